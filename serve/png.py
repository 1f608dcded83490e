"""Write 8-bit grayscale or RGB PNGs with numpy and zlib alone (no Pillow needed); grids of images, with row
labels drawn by Pillow (in the base install) when asked for."""
from __future__ import annotations

import os
import struct
import zlib

import numpy as np

from .files import atomic_write_bytes


def encode_png(image: np.ndarray) -> bytes:
    """image: H x W (gray) or H x W x 3 (RGB), uint8 or float in [0, 1] -> PNG bytes."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all():
            raise ValueError(f"image must be uint8 or finite float in [0, 1], got dtype {a.dtype}")
        a = np.round(np.clip(a, 0.0, 1.0) * 255).astype(np.uint8)
    if a.ndim == 2:
        color = 0
    elif a.ndim == 3 and a.shape[2] == 3:
        color = 2
    else:
        raise ValueError(f"image must be H x W or H x W x 3, got shape {a.shape}")
    h, w = a.shape[:2]
    rows = a.reshape(h, -1)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Encode and write atomically."""
    atomic_write_bytes(path, encode_png(image))


def image_grid(rows: list[np.ndarray], pad: int = 2, scale: int = 3, labels: list[str] | None = None) -> np.ndarray:
    """rows: each N x C x H x W in [0, 1] (C = 1) -> one H' x W' gray image, rows stacked, pixels upscaled.

    ``labels``: one per row, written left of it in a white strip (black text), so the image says what each row is.
    """
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"labels must name each of the {len(rows)} rows, got {len(labels)}: {list(labels)}")
    n = max(len(r) for r in rows)
    _, _, h, w = rows[0].shape
    grid = np.ones((len(rows) * (h + pad) + pad, n * (w + pad) + pad), np.float32)
    for i, r in enumerate(rows):
        for j, img in enumerate(r):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            grid[top:top + h, left:left + w] = img[0]
    grid = np.kron(grid, np.ones((scale, scale), np.float32))
    if labels is None:
        return grid
    centres = [(pad + i * (h + pad)) * scale + h * scale // 2 for i in range(len(rows))]
    return np.concatenate([label_strip(labels, centres, grid.shape[0], size=max(10, h * scale // 5)), grid], axis=1)


def label_strip(labels: list[str], centres: list[int], height: int, size: int = 16) -> np.ndarray:
    """A white ``height`` x W float strip with each label in black, vertically centred on its ``centres`` row."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=size)  # scalable where Pillow has FreeType (Pillow >= 10.1)
    except (TypeError, OSError, ImportError):
        font = ImageFont.load_default()  # Pillow's small bitmap font
    draw = ImageDraw.Draw(Image.new("L", (1, 1)))
    boxes = [draw.textbbox((0, 0), text, font=font) for text in labels]
    margin = max(4, size // 2)
    strip = Image.new("L", (max(b[2] for b in boxes) + 2 * margin, height), 255)
    draw = ImageDraw.Draw(strip)
    for text, box, cy in zip(labels, boxes, centres):
        draw.text((margin - box[0], cy - (box[1] + box[3]) // 2), text, fill=0, font=font)
    return np.asarray(strip, np.float32) / np.float32(255.0)
