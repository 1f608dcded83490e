"""A small hierarchical class-conditional VAE (after the conditional VDVAE work and Willetts et al.'s Seatbelt-VAE).

Bottom-up: the CVAE's convolutional trunk, once per image, to features h. Top-down: L stochastic blocks, top
first, on a residual state s (a learned start). Block i adds its own label embedding e_i(y) to the state and
draws z_i from the prior p(z_i | s, y) or the posterior q(z_i | s, y, h); then s <- s + W_i z_i. The decoder reads
the final state, and with ``skip`` (Seatbelt-VAE: "the decoder sees every layer") every z_i as well.

Reconstruction for the purifier (``reconstruct_all``) takes the first ``k`` blocks from the posterior and the
rest from the conditional priors, the conditional-VDVAE recipe: the input fixes the coarse content, the label's
priors fill in the rest, so a wrong label cannot simply copy the input. Prior draws are the prior means at
``temperature`` 0 (deterministic, exportable); above 0 the purifier samples and must be attacked with EOT.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .cvae import conv_trunks, gaussian_kl


@dataclass(frozen=True)
class HCVAEConfig:
    image_shape: tuple[int, int, int] = (1, 28, 28)
    num_classes: int = 10
    latent_dims: tuple[int, ...] = (8, 8, 8)   # top block first
    channels: tuple[int, int] = (16, 32)
    hidden: int = 256
    skip: bool = False                         # Seatbelt-VAE: the decoder also reads every z_i
    k: int = 1                                 # posterior blocks used by reconstruct_all
    temperature: float = 0.0                   # prior noise scale for the blocks after k

    def __post_init__(self):
        c, h, w = self.image_shape
        if h % 4 or w % 4:
            raise ValueError(f"image height and width must be multiples of 4, got {h} x {w}")
        if not self.latent_dims or min(self.latent_dims) < 1:
            raise ValueError(f"latent_dims must be positive sizes, top first, got {self.latent_dims}")
        if not 1 <= self.k <= len(self.latent_dims):
            raise ValueError(f"k must be in [1, {len(self.latent_dims)}] (the number of blocks), got {self.k}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")

    @property
    def latent_dim(self) -> int:
        """Size of the top block: the layer a beta-TC penalty disentangles."""
        return self.latent_dims[0]

    @classmethod
    def from_dict(cls, d: dict) -> "HCVAEConfig":
        d = dict(d)
        for key in ("image_shape", "latent_dims", "channels"):
            d[key] = tuple(d[key])
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


class _Block(nn.Module):
    def __init__(self, cfg: HCVAEConfig, dim: int):
        super().__init__()
        self.embed = nn.Embedding(cfg.num_classes, cfg.hidden)
        self.prior = nn.Linear(cfg.hidden, 2 * dim)
        self.post = nn.Sequential(nn.Linear(2 * cfg.hidden, cfg.hidden), nn.LeakyReLU(0.2),
                                  nn.Linear(cfg.hidden, 2 * dim))
        self.out = nn.Linear(dim, cfg.hidden)

    def forward(self, s, y, h):
        """-> (u, prior mu, prior logvar, posterior mu, posterior logvar or None without h)."""
        u = F.leaky_relu(s + self.embed(y), 0.2)
        p_mu, p_lv = self.prior(u).chunk(2, dim=1)
        if h is None:
            return p_mu, p_lv.clamp(-20, 10), None, None
        q_mu, q_lv = self.post(torch.cat([u, h], dim=1)).chunk(2, dim=1)
        return p_mu, p_lv.clamp(-20, 10), q_mu, q_lv.clamp(-20, 10)


class HCVAE(nn.Module):
    def __init__(self, cfg: HCVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.enc_trunk, self.dec_trunk, self.feat_shape = conv_trunks(cfg.image_shape, cfg.channels)
        feat = self.feat_shape[0] * self.feat_shape[1] * self.feat_shape[2]
        self.enc_proj = nn.Sequential(nn.Linear(feat, cfg.hidden), nn.LeakyReLU(0.2))
        self.start = nn.Parameter(torch.zeros(cfg.hidden))
        self.blocks = nn.ModuleList(_Block(cfg, d) for d in cfg.latent_dims)
        dec_in = cfg.hidden + (sum(cfg.latent_dims) if cfg.skip else 0)
        self.dec_head = nn.Sequential(nn.Linear(dec_in, cfg.hidden), nn.LeakyReLU(0.2),
                                      nn.Linear(cfg.hidden, feat), nn.LeakyReLU(0.2))

    def enc(self, x: torch.Tensor) -> torch.Tensor:
        """Bottom-up: x -> features h (B x hidden), once per image."""
        return self.enc_proj(self.enc_trunk(x))

    def _top_down(self, h: torch.Tensor | None, y: torch.Tensor, k: int, sample: bool, temperature: float) -> dict:
        """Blocks 1..k from the posterior (needs h), the rest from the prior. sample: posterior draws (training);
        prior draws are mean + temperature * sigma * noise."""
        s = self.start.unsqueeze(0).expand(y.shape[0], -1)  # y.shape, not len(): keeps the batch dynamic in export
        zs, kl, top = [], 0.0, None
        for i, block in enumerate(self.blocks):
            p_mu, p_lv, q_mu, q_lv = block(s, y, h if i < k else None)
            if q_mu is not None:
                z = q_mu + torch.randn_like(q_mu) * torch.exp(0.5 * q_lv) if sample else q_mu
                kl = kl + gaussian_kl(q_mu, q_lv, p_mu, p_lv)
                if i == 0:
                    top = (q_mu, q_lv, z)
            else:
                z = p_mu + temperature * torch.randn_like(p_mu) * torch.exp(0.5 * p_lv) if temperature else p_mu
            zs.append(z)
            s = s + block.out(z)
        d = torch.cat([s, *zs], dim=1) if self.cfg.skip else s
        logits = self.dec_trunk(self.dec_head(d).view(-1, *self.feat_shape))
        return {"logits": logits, "kl": kl, "top": top, "codes": torch.cat(zs[:k], dim=1)}

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training pass, every block from the posterior. x: B x C x H x W, y: B -> ``logits``, ``recon``,
        ``kl`` (B, summed over blocks), ``mu``/``logvar``/``z`` of the top block (for a beta-TC penalty), and
        ``purify_recon``: the reconstruction the purifier hands on for label y (the first k blocks from the
        posterior, the rest from the conditional priors at the purifier's temperature), which PuVAE's
        cross-entropy term must train. With k = every block it is ``recon``."""
        h = self.enc(x)
        out = self._top_down(h, y, len(self.blocks), self.training, 0.0)
        mu, logvar, z = out["top"]
        recon = torch.sigmoid(out["logits"])
        if self.cfg.k < len(self.blocks):
            purify = self._top_down(h, y, self.cfg.k, self.training, self.cfg.temperature)
            purify_recon = torch.sigmoid(purify["logits"])
        else:
            purify_recon = recon
        return {"logits": out["logits"], "recon": recon, "kl": out["kl"], "mu": mu, "logvar": logvar, "z": z,
                "purify_recon": purify_recon}

    def encode(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top block's posterior (mu, logvar): the code latent regularisers and attacks act on."""
        _, _, q_mu, q_lv = self.blocks[0](self.start.unsqueeze(0).expand(y.shape[0], -1), y, self.enc(x))
        return q_mu, q_lv

    def reconstruct_all(self, x: torch.Tensor, deterministic: bool = False,
                        classes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Reconstruct every image once per class (B*K in one batch) from the first ``k`` posteriors and the
        remaining conditional priors. -> ``logits``/``recon`` B x K x C x H x W, ``kl`` B x K (the used blocks'),
        ``mu``/``logvar`` B x K x top size, ``codes`` B x K x (sizes of the first k blocks)."""
        b = x.shape[0]
        if classes is None:
            k = self.cfg.num_classes
            y = torch.arange(k, device=x.device).repeat(b)
        else:
            k = classes.shape[1]
            y = classes.reshape(-1)
        h = self.enc(x)
        h = h.unsqueeze(1).expand(b, k, h.shape[1]).reshape(b * k, -1)
        sample = self.training and not deterministic
        out = self._top_down(h, y, self.cfg.k, sample, 0.0 if deterministic else self.cfg.temperature)
        mu, logvar, _ = out["top"]
        shape = (b, k, *self.cfg.image_shape)
        return {"logits": out["logits"].view(shape), "recon": torch.sigmoid(out["logits"]).view(shape),
                "kl": out["kl"].view(b, k), "mu": mu.view(b, k, -1), "logvar": logvar.view(b, k, -1),
                "codes": out["codes"].view(b, k, -1)}

    @property
    def random(self) -> bool:
        """Whether reconstruct_all samples in eval mode (temperature > 0 with prior blocks)."""
        return self.cfg.temperature > 0 and self.cfg.k < len(self.cfg.latent_dims)
