"""Class-conditional VAE (PuVAE, Hwang et al. 2019): q(z | x, y) and p(x | z, y).

The label enters after the convolutional trunk of the encoder and before the convolutional trunk of
the decoder. Why: the encoder's convolutions then run once per image, not once per (image, class) pair,
which keeps the K-way reconstruction of the purifier cheap and a single batched tensor (B*K) in the
exported graph. For the same reason the encoder's first dense layer, W [f; c(y)] + b, is computed as
W_f f (once per image) + W_c c(y) + b (per class): the same layer and weights, K times less work.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class CVAEConfig:
    image_shape: tuple[int, int, int] = (1, 28, 28)
    num_classes: int = 10
    latent_dim: int = 16
    channels: tuple[int, int] = (32, 64)
    hidden: int = 256
    conditioning: str = "onehot"  # or "embedding"
    embed_dim: int = 16

    def __post_init__(self):
        c, h, w = self.image_shape
        if h % 4 or w % 4:
            raise ValueError(f"image height and width must be multiples of 4, got {h} x {w}")
        if self.conditioning not in ("onehot", "embedding"):
            raise ValueError(f"conditioning must be 'onehot' or 'embedding', got {self.conditioning!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")

    @classmethod
    def from_dict(cls, d: dict) -> "CVAEConfig":
        d = dict(d)
        d["image_shape"] = tuple(d["image_shape"])
        d["channels"] = tuple(d["channels"])
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


# Fashion-MNIST: narrower convolutions bought more epochs in the same time, which moved validation
# argmin accuracy more than width did (calibration in README).
PRESETS = {"fashion-mnist": CVAEConfig(latent_dim=16, channels=(16, 32))}
PRESETS["mnist"] = PRESETS["fashion-mnist"]


def preset_for(dataset: str, image_shape, num_classes: int, **overrides) -> CVAEConfig:
    """The named dataset's preset, or the base config fitted to a user's image shape and class count."""
    base = PRESETS.get(dataset, CVAEConfig(image_shape=tuple(image_shape), num_classes=num_classes))
    return replace(base, image_shape=tuple(image_shape), num_classes=num_classes, **overrides)


class Condition(nn.Module):
    """Label -> conditioning vector: one-hot, or a learned embedding."""

    def __init__(self, cfg: CVAEConfig):
        super().__init__()
        self.num_classes = cfg.num_classes
        self.embed = nn.Embedding(cfg.num_classes, cfg.embed_dim) if cfg.conditioning == "embedding" else None
        self.dim = cfg.embed_dim if self.embed is not None else cfg.num_classes

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            return self.embed(y)
        return F.one_hot(y, self.num_classes).to(torch.get_default_dtype())


def conv_trunks(image_shape, channels) -> tuple[nn.Sequential, nn.Sequential, tuple[int, int, int]]:
    """The convolutional encoder trunk (C x H x W -> flat features) and decoder trunk (features -> pixel logits),
    two stride-2 layers each, shared by the flat and the hierarchical CVAE; returns them and the feature shape."""
    c, h, w = image_shape
    c1, c2 = channels
    enc = nn.Sequential(nn.Conv2d(c, c1, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(c1, c2, 4, 2, 1), nn.LeakyReLU(0.2),
                        nn.Flatten())
    dec = nn.Sequential(nn.ConvTranspose2d(c2, c1, 4, 2, 1), nn.LeakyReLU(0.2), nn.ConvTranspose2d(c1, c, 4, 2, 1))
    return enc, dec, (c2, h // 4, w // 4)


class CVAE(nn.Module):
    """PuVAE's conditional VAE. ``reparameterize`` returns mu when not training (deterministic purifier)."""

    def __init__(self, cfg: CVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.enc_trunk, self.dec_trunk, self.feat_shape = conv_trunks(cfg.image_shape, cfg.channels)
        feat = self.feat_shape[0] * self.feat_shape[1] * self.feat_shape[2]
        self.cond = Condition(cfg)
        self.enc_head = nn.Sequential(
            nn.Linear(feat + self.cond.dim, cfg.hidden), nn.LeakyReLU(0.2),
            nn.Linear(cfg.hidden, 2 * cfg.latent_dim),
        )
        self.dec_head = nn.Sequential(
            nn.Linear(cfg.latent_dim + self.cond.dim, cfg.hidden), nn.LeakyReLU(0.2),
            nn.Linear(cfg.hidden, feat), nn.LeakyReLU(0.2),
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: B x C x H x W -> B x hidden: the label-free part of the encoder, up to W_f f."""
        first = self.enc_head[0]
        feats = self.enc_trunk(x)
        return F.linear(feats, first.weight[:, :feats.shape[1]])

    def encode_features(self, h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h: N x hidden from ``features``, y: N -> (mu, logvar), each N x latent_dim."""
        first = self.enc_head[0]
        cond = self.cond(y)
        h = h + F.linear(cond, first.weight[:, first.in_features - cond.shape[1]:], first.bias)
        mu, logvar = self.enc_head[2](self.enc_head[1](h)).chunk(2, dim=1)
        return mu, logvar.clamp(-20.0, 10.0)

    def encode(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_features(self.features(x), y)

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return mu
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def decode_logits(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """z: N x latent_dim, y: N -> pixel logits N x C x H x W (Bernoulli decoder)."""
        h = self.dec_head(torch.cat([z, self.cond(y)], dim=1))
        return self.dec_trunk(h.view(-1, *self.feat_shape))

    def decode(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decode_logits(z, y))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: B x C x H x W in [0, 1], y: B -> dict with ``logits``, ``recon``, ``mu``, ``logvar``, ``z``."""
        mu, logvar = self.encode(x, y)
        z = self.reparameterize(mu, logvar)
        logits = self.decode_logits(z, y)
        return {"logits": logits, "recon": torch.sigmoid(logits), "mu": mu, "logvar": logvar, "z": z}

    def reconstruct_all(self, x: torch.Tensor, deterministic: bool = False,
                        classes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Reconstruct every image once per class, as one batch of B*K.

        x: B x C x H x W -> ``logits``/``recon`` B x K x C x H x W, ``mu``/``logvar`` B x K x latent_dim.
        z = mu in eval mode, or always with ``deterministic``. ``classes`` (B x M, optional) reconstructs
        each image under its own M classes instead of all K (training uses it for hard negatives).
        """
        b = x.shape[0]
        feats = self.features(x)
        if classes is None:
            k = self.cfg.num_classes
            y = torch.arange(k, device=x.device).repeat(b)
        else:
            k = classes.shape[1]
            y = classes.reshape(-1)
        feats = feats.unsqueeze(1).expand(b, k, feats.shape[1]).reshape(b * k, -1)
        mu, logvar = self.encode_features(feats, y)
        z = mu if deterministic else self.reparameterize(mu, logvar)
        logits = self.decode_logits(z, y)
        shape = (b, k, *self.cfg.image_shape)
        return {
            "logits": logits.view(shape), "recon": torch.sigmoid(logits).view(shape),
            "mu": mu.view(b, k, -1), "logvar": logvar.view(b, k, -1),
        }


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)), summed over the last dimension."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def gaussian_kl(mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor) -> torch.Tensor:
    """KL(N(mu_q, exp(logvar_q)) || N(mu_p, exp(logvar_p))), summed over the last dimension."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) * torch.exp(-logvar_p) - 1.0).sum(-1)
