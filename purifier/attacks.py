"""L-infinity PGD (Madry et al. 2018) with best-iterate accounting, in the style of torchattacks.

The attack takes any ``nn.Module`` that returns logits; point it at the classifier for the oblivious threat
model, or at a ``PurifiedClassifier`` (grad="bpda" / "full" / "softmin") to attack the whole pipeline.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class PGD:
    """PGD-L-infinity: ``steps`` signed-gradient steps of size ``alpha`` within an ``eps`` ball, clipped to [0, 1].

    Defaults follow the project's benchmark protocol: alpha = 2.5 * eps / steps, a uniform random start.
    An image counts as broken if *any* iterate fools the model (best-iterate accounting); the returned batch
    holds, per image, the first iterate that fooled it, else the last.
    """

    eps: float = 0.1
    steps: int = 40
    alpha: float | None = None
    random_start: bool = True
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.eps <= 1:
            raise ValueError(f"eps must be in [0, 1], got {self.eps}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")

    @property
    def step_size(self) -> float:
        return self.alpha if self.alpha is not None else 2.5 * self.eps / self.steps

    def to_dict(self) -> dict:
        return {**asdict(self), "alpha": self.step_size, "norm": "Linf"}

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss=None) -> torch.Tensor:
        """x: B x C x H x W in [0, 1], y: B -> adversarial x of the same shape.

        ``model`` decides success (argmax != y). The ascent objective is cross-entropy on ``model`` unless
        ``loss(adv, y)`` (a sum over the batch, to maximise) is given, e.g. ``selection_loss``.
        """
        was_training = model.training
        model.eval()
        try:
            return self._run(model, x.detach(), y, loss)
        finally:
            model.train(was_training)

    def _run(self, model, x, y, loss):
        gen = torch.Generator(device=x.device).manual_seed(self.seed)
        delta = torch.zeros_like(x)
        if self.random_start:
            delta = (torch.rand(x.shape, generator=gen, device=x.device) * 2 - 1) * self.eps
        adv = (x + delta).clamp(0, 1)
        best = adv.clone()
        broken = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(self.steps):
            adv.requires_grad_(True)
            if loss is None:
                logits = model(adv)
                objective = F.cross_entropy(logits, y, reduction="sum")
            else:
                with torch.no_grad():
                    logits = model(adv)
                objective = loss(adv, y)
            grad, = torch.autograd.grad(objective, adv)
            with torch.no_grad():
                fooled = logits.argmax(1) != y
                newly = fooled & ~broken
                best[newly] = adv.detach()[newly]
                broken |= fooled
                adv = adv.detach() + self.step_size * grad.sign()
                adv = (x + (adv - x).clamp(-self.eps, self.eps)).clamp(0, 1)
        best[~broken] = adv[~broken]  # never fooled: the last iterate (it may still fool; the caller checks)
        return best


def selection_loss(purifier: nn.Module):
    """The selection attack on PuVAE's decision rule: maximise score(x, y) - min over c != y of score(x, c).

    Positive once a wrong class's reconstruction fits the input better than the true class's, so the
    purifier hands the classifier an image of the wrong class (Tramer et al. 2020 broke a generative
    classifier this way). Gradients flow through every class's encoder and decoder.
    """
    def loss(adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        scores = purifier(adv)["recon_error"]
        true = scores.gather(1, y[:, None]).squeeze(1)
        other = scores.scatter(1, y[:, None], float("inf")).min(1).values
        return (true - other).sum()

    return loss
