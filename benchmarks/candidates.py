"""The candidate mode's trade-off: reconstruct only the k classes a ranking classifier ranks highest on the raw
input (``Purifier(candidates=k, ranker=...)``), against the full purifier (k = K), on a model directory whose
purifier is built as its checkpoint says (rule, robust prior). ``--ranker classifier``: the target classifier ranks;
``--ranker prior``: the directory's robust prior does (a model with a prior only).

    python -m benchmarks.candidates --out results/candidates.json
    python -m benchmarks.candidates --ranker prior --out results/candidates-prior.json

Per k in ``--ks`` (k = K is the full purifier):
  clean    accuracy of classifier(purifier(x)) on the first ``--clean-n`` test images (all 10,000 by default), and
           how often the true class is among the k candidates (the ranker's top-k accuracy);
  robust   adaptive robust accuracy on the first ``--n`` test images, L-infinity ``--eps``, PGD (step
           2.5 * eps / steps, random start, seeded), per-example worst case with early exit over the benchmark
           protocol's attacks on the whole pipeline (``purifier_attacks``: selection, full gradient, BPDA, softmin,
           targeted selection and logits toward ``--targeted`` runner-ups) and, for k < K, first the
           candidate-exclusion attack (push the true class out of the ranking; ``candidate_exclusion_objective``);
  speed    images/s of the pipeline (ranking + k reconstructions + classifier) in torch eager and in onnxruntime
           (the candidate purifier exported with ``export_onnx``, parity-checked; CPU provider), batch 256 and 1,
           timed in interleaved rounds, median of ``--reps``.
Each section is cached in ``--work`` (``--section`` computes one and stops, so the timing can run on its own).
"""
from __future__ import annotations

import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import click
import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]

from export.onnx_export import export_onnx  # noqa: E402
from purifier import __version__, checkpoint  # noqa: E402
from purifier.attacks import PGD  # noqa: E402
from purifier.data import load_dataset  # noqa: E402
from purifier.designs import load_prior, purifier_from_spec  # noqa: E402
from purifier.pipeline import PurifiedClassifier, Purifier, purify  # noqa: E402
from purifier.provenance import cpu_model, git_commit  # noqa: E402
from purifier.robust import chunked, purifier_attacks, worst_case  # noqa: E402

from serve.models import MODELS  # noqa: E402
from benchmarks.results import cached, markdown_table, model_weights, weights_work, write_results  # noqa: E402
from benchmarks.scaling import parse_ints, session  # noqa: E402  (benchmarks/scaling.py)
from benchmarks.speed import time_interleaved  # noqa: E402  (benchmarks/speed.py)

SECTIONS = ("clean", "robust", "speed")
RANKERS = {"classifier": "the target classifier (MODEL/classifier)", "prior": "the robust prior (MODEL/prior)"}
SPEED_BATCHES = {256: 1024, 1: 64}  # batch size -> images per repetition


class Model(NamedTuple):
    """A model directory's purifier parts: the CVAE, its purifier spec, its robust prior (or None) and the
    classifier that ranks the candidates."""
    cvae: torch.nn.Module
    spec: dict | None
    prior: torch.nn.Module | None
    ranker: torch.nn.Module


def purifier_for(model: Model, k: int) -> Purifier:
    """k = K: the model directory's purifier as its checkpoint describes it (rule, robust prior); else the same
    purifier reconstructing only the k classes ``model.ranker`` ranks highest."""
    spec = dict(model.spec or {"selection": "mse"})
    if k < model.cvae.cfg.num_classes:
        spec["candidates"] = k
    return purifier_from_spec(model.cvae, spec, ranker=model.ranker if "candidates" in spec else None,
                              prior=model.prior).eval()


def clean(model, classifier, ks, x: torch.Tensor, y: torch.Tensor) -> dict:
    with torch.no_grad():
        logits = torch.cat([classifier(x[i:i + 500]) for i in range(0, len(x), 500)])
        ranks = torch.cat([model.ranker(x[i:i + 500]) for i in range(0, len(x), 500)])
    out = {"n": len(y), "classifier_alone": float((logits.argmax(1) == y).float().mean()), "k": {}}
    for k in ks:
        p = purify(purifier_for(model, k), x)
        with torch.no_grad():
            pred = torch.cat([classifier(p["purified"][i:i + 500]).argmax(1) for i in range(0, len(x), 500)])
        in_top = (ranks.topk(k, dim=1).indices == y[:, None]).any(1)
        out["k"][str(k)] = {"accuracy": float((pred == y).float().mean()),
                            "chosen_is_label": float((p["chosen_class"] == y).float().mean()),
                            "label_in_candidates": float(in_top.float().mean())}
    return out


def robust(model, classifier, ks, x, y, eps, steps, restarts, targeted, seed, batch_size) -> dict:
    pgd = PGD(eps=eps, steps=steps, seed=seed)
    out = {"n": len(y), "eps": eps, "norm": "Linf", "steps": steps, "alpha": pgd.step_size, "restarts": restarts,
           "random_start": True, "seed": seed, "targeted_runner_ups": targeted, "k": {}}
    for k in ks:
        purifier = purifier_for(model, k)

        def holds(a, b, purifier=purifier):
            with torch.no_grad():
                return classifier(purifier(a)["purified"]).argmax(1) == b

        attacks = purifier_attacks(classifier, purifier, pgd, restarts, targeted=targeted)
        r = worst_case(attacks, holds, x, y, batch_size)
        out["k"][str(k)] = {"robust_accuracy": r["accuracy"], "clean_accuracy": float(
            chunked(holds, x, y, batch_size).float().mean()), "attacks": [a.name for a in attacks],
            "steps": r["steps"], "broken_by": {a.name: r["broken_by"].count(a.name) for a in attacks}}
    return out


def speed(model, classifier, ks, x: np.ndarray, reps: int) -> dict:
    torch_fns, ort_fns = {}, {}
    tmp = tempfile.TemporaryDirectory()
    for k in ks:
        purifier = purifier_for(model, k)
        pipe = PurifiedClassifier(classifier, purifier, grad="none").eval()
        torch_fns[str(k)] = lambda a, pipe=pipe: pipe(torch.from_numpy(a))
        path = Path(tmp.name) / f"pipeline-k{k}.onnx"
        export_onnx(path, purifier, classifier)
        s = session(path)
        ort_fns[str(k)] = lambda a, s=s: s.run(["logits"], {"x": a})
    out = {"provider": s.get_providers(), "torch_threads": torch.get_num_threads(),
           "onnxruntime_threads": "default (intra_op_num_threads = 0: one per physical core)",
           "load_average_at_start": os.getloadavg(), "batches": {}}
    with torch.no_grad():
        for b, n in SPEED_BATCHES.items():
            out["batches"][str(b)] = {"torch": time_interleaved(torch_fns, x[:n], b, reps),
                                      "onnxruntime": time_interleaved(ort_fns, x[:n], b, reps)}
    out["load_average_at_end"] = os.getloadavg()
    tmp.cleanup()
    return out


def tables(report: dict) -> str:
    c, r, s = report["clean"], report["robust"], report["speed"]
    num_classes = report["num_classes"]
    head = ["k (classes reconstructed)", f"clean accuracy ({c['n']:,} test images)", "true class in candidates",
            f"adaptive robust accuracy (first {r['n']}, eps {r['eps']})",
            f"images broken by candidate exclusion (of {r['n']})",
            "torch images/s (batch 256)", "onnxruntime images/s (batch 256)", "onnxruntime images/s (batch 1)",
            "onnxruntime speed-up vs k = K (batch 256)"]
    full_ort = s["batches"]["256"]["onnxruntime"][str(num_classes)]["images_per_s"]
    rows = []
    for k in report["ks"]:
        kk = str(k)
        ort256 = s["batches"]["256"]["onnxruntime"][kk]["images_per_s"]
        rows.append([f"{k}" + (" (full purifier)" if k == num_classes else ""), f"{100 * c['k'][kk]['accuracy']:.2f}%",
                     f"{100 * c['k'][kk]['label_in_candidates']:.2f}%",
                     f"{100 * r['k'][kk]['robust_accuracy']:.1f}%",
                     str(r["k"][kk]["broken_by"].get("candidate exclusion", "-")),
                     f"{s['batches']['256']['torch'][kk]['images_per_s']:.0f}", f"{ort256:.0f}",
                     f"{s['batches']['1']['onnxruntime'][kk]['images_per_s']:.0f}", f"{ort256 / full_ort:.2f}x"])
    load = ", ".join(f"{v:.2f}" for v in s["load_average_at_end"])
    return (f"Classifier alone: {100 * c['classifier_alone']:.2f}% clean. Robust: L-inf eps {r['eps']}, "
            f"PGD-{r['steps']} "
            f"(step {r['alpha']:.4f}, random start, {r['restarts']} restart, seed {r['seed']}); attacks, per-example "
            f"worst case with early exit: {', '.join(r['k'][str(report['ks'][0])]['attacks'])} (candidate exclusion "
            f"only for k < {num_classes}). Speed: {s['provider'][0]}, default threads, torch {s['torch_threads']} "
            f"threads, median of {report['settings']['reps']} interleaved rounds, load average {load} at the end.\n\n"
            + markdown_table(head, rows))


@click.command()
@click.option("--model", "model_dir", default=str(MODELS["fashion-mnist"].path), show_default=True)
@click.option("--ranker", type=click.Choice(RANKERS), default="classifier", show_default=True,
              help="Who ranks the candidates: the target classifier, or the model directory's robust prior.")
@click.option("--ks", default="2,3,5,10", show_default=True, help="Candidate counts k (k = K: the full purifier).")
@click.option("--n", default=200, show_default=True, help="Robust accuracy on the first N test images.")
@click.option("--clean-n", default=10_000, show_default=True, help="Clean accuracy on the first N test images.")
@click.option("--eps", default=0.1, show_default=True)
@click.option("--steps", default=20, show_default=True, help="PGD steps per attack (step 2.5 * eps / steps).")
@click.option("--restarts", default=1, show_default=True)
@click.option("--targeted", default=3, show_default=True, help="Runner-up classes of the targeted attacks.")
@click.option("--seed", default=0, show_default=True)
@click.option("--reps", default=5, show_default=True)
@click.option("--batch-size", default=100, show_default=True, help="Attack batch size.")
@click.option("--section", type=click.Choice(SECTIONS), help="Compute (and cache) this section only, write nothing.")
@click.option("--work", type=click.Path(file_okay=False),
              help="Cache each section here (default: results/.candidates-work next to --out), in a folder per set "
                   "of weights.")
@click.option("--out", default=str(ROOT / "results" / "candidates.json"), show_default=True)
def main(model_dir, ranker, ks, n, clean_n, eps, steps, restarts, targeted, seed, reps, batch_size, section, work, out):
    model_dir = Path(model_dir)
    cvae = checkpoint.load(model_dir / "cvae", expect="cvae").eval()
    spec = cvae.meta.get("purifier")
    prior = load_prior(model_dir / "cvae", spec)
    classifier = checkpoint.load(model_dir / "classifier", expect="classifier").eval()
    if ranker == "prior" and prior is None:
        raise click.BadParameter(f"{model_dir} has no robust prior (its purifier spec is {spec}); rank with the "
                                 f"classifier or attach one (purifier attach-prior)", param_hint="--ranker")
    model = Model(cvae, spec, prior, prior if ranker == "prior" else classifier)
    num_classes = cvae.cfg.num_classes
    ks = parse_ints(ks, "--ks")
    if max(ks) > num_classes:
        raise click.BadParameter(f"k must be at most {num_classes} (the model's classes), got {max(ks)}",
                                 param_hint="--ks")
    test = load_dataset("fashion-mnist", "test")
    weights = model_weights(model_dir)
    if spec:  # the rule measured: two directories may share a CVAE and differ in their rule, prior or its weight
        weights["purifier"] = spec
    if prior is not None:
        weights["prior"] = checkpoint.read_record(model_dir / "prior")["weights_sha256"]
    if ranker != "classifier":
        weights["ranker"] = ranker
    work = weights_work(work or Path(out).parent / f".{Path(out).stem}-work", weights)
    say = lambda msg: click.echo(msg, err=True)  # noqa: E731
    tag = "-".join(map(str, ks))
    jobs = {
        "clean": (f"clean-{tag}-{clean_n}", lambda: clean(model, classifier, ks, torch.from_numpy(test.x[:clean_n]),
                                                         torch.from_numpy(test.y[:clean_n]))),
        "robust": (f"robust-{tag}-{n}-{eps}-{steps}-{restarts}-{targeted}-{seed}",
                   lambda: robust(model, classifier, ks, torch.from_numpy(test.x[:n]), torch.from_numpy(test.y[:n]),
                                  eps, steps, restarts, targeted, seed, batch_size)),
        "speed": (f"speed-{tag}-{reps}", lambda: speed(model, classifier, ks, test.x, reps)),
    }
    if section:
        cached(work, *jobs[section], say)
        return
    report = {
        "command": shlex.join(["python", "-m", "benchmarks.candidates", *sys.argv[1:]]), "commit": git_commit(ROOT),
        "model": str(model_dir), "checkpoints": weights,
        "num_classes": num_classes, "ks": ks,
        "ranker": RANKERS[ranker],
        "settings": {"reps": reps, "speed_images_per_rep": SPEED_BATCHES, "attack_batch_size": batch_size},
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
        "versions": {"purifier": __version__, "torch": torch.__version__, "onnxruntime": ort.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        **{name: cached(work, key, fn, say) for name, (key, fn) in jobs.items()},
    }
    text = tables(report)
    write_results(out, report, f"Candidate mode: reconstruct only the k classes {RANKERS[ranker]} ranks highest "
                               f"(Fashion-MNIST, {model_dir}; {report['machine']['cpu']}, "
                               f"{report['machine']['cores']} cores)", text)
    click.echo(text)


if __name__ == "__main__":
    main()
