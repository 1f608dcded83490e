"""PuVAE purification: reconstruct the input once per class, keep the reconstruction that fits best.

``Purifier`` returns the purified images, the chosen class and the per-class scores (lower is better).
``PurifiedClassifier`` puts a purifier in front of a classifier and returns logits only, so attack
libraries can attack the whole pipeline; its ``grad`` says how gradients cross the purifier:

  ``bpda``     straight-through: forward through the purifier, backward as the identity (Athalye et al. 2018)
  ``full``     the argmin is held fixed; gradients flow through the encoder and decoder of the chosen class
  ``softmin``  forward as ``full``; backward through softmax(-score / tau) over the K reconstructions
  ``none``     the purifier is a constant for the gradient (the input gradient is zero)

Candidate mode (``candidates=k``): only the k classes a ranking classifier scores highest on the raw input are
reconstructed, so the purifier's cost grows with k instead of K. The ranking is a discrete choice made without
gradient; an attacker can push the true class out of it (``attacks.candidate_exclusion_objective``).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .models.cvae import CVAE, kl_divergence
from .validation import check_images

SELECTIONS = ("mse", "likelihood", "iwae")
GRADS = ("bpda", "full", "softmin", "none")


def class_scores(x: torch.Tensor, out: dict[str, torch.Tensor], selection: str = "mse") -> torch.Tensor:
    """Per-class scores B x K from ``CVAE.reconstruct_all`` output; the purifier picks the lowest.

    ``mse``: mean squared error between x and each reconstruction (PuVAE's rule).
    ``likelihood``: negative ELBO at z = mu, Bernoulli reconstruction term (summed over pixels) plus KL
    (a hierarchical model's ``kl`` B x K, summed over its layers, when it returns one).
    ``iwae`` needs the model and fixed noise: see ``iwae_scores``.
    """
    xk = x.unsqueeze(1)
    if selection == "mse":
        return (out["recon"] - xk).pow(2).flatten(2).mean(-1)
    if selection == "likelihood":
        kl = out["kl"] if "kl" in out else kl_divergence(out["mu"], out["logvar"])
        return bernoulli_nll(out["logits"], xk) + kl
    raise ValueError(f"unknown selection {selection!r}; choose from {SELECTIONS}")


def bernoulli_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x | z) summed over pixels: logits ... x C x H x W against x broadcast to them -> ....

    Written out as relu(l) - l x + log(1 + exp(-|l|)), stable for any logit: the exported form of torch's
    binary_cross_entropy_with_logits takes log(sigmoid(l)) in onnxruntime, -inf for a saturated pixel.
    """
    nll = F.relu(logits) - logits * x + torch.log1p(torch.exp(-logits.abs()))
    return nll.flatten(-3).sum(-1)


def iwae_scores(cvae: CVAE, x: torch.Tensor, out: dict[str, torch.Tensor], noise: torch.Tensor) -> torch.Tensor:
    """Negative importance-weighted bound (Burda et al. 2016) per class, B x K, with S fixed noise draws.

    z_s = mu + sigma * noise_s (noise: S x latent_dim, a constant of the purifier, so the rule is deterministic,
    exportable and needs no EOT), log w_s = log p(x | z_s, y) + log N(z_s; 0, I) - log q(z_s | x, y), score =
    -(logsumexp_s log w_s - log S): never above the mean of the S single-sample bounds, and tighter as S grows.
    """
    mu, logvar = out["mu"], out["logvar"]                       # B x K x D
    b, k, d = mu.shape
    s = noise.shape[0]
    eps = noise.view(1, 1, s, d)
    z = mu.unsqueeze(2) + torch.exp(0.5 * logvar).unsqueeze(2) * eps  # B x K x S x D
    y = torch.arange(k, device=x.device).repeat_interleave(s).repeat(b)
    logits = cvae.decode_logits(z.reshape(b * k * s, d), y).view(b, k, s, *x.shape[1:])
    log_px = -bernoulli_nll(logits, x.view(b, 1, 1, *x.shape[1:]))
    log_pz = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(-1)
    log_qz = -0.5 * (eps.pow(2) + logvar.unsqueeze(2) + math.log(2 * math.pi)).sum(-1)
    log_w = log_px + log_pz - log_qz
    # logsumexp spelled out: onnxruntime's ReduceLogSumExp does not subtract the max, and log w is in the
    # hundreds of negative nats on real images, where exp underflows to 0 and the score becomes inf
    top = log_w.max(dim=2, keepdim=True).values
    return -(top.squeeze(2) + torch.log(torch.exp(log_w - top).sum(2)) - math.log(s))


def check_candidates(candidates: int | None, num_classes: int) -> int | None:
    """``candidates`` must be None (every class) or an integer k with 1 <= k <= num_classes; returns it."""
    if candidates is None:
        return None
    if isinstance(candidates, bool) or not isinstance(candidates, int) or not 1 <= candidates <= num_classes:
        raise ValueError(f"candidates must be an integer k with 1 <= k <= {num_classes} (the model's classes), "
                         f"got {candidates!r}")
    return candidates


def check_prior(prior: nn.Module | None, prior_weight: float) -> float:
    """``prior_weight`` must be a finite number >= 0, and > 0 only with a prior classifier; returns it as a float."""
    if isinstance(prior_weight, bool) or not isinstance(prior_weight, (int, float)) or not 0 <= prior_weight < math.inf:
        raise ValueError(f"prior_weight must be a finite number >= 0, got {prior_weight!r}")
    if prior_weight and prior is None:
        raise ValueError(f"prior_weight={prior_weight} needs a prior: the classifier whose log-posterior on the raw "
                         f"input joins the rule's scores (a model directory's 'prior' checkpoint)")
    return float(prior_weight)


def rank_candidates(ranker: nn.Module, x: torch.Tensor, k: int) -> torch.Tensor:
    """The k classes ``ranker`` scores highest on x, B x k, in ascending class order (so k = K is ``arange(K)`` per
    image, the full purifier's batch, and ties in the scores break toward the lower class as the full argmin does).
    No gradient: the choice is discrete."""
    with torch.no_grad():
        return ranker(x).topk(k, dim=1).indices.sort(dim=1).values


def select(recon: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """recon: B x K x C x H x W, scores: B x K -> (chosen reconstruction B x C x H x W, chosen class B)."""
    chosen = scores.argmin(dim=1)
    index = chosen.view(-1, 1, 1, 1, 1).expand(-1, 1, *recon.shape[2:])
    return torch.gather(recon, 1, index).squeeze(1), chosen


def with_alias(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``out`` with ``recon_error``: the same tensor as ``out["scores"]``, the deprecated name of the purifier's
    per-class scores, kept for one release (removed in the next)."""
    out["recon_error"] = out["scores"]
    return out


class Purifier(nn.Module):
    """PuVAE purifier around a trained CVAE.

    forward(x: B x C x H x W in [0, 1]) -> dict:
      ``purified`` B x C x H x W, ``chosen_class`` B (int64), ``scores`` B x K (the selection rule's score per
      class, lower = better fit, ``chosen_class`` is the argmin: MSE reconstruction errors under ``mse``, negative
      ELBO or IWAE bounds under ``likelihood`` and ``iwae``), ``recon`` B x K x C x H x W (every class's
      reconstruction), and ``recon_error``: the ``scores`` tensor again, a deprecated alias removed in the next
      release.

    ``candidates`` = k (with ``ranker``, a classifier B x C x H x W -> logits B x K, usually the target classifier):
    reconstruct only the k classes ``ranker`` scores highest on x. The other classes' scores are +inf and their
    reconstructions zero, so every output keeps its B x K shape and class indexing; ``candidates`` B x k (int64)
    is added. k = K gives the full purifier's outputs exactly.

    ``prior_weight`` = mu > 0 (with ``prior``, a classifier B x C x H x W -> logits B x K, usually an adversarially
    trained one): the rule's score of class c becomes score_c - mu * log p_prior(c | x), a product of the
    reconstruction rule and the prior classifier's posterior on the raw input; mu is in the units of the rule's
    scores (per-pixel MSE under ``mse``). The scores' gradient flows through both parts, so the attacks on the
    scores (selection, targeted selection, softmin) attack the prior too; the purifier then holds that
    classifier's robustness as well as its own.
    """

    def __init__(self, cvae: CVAE, selection: str = "mse", samples: int = 8, noise_seed: int = 0,
                 candidates: int | None = None, ranker: nn.Module | None = None, prior: nn.Module | None = None,
                 prior_weight: float = 0.0):
        super().__init__()
        self.prior_weight = check_prior(prior, prior_weight)
        self.prior = prior if self.prior_weight else None
        self.candidates = check_candidates(candidates, cvae.cfg.num_classes)
        if self.candidates is not None and ranker is None:
            raise ValueError(f"candidates={candidates} needs a ranker: the classifier whose logits on the raw input "
                             f"pick the classes to reconstruct (usually the target classifier)")
        if self.candidates is not None and selection == "iwae":
            raise ValueError("candidates: the iwae rule scores every class; use selection 'mse' or 'likelihood'")
        self.ranker = ranker
        if selection not in SELECTIONS:
            raise ValueError(f"unknown selection {selection!r}; choose from {SELECTIONS}")
        if samples < 1:
            raise ValueError(f"samples must be at least 1, got {samples}")
        self.cvae = cvae
        self.selection = selection
        self.samples = samples
        self.noise_seed = noise_seed
        if selection == "iwae" and not isinstance(cvae, CVAE):
            raise ValueError(f"the iwae rule needs a flat CVAE (one latent); got a {type(cvae).__name__}")
        if selection == "iwae":
            # the importance samples' noise is part of the purifier, drawn once from its seed: no sampling at
            # inference, the same scores in torch and in the exported graph
            gen = torch.Generator().manual_seed(noise_seed)
            self.register_buffer("noise", torch.randn(samples, cvae.cfg.latent_dim, generator=gen), persistent=False)

    @property
    def spec(self) -> dict:
        """The settings that rebuild this purifier around its model (``from_spec``), as JSON."""
        out = {"selection": self.selection}
        if self.selection == "iwae":
            out.update(samples=self.samples, noise_seed=self.noise_seed)
        if self.candidates is not None:
            out["candidates"] = self.candidates
        if self.prior_weight:
            out["prior_weight"] = self.prior_weight
        return out

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.cvae.cfg.image_shape

    @property
    def num_classes(self) -> int:
        return self.cvae.cfg.num_classes

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check_images(x, self.image_shape)
        if self.candidates is not None:
            return self._forward_candidates(x)
        out = self.cvae.reconstruct_all(x)
        if self.selection == "iwae":
            scores = iwae_scores(self.cvae, x, out, self.noise)
        else:
            scores = class_scores(x, out, self.selection)
        scores = self.with_prior(x, scores)
        purified, chosen = select(out["recon"], scores)
        return with_alias({"purified": purified, "chosen_class": chosen, "scores": scores, "recon": out["recon"]})

    def with_prior(self, x: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """``scores`` (B x K, or B x k for ``classes``) minus prior_weight times the prior's log-posterior."""
        if not self.prior_weight:
            return scores
        log_p = F.log_softmax(self.prior(x), dim=1)
        if classes is not None:
            log_p = log_p.gather(1, classes)
        return scores - self.prior_weight * log_p

    def _forward_candidates(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        classes = rank_candidates(self.ranker, x, self.candidates)          # B x k
        out = self.cvae.reconstruct_all(x, classes=classes)
        scores_k = self.with_prior(x, class_scores(x, out, self.selection), classes)  # B x k
        purified, pick = select(out["recon"], scores_k)
        b, k = x.shape[0], self.num_classes
        # scattered back to B x K: indexing by class stays as in the full purifier; excluded classes never win
        scores = scores_k.new_full((b, k), float("inf")).scatter(1, classes, scores_k)
        index = classes.view(b, -1, 1, 1, 1).expand(-1, -1, *out["recon"].shape[2:])
        recon = out["recon"].new_zeros((b, k, *out["recon"].shape[2:])).scatter(1, index, out["recon"])
        return with_alias({"purified": purified, "chosen_class": classes.gather(1, pick[:, None]).squeeze(1),
                           "scores": scores, "recon": recon, "candidates": classes})


@torch.no_grad()
def purify(purifier: Purifier, x: torch.Tensor, batch_size: int = 512) -> dict[str, torch.Tensor]:
    """Purify a batch of any size in eval mode, chunked; returns ``purified``, ``chosen_class``, ``scores`` (and
    ``recon_error``, its deprecated alias).

    Every submodule gets back the mode it had (a freshly wrapped ``Purifier(cvae)`` is in training mode while
    its CVAE may not be; restoring the wrapper's flag alone would switch the CVAE to sampling).
    """
    modes = [(m, m.training) for m in purifier.modules()]
    purifier.eval()
    try:
        parts = [purifier(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    finally:
        for m, mode in modes:
            m.training = mode
    keys = ("purified", "chosen_class", "scores")
    if not parts:
        check_images(x, purifier.image_shape)
    return with_alias({k: torch.cat([p[k] for p in parts]) if parts else x.new_zeros(0) for k in keys})


class PurifiedClassifier(nn.Module):
    """classifier(purifier(x)) as one ``nn.Module`` returning logits B x K, for attack libraries."""

    def __init__(self, classifier: nn.Module, purifier: Purifier, grad: str = "bpda", tau: float = 0.01):
        super().__init__()
        if grad not in GRADS:
            raise ValueError(f"unknown grad mode {grad!r}; choose from {GRADS}")
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        self.classifier = classifier
        self.purifier = purifier
        self.grad = grad
        self.tau = tau

    def purified(self, x: torch.Tensor) -> torch.Tensor:
        """The purified batch, carrying the gradient this module's ``grad`` mode defines."""
        return self.purify_with_scores(x)[0]

    def purify_with_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(purified batch carrying this mode's gradient, the purifier's output dict) in one pass.

        Attacks on the reject option use the dict's ``scores``; they carry gradient except in
        ``bpda`` and ``none`` modes.
        """
        if self.grad in ("none", "bpda"):
            with torch.no_grad():
                out = self.purifier(x)
            p = out["purified"]
            return (p if self.grad == "none" else x + (p - x).detach()), out
        out = self.purifier(x)
        if self.grad == "full":
            return out["purified"], out
        weights = torch.softmax(-out["scores"] / self.tau, dim=1)
        soft = (weights.view(*weights.shape, 1, 1, 1) * out["recon"]).sum(1)
        return soft + (out["purified"] - soft).detach(), out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.purified(x))
