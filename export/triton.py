"""Triton Inference Server model repositories for an exported ONNX model: ONNX Runtime backend, Python backend.

    purifier export models/middleware/cvae-alone-smooth200-tau3-prior1-mu2 --triton triton-repo \
        --triton-name fashion-mnist
    docker run --rm -p 8000:8000 -v $PWD/triton-repo:/models nvcr.io/nvidia/tritonserver:<tag>-py3 \
        tritonserver --model-repository=/models

``--triton-backend`` (``write_triton_repos``) chooses what goes in: ``onnx`` writes ``REPO/<name>/1/model.onnx``
and ``REPO/<name>/config.pbtxt`` (platform ``onnxruntime_onnx``, the ONNX model's inputs and outputs with the batch
dimension left to ``max_batch_size``, dynamic batching), serving the graph's own outputs; ``python`` writes
``REPO/<name>-python`` (``serve.triton.write_python_repo``: backend ``python`` running ``serve.runtime``'s
``OnnxPurifier``), serving those and ``margin``, ``rejected``, ``predicted_class`` exactly as ``purifier serve``
computes them; ``both`` (the default) writes the two. The same Open Inference Protocol clients work against
Triton and against ``purifier serve``.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import onnx

from serve.files import atomic_write_bytes
from serve.triton import check_model_name, config_text, write_python_repo

BACKENDS = ("both", "onnx", "python")

# ONNX TensorProto element type -> Triton DataType name
TRITON_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.DOUBLE: "TYPE_FP64",
                onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.INT64: "TYPE_INT64",
                onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.UINT8: "TYPE_UINT8",
                onnx.TensorProto.BOOL: "TYPE_BOOL"}


def onnx_io(path: str | os.PathLike) -> dict[str, list[tuple[str, str, list[int]]]]:
    """The model's inputs and outputs as (name, Triton type, dims without the batch dimension; -1 if dynamic)."""
    model = onnx.load(str(path), load_external_data=False)
    out = {}
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        rows = []
        for v in values:
            t = v.type.tensor_type
            if t.elem_type not in TRITON_TYPES:
                raise ValueError(f"{path}: {kind} {v.name!r} has ONNX element type {t.elem_type}, which this "
                                 f"exporter does not map to a Triton type")
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            if not dims:
                raise ValueError(f"{path}: {kind} {v.name!r} has no batch dimension")
            rows.append((v.name, TRITON_TYPES[t.elem_type], dims[1:]))
        out[kind] = rows
    return out


def config_pbtxt(name: str, io: dict, max_batch_size: int, max_queue_delay_us: int) -> str:
    return config_text(name, 'platform: "onnxruntime_onnx"', io, max_batch_size, max_queue_delay_us)


def write_triton_repo(model: str | os.PathLike, repo: str | os.PathLike, name: str = "purifier",
                      max_batch_size: int = 256, max_queue_delay_us: int = 2000) -> Path:
    """Write (or replace) ``repo/name`` from an ONNX file; returns the model's directory."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    check_model_name(name)
    io = onnx_io(model)
    for n, _, dims in io["input"]:
        if any(d < 1 for d in dims):
            raise ValueError(f"input {n!r} has a dynamic non-batch dimension {dims}; Triton needs it fixed")
    model_dir = Path(repo) / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    tmp = model_dir / "1" / ".model.onnx.tmp"
    shutil.copyfile(model, tmp)
    os.replace(tmp, model_dir / "1" / "model.onnx")
    atomic_write_bytes(model_dir / "config.pbtxt",
                       config_pbtxt(name, io, max_batch_size, max_queue_delay_us).encode())
    return model_dir


def write_triton_repos(model: str | os.PathLike, repo: str | os.PathLike, name: str = "purifier",
                       backend: str = "both", max_batch_size: int = 256, max_queue_delay_us: int = 2000) -> list[Path]:
    """The repository ``purifier export --triton`` writes: ``backend`` onnx (``repo/name``), python
    (``repo/name-python``) or both. Returns the model directories written."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    dirs = []
    if backend in ("both", "onnx"):
        dirs.append(write_triton_repo(model, repo, name, max_batch_size, max_queue_delay_us))
    if backend in ("both", "python"):
        dirs.append(write_python_repo(model, repo, check_model_name(name) + "-python", max_batch_size,
                                      max_queue_delay_us))
    return dirs
