"""The protocol's sanity checks (../shared/BENCHMARK_PROTOCOL.md), one set for every benchmark script.

A result that fails one is flagged in its report, not published as robustness. ``defense_checks`` runs the set on
one defense; each check is ``{name: {"pass": bool, ...values}}`` so a report lists them as they are.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from purifier.pipeline import PurifiedClassifier
from purifier.robust import worst_case


def se(p: float, n: int) -> float:
    """Binomial standard error; the noise allowance of the sanity checks is two of these (at least 1/n)."""
    return math.sqrt(max(p * (1 - p), 1.0 / n) / n)


def gradient_checks(objectives: dict, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Sanity check: the gradient of each attack objective is non-zero on at least 99% of the images."""
    checks = {}
    for name, obj in objectives.items():
        a = x.clone().requires_grad_(True)
        value, _ = obj(a, y)
        g, = torch.autograd.grad(value, a)
        frac = float((g.flatten(1).abs().sum(1) > 0).float().mean())
        checks[f"gradient not zero: {name}"] = {"pass": frac >= 0.99, "value": frac}
    return checks


def monotone_check(accs: list) -> dict:
    """Robust accuracy does not rise with eps beyond noise; ``accs`` is [(eps, accuracy, n)] in rising eps."""
    rises = [(a, b) for a, b in zip(accs, accs[1:]) if b[1] > a[1] + 2 * se(a[1], a[2])]
    return {"pass": not rises, "values": [list(a) for a in accs]}


def art_bridge_check(clf, pur, estimator, x: torch.Tensor, y: torch.Tensor) -> dict:
    """ART's estimator (``purifier.art_bridge``, BPDA) predicts what the pipeline predicts and passes the BPDA
    gradient, so the ART attacks measure this pipeline."""
    with torch.no_grad():
        ours = clf(pur(x)["purified"]).numpy()
    diff = float(np.abs(estimator.predict(x.numpy()) - ours).max())
    g_art = estimator.loss_gradient(x.numpy(), np.eye(ours.shape[1], dtype=np.float32)[y.numpy()])
    a = x.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(PurifiedClassifier(clf, pur, "bpda")(a), y).backward()
    g = a.grad.numpy()
    cos = float(np.dot(g_art.ravel(), g.ravel()) / (np.linalg.norm(g_art) * np.linalg.norm(g) + 1e-12))
    return {"pass": diff < 1e-4 and cos > 0.999, "max_logit_diff": diff, "bpda_gradient_cosine": cos}


def defense_checks(attacks: Callable, holds: Callable, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                   sanity_steps: tuple, batch_size: int, by_eps: list, oblivious: dict, objectives: dict,
                   x_grad: torch.Tensor, y_grad: torch.Tensor, purifier=None, art=None, more_steps: bool = True,
                   suffix: str = "") -> dict:
    """The protocol's sanity checks on one defense, on the images ``x, y``.

    ``attacks(eps, restarts, steps=None)`` builds the defense's adaptive attacks and ``holds(x, y)`` judges them;
    ``by_eps`` is [(eps, robust accuracy, n)] for the monotone check, ``oblivious`` {label: (adaptive,
    oblivious, n)} (purifiers), ``objectives`` the attack objectives whose gradients must not vanish on ``x_grad``;
    ``purifier`` (deterministic: EOT not needed) and ``art`` ((classifier, estimator): the ART bridge) where there
    is one. ``more_steps`` runs each attack at ``sanity_steps`` (few, many) at ``eps`` (off only where a defense's
    forward costs too much for it); ``suffix`` (the defense, where a report has several) ends every name.
    """
    n = len(y)
    few, many = sanity_steps
    acc1 = worst_case(attacks(1.0, 1, steps=few), holds, x, y, batch_size)["accuracy"]
    checks = {"eps 1.0 near 0": {"pass": acc1 <= 0.05, "value": acc1, "n": n, "steps": few, "limit": 0.05}}
    if len(by_eps) >= 2:
        checks["monotone in eps"] = monotone_check(by_eps)
    if more_steps:
        for a_few, a_many in zip(attacks(eps, 1, steps=few), attacks(eps, 1, steps=many)):
            acc_few = worst_case([a_few], holds, x, y, batch_size)["accuracy"]
            acc_many = worst_case([a_many], holds, x, y, batch_size)["accuracy"]
            checks[f"more steps ({few} -> {many}) no higher: {a_few.name}"] = {
                "pass": acc_many <= acc_few + 2 * se(acc_few, n), "values": [acc_few, acc_many], "n": n}
    for label, (adaptive, obl, m) in oblivious.items():
        checks[f"adaptive <= oblivious{label}"] = {"pass": adaptive <= obl + 2 * se(obl, m),
                                                   "values": [adaptive, obl]}
    if purifier is not None:
        with torch.no_grad():
            same = bool(torch.equal(purifier(x_grad)["purified"], purifier(x_grad)["purified"]))
        checks["deterministic (EOT not needed)"] = {"pass": same}
    if art is not None:
        checks["ART bridge equals the pipeline"] = art_bridge_check(art[0], purifier, art[1], x_grad, y_grad)
    checks.update(gradient_checks(objectives, x_grad, y_grad))
    return {k + suffix: v for k, v in checks.items()}
