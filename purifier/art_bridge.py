"""Attach the purifier to an Adversarial Robustness Toolbox (ART) classifier as a preprocessing defence.

    from art.estimators.classification import PyTorchClassifier
    from purifier.art_bridge import PurifierPreprocessor

    art_clf = PyTorchClassifier(model=classifier, loss=torch.nn.CrossEntropyLoss(), input_shape=(1, 28, 28),
                                nb_classes=10, clip_values=(0.0, 1.0),
                                preprocessing_defences=[PurifierPreprocessor(purifier, grad="bpda")])

Any ART attack then attacks classifier(purifier(x)). ``grad`` says how gradients cross the purifier
(see ``purifier.pipeline.PurifiedClassifier``). ART's ``PyTorchClassifier`` differentiates through
``forward`` and never calls ``estimate_forward``, so BPDA cannot be left to ART: in ``bpda`` mode ``forward``
itself is straight-through (the purified values forward, the identity backward).

Needs the ``bench`` extra (adversarial-robustness-toolbox); importing this module imports ART.
"""
from __future__ import annotations

import torch
from art.defences.preprocessor.preprocessor import PreprocessorPyTorch

from .pipeline import GRADS, PurifiedClassifier


class PurifierPreprocessor(PreprocessorPyTorch):
    """ART ``PreprocessorPyTorch`` running the purifier; ``grad`` in bpda / full / softmin / none."""

    def __init__(self, purifier: torch.nn.Module, grad: str = "bpda", tau: float = 0.01, device_type: str = "cpu"):
        if grad not in GRADS:
            raise ValueError(f"unknown grad mode {grad!r}; choose from {GRADS}")
        super().__init__(device_type=device_type, is_fitted=True, apply_fit=False, apply_predict=True)
        self.purifier = purifier.eval()
        # reuse the pipeline's gradient modes; its classifier is unused (ART applies its own model)
        self._modes = PurifiedClassifier(torch.nn.Identity(), self.purifier, grad=grad, tau=tau)
        self.grad = grad

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        return self._modes.purified(x.to(torch.get_default_dtype())), y


def art_classifier(classifier: torch.nn.Module, purifier: torch.nn.Module | None = None, grad: str = "bpda",
                   input_shape=(1, 28, 28), nb_classes: int = 10):
    """An ART ``PyTorchClassifier`` over ``classifier`` on CPU, inputs in [0, 1], with the purifier attached as a
    ``PurifierPreprocessor(grad)`` when one is given."""
    from art.estimators.classification import PyTorchClassifier

    defences = [PurifierPreprocessor(purifier, grad=grad)] if purifier is not None else None
    return PyTorchClassifier(model=classifier, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(input_shape),
                             nb_classes=nb_classes, clip_values=(0.0, 1.0), preprocessing_defences=defences,
                             device_type="cpu")
