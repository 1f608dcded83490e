"""Whether bf16 training moves results: the same short training runs in fp32 with two seeds (how far results move
by chance) and under bf16 autocast with the first seed, through the training functions the command line calls.

    python -m benchmarks.precision_check --out results/precision-check.json

Workloads (real Fashion-MNIST, the 55,000 / 5,000 split of ``purifier train``, classifier A):
  classifier   plain cross-entropy training, ``--classifier-epochs`` epochs; validation accuracy (5,000)
  pgd-at       PGD-10 adversarial training at eps 0.1 for one epoch on the first ``--pgd-n`` training images;
               validation accuracy and PGD-20 robust accuracy on the first 1,000 validation images
  puvae        the PuVAE stage (default design) with the plain model's classifier A as the frozen CE source,
               ``--puvae-epochs`` epochs; validation rate at which the MSE rule selects the true class
bf16 keeps what it measures when its difference from the fp32 seed-0 run is within the seed-to-seed difference.
Validation always runs in fp32. Seconds are the training loops' own, on this machine's threads.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click
import torch

ROOT = Path(__file__).resolve().parents[1]

from purifier import checkpoint, designs  # noqa: E402
from purifier.config import AdversarialTraining, TrainConfig  # noqa: E402
from purifier.data import load_dataset  # noqa: E402
from purifier.fitting import split  # noqa: E402
from purifier.losses import PuVAELoss  # noqa: E402
from purifier.models.classifiers import Classifier, ClassifierConfig  # noqa: E402
from purifier.provenance import cpu_model, git_commit  # noqa: E402
from purifier.train import native_bf16, seed_everything, train_classifier, train_cvae  # noqa: E402

from benchmarks.results import markdown_table, write_results  # noqa: E402

RUNS = (("fp32", 0), ("fp32", 1), ("bf16", 0))
METRICS = {"classifier": ("val_acc",), "pgd-at": ("val_acc", "val_robust"), "puvae": ("val_argmin_acc",)}


def run(name: str, precision: str, seed: int, data, settings: dict) -> dict:
    x, y, xv, yv = data
    seed_everything(seed)
    start = time.perf_counter()
    if name == "puvae":
        design = designs.get("puvae")
        cvae = designs.build_model(design, "fashion-mnist", (1, 28, 28), 10)
        source = checkpoint.load(ROOT / settings["source"], expect="classifier")
        loss = PuVAELoss(**{**design.loss, "tc_dataset_size": len(x)})
        cfg = TrainConfig(epochs=settings["puvae_epochs"], seed=seed, precision=precision)
        history = train_cvae(cvae, source, x, y, xv, yv, cfg, loss)
    else:
        model = Classifier(ClassifierConfig("a"))
        adv = None
        epochs = settings["classifier_epochs"]
        if name == "pgd-at":
            adv = AdversarialTraining("pgd", eps=0.1, steps=10, val_n=1000)
            x, y, epochs = x[:settings["pgd_n"]], y[:settings["pgd_n"]], 1
        cfg = TrainConfig(epochs=epochs, seed=seed, precision=precision)
        history = train_classifier(model, x, y, xv, yv, cfg, adversarial=adv)
    last = history[-1]
    return {"precision": precision, "seed": seed, **{m: last[m] for m in METRICS[name]},
            "train_seconds": sum(h["seconds"] for h in history), "seconds": time.perf_counter() - start}


def verdict(rows: list[dict], metric: str) -> dict:
    fp0, fp1, bf = (next(r[metric] for r in rows if (r["precision"], r["seed"]) == key) for key in RUNS)
    return {"seed_difference": abs(fp1 - fp0), "bf16_difference": abs(bf - fp0),
            "within_seed_noise": abs(bf - fp0) <= abs(fp1 - fp0)}


@click.command()
@click.option("--out", type=click.Path(), default="results/precision-check.json", show_default=True)
@click.option("--classifier-epochs", default=2, show_default=True)
@click.option("--pgd-n", default=20000, show_default=True, help="Training images of the one PGD-AT epoch.")
@click.option("--puvae-epochs", default=1, show_default=True)
@click.option("--source", default="models/fashion-mnist-plain/classifier", show_default=True,
              help="The PuVAE workload's frozen CE source.")
def main(out, classifier_epochs, pgd_n, puvae_epochs, source):
    data = split(load_dataset("fashion-mnist", "train"), "auto", 0)
    settings = {"classifier_epochs": classifier_epochs, "pgd_n": pgd_n, "puvae_epochs": puvae_epochs,
                "source": source}
    results = {}
    for name in METRICS:
        rows = []
        for precision, seed in RUNS:
            click.echo(f"{name} {precision} seed {seed} ...", err=True)
            rows.append(run(name, precision, seed, data, settings))
        results[name] = {"runs": rows, "verdict": {m: verdict(rows, m) for m in METRICS[name]}}
    report = {"command": " ".join(["python", "-m", "benchmarks.precision_check", *sys.argv[1:]]),
              "commit": git_commit(ROOT), "cpu": cpu_model(), "native_bf16": native_bf16(),
              "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "torch": torch.__version__,
              "settings": settings,
              "results": results}
    write_results(out, report, "# bf16 training against fp32: do results move?", render(report))


def render(report: dict) -> str:
    rows = []
    for name, res in report["results"].items():
        by = {(r["precision"], r["seed"]): r for r in res["runs"]}
        for metric, v in res["verdict"].items():
            rows.append([name, metric, *(f"{by[k][metric]:.4f}" for k in RUNS), f"{v['seed_difference']:.4f}",
                         f"{v['bf16_difference']:.4f}", "yes" if v["within_seed_noise"] else "no"])
        rows.append([name, "training s", *(f"{by[k]['train_seconds']:.0f}" for k in RUNS), "", "", ""])
    s = report["settings"]
    return (f"CPU {report['cpu']} (native bf16: {'yes' if report['native_bf16'] else 'no'}), "
            f"{report['threads']} threads, load average {', '.join(f'{v:.1f}' for v in report['load_average'])} at "
            f"the end (1, 5, 15 min; training seconds are only comparable within one run), torch {report['torch']}. "
            f"classifier: {s['classifier_epochs']} epochs; "
            f"pgd-at: 1 epoch of PGD-10 (eps 0.1) on {s['pgd_n']} images, PGD-20 on 1,000 validation images; "
            f"puvae: {s['puvae_epochs']} epoch(s), CE source {s['source']}.\n\n"
            + markdown_table(["workload", "metric", "fp32 seed 0", "fp32 seed 1", "bf16 seed 0",
                              "seed difference", "bf16 difference", "bf16 within seed noise"], rows))


if __name__ == "__main__":
    main()
