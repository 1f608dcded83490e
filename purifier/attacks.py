"""PGD (Madry et al. 2018, L-infinity and L2) with best-iterate accounting, and the adaptive objectives that
attack the purifier itself.

The attack takes any ``nn.Module`` that returns logits; point it at the classifier for the oblivious threat
model, or at a ``PurifiedClassifier`` (grad="bpda" / "full" / "softmin") to attack the whole pipeline.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F


# objective(adv, y) -> (a scalar to maximise, a sum over the batch; B bools: does each image count as broken)
Objective = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
NORMS = ("Linf", "L2")


@dataclass(frozen=True)
class PGD:
    """PGD (Madry et al. 2018) in L-infinity or L2: ``steps`` steps of size ``alpha`` within an ``eps`` ball,
    clipped to [0, 1]. L-infinity steps along the gradient's sign, L2 along the gradient normalised per image.

    Defaults follow the project's benchmark protocol: alpha = 2.5 * eps / steps, a random start (uniform in
    the L-infinity ball; uniform radius along a random direction for L2). An image counts as broken if *any*
    iterate fools the model (best-iterate accounting); the returned batch holds, per image, the first iterate
    that fooled it, else the last. Broken images leave the batch (early exit): that changes no result, since
    their returned iterate is already fixed, and it saves the work. ``best_iterate=False`` returns the last
    iterate of every image (adversarial training).
    """

    eps: float = 0.1
    steps: int = 40
    alpha: float | None = None
    random_start: bool = True
    seed: int = 0
    best_iterate: bool = True
    norm: str = "Linf"

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.eps < 0 or (self.norm == "Linf" and self.eps > 1):
            raise ValueError(f"eps must be in [0, 1] for Linf and >= 0 for L2, got {self.eps}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")

    @property
    def step_size(self) -> float:
        return self.alpha if self.alpha is not None else 2.5 * self.eps / self.steps

    def to_dict(self) -> dict:
        return {**asdict(self), "alpha": self.step_size}

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss=None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """x: B x C x H x W in [0, 1], y: B -> adversarial x of the same shape.

        ``model`` decides success (argmax != y). The ascent objective is cross-entropy on ``model`` unless
        ``loss(adv, y)`` (a sum over the batch, to maximise) is given, e.g. ``selection_loss``.
        ``generator`` draws the random start (default: one seeded with ``seed``).
        """
        was_training = model.training
        model.eval()
        try:
            return self.run(ce_objective(model) if loss is None else _with_model(loss, model), x, y, generator)
        finally:
            model.train(was_training)

    def run(self, objective: Objective, x: torch.Tensor, y: torch.Tensor,
            generator: torch.Generator | None = None) -> torch.Tensor:
        """Maximise ``objective`` (see ``Objective``) from x; modules it calls must already be in eval mode."""
        x = x.detach()
        gen = generator if generator is not None else torch.Generator(device=x.device).manual_seed(self.seed)
        adv = (x + self._start(x, gen)).clamp(0, 1) if self.random_start else x.clone()
        best = adv.clone()
        broken = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(self.steps):
            idx = (~broken).nonzero().squeeze(1) if self.best_iterate else torch.arange(len(x), device=x.device)
            if len(idx) == 0:
                break
            a = adv[idx].requires_grad_(True)
            value, fooled = objective(a, y[idx])
            grad, = torch.autograd.grad(value, a)
            with torch.no_grad():
                if self.best_iterate:
                    hit = idx[fooled]
                    best[hit] = a.detach()[fooled]
                    broken[hit] = True
                adv[idx] = self._project(a.detach() + self.step_size * self._direction(grad), x[idx])
        best[~broken] = adv[~broken]  # never fooled: the last iterate (it may still fool; the caller checks)
        return best

    def _start(self, x, gen):
        noise = torch.rand(x.shape, generator=gen, device=x.device) * 2 - 1
        if self.norm == "Linf":
            return noise * self.eps
        radius = torch.rand(len(x), generator=gen, device=x.device) * self.eps
        return noise * (radius / _norms(noise)).view(-1, *[1] * (x.dim() - 1))

    def _direction(self, grad):
        if self.norm == "Linf":
            return grad.sign()
        return grad / _norms(grad).clamp_min(1e-12).view(-1, *[1] * (grad.dim() - 1))

    def _project(self, adv, x):
        delta = adv - x
        if self.norm == "Linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            scale = (self.eps / _norms(delta).clamp_min(1e-12)).clamp(max=1.0)
            delta = delta * scale.view(-1, *[1] * (delta.dim() - 1))
        return (x + delta).clamp(0, 1)


def _norms(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


def _with_model(loss, model: nn.Module) -> Objective:
    def objective(adv, y):
        with torch.no_grad():
            fooled = model(adv).argmax(1) != y
        return loss(adv, y), fooled

    return objective


def ce_objective(model: nn.Module) -> Objective:
    """Cross-entropy of any logits module (a classifier, or a ``PurifiedClassifier`` in any grad mode)."""
    def objective(adv, y):
        logits = model(adv)
        return F.cross_entropy(logits, y, reduction="sum"), logits.argmax(1) != y

    return objective


@dataclass(frozen=True)
class RejectOption:
    """The purifier flags inputs whose best reconstruction error exceeds ``threshold``.

    Against it an image is broken only when it is misclassified *and* not flagged. An attack that pays for the
    reject option subtracts ``penalty`` * sum(relu(best_error / threshold - 1)) from its objective, so it pushes
    the class while keeping the error under the threshold. penalty = 0: the attack ignores the flag.
    """

    threshold: float
    penalty: float = 0.0

    def broken(self, wrong: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return wrong & (scores.min(1).values <= self.threshold)

    def cost(self, scores: torch.Tensor) -> torch.Tensor:
        if not self.penalty:
            return scores.new_zeros(())
        return self.penalty * F.relu(scores.min(1).values / self.threshold - 1).sum()


def pipeline_objective(classifier: nn.Module, purifier: nn.Module, grad: str, tau: float = 0.01,
                       reject: RejectOption | None = None) -> Objective:
    """Cross-entropy through classifier(purifier(x)), gradients crossing the purifier as ``grad`` says
    (bpda, full, softmin; see ``PurifiedClassifier``)."""
    from .pipeline import PurifiedClassifier

    pipeline = PurifiedClassifier(classifier, purifier, grad=grad, tau=tau)

    def objective(adv, y):
        purified, out = pipeline.purify_with_scores(adv)
        logits = classifier(purified)
        value, wrong = F.cross_entropy(logits, y, reduction="sum"), logits.argmax(1) != y
        if reject is None:
            return value, wrong
        return value - reject.cost(out["scores"]), reject.broken(wrong, out["scores"].detach())

    return objective


def selection_objective(classifier: nn.Module, purifier: nn.Module, reject: RejectOption | None = None) -> Objective:
    """The selection attack (see ``selection_loss``), judged by the pipeline's real prediction."""
    def objective(adv, y):
        out = purifier(adv)
        value = _selection_margin(out["scores"], y).sum()
        with torch.no_grad():
            wrong = classifier(out["purified"]).argmax(1) != y
        if reject is None:
            return value, wrong
        return value - reject.cost(out["scores"]), reject.broken(wrong, out["scores"].detach())

    return objective


def _selection_margin(scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    true = scores.gather(1, y[:, None]).squeeze(1)
    other = scores.scatter(1, y[:, None], float("inf")).min(1).values
    return true - other


def selection_loss(purifier: nn.Module):
    """The selection attack on PuVAE's decision rule: maximise score(x, y) - min over c != y of score(x, c).

    Positive once a wrong class's reconstruction fits the input better than the true class's, so the
    purifier hands the classifier an image of the wrong class (Tramer et al. 2020 broke a generative
    classifier this way). Gradients flow through every class's encoder and decoder.
    """
    def loss(adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _selection_margin(purifier(adv)["scores"], y).sum()

    return loss


def candidate_exclusion_objective(classifier: nn.Module, purifier: nn.Module,
                                  reject: RejectOption | None = None) -> Objective:
    """Against a candidate purifier (``Purifier(candidates=k, ranker=...)``): push the true class out of the k
    classes the ranker picks. Maximise the k-th highest other logit minus the true class's logit, in the ranker's
    logits on the raw input: positive once k other classes outrank y, so y's reconstruction is never made and the
    purifier must hand the classifier another class's. Judged by the pipeline's real prediction.

    The ranking itself passes no gradient through the purifier (a discrete choice); this objective's gradient is
    the ranker's own. Needs k < K (with k = K every class is reconstructed and none can be pushed out).
    """
    k, num_classes = purifier.candidates, purifier.num_classes
    if k is None or k >= num_classes:
        raise ValueError(f"the candidate-exclusion attack needs a purifier with candidates k < {num_classes} "
                         f"(the model's classes), got candidates={k}")

    def objective(adv, y):
        z = purifier.ranker(adv)
        true = z.gather(1, y[:, None]).squeeze(1)
        kth_other = z.scatter(1, y[:, None], float("-inf")).topk(k, dim=1).values[:, -1]
        value = (kth_other - true).sum()
        if reject is None:
            with torch.no_grad():
                out = purifier(adv)
                wrong = classifier(out["purified"]).argmax(1) != y
            return value, wrong
        out = purifier(adv)
        with torch.no_grad():
            wrong = classifier(out["purified"]).argmax(1) != y
        return value - reject.cost(out["scores"]), reject.broken(wrong, out["scores"].detach())

    return objective
