"""Training steps per second on this CPU: the same step under each speed setting, so what each one gives is measured.

    python -m benchmarks.train_speed --out results/train_speed.json

Workloads (batch 128 of real Fashion-MNIST training images, one Adam step each):
  classifier   cross-entropy step of classifier A
  pgd-at       PGD-10 adversarial training step of classifier A (10 attack steps + one training step)
  puvae        the PuVAE step of the shipped design's CVAE, classifier A as the frozen CE source

Settings: ``fp32`` (contiguous tensors), ``channels_last`` (the models in NHWC, what training uses),
``bf16`` (``torch.autocast("cpu", torch.bfloat16)`` around forward and loss), ``channels_last+bf16``,
``compile`` (``torch.compile`` of the models, channels_last) and ``threads=1`` (channels_last, one intra-op thread).
Each setting gets warm-up steps (compilation included), then ``--reps`` timed blocks of ``--steps`` steps run in
rounds, one block per setting per round; the median block gives steps/s. The bf16 rows also give the loss after the
timed steps beside the others' from the same start, batch, dropout masks and noise (the global generator is
seeded per step): a first look at whether a setting moves results.
"""
from __future__ import annotations

import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import click
import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]

from purifier import designs  # noqa: E402
from purifier.attacks import PGD  # noqa: E402
from purifier.data import load_dataset  # noqa: E402
from purifier.losses import PuVAELoss  # noqa: E402
from purifier.models.classifiers import Classifier, ClassifierConfig  # noqa: E402
from purifier.provenance import cpu_model, git_commit  # noqa: E402

from benchmarks.results import markdown_table, write_results  # noqa: E402  (benchmarks/results.py)

SETTINGS = ("fp32", "channels_last", "bf16", "channels_last+bf16", "compile", "threads=1")


def workload(name: str, setting: str, x: torch.Tensor, y: torch.Tensor):
    """A zero-argument step function (returns the loss) for workload ``name`` under ``setting``."""
    torch.manual_seed(0)
    clf = Classifier(ClassifierConfig("a"))
    nhwc = setting != "fp32" and setting != "bf16"
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    cast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if "bf16" in setting else nullcontext
    if name in ("classifier", "pgd-at"):
        model = clf.to(memory_format=fmt)
        params = model.parameters()
    else:
        source = clf.eval().to(memory_format=fmt)
        for p in source.parameters():
            p.requires_grad_(False)
        design = designs.get("puvae")
        model = designs.build_model(design, "fashion-mnist", (1, 28, 28), 10).to(memory_format=fmt)
        loss = PuVAELoss(**{**design.loss, "tc_dataset_size": 55000})
        params = model.parameters()
    run = torch.compile(model) if setting == "compile" else model
    opt = torch.optim.Adam(params, lr=1e-3)
    pgd = PGD(eps=0.1, steps=10, best_iterate=False)
    gen = torch.Generator().manual_seed(1)
    xb = x.contiguous(memory_format=fmt)
    count = [0]

    def step():
        count[0] += 1
        torch.manual_seed(count[0])  # the same dropout masks and noise at step k under every setting
        if name == "pgd-at":
            model.eval()
            with cast():
                xa = pgd(run, xb, y, generator=gen)
            model.train()
        else:
            xa = xb
        with cast():
            if name == "puvae":
                terms = loss(run, source, xa, y)
                total = terms["loss"]
            else:
                total = F.cross_entropy(run(xa).float(), y)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        return float(total.detach())

    return step


def measure(name: str, x, y, steps: int, reps: int, warmup: int) -> dict:
    steps_fns, losses, times = {}, {}, {s: [] for s in SETTINGS}
    for s in SETTINGS:
        if s == "threads=1":
            continue
        steps_fns[s] = workload(name, s, x, y)
        for _ in range(warmup):
            steps_fns[s]()
    steps_fns["threads=1"] = workload(name, "channels_last", x, y)
    for _ in range(warmup):
        steps_fns["threads=1"]()
    threads = torch.get_num_threads()
    for _ in range(reps):
        for s, fn in steps_fns.items():
            torch.set_num_threads(1 if s == "threads=1" else threads)
            t0 = time.perf_counter()
            for _ in range(steps):
                losses[s] = fn()
            times[s].append(time.perf_counter() - t0)
    torch.set_num_threads(threads)
    rows = {}
    base = steps / statistics.median(times["channels_last"])
    for s in SETTINGS:
        sps = steps / statistics.median(times[s])
        rows[s] = {"steps_per_s": sps, "vs_channels_last": sps / base, "block_seconds": times[s],
                   "loss_after": losses[s]}
    return rows


@click.command()
@click.option("--out", type=click.Path(), default="results/train_speed.json", show_default=True)
@click.option("--steps", default=10, show_default=True, help="Steps per timed block (pgd-at: a fifth of it, at least 2).")
@click.option("--reps", default=3, show_default=True, help="Timed blocks per setting (median reported).")
@click.option("--warmup", default=3, show_default=True, help="Untimed steps per setting first (compiles).")
def main(out, steps, reps, warmup):
    ds = load_dataset("fashion-mnist", "train")
    x, y = torch.from_numpy(ds.x[:128]), torch.from_numpy(ds.y[:128])
    results = {}
    for name in ("classifier", "pgd-at", "puvae"):
        n = max(2, steps // 5) if name == "pgd-at" else steps
        click.echo(f"{name} ...", err=True)
        results[name] = measure(name, x, y, n, reps, warmup)
    report = {"command": " ".join(["python", "-m", "benchmarks.train_speed", *sys.argv[1:]]), "commit": git_commit(ROOT),
              "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "batch_size": 128,
              "steps": steps, "reps": reps, "warmup": warmup, "results": results}
    table = markdown_table(
        ["workload", *SETTINGS],
        [[w, *(f"{r[s]['steps_per_s']:.2f} ({r[s]['vs_channels_last']:.2f}x)" for s in SETTINGS)]
         for w, r in results.items()])
    losses = markdown_table(["workload", *SETTINGS], [[w, *(f"{r[s]['loss_after']:.4f}" for s in SETTINGS)]
                                                     for w, r in results.items()])
    write_results(out, report, "# Training steps per second (batch 128; in brackets: against channels_last)",
                  f"{table}\n\nCPU {report['cpu']} ({report['cpu_capability']}), {report['threads']} threads, "
                  f"torch {report['torch']}.\n\nLoss after the timed steps (same start and batch per workload):\n\n"
                  f"{losses}")
    click.echo(table)


if __name__ == "__main__":
    main()
