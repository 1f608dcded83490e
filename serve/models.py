"""Shipped models by name, found wherever the package is used (any working directory) (torch-free).

``resolve("fashion-mnist")`` is the repository's ``models/middleware/cvae-alone-smooth200-tau3-prior1-mu2`` (the
default), found from the package's own location (``Path(serve.__file__).resolve().parents[1] / "models"``: right
for this repository and for an editable install; a wheel does not carry ``models/``). Anything that is not a bare
shipped name is a path, taken as given.
``purifier serve``, ``purifier purify`` and ``purifier demo`` resolve names here; ``purifier.load(name)`` too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MODELS_ROOT = Path(__file__).resolve().parents[1] / "models"


@dataclass(frozen=True)
class ShippedModel:
    name: str
    folder: str   # under MODELS_ROOT
    summary: str

    @property
    def path(self) -> Path:
        return MODELS_ROOT / self.folder


MODELS = {m.name: m for m in [
    ShippedModel("fashion-mnist", "middleware/cvae-alone-smooth200-tau3-prior1-mu2",
                 "the default: the CVAE alone adversarially trained (PGD-7, targeted selection attack included, "
                 "TRADES-style smoothness term on the selection, selection temperature 0.003, then 1 epoch through "
                 "a robust prior) in front of a frozen, untouched standard classifier A (the plain model's), its "
                 "rule consulting that robust prior (the converged PGD-AT of A, mu 0.002)"),
    ShippedModel("fashion-mnist-middleware", "middleware/cvae-alone-smooth200-tau3-prior1-mu2",
                 "the default, by the name of its setting"),
    ShippedModel("fashion-mnist-plain", "fashion-mnist-plain",
                 "plain PuVAE (selection CE, no adversarial training) in front of a standard classifier A"),
    ShippedModel("fashion-mnist-joint", "adversarial/joint",
                 "PuVAE and its classifier adversarially trained together through the pipeline (the classifier "
                 "is retrained)"),
]}


def shipped_name(folder: str | os.PathLike) -> str | None:
    """The main name of a shipped model's folder (the first of its names in ``MODELS``), or None."""
    path = Path(folder).resolve()
    return next((m.name for m in MODELS.values() if m.path.resolve() == path), None)


def known() -> str:
    return ", ".join(MODELS)


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A shipped model name (``MODELS``) or a path -> the model's path; ``FileNotFoundError`` saying where it looked.

    A bare name of ``MODELS`` always means the shipped model, whatever the working directory holds; write
    ``./fashion-mnist`` for a folder of that name here. A path must exist (a model directory or an .onnx file).
    """
    text = os.fspath(name_or_path)
    if text in MODELS:
        path = MODELS[text].path
        if not path.exists():
            raise FileNotFoundError(
                f"shipped model {text!r} is not installed here: looked for {path} (models/ beside the serve and "
                f"purifier packages, {Path(__file__).resolve().parent.parent}); a wheel does not carry models/: install from a "
                f"clone of the repository (pip install -e .) or pass a model directory")
        return path
    path = Path(text)
    if path.exists():
        return path
    if os.sep not in text and "/" not in text and not path.suffix:
        raise FileNotFoundError(f"no model {text!r}: not a shipped model name ({known()}) and no such directory "
                                f"in {Path.cwd()}")
    raise FileNotFoundError(f"model {text!r} does not exist (a model directory, an .onnx file, or a shipped "
                            f"model name: {known()})")
