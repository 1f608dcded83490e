"""Shipped models by name (``serve.models``: the names and where they live, torch-free) and ``load``, which gives
a shipped model's torch modules.
"""
from __future__ import annotations

import os

from serve.models import MODELS, MODELS_ROOT, ShippedModel, known, resolve

__all__ = ["MODELS", "MODELS_ROOT", "ShippedModel", "known", "resolve", "load"]


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
