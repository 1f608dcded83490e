"""A classifier the project did not make, named three ways, loaded as a frozen ``nn.Module``.

  ``checkpoint``  a project checkpoint (``NAME.json`` + ``NAME.safetensors`` of kind ``classifier``)
  ``factory``     ``package.module:callable`` (or ``path/to/model.py:callable``) that builds the module, plus a
                  safetensors state dict: the user's own code and weights, no pickle
  ``onnx``        a deployed ``classifier.onnx``, converted to a differentiable torch module by onnx2torch
                  (``export.onnx_classifier``: ``export/`` is the only package that reads ONNX) and checked
                  against onnxruntime on real images before use

What every classifier must do: take B x C x H x W float images in [0, 1] and return B x K logits. One that
expects another input declares it and is wrapped by ``InputAdapter``: ``layout="nhwc"`` (B x H x W x C) and
``mean``/``std`` (per channel; the classifier sees (x - mean) / std). The purifier never changes its weights:
``state_digest`` is taken before and after training and must agree.

A model directory records its classifier as ``classifier.json`` beside the weights (``classifier.safetensors``,
with a file factory's code as ``classifier_factory.py``) or the model (``classifier.onnx`` and its external
data), so every command rebuilds it from the directory alone, wherever it is moved
(``checkpoint.load(DIR / "classifier", expect="classifier")``).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

KINDS = ("checkpoint", "factory", "onnx")
FACTORY_FILE = "classifier_factory.py"  # a file factory's code, copied into the model directory
LAYOUTS = ("nchw", "nhwc")


class ClassifierError(ValueError):
    """A user's classifier cannot be loaded or does not do what a purifier needs."""


@dataclass(frozen=True)
class ClassifierSource:
    """Where a classifier comes from, as recorded in a model directory's ``classifier.json``."""

    kind: str
    path: str | None = None          # checkpoint stem or .onnx file
    factory: str | None = None       # "package.module:callable" or "file.py:callable"
    weights: str | None = None       # the factory module's safetensors state dict
    kwargs: dict = field(default_factory=dict)  # keyword arguments of the factory (JSON values)
    layout: str = "nchw"
    mean: tuple | None = None
    std: tuple | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ClassifierError(f"classifier kind must be one of {KINDS}, got {self.kind!r}")
        if self.layout not in LAYOUTS:
            raise ClassifierError(f"classifier layout must be one of {LAYOUTS}, got {self.layout!r}")
        if (self.mean is None) != (self.std is None):
            raise ClassifierError("give both mean and std (the classifier's input normalisation), or neither")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ClassifierError(f"std must be positive, got {list(self.std)}")
        if self.kind == "factory" and not (self.factory and self.weights):
            raise ClassifierError("a factory classifier needs both the factory (package.module:callable) and "
                                  "its weights (.safetensors)")
        if self.kind in ("checkpoint", "onnx") and not self.path:
            raise ClassifierError(f"a {self.kind} classifier needs a path")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"] = list(self.mean) if self.mean is not None else None
        d["std"] = list(self.std) if self.std is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifierSource":
        d = dict(d)
        for k in ("mean", "std"):
            if d.get(k) is not None:
                d[k] = tuple(float(v) for v in d[k])
        return cls(**d)

    def files(self) -> list[Path]:
        """The files that hold the classifier's weights (hashed, copied into model directories)."""
        if self.kind == "checkpoint":
            from .checkpoint import file_of, stem_of

            stem = stem_of(self.path)
            return [file_of(stem, ".safetensors"), file_of(stem, ".json")]
        return [Path(self.weights if self.kind == "factory" else self.path)]

    def sha256(self) -> str:
        """sha256 of the weights file (the checkpoint's recorded one for project checkpoints)."""
        if self.kind == "checkpoint":
            from . import checkpoint

            return checkpoint.read_record(self.path)["weights_sha256"]
        return _sha256_file(self.files()[0])

    def load(self, x_check=None) -> nn.Module:
        """The classifier, frozen (no parameter requires grad) and in eval mode, behind its ``InputAdapter``.

        ``x_check`` (N x C x H x W in [0, 1], numpy): the real images an ONNX classifier's conversion is
        checked on against onnxruntime (default: 16 uniform random images of its input shape).
        """
        if self.kind == "checkpoint":
            from . import checkpoint

            try:
                module = checkpoint.load(self.path, expect="classifier")
            except (FileNotFoundError, ValueError) as exc:
                raise ClassifierError(str(exc)) from exc
        elif self.kind == "factory":
            module = build_factory(self.factory, self.weights, self.kwargs)
        else:
            from export.onnx_classifier import to_torch

            module = to_torch(self.path, x_check, layout=self.layout)
        return freeze(InputAdapter.wrap(module, self.layout, self.mean, self.std))


def _sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def import_factory(spec: str):
    """``package.module:callable`` or ``path/to/file.py:callable`` -> the callable."""
    if not isinstance(spec, str) or spec.count(":") < 1 or not spec.rsplit(":", 1)[1]:
        raise ClassifierError(f"classifier factory {spec!r} must look like package.module:callable "
                              f"or path/to/model.py:callable")
    where, name = spec.rsplit(":", 1)
    try:
        if where.endswith(".py"):
            path = Path(where).resolve()
            if not path.is_file():
                raise ClassifierError(f"classifier factory {spec!r}: file {path} does not exist")
            mod_name = f"_purifier_factory_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
            module = sys.modules.get(mod_name)
            if module is None:
                loader = importlib.util.spec_from_file_location(mod_name, path)
                module = importlib.util.module_from_spec(loader)
                sys.modules[mod_name] = module
                try:
                    loader.loader.exec_module(module)
                except BaseException:
                    del sys.modules[mod_name]
                    raise
        else:
            module = importlib.import_module(where)
    except ClassifierError:
        raise
    except Exception as exc:  # an import runs the user's code: any error is theirs to see, named
        raise ClassifierError(f"classifier factory {spec!r} does not import: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ClassifierError(f"classifier factory {spec!r}: {where} has no callable {name!r}")
    return fn


def build_factory(spec: str, weights, kwargs: dict | None = None) -> nn.Module:
    """Build the module with the factory and load its safetensors state dict (every key must fit)."""
    from safetensors.torch import load_file

    fn = import_factory(spec)
    try:
        module = fn(**(kwargs or {}))
    except Exception as exc:
        raise ClassifierError(f"classifier factory {spec!r} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(module, nn.Module):
        raise ClassifierError(f"classifier factory {spec!r} returned a {type(module).__name__}, not a torch nn.Module")
    weights = Path(weights)
    if not weights.is_file():
        raise ClassifierError(f"classifier weights {weights} do not exist")
    try:
        state = load_file(str(weights))
    except Exception as exc:
        raise ClassifierError(f"classifier weights {weights} are not a safetensors file: {exc}") from exc
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ClassifierError(f"classifier weights {weights} do not fit the module {spec!r} builds: "
                              f"{str(exc).splitlines()[0]} {_key_diff(module, state)}") from exc
    return module


def _key_diff(module: nn.Module, state: dict) -> str:
    want, got = set(module.state_dict()), set(state)
    parts = []
    if want - got:
        parts.append(f"missing {sorted(want - got)[:5]}")
    if got - want:
        parts.append(f"unexpected {sorted(got - want)[:5]}")
    return "(" + "; ".join(parts) + ")" if parts else ""


class InputAdapter(nn.Module):
    """x (B x C x H x W in [0, 1]) -> the input the wrapped classifier expects: (x - mean) / std, then NHWC."""

    def __init__(self, classifier: nn.Module, layout: str = "nchw", mean=None, std=None):
        super().__init__()
        self.classifier = classifier
        self.layout = layout
        self.normalise = mean is not None
        if self.normalise:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    @classmethod
    def wrap(cls, classifier: nn.Module, layout: str = "nchw", mean=None, std=None) -> nn.Module:
        """The classifier itself when it takes the project's input as it is, else an adapter around it."""
        if layout == "nchw" and mean is None:
            return classifier
        return cls(classifier, layout, mean, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalise:
            x = (x - self.mean) / self.std
        if self.layout == "nhwc":
            x = x.permute(0, 2, 3, 1)
        return self.classifier(x)


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode, no parameter requires grad: the purifier trains around it, never into it."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def state_digest(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes): equal before and after training
    means the classifier was not changed."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@torch.no_grad()
def check_classifier(module: nn.Module, image_shape, num_classes: int, what: str = "classifier") -> None:
    """Raise ``ClassifierError`` unless ``module`` maps 2 x C x H x W images in [0, 1] to 2 x num_classes logits."""
    x = torch.full((2, *image_shape), 0.5)
    was = module.training
    module.eval()
    try:
        out = module(x)
    except Exception as exc:
        raise ClassifierError(f"{what} fails on a 2 x {' x '.join(map(str, image_shape))} batch in [0, 1] (the "
                              f"data's shape): {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    finally:
        module.train(was)
    if not isinstance(out, torch.Tensor):
        raise ClassifierError(f"{what} must return a logits tensor, got {type(out).__name__}")
    if out.dim() != 2 or out.shape[0] != 2:
        raise ClassifierError(f"{what} must return B x K logits; for a batch of 2 it returned shape "
                              f"{tuple(out.shape)}")
    if out.shape[1] != num_classes:
        raise ClassifierError(f"{what} returns {out.shape[1]} logits per image, the data has {num_classes} classes")


def write_into(directory, source: ClassifierSource, module: nn.Module | None = None, meta: dict | None = None,
               trained: bool = False) -> Path:
    """Record ``source``'s classifier in ``directory`` as ``classifier.json`` (+ its weights file) and return the
    stem. A frozen classifier's files are copied byte for byte; a trained one (``trained``) is saved from
    ``module`` (a project checkpoint through ``checkpoint.save``, a factory module's state dict as safetensors)."""
    from . import __version__, checkpoint
    from .checkpoint import write_json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / "classifier"
    if source.kind == "checkpoint":
        if trained:
            inner = module.classifier if isinstance(module, InputAdapter) else module
            return checkpoint.save(inner, stem, meta)
        src = checkpoint.stem_of(source.path)
        if src.resolve() != stem.resolve():
            for suffix in (".safetensors", ".json"):
                _copy(checkpoint.file_of(src, suffix), checkpoint.file_of(stem, suffix))
        return stem
    if source.kind == "onnx":
        if trained:
            raise ClassifierError("an ONNX classifier cannot be trained in place; use the mode that trains the CVAE "
                                  "alone (cvae)")
        weights = directory / "classifier.onnx"
        if Path(source.path).resolve() != weights.resolve():
            from export.onnx_classifier import inspect_classifier

            # its external-data files keep the names the graph gives them, beside the copy
            for name in inspect_classifier(source.path)["external_data"]:
                _copy(Path(source.path).parent / name, directory / name)
            _copy(source.path, weights)
        recorded = ClassifierSource("onnx", path="classifier.onnx", layout=source.layout, mean=source.mean,
                                    std=source.std)
    else:
        weights = directory / "classifier.safetensors"
        if trained:
            from safetensors.torch import save_file

            from serve.files import atomic_write

            inner = module.classifier if isinstance(module, InputAdapter) else module
            state = {k: v.detach().contiguous().cpu() for k, v in inner.state_dict().items()}
            atomic_write(weights, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        elif Path(source.weights).resolve() != weights.resolve():
            _copy(source.weights, weights)
        factory = source.factory
        where, name = factory.rsplit(":", 1)
        if where.endswith(".py"):  # the model's code travels with the directory, named relative to it
            if Path(where).resolve() != (directory / FACTORY_FILE).resolve():
                _copy(where, directory / FACTORY_FILE)
            factory = f"{FACTORY_FILE}:{name}"
        recorded = ClassifierSource("factory", factory=factory, weights="classifier.safetensors",
                                    kwargs=source.kwargs, layout=source.layout, mean=source.mean, std=source.std)
    record = {"kind": source.kind, "source": recorded.to_dict(), "weights_sha256": _sha256_file(weights),
              "meta": meta or {}, "version": __version__}
    write_json(checkpoint.file_of(stem, ".json"), record, sort_keys=True)
    return stem


def _copy(src, dst) -> None:
    from serve.files import atomic_write

    if not Path(src).is_file():
        raise ClassifierError(f"classifier file {src} does not exist")
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def load_recorded(stem, record: dict, x_check=None) -> nn.Module:
    """The classifier a ``classifier.json`` of kind factory or onnx records (its files relative to its folder)."""
    module = _resolve(ClassifierSource.from_dict(record["source"]), Path(stem).parent).load(x_check)
    module.meta = record.get("meta", {})
    return module


def _resolve(src: ClassifierSource, base: Path) -> ClassifierSource:
    """A recorded source with its file named relative to the directory that holds its ``classifier.json``."""
    if src.kind == "onnx":
        return ClassifierSource("onnx", path=str(base / src.path), layout=src.layout, mean=src.mean, std=src.std)
    where, name = src.factory.rsplit(":", 1)
    factory = f"{base / where}:{name}" if where.endswith(".py") and not Path(where).is_absolute() else src.factory
    return ClassifierSource("factory", factory=factory, weights=str(base / src.weights), kwargs=src.kwargs,
                            layout=src.layout, mean=src.mean, std=src.std)


def source_of(path) -> ClassifierSource:
    """The ``ClassifierSource`` of a checkpoint or a model directory's ``classifier.json`` (paths resolved)."""
    from . import checkpoint

    stem = checkpoint.stem_of(path)
    record = checkpoint.read_record(stem)
    if record["kind"] == "classifier":
        return ClassifierSource("checkpoint", path=str(stem))
    return _resolve(ClassifierSource.from_dict(record["source"]), stem.parent)


def describe(module: nn.Module) -> str:
    """A short name for reports: the project architecture, or the user's class name."""
    inner = module.classifier if isinstance(module, InputAdapter) else module
    cfg = getattr(inner, "cfg", None)
    return f"arch {cfg.arch}" if cfg is not None and hasattr(cfg, "arch") else type(inner).__name__


__all__ = ["ClassifierSource", "ClassifierError", "InputAdapter", "check_classifier", "state_digest", "freeze",
           "write_into", "load_recorded", "source_of", "build_factory", "import_factory", "describe"]
