import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from purifier.data import load_dataset
from purifier.models.classifiers import Classifier, ClassifierConfig
from purifier.models.cvae import CVAE, CVAEConfig


@pytest.fixture(scope="session")
def fmnist_test():
    return load_dataset("fashion-mnist", "test")


@pytest.fixture
def small_cvae():
    torch.manual_seed(0)
    return CVAE(CVAEConfig(latent_dim=8, channels=(8, 16), hidden=32)).eval()


@pytest.fixture
def small_classifier():
    torch.manual_seed(0)
    return Classifier(ClassifierConfig(arch="a")).eval()


@pytest.fixture
def batch():
    return torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def write_bands(path):
    """A dataset of another size and class count: 5 classes of 1 x 32 x 32, uint8, with a test split, at ``path``.

    Class k is a bright horizontal band at rows 6k..6k+5 plus noise, so a model can learn it quickly.
    """
    rng = np.random.default_rng(0)

    def make(n):
        y = rng.integers(0, 5, n)
        x = rng.integers(0, 60, (n, 32, 32)).astype(np.uint8)
        for i, k in enumerate(y):
            x[i, 6 * k:6 * k + 6] = 220
        return x, y

    x, y = make(600)
    xt, yt = make(100)
    np.savez(path, x=x, y=y, x_test=xt, y_test=yt, class_names=np.array([f"band{k}" for k in range(5)]))
    return path


@pytest.fixture
def tiny_npz(tmp_path):
    return write_bands(tmp_path / "bands.npz")


def run_torch_free(code: str, forbidden: tuple = ("torch",), cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (in ``cwd``, default the repository root), then check that it imported
    none of the modules ``forbidden``; returns the finished process for checks of its output."""
    check = (f"\nimport sys as _sys\n_bad = [m for m in {tuple(forbidden)!r} if m in _sys.modules]\n"
             "assert not _bad, f'imported: {_bad}'\n")
    r = subprocess.run([sys.executable, "-c", code + check], cwd=cwd or Path(__file__).resolve().parents[1],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.fixture
def torch_free():
    """``run_torch_free``: code that must run without importing torch (or the other modules named)."""
    return run_torch_free
