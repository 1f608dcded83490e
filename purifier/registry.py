"""Shipped models by name, found wherever the package is used (any working directory).

``resolve("fashion-mnist")`` is the repository's ``models/fashion-mnist``, found from the package's own location
(``Path(purifier.__file__).resolve().parents[1] / "models"``: right for this repository and for an editable
install; a wheel does not carry ``models/``). Anything that is not a bare shipped name is a path, taken as given.
Imports no torch: the torch-free commands resolve names too; ``load`` imports torch when called.
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
    ShippedModel("fashion-mnist", "fashion-mnist",
                 "the default: PuVAE and its classifier adversarially trained together through the pipeline (joint)"),
    ShippedModel("fashion-mnist-plain", "fashion-mnist-plain",
                 "plain PuVAE (selection CE, no adversarial training) in front of a standard classifier A"),
    ShippedModel("fashion-mnist-middleware", "middleware/cvae-alone",
                 "the CVAE alone adversarially trained in front of the plain model's frozen standard classifier A"),
]}


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
                f"shipped model {text!r} is not installed here: looked for {path} (models/ beside the purifier "
                f"package, {Path(__file__).resolve().parent}); a wheel does not carry models/: install from a "
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


def load(name_or_path: str | os.PathLike):
    """A shipped model name or a model directory -> ``(purifier, classifier)``, torch modules in eval mode.

    The purifier is rebuilt as the CVAE's checkpoint records it (its design's decision rule); the classifier is
    the directory's ``classifier`` (the project's checkpoint or a user's, as ``classifier.json`` names it).
    """
    from .fitting import ModelDir

    path = resolve(name_or_path)
    for name in ("cvae.json", "classifier.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} does not exist: a model directory holds cvae.json and "
                                    f"classifier.json (purifier train --out DIR writes both)")
    model = ModelDir(path)
    return model.purifier(), model.classifier()
