"""Analysis by synthesis (Schott et al. 2019) on the PuVAE model: per-class latent optimisation at inference.

For every class y the latent starts at the encoder's mu(x, y) and takes ``steps`` gradient steps of size ``lr``
on the class-conditional negative log joint

    E(z; x, y) = -log p(x | z, y) + ||z||^2 / 2      (Bernoulli decoder, N(0, I) prior)

so each class explains the input as well as its decoder can, not only as well as the encoder guessed. The
steps are the speed/robustness knob: 0 is plain PuVAE. Scores: ``mse`` (PuVAE's rule, on the optimised
reconstructions) or ``likelihood`` (E at the optimised latent, the ABS class evidence up to a constant).

Attacking it honestly: with ``unrolled`` the steps are part of the autograd graph (create_graph), so an attack's
gradient runs through the optimisation itself; without it the optimised latent is detached from the input, so
the reconstruction carries no input gradient at all (gradient masking, not robustness). ``attack_view()``
returns the unrolled twin for attacks; the benchmark uses it.

Not exportable to ONNX: the steps need the decoder's gradient at inference, and ONNX inference graphs have no
autodiff operator; an export would have to spell out the decoder's backward pass by hand.
"""
from __future__ import annotations

import copy

import torch
from .pipeline import Purifier, bernoulli_nll, select, with_alias
from .validation import check_images

SCORES = ("mse", "likelihood")


class LatentOptPurifier(Purifier):
    """forward(x) -> the same dict as ``Purifier`` (purified, chosen_class, scores, recon; recon_error, the
    deprecated alias of scores)."""

    def __init__(self, cvae, selection: str = "mse", steps: int = 10, lr: float = 0.002, unrolled: bool = False):
        if selection not in SCORES:
            raise ValueError(f"analysis by synthesis scores by {SCORES}, got {selection!r}")
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not hasattr(cvae, "encode_features"):
            raise ValueError(f"analysis by synthesis needs a flat CVAE (one latent); got a {type(cvae).__name__}")
        super().__init__(cvae, selection)
        self.steps, self.lr, self.unrolled = steps, lr, unrolled

    @property
    def spec(self) -> dict:
        return {"kind": "abs", "selection": self.selection, "steps": self.steps, "lr": self.lr}

    def attack_view(self) -> "LatentOptPurifier":
        """The same purifier with the optimisation unrolled into the graph (shared weights), for attacks."""
        twin = copy.copy(self)
        twin.unrolled = True
        return twin

    def _energy(self, z, y, xk):
        logits = self.cvae.decode_logits(z, y)
        return bernoulli_nll(logits, xk) + 0.5 * z.pow(2).sum(1), logits

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check_images(x, self.image_shape)
        b, k = x.shape[0], self.num_classes
        mu, _ = self.cvae.encode_features(
            self.cvae.features(x).unsqueeze(1).expand(b, k, -1).reshape(b * k, -1),
            y := torch.arange(k, device=x.device).repeat(b))
        xk = x.repeat_interleave(k, 0)
        unrolled = self.unrolled and torch.is_grad_enabled()
        z = mu if unrolled else mu.detach()
        with torch.enable_grad():
            for _ in range(self.steps):
                if not z.requires_grad:
                    z = z.requires_grad_(True)
                energy, _ = self._energy(z, y, xk)
                grad, = torch.autograd.grad(energy.sum(), z, create_graph=unrolled)
                z = z - self.lr * grad
                if not unrolled:
                    z = z.detach()
        energy, logits = self._energy(z, y, xk)
        recon = torch.sigmoid(logits).view(b, k, *x.shape[1:])
        if self.selection == "mse":
            scores = (recon - x.unsqueeze(1)).pow(2).flatten(2).mean(-1)
        else:
            scores = energy.view(b, k)
        purified, chosen = select(recon, scores)
        return with_alias({"purified": purified, "chosen_class": chosen, "scores": scores, "recon": recon})
