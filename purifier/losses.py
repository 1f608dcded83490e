"""The PuVAE training loss, returned as named terms so the training loop stays generic.

  loss = recon + beta * KL + ce_weight * CE(source(x_hat_y), y) + sel_weight * CE(-score / sel_tau, y)

recon is Bernoulli (BCE summed over pixels), KL is to N(0, I), both per image. The third term is PuVAE's:
the frozen *source* classifier must recognise the reconstruction as the true class; its gradient trains
the decoder (and, through z, the encoder) but never the source. The fourth term is ours: a cross-entropy
over the K classes on the negative MSE scores the purifier selects by (z = mu, as at inference), which
trains the decision rule itself: the true class's reconstruction must fit the input better than every
other class's (or, with sel_negatives = m, than the m classes the source finds likeliest). sel_weight = 0
is plain PuVAE.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .models.cvae import CVAE, kl_divergence
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

    def to_dict(self) -> dict:
        return asdict(self)

    def __call__(self, cvae: CVAE, source: nn.Module | None, x: torch.Tensor, y: torch.Tensor) -> dict:
        out = cvae(x, y)
        recon = F.binary_cross_entropy_with_logits(out["logits"], x, reduction="none").flatten(1).sum(1).mean()
        kl = kl_divergence(out["mu"], out["logvar"]).mean()
        terms = {"recon": recon, "kl": kl}
        loss = recon + self.beta * kl
        if self.ce_weight:
            if source is None:
                raise ValueError("ce_weight > 0 needs a source classifier")
            terms["ce"] = F.cross_entropy(source(out["recon"]), y)
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
