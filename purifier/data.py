"""Datasets as numpy arrays: Fashion-MNIST from IDX files and a user's own ``.npz``.

Everything here is numpy only (no torch), so the torch-free commands can load data too.
Images come out as float32 ``N x C x H x W`` in [0, 1]; labels as int64 ``N``.

Dataset specs, as named on the command line:
  ``fashion-mnist``   the gzipped IDX files of Debian's ``dataset-fashion-mnist`` package
                      (``/usr/share/datasets/fashion-mnist``; override with ``$PURIFIER_FASHION_MNIST_DIR``
                      or ``root=``), falling back to a torchvision download where neither holds them.
  ``npz:PATH``        an ``.npz`` with ``x`` and ``y`` (and optionally ``x_test``/``y_test``, ``class_names``).
  ``folder:PATH``     an image folder, one subfolder per class (``PATH/CLASS/*.png``; the class names are the
                      subfolders' names, sorted), or ``PATH/train/CLASS/...`` and ``PATH/test/CLASS/...``.
                      Greyscale images give 1 channel, any other mode 3 (RGB); every image must have one size.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


@dataclass(frozen=True)
class Dataset:
    """Images ``x`` (float32, N x C x H x W, [0, 1]) with labels ``y`` (int64, N)."""

    name: str
    split: str
    x: np.ndarray
    y: np.ndarray
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])

    def subset(self, index: np.ndarray, split: str | None = None) -> "Dataset":
        return Dataset(self.name, split or self.split, self.x[index], self.y[index], self.class_names)


def load_dataset(spec: str, split: str = "train", root: str | os.PathLike | None = None) -> Dataset:
    """Load ``spec`` (``fashion-mnist`` or ``npz:PATH``), split ``train`` or ``test``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if spec == "fashion-mnist":
        return load_fashion_mnist(split, root)
    if spec.startswith("npz:"):
        return load_npz(spec[len("npz:"):], split)
    if spec.startswith("folder:"):
        return load_image_folder(spec[len("folder:"):], split)
    raise ValueError(f"unknown dataset {spec!r}: expected 'fashion-mnist', 'npz:PATH' or 'folder:PATH'")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read a (gzipped) IDX file of unsigned bytes into an array of the shape its header gives."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic {data[:4]!r})")
    if data[2] != 0x08:
        raise ValueError(f"{path}: IDX element type 0x{data[2]:02x} is not unsigned byte (0x08)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape))
    if len(data) - offset != expected:
        raise ValueError(f"{path}: header says {shape} ({expected} bytes), file holds {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def _fashion_mnist_dir(root) -> Path:
    if root is not None:
        return Path(root)
    return Path(os.environ.get("PURIFIER_FASHION_MNIST_DIR", FASHION_MNIST_DIR))


def load_fashion_mnist(split: str = "train", root=None) -> Dataset:
    directory = _fashion_mnist_dir(root)
    images_name, labels_name = _FASHION_MNIST_FILES[split]
    if not (directory / images_name).exists():
        directory = _download_fashion_mnist(directory)
    images = read_idx(directory / images_name)
    labels = read_idx(directory / labels_name)
    x = (images.astype(np.float32) / 255.0)[:, None]
    return Dataset("fashion-mnist", split, x, labels.astype(np.int64), FASHION_MNIST_CLASSES)


def _download_fashion_mnist(missing: Path) -> Path:
    """Fallback for machines without the Debian package: torchvision's downloader into a user cache."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "purifier"
    raw = cache / "FashionMNIST" / "raw"
    if (raw / _FASHION_MNIST_FILES["test"][0]).exists():
        return raw
    try:
        from torchvision.datasets import FashionMNIST
    except ImportError as exc:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {missing}; install the Debian package dataset-fashion-mnist, "
            f"set PURIFIER_FASHION_MNIST_DIR, or install torchvision to download it") from exc
    try:
        FashionMNIST(str(cache), train=True, download=True)
        FashionMNIST(str(cache), train=False, download=True)
    except Exception as exc:  # network failures come in many types
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {missing} and the download failed ({exc}); install the Debian "
            f"package dataset-fashion-mnist or set PURIFIER_FASHION_MNIST_DIR") from exc
    return raw


def images_to_float(x: np.ndarray, what: str = "x") -> np.ndarray:
    """uint8 or float images (N x H x W or N x C x H x W) -> float32 N x C x H x W in [0, 1]."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"{what} must be N x H x W or N x C x H x W, got shape {x.shape}")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{what} must be uint8 or float in [0, 1], got dtype {x.dtype}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(f"{what} holds a non-finite value {x[tuple(bad)]} at index {tuple(bad.tolist())}")
    lo, hi = float(x.min(initial=0.0)), float(x.max(initial=0.0))
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{what} must be in [0, 1], got values in [{lo}, {hi}]")
    return x


def load_npz(path: str, split: str = "train") -> Dataset:
    """A user's dataset: ``x`` and ``y`` (train), ``x_test``/``y_test`` (test, else ``x``/``y``)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"npz dataset {path!r} does not exist")
    with np.load(path, allow_pickle=False) as f:
        keys = set(f.files)
        x_key, y_key = ("x_test", "y_test") if split == "test" and "x_test" in keys else ("x", "y")
        missing = [k for k in (x_key, y_key) if k not in keys]
        if missing:
            raise ValueError(f"{path}: missing key(s) {missing}; the file holds {sorted(keys)}")
        x = images_to_float(f[x_key], f"{path}:{x_key}")
        y = np.asarray(f[y_key])
        names = tuple(str(n) for n in f["class_names"]) if "class_names" in keys else None
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"{path}:{y_key} must be a vector of {len(x)} labels, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{path}:{y_key} must hold integer labels, got dtype {y.dtype}")
    if names is None:
        names = tuple(str(i) for i in range(int(y.max(initial=0)) + 1))
    if len(y) and (y.min() < 0 or y.max() >= len(names)):
        raise ValueError(f"{path}:{y_key} labels must be in [0, {len(names)}), got range [{y.min()}, {y.max()}]")
    return Dataset(f"npz:{path}", split, x, y.astype(np.int64), names)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def load_image_folder(path: str, split: str = "train") -> Dataset:
    """An image folder with one subfolder per class (``PATH/CLASS/IMAGE``), or its ``train``/``test`` subfolders."""
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {path!r} does not exist")
    if (root / "train").is_dir() and (root / "test").is_dir():
        root = root / split
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if len(classes) < 2:
        raise ValueError(f"image folder {root} must hold one subfolder per class (at least 2), found {classes}")
    files = [(f, k) for k, c in enumerate(classes) for f in sorted((root / c).iterdir())
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise ValueError(f"image folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    images, shape = [], None
    for f, _ in files:
        try:
            with Image.open(f) as img:
                if shape is None:
                    mode = "L" if img.mode in ("1", "L", "I;16", "I", "LA") else "RGB"
                arr = np.asarray(img.convert(mode))
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"{f}: not an image Pillow can read ({exc})") from exc
        if shape is None:
            shape = arr.shape
        if arr.shape != shape:
            raise ValueError(f"{f} is {arr.shape[1]} x {arr.shape[0]}, the folder's first image {shape[1]} x "
                             f"{shape[0]}: every image must have one size")
        images.append(arr)
    x = np.stack(images)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    y = np.array([k for _, k in files], dtype=np.int64)
    return Dataset(f"folder:{path}", split, images_to_float(x), y, tuple(classes))


def train_val_split(n: int, val_size: int | float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, validation) index split; ``val_size`` is a count or a fraction."""
    n_val = int(round(val_size * n)) if isinstance(val_size, float) else int(val_size)
    if not 0 < n_val < n:
        raise ValueError(f"validation size {val_size!r} leaves no train or no validation data of {n} items")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])
