"""A Defense-GAN-style purifier (Samangouei et al. 2018), the benchmark's generative baseline.

Defense-GAN projects the input onto the range of a generator: z* = argmin_z ||G(z) - x||^2 by gradient descent,
L steps from each of R starting points, keeping the best, and classifies G(z*). Here G is the decoder of an
unconditional VAE (an MLP, trained with ``train_vae``) rather than a GAN's generator: the projection is the same
algorithm, and a VAE trains in minutes on 2 cores. The R starting points are drawn once from ``seed`` and kept
as a buffer, so the purifier is deterministic: the same input always gives the same output, and attacks need no
EOT (the attacker knows the starting points, as in any white-box evaluation).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..pipeline import with_alias
from ..validation import check_images


@dataclass(frozen=True)
class VAEConfig:
    image_shape: tuple[int, int, int] = (1, 28, 28)
    latent_dim: int = 16
    hidden: int = 400

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        d = dict(d)
        d["image_shape"] = tuple(d["image_shape"])
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


class VAE(nn.Module):
    """An unconditional MLP VAE with a Bernoulli decoder (Kingma & Welling's MNIST model, latent 16)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        pixels = math.prod(cfg.image_shape)
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(pixels, cfg.hidden), nn.ReLU(),
                                     nn.Linear(cfg.hidden, 2 * cfg.latent_dim))
        self.decoder = nn.Sequential(nn.Linear(cfg.latent_dim, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, pixels))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-20.0, 10.0)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).view(-1, *self.cfg.image_shape)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decode_logits(z))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        logits = self.decode_logits(z)
        return {"logits": logits, "recon": torch.sigmoid(logits), "mu": mu, "logvar": logvar}


def vae_loss(vae: VAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Negative ELBO per image (BCE summed over pixels + KL to N(0, I)), averaged over the batch."""
    out = vae(x)
    recon = F.binary_cross_entropy_with_logits(out["logits"], x, reduction="none").flatten(1).sum(1)
    kl = 0.5 * (out["mu"].pow(2) + out["logvar"].exp() - 1.0 - out["logvar"]).sum(1)
    return {"loss": (recon + kl).mean(), "recon": recon.mean(), "kl": kl.mean()}


class DefenseGAN(nn.Module):
    """Projection onto a decoder's range: ``steps`` (L) Adam steps on z from each of ``restarts`` (R) starts.

    forward(x: B x C x H x W in [0, 1]) -> dict: ``purified`` B x C x H x W (G(z*)), ``scores`` B x 1 (the
    MSE of the best restart; ``recon_error``, the same tensor, is its deprecated alias), ``z`` B x latent_dim.
    Runs its own optimisation with gradients enabled whatever the caller's grad mode; the output carries no
    gradient to x (attack it with BPDA, as Athalye et al. 2018 did).
    """

    def __init__(self, vae: VAE, steps: int = 200, restarts: int = 10, lr: float = 0.05, seed: int = 0):
        super().__init__()
        if steps < 0 or restarts < 1:
            raise ValueError(f"need steps >= 0 and restarts >= 1, got steps={steps}, restarts={restarts}")
        self.vae = vae
        self.steps, self.restarts, self.lr, self.seed = steps, restarts, lr, seed
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("z0", torch.randn(restarts, vae.cfg.latent_dim, generator=gen))
        for p in self.vae.parameters():
            p.requires_grad_(False)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.vae.cfg.image_shape

    def settings(self) -> dict:
        return {"steps": self.steps, "restarts": self.restarts, "lr": self.lr, "seed": self.seed,
                "optimizer": "adam", "generator": "VAE decoder (MLP)", **self.vae.cfg.to_dict()}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        check_images(x, self.image_shape)
        b, r = x.shape[0], self.restarts
        target = x.detach().unsqueeze(1).expand(b, r, *x.shape[1:]).reshape(b * r, -1)
        z = self.z0.repeat(b, 1).clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=self.lr)
        with torch.enable_grad():
            for _ in range(self.steps):
                err = (self.vae.decode(z).flatten(1) - target).pow(2).mean(1)
                opt.zero_grad(set_to_none=True)
                err.sum().backward()
                opt.step()
        with torch.no_grad():
            recon = self.vae.decode(z)
            err = (recon.flatten(1) - target).pow(2).mean(1).view(b, r)
            best = err.argmin(1)
            pick = torch.arange(b) * r + best
            return with_alias({"purified": recon[pick], "scores": err.gather(1, best[:, None]),
                               "z": z.detach()[pick]})
