"""The one-command demo: attack the shipped model and purify through onnxruntime.

Adversarial examples are crafted in torch (gradients are needed); purification and classification of every
row run on the exported ``pipeline.onnx`` through the torch-free runtime, as a deployment would.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from serve.runtime import OnnxPurifier

from . import checkpoint, registry
from .attacks import PGD, selection_loss
from .data import load_dataset
from .designs import load_purifier
from .pipeline import PurifiedClassifier
from .provenance import cpu_model, git_commit
from .train import predict

# row -> (what the attacker does, PurifiedClassifier grad mode or None for the bare classifier, objective)
THREATS = (
    ("oblivious", "classifier only, then purified", None, "ce"),
    ("bpda", "whole pipeline, purifier as identity in the backward pass", "bpda", "ce"),
    ("full-gradient", "whole pipeline, through the chosen class's encoder and decoder", "full", "ce"),
    ("selection", "the purifier's argmin: raise the true class's error above the best wrong class's", "none",
     "selection"),
)
ADAPTIVE = ("bpda", "full-gradient", "selection")
# the rows of the report's ``grid``, top to bottom: one example per class each
GRID_ROWS = ("clean", "adversarial (BPDA)", "purified")
# what a model directory must hold for the demo: file -> (checkpoint family or None, what writes it)
NEEDS = {
    "cvae.json": ("cvae", "the purifier; purifier train --out DIR writes it"),
    "classifier.json": ("classifier", "the classifier it defends; purifier train writes it beside cvae.json"),
    "pipeline.onnx": (None, "purifier + classifier for onnxruntime; purifier export DIR --out DIR writes it"),
}


def check_model_dir(model: str | Path) -> Path:
    """A shipped model name or a model directory -> its path, once it holds what the demo needs.

    Raises ``FileNotFoundError`` naming each missing file and what writes it, ``ValueError`` for a record of the
    wrong kind.
    """
    path = registry.resolve(model)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory: the demo takes a model directory (cvae.json, "
                                f"classifier.json, pipeline.onnx) or a shipped model name ({registry.known()})")
    missing = [name for name in NEEDS if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path} has " + ", ".join(f"no {m} ({NEEDS[m][1]})" for m in missing) + ". Pass a model directory "
            f"holding cvae.json, classifier.json and pipeline.onnx, or a shipped model name ({registry.known()})")
    for name, (family, _) in NEEDS.items():
        if family is not None:
            kind = checkpoint.read_record(path / name)["kind"]
            if kind not in checkpoint.FAMILIES[family]:
                raise ValueError(f"{path / name} holds a {kind!r}, the demo needs a {family!r} there")
    return path


def run_demo(model_dir: str | Path, n: int = 1000, eps: float = 0.1, steps: int = 40, seed: int = 0,
             batch_size: int = 250, on_progress=None) -> dict:
    """Returns a report (settings and one row per threat model) and ``grid`` rows for an image (``GRID_ROWS``).

    ``model_dir``: a model directory or a shipped model name (``purifier.registry``).

    Each row: accuracy of the bare classifier on that row's inputs, accuracy of the ONNX pipeline
    (purified), its rejection rate, and the defended rate (correct or rejected).
    """
    requested, model_dir = str(model_dir), check_model_dir(model_dir)
    cvae = checkpoint.load(model_dir / "cvae", expect="cvae")
    classifier = checkpoint.load(model_dir / "classifier", expect="classifier")
    runtime = OnnxPurifier(model_dir / "pipeline.onnx")
    ds = load_dataset(cvae.meta.get("dataset", "fashion-mnist"), "test")
    x, y = torch.from_numpy(ds.x[:n]), torch.from_numpy(ds.y[:n])
    attack = PGD(eps=eps, steps=steps, seed=seed)
    purifier = load_purifier(model_dir / "cvae")  # the rule pipeline.onnx runs (a robust prior included)

    outcomes = {}

    def score(inputs: torch.Tensor, name: str, threat: str, seconds: float) -> dict:
        bare = predict(classifier, inputs, batch_size)
        out = runtime(inputs.numpy())
        correct = out["predicted_class"] == y.numpy()
        outcomes[name] = (correct, out["rejected"], bare == y)
        return {"row": name, "attacker": threat, "classifier_accuracy": float((bare == y).float().mean()),
                "purified_accuracy": float(correct.mean()), "rejected": float(out["rejected"].mean()),
                "defended": float((correct | out["rejected"]).mean()), "attack_seconds": seconds}

    rows = [score(x, "clean", "none", 0.0)]
    advs = {}
    for name, threat, grad, objective in THREATS:
        model = classifier if grad is None else PurifiedClassifier(classifier, purifier, grad=grad)
        loss = selection_loss(purifier) if objective == "selection" else None
        start = time.perf_counter()
        adv = torch.cat([attack(model, x[i:i + batch_size], y[i:i + batch_size], loss)
                         for i in range(0, n, batch_size)])
        advs[name] = adv
        rows.append(score(adv, name, threat, time.perf_counter() - start))
        if on_progress is not None:
            on_progress(name)
    # per image, the worst case over the attacks that know the defense
    correct = np.logical_and.reduce([outcomes[a][0] for a in ADAPTIVE])
    defended = np.logical_and.reduce([outcomes[a][0] | outcomes[a][1] for a in ADAPTIVE])
    rows.append({"row": "adaptive worst", "attacker": "per image, the worst of " + ", ".join(ADAPTIVE),
                 "classifier_accuracy": float(np.logical_and.reduce([outcomes[a][2].numpy() for a in ADAPTIVE]).mean()),
                 "purified_accuracy": float(correct.mean()),
                 "rejected": float(np.logical_or.reduce([outcomes[a][1] for a in ADAPTIVE]).mean()),
                 "defended": float(defended.mean()),
                 "attack_seconds": sum(r["attack_seconds"] for r in rows if r["row"] in ADAPTIVE)})
    # one example per class (GRID_ROWS): clean, BPDA-adversarial, and its purified version (from the ONNX runtime)
    picks = [int(np.flatnonzero(ds.y[:n] == k)[0]) for k in range(ds.num_classes) if (ds.y[:n] == k).any()]
    grid = [x[picks].numpy(), advs["bpda"][picks].numpy(), runtime(advs["bpda"][picks].numpy())["purified"]]
    import onnxruntime

    return {"settings": {"n": n, "dataset": ds.name, "split": "test (first n images)", "attack": attack.to_dict(),
                         "model": requested, "runtime_providers": runtime.providers,
                         "rejection_threshold": runtime.threshold, "commit": git_commit(model_dir),
                         "cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                         "onnxruntime": onnxruntime.__version__},
            "rows": rows, "grid": grid}


def format_table(report: dict) -> str:
    s = report["settings"]
    a = s["attack"]
    lines = [f"{s['dataset']} {s['split']}, n = {s['n']}; attack: PGD-Linf eps {a['eps']}, {a['steps']} steps, "
             f"step {a['alpha']:.4g}, random start, seed {a['seed']}, 1 restart; purified by onnxruntime "
             f"({', '.join(s['runtime_providers'])})",
             f"{'inputs':<16}{'classifier alone':>17}{'purified':>10}{'rejected':>10}{'defended':>10}{'attack s':>10}"]
    for r in report["rows"]:
        lines.append(f"{r['row']:<16}{r['classifier_accuracy']:>17.3f}{r['purified_accuracy']:>10.3f}"
                     f"{r['rejected']:>10.3f}{r['defended']:>10.3f}{r['attack_seconds']:>10.1f}")
    lines.append("defended = purified correctly or rejected (best reconstruction error above the threshold); "
                 "adaptive worst: an image counts only if it survives every adaptive attack.")
    return "\n".join(lines)
