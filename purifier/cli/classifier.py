"""The command line's three ways to name a classifier, shared by every command that takes one.

  --classifier PATH                 a project checkpoint or a model directory's classifier.json (as before)
  --classifier-factory MOD:FN       the user's code builds the module (package.module:callable or file.py:callable)
    --classifier-weights FILE       ... and its safetensors state dict
  --classifier-onnx FILE            a deployed classifier.onnx (converted for training, composed for export)
  --classifier-layout nchw|nhwc     the input layout the classifier takes (default nchw)
  --classifier-mean / -std A,B,C    the normalisation it expects on [0, 1] inputs (default: none, it takes [0, 1])

Torch is not imported here: ``purifier --help`` stays on the base install.
"""
from __future__ import annotations

import functools

import click

LAYOUT_HELP = "Input layout the classifier takes: nchw (B x C x H x W) or nhwc (B x H x W x C)."


def classifier_options(path_option: str = "--classifier", path_help: str = "Classifier checkpoint."):
    """Add the classifier options to a command; the command receives ``classifier_source`` (None if none given)."""
    def decorate(fn):
        @click.option(path_option, "classifier_path", type=click.Path(), help=path_help)
        @click.option("--classifier-factory", help="Your module's builder: package.module:callable or "
                                                   "path/to/model.py:callable (with --classifier-weights).")
        @click.option("--classifier-weights", type=click.Path(), help="The factory module's .safetensors state dict.")
        @click.option("--classifier-onnx", type=click.Path(), help="Your deployed classifier as an .onnx file.")
        @click.option("--classifier-layout", type=click.Choice(["nchw", "nhwc"]), default="nchw", show_default=True,
                      help=LAYOUT_HELP)
        @click.option("--classifier-mean", help="Per-channel mean the classifier subtracts from [0, 1] input, e.g. "
                                                "0.5 or 0.485,0.456,0.406 (with --classifier-std).")
        @click.option("--classifier-std", help="Per-channel std it divides by (with --classifier-mean).")
        @functools.wraps(fn)
        def wrapper(*args, classifier_path, classifier_factory, classifier_weights, classifier_onnx,
                    classifier_layout, classifier_mean, classifier_std, **kwargs):
            kwargs["classifier_source"] = classifier_source(
                path_option, classifier_path, classifier_factory, classifier_weights, classifier_onnx,
                classifier_layout, classifier_mean, classifier_std)
            return fn(*args, **kwargs)

        return wrapper

    return decorate


def _floats(value: str | None, option: str):
    if value is None:
        return None
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected numbers separated by commas, got {value!r}", param_hint=option) from None


def classifier_source(path_option, path, factory, weights, onnx, layout, mean, std):
    """The ``ClassifierSource`` the options name, or None; a usage error names a conflict or a missing part."""
    from ..classifier_io import ClassifierError, ClassifierSource

    named = [n for n, v in ((path_option, path), ("--classifier-factory", factory), ("--classifier-onnx", onnx))
             if v]
    if len(named) > 1:
        raise click.UsageError(f"name the classifier one way, got {' and '.join(named)}")
    if weights and not factory:
        raise click.UsageError("--classifier-weights goes with --classifier-factory")
    if factory and not weights:
        raise click.UsageError("--classifier-factory needs --classifier-weights FILE.safetensors")
    adapter = dict(layout=layout, mean=_floats(mean, "--classifier-mean"), std=_floats(std, "--classifier-std"))
    if not named:
        if layout != "nchw" or mean or std:
            raise click.UsageError("--classifier-layout/-mean/-std describe a classifier: name one too")
        return None
    try:
        if path:
            from ..classifier_io import source_of

            if layout != "nchw" or mean or std:
                raise click.UsageError(f"{path_option} names a recorded classifier; its layout and normalisation "
                                       f"are in its JSON")
            return source_of(path)
        if factory:
            return ClassifierSource("factory", factory=factory, weights=weights, **adapter)
        return ClassifierSource("onnx", path=onnx, **adapter)
    except FileNotFoundError as exc:
        raise click.BadParameter(str(exc), param_hint=path_option) from exc
    except (ClassifierError, ValueError) as exc:
        raise click.UsageError(str(exc)) from exc


def load_classifier(source, x_check=None, what: str = "--classifier"):
    """Load a ``ClassifierSource``; a classifier that cannot be loaded is a usage error naming why."""
    from ..classifier_io import ClassifierError

    try:
        return source.load(x_check)
    except (ClassifierError, FileNotFoundError) as exc:
        raise click.UsageError(f"{what}: {exc}") from exc
