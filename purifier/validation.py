"""Checks at the boundary: bad input fails here with the offending value named."""
from __future__ import annotations

import torch


def check_images(x: torch.Tensor, image_shape: tuple[int, int, int], what: str = "x") -> None:
    """Raise ``ValueError``/``TypeError`` unless x is a float B x C x H x W batch in [0, 1] of ``image_shape``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{what} must have rank 4 (B x C x H x W), got shape {tuple(x.shape)}")
    if tuple(x.shape[1:]) != tuple(image_shape):
        c, h, w = image_shape
        if x.shape[1] != c:
            raise ValueError(f"{what} has {x.shape[1]} channels, the model expects {c} (shape {tuple(x.shape)})")
        raise ValueError(f"{what} has spatial size {tuple(x.shape[2:])}, the model expects {(h, w)}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor in [0, 1], got dtype {x.dtype}")
    if torch.compiler.is_compiling():  # data-dependent checks cannot live in an exported graph
        return
    x = x.detach()
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        idx = tuple(torch.nonzero(~finite)[0].tolist())
        raise ValueError(f"{what} holds a non-finite value {x[idx].item()} at index {idx}")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{what} must be in [0, 1], got values in [{lo}, {hi}]")


def check_labels(y: torch.Tensor, num_classes: int, n: int | None = None, what: str = "y") -> None:
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.is_floating_point():
        raise ValueError(f"{what} must be a 1-D integer tensor, got {getattr(y, 'dtype', type(y))} "
                         f"of shape {tuple(getattr(y, 'shape', ()))}")
    if n is not None and len(y) != n:
        raise ValueError(f"{what} has {len(y)} labels for {n} images")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{what} labels must be in [0, {num_classes}), got range [{int(y.min())}, {int(y.max())}]")
