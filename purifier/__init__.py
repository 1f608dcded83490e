"""purifier: PuVAE-style adversarial purification in front of an existing classifier.

Importing this package does not import torch: the torch-free runtime and CLI commands stand on the base
install. The torch objects load on first access (``purifier.Purifier`` and friends).
"""
__version__ = "0.1.0"

_LAZY = {
    "CVAE": "models.cvae", "CVAEConfig": "models.cvae",
    "Classifier": "models.classifiers", "ClassifierConfig": "models.classifiers",
    "Purifier": "pipeline", "PurifiedClassifier": "pipeline", "purify": "pipeline",
    "PuVAELoss": "losses", "TrainConfig": "train",
    "load_dataset": "data", "Dataset": "data",
    "fit": "fitting", "attach_prior": "fitting", "FitConfig": "fitting", "ModelDir": "fitting", "ClassifierSource": "classifier_io",
    "load": "registry",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'purifier' has no attribute {name!r}")
