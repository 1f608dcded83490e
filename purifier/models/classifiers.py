"""Reference classifiers: the two MNIST/Fashion-MNIST architectures of the PuVAE paper.

A: conv64-5x5, conv64-5x5 stride 2, dropout .25, fc128, dropout .5, fc10.
B: conv128-3x3, conv64-3x3 stride 2, same head.
Convolutions are unpadded ('valid'), as in the Keras models the paper's setups come from.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

ARCHS = {
    # arch: ((out_channels, kernel, stride), ...)
    "a": ((64, 5, 1), (64, 5, 2)),
    "b": ((128, 3, 1), (64, 3, 2)),
}


@dataclass(frozen=True)
class ClassifierConfig:
    arch: str = "a"
    image_shape: tuple[int, int, int] = (1, 28, 28)
    num_classes: int = 10
    hidden: int = 128

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown classifier arch {self.arch!r}; choose from {sorted(ARCHS)}")

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifierConfig":
        d = dict(d)
        d["image_shape"] = tuple(d["image_shape"])
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


class Classifier(nn.Module):
    """x: B x C x H x W in [0, 1] -> logits B x num_classes."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        c, h, w = cfg.image_shape
        layers: list[nn.Module] = []
        for out, k, s in ARCHS[cfg.arch]:
            layers += [nn.Conv2d(c, out, k, s), nn.ReLU()]
            c, h, w = out, (h - k) // s + 1, (w - k) // s + 1
        if h < 1 or w < 1:
            raise ValueError(f"image shape {cfg.image_shape} is too small for classifier arch {cfg.arch!r}")
        self.net = nn.Sequential(
            *layers, nn.Dropout(0.25), nn.Flatten(),
            nn.Linear(c * h * w, cfg.hidden), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(cfg.hidden, cfg.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
