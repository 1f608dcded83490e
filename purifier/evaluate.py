"""Clean-data evaluation of a classifier alone and behind the purifier, per selection rule and per class."""
from __future__ import annotations

import time

import torch
from torch import nn

from .designs import purifier_from_spec
from .models.cvae import CVAE
from .pipeline import Purifier, purify
from .train import predict


def _rate(a: torch.Tensor) -> float:
    return float(a.float().mean()) if len(a) else float("nan")


def evaluate(classifier: nn.Module, cvae: CVAE, x: torch.Tensor, y: torch.Tensor,
             selections=("mse", "likelihood"), class_names=None, batch_size: int = 500,
             candidates: int | None = None, prior: nn.Module | None = None) -> dict:
    """Accuracy of ``classifier`` on x, and of classifier(purifier(x)) for each selection rule.

    A rule is ``mse``, ``likelihood``, ``iwae`` or ``design``: the purifier the model's checkpoint records
    (analysis by synthesis, say). For each rule: ``accuracy`` (purified prediction = label), ``argmin_acc`` (chosen class = label),
    ``pred_eq_argmin`` (purified prediction = chosen class), all per class too, and seconds taken.
    ``candidates`` = k: every purifier reconstructs only the k classes ``classifier`` ranks highest on the raw
    input (``Purifier(candidates=k)``). ``prior``: the prior classifier of a recorded purifier with
    ``prior_weight`` (``designs.load_prior``), for the ``design`` rule.
    """
    classifier.eval()
    cvae.eval()
    names = list(class_names) if class_names is not None else [str(i) for i in range(cvae.cfg.num_classes)]
    start = time.perf_counter()
    clean_pred = predict(classifier, x)
    report = {"n": len(y), "candidates": candidates, "classifier": {"accuracy": _rate(clean_pred == y),
                                          "seconds": time.perf_counter() - start}, "selections": {}}
    for selection in selections:
        start = time.perf_counter()
        if selection == "design":
            spec = dict(getattr(cvae, "meta", {}).get("purifier") or {"selection": "mse"})
            if candidates is not None:
                spec["candidates"] = candidates
            purifier = purifier_from_spec(cvae, spec, ranker=classifier, prior=prior)
        else:
            purifier = Purifier(cvae, selection, candidates=candidates, ranker=classifier)
        out = purify(purifier, x, batch_size)
        pred = predict(classifier, out["purified"])
        chosen = out["chosen_class"]
        per_class = {}
        for k, name in enumerate(names):
            m = y == k
            per_class[name] = {"n": int(m.sum()), "accuracy": _rate(pred[m] == k), "argmin_acc": _rate(chosen[m] == k),
                               "classifier_accuracy": _rate(clean_pred[m] == k)}
        report["selections"][selection] = {
            "accuracy": _rate(pred == y), "argmin_acc": _rate(chosen == y), "pred_eq_argmin": _rate(pred == chosen),
            "per_class": per_class, "seconds": time.perf_counter() - start,
        }
    return report
