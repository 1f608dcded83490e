"""A numpy-in, numpy-out purifier on onnxruntime. Imports neither torch nor purifier nor export.

Everything the runtime needs (input shape, value range, class names, rejection threshold) is read from the
ONNX model's ``metadata_props``.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


PRECISIONS = ("fp32", "int8")
SCORES = "scores"
# deprecated output -> the output it repeats; kept for one release, removed in the next
ALIASES = {"recon_error": SCORES}


def check_precision(precision: str | None) -> str | None:
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def resolve_model(path: str | os.PathLike, prefer: str = "pipeline.onnx", precision: str | None = None) -> Path:
    """A model directory (holding pipeline.onnx or purifier.onnx) or an .onnx file -> the .onnx path.

    ``precision="int8"`` picks a directory's ``pipeline.int8.onnx`` (or ``purifier.int8.onnx``), written by
    ``purifier export DIR --int8``; a missing one is a ``FileNotFoundError`` naming the path and that command."""
    path = Path(path)
    if check_precision(precision) == "int8" and path.is_dir():
        for name in (prefer, "pipeline.onnx", "purifier.onnx"):
            if (path / name).is_file() and (path / name.replace(".onnx", ".int8.onnx")).is_file():
                return path / name.replace(".onnx", ".int8.onnx")
        raise FileNotFoundError(f"precision int8 asked for, but {path / 'pipeline.int8.onnx'} does not exist: write it "
                                f"with `purifier export {path} --int8` (or pass --precision fp32)")
    if path.is_dir():
        for name in (prefer, "pipeline.onnx", "purifier.onnx"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"no pipeline.onnx or purifier.onnx in {path}")
    if not path.is_file():
        raise FileNotFoundError(f"model {path} does not exist")
    return path


def select_model(path: str | os.PathLike, precision: str | None = None) -> Path:
    """``resolve_model`` for the command line: an .onnx file given with a ``precision`` must be of that precision
    (``ValueError`` naming both); its metadata is read by a bare CPU session."""
    resolved = resolve_model(path, precision=precision)
    if precision is not None and not Path(path).is_dir():
        opts = ort.SessionOptions()
        opts.log_severity_level, opts.graph_optimization_level = 3, ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        _precision_of(resolved, ort.InferenceSession(str(resolved), opts, providers=[CPU]), precision)
    return resolved


def _precision_of(path: Path, session: ort.InferenceSession, asked: str | None) -> str:
    """The precision a model's metadata names (fp32 where it names none: exported before int8 existed), checked
    against the one ``asked`` for."""
    have = session.get_modelmeta().custom_metadata_map.get("precision", "fp32")
    if asked is not None and have != asked:
        raise ValueError(f"{path} has precision {have} (its metadata), but precision {asked} was asked for")
    return have


def cuda_driver_gpus() -> int:
    """GPUs the CUDA driver reports (0 without a driver), asked of libcuda directly: quiet and cheap."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    except (OSError, AttributeError):
        return 0


def choose_providers(device: str = "auto") -> list[str]:
    """Providers to ask for. ``auto``: CUDA first when this build has it and a GPU answers, else CPU only."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cpu":
        return [CPU]
    if CUDA not in ort.get_available_providers():
        if device == "cuda":
            raise RuntimeError("device 'cuda' asked for, but this onnxruntime build has no CUDA provider")
        return [CPU]
    if device == "auto" and cuda_driver_gpus() == 0:
        return [CPU]
    return [CUDA, CPU]


def _session(path: Path, device: str, threads: int | None) -> ort.InferenceSession:
    def options(severity: int = 2) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        opts.log_severity_level = severity
        if threads:
            opts.intra_op_num_threads = threads
        return opts

    providers = choose_providers(device)
    if CUDA not in providers:
        return ort.InferenceSession(str(path), options(), providers=providers)
    # A GPU answered; the CUDA provider may still fail to load (cuDNN/cuBLAS missing). Try it with provider
    # logs silenced, keep it only if it really started, and fall back to the CPU quietly under "auto".
    if hasattr(ort, "preload_dlls"):
        with contextlib.suppress(Exception):
            ort.preload_dlls()
    ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(str(path), options(4), providers=providers)
    finally:
        ort.set_default_logger_severity(2)
    if CUDA not in session.get_providers():
        if device == "cuda":
            raise RuntimeError(f"device 'cuda' asked for, but the CUDA provider did not start (providers: "
                               f"{session.get_providers()})")
        return ort.InferenceSession(str(path), options(), providers=[CPU])
    return session


class OnnxPurifier:
    """Run an exported ``purifier.onnx`` or ``pipeline.onnx``.

    ``__call__(x)`` takes N x C x H x W (or N x H x W for one channel), float32 in [0, 1] or uint8, and
    returns a dict of numpy arrays: ``purified``, ``chosen_class``, ``scores`` (N x K, the selection rule's score
    per class, lower = better fit), ``logits`` and ``predicted_class`` (pipeline models only), ``margin`` (runner-up
    minus best score) and ``rejected`` (best score above the model's calibrated threshold), and ``recon_error``:
    the ``scores`` array again, a deprecated alias removed in the next release. A model exported by an earlier
    release (``recon_error`` without ``scores``) gives the same dict.

    ``precision``: ``"fp32"`` or ``"int8"`` (a model directory's ``pipeline.int8.onnx``, from
    ``purifier export --int8``); None takes a directory's fp32 model, or a file as its metadata says.
    """

    def __init__(self, model: str | os.PathLike, device: str = "auto", threads: int | None = None,
                 precision: str | None = None):
        self.path = resolve_model(model, precision=precision)
        self.session = _session(self.path, device, threads)
        props = self.session.get_modelmeta().custom_metadata_map
        missing = [k for k in ("input_shape", "class_names", "rejection_threshold", "value_range") if k not in props]
        if missing:
            raise ValueError(f"{self.path}: metadata_props lacks {missing}; export it with `purifier export`")
        self.metadata = {k: _decode(v) for k, v in props.items()}
        self.precision = _precision_of(self.path, self.session, precision)
        self.image_shape = tuple(int(d) for d in self.metadata["input_shape"][1:])
        self.class_names = list(self.metadata["class_names"])
        self.threshold = float(self.metadata["rejection_threshold"])
        graph = [o.name for o in self.session.get_outputs()]
        # run every graph output but an alias of another; a graph of an earlier release (recon_error, no scores)
        # has its recon_error run and named scores
        self._run = [n for n in graph if ALIASES.get(n) not in graph]
        self._names = [SCORES if n in ALIASES else n for n in self._run]
        self.outputs = [*self._names, *(a for a, of in ALIASES.items() if of in self._names)]

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def validate(self, x) -> np.ndarray:
        """Check and convert a batch; raise ``ValueError`` naming the offending value."""
        x = np.asarray(x)
        c, h, w = self.image_shape
        if x.ndim == 3 and c == 1:
            x = x[:, None]
        if x.ndim != 4:
            raise ValueError(f"input must be N x {c} x {h} x {w}, got shape {x.shape}")
        if x.shape[1:] != (c, h, w):
            raise ValueError(f"input has shape {x.shape}, the model expects N x {c} x {h} x {w}")
        if x.shape[0] == 0:
            raise ValueError(f"input holds no images (shape {x.shape})")
        if x.dtype == np.uint8:
            return x.astype(np.float32) / np.float32(255.0)
        if x.dtype not in (np.float32, np.float64, np.float16):
            raise ValueError(f"input dtype must be float32 in [0, 1] or uint8, got {x.dtype}")
        x = x.astype(np.float32, copy=False)
        bad = ~np.isfinite(x)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"input holds a non-finite value {x[idx]} at index {idx}")
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"input must be in [0, 1], got values in [{lo}, {hi}]")
        return x

    def __call__(self, x) -> dict[str, np.ndarray]:
        x = self.validate(x)
        out = dict(zip(self._names, self.session.run(self._run, {"x": x})))
        out.update({alias: out[of] for alias, of in ALIASES.items() if of in out})
        ranked = np.sort(out[SCORES], axis=1)
        out["margin"] = ranked[:, 1] - ranked[:, 0]
        out["rejected"] = ranked[:, 0] > self.threshold
        if "logits" in out:
            out["predicted_class"] = out["logits"].argmax(1)
        return out


def _decode(value: str):
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return value
