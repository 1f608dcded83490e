"""The PuVAE training loss, returned as named terms so the training loop stays generic.

  loss = recon + beta * KL + ce_weight * CE(source(x_hat_y), y) + sel_weight * CE(-score / sel_tau, y)

recon is Bernoulli (BCE summed over pixels), KL is to N(0, I), both per image. The third term is PuVAE's:
the frozen *source* classifier must recognise the reconstruction as the true class; its gradient trains
the decoder (and, through z, the encoder) but never the source. The fourth term is ours: a cross-entropy
over the K classes on the negative MSE scores the purifier selects by (z = mu, as at inference), which
trains the decision rule itself: the true class's reconstruction must fit the input better than every
other class's (or, with sel_negatives = m, than the m classes the source finds likeliest). sel_weight = 0
is plain PuVAE.

The purifier family of the source papers adds latent regularisers (``regularisers``), each 0 = off:
  tc_weight        beta-TCVAE: (beta - 1) * total correlation of q(z) on top of the KL (whole KL = beta 1);
  ks_weight,       Saseendran et al.: KS and covariance losses on the codes z = mu, weighted by eq. 10's prior
  cv_weight        heuristic times ``reg_scale`` (lambda_REC^-1: the reconstruction loss a plain model reaches;
                   plain PuVAE ends at 242 nats per Fashion-MNIST image, so 250);
  couple_alpha     > 0: the coupled (two-point) versions on clean codes and the codes of a latent attack
                   (PGD within couple_eps maximising ||mu(x_adv) - mu(x)||), plus the reconstruction of x from
                   x_adv (eq. 9's L_REC on the augmented batch).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
from torch import nn
from torch.nn import functional as F

from . import regularisers as reg
from .models.cvae import kl_divergence
from .pipeline import class_scores


@dataclass(frozen=True)
class PuVAELoss:
    beta: float = 1.0
    ce_weight: float = 10.0
    sel_weight: float = 100.0
    sel_tau: float = 0.001
    # 0: the selection CE runs over all K classes. m > 0: over the true class and the m wrong classes the
    # source classifier rates most likely for x (hard negatives), which costs (m + 1) / K of the full term.
    sel_negatives: int = 0
    tc_weight: float = 0.0
    tc_dataset_size: int = 55000
    ks_weight: float = 0.0
    cv_weight: float = 0.0
    reg_scale: float = 250.0
    couple_alpha: float = 0.0
    couple_eps: float = 0.1
    couple_steps: int = 3

    def __post_init__(self):
        for name in ("beta", "ce_weight", "sel_weight", "tc_weight", "ks_weight", "cv_weight", "couple_eps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.couple_alpha <= 1:
            raise ValueError(f"couple_alpha must be in [0, 1], got {self.couple_alpha}")
        if self.couple_alpha and not (self.ks_weight or self.cv_weight):
            raise ValueError("couple_alpha > 0 couples the KS/covariance losses: set ks_weight or cv_weight")

    def to_dict(self) -> dict:
        return asdict(self)

    def __call__(self, cvae: nn.Module, source: nn.Module | None, x: torch.Tensor, y: torch.Tensor) -> dict:
        out = cvae(x, y)
        recon = _bce(out["logits"], x)
        kl = out["kl"].mean() if "kl" in out else kl_divergence(out["mu"], out["logvar"]).mean()
        terms = {"recon": recon, "kl": kl}
        loss = recon + self.beta * kl
        if self.tc_weight:
            terms["tc"] = reg.total_correlation(out["z"], out["mu"], out["logvar"], self.tc_dataset_size)
            loss = loss + self.tc_weight * terms["tc"]
        if self.ks_weight or self.cv_weight:
            loss = loss + self._latent_terms(cvae, out, x, y, terms)
        if self.ce_weight:
            if source is None:
                raise ValueError("ce_weight > 0 needs a source classifier")
            # on the reconstruction the purifier hands on (hierarchical models: from the first k posteriors)
            terms["ce"] = F.cross_entropy(source(out.get("purify_recon", out["recon"])), y)
            loss = loss + self.ce_weight * terms["ce"]
        if self.sel_weight:
            classes, target = None, y
            if 0 < self.sel_negatives < cvae.cfg.num_classes - 1:
                if source is None:
                    raise ValueError("sel_negatives > 0 needs a source classifier to choose the negatives")
                with torch.no_grad():
                    wrong = source(x).scatter(1, y[:, None], float("-inf"))
                classes = torch.cat([y[:, None], wrong.topk(self.sel_negatives, dim=1).indices], dim=1)
                target = torch.zeros_like(y)  # the true class is column 0
            scores = class_scores(x, cvae.reconstruct_all(x, deterministic=True, classes=classes), "mse")
            terms["sel"] = F.cross_entropy(-scores / self.sel_tau, target)
            terms["sel_acc"] = (scores.argmin(1) == target).float().mean()
            loss = loss + self.sel_weight * terms["sel"]
        terms["loss"] = loss
        return terms

    def _latent_terms(self, cvae, out, x, y, terms) -> torch.Tensor:
        z = out["mu"]
        n, d = z.shape
        w_ks, w_cv = _prior_weights(n, d, self.couple_alpha)
        if not self.couple_alpha:
            terms["ks"], terms["cv"] = reg.ks_loss(z), reg.cov_loss(z)
        else:
            x_adv = latent_attack_batch(cvae, x, y, self.couple_eps, self.couple_steps)
            adv = cvae(x_adv, y)
            terms["ks"] = reg.coupled_ks_loss(z, adv["mu"])
            terms["cv"] = reg.coupled_cov_loss(z, adv["mu"], self.couple_alpha)
            terms["recon_adv"] = _bce(adv["logits"], x)
        value = self.reg_scale * (self.ks_weight * w_ks * terms["ks"] + self.cv_weight * w_cv * terms["cv"])
        return value + terms.get("recon_adv", 0.0)


def _bce(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1).mean()


@lru_cache(maxsize=32)
def _prior_weights(n: int, d: int, alpha: float) -> tuple[float, float]:
    """Eq. 10's weights for a batch of n codes of size d (pairs of independent prior batches when coupled)."""
    if not alpha:
        return reg.prior_weight(reg.ks_loss, n, d), reg.prior_weight(reg.cov_loss, n, d)
    return (reg.prior_weight(reg.coupled_ks_loss, n, d, coupled=True),
            reg.prior_weight(lambda a, b: reg.coupled_cov_loss(a, b, alpha), n, d, coupled=True))


def latent_attack_batch(cvae: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
                        seed: int | None = None) -> torch.Tensor:
    """PGD (L-infinity, random start, step 2.5 * eps / steps) maximising ||mu(x_adv, y) - mu(x, y)||^2: the
    inputs whose codes move furthest, for the coupled regularisers. Returns x_adv detached."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        mu0 = cvae.encode(x, y)[0]
    adv = (x + (torch.rand(x.shape, generator=gen) * 2 - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        adv.requires_grad_(True)
        dist = (cvae.encode(adv, y)[0] - mu0).pow(2).sum()
        grad, = torch.autograd.grad(dist, adv)
        with torch.no_grad():
            adv = torch.min(torch.max(adv + 2.5 * eps / steps * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return adv.detach()
