"""The Open Inference Protocol (KServe v2) as the server speaks it: datatypes, the request models, the body limit,
the binary tensor extension, and input tensors checked and decoded to numpy. Errors are ``ApiError`` (status and a
message naming the offending value)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from fastapi import Request
from pydantic import BaseModel, Field

from .models import shipped_name
from .runtime import ALIASES, OnnxPurifier


# KServe v2 datatype <-> numpy
DTYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "UINT8": np.uint8, "INT64": np.int64,
          "INT32": np.int32, "BOOL": np.bool_}
INPUT_DTYPES = ("FP32", "UINT8")
NP_TO_V2 = {np.dtype(v): k for k, v in DTYPES.items()}


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


# ---- request schemas (documented in OpenAPI; validated by hand so binary bodies work too) -------------------
class TensorInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[TensorInput] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None


def served_name(runtime: OnnxPurifier, configured: str | None = None) -> str:
    """The model's name in the v2 URLs: ``configured``, else the name in its metadata, else the shipped name of its
    directory (``serve.models``: ``fashion-mnist`` for ``models/middleware/cvae-alone-smooth200-tau3-prior1-mu2``),
    else its directory's."""
    name = configured or str(runtime.metadata.get("model_name") or shipped_name(runtime.path.parent)
                             or runtime.path.parent.name or "purifier")
    return name.replace("/", "-")


def _outputs_meta(runtime: OnnxPurifier) -> list[dict]:
    """The outputs the server gives, in order: the graph's, ``predicted_class`` (pipelines), ``margin``,
    ``rejected``, then the deprecated aliases (``recon_error``, the same values as ``scores``)."""
    k = len(runtime.class_names)
    shape = [-1, *runtime.image_shape]
    metas = {"purified": ("FP32", shape), "chosen_class": ("INT64", [-1]), "scores": ("FP32", [-1, k]),
             "logits": ("FP32", [-1, k]), "predicted_class": ("INT64", [-1]), "margin": ("FP32", [-1]),
             "rejected": ("BOOL", [-1])}
    metas.update({alias: metas[of] for alias, of in ALIASES.items()})
    names = [n for n in runtime.outputs if n in metas and n not in ALIASES] + ["margin", "rejected"]
    if "logits" in runtime.outputs:
        names.insert(names.index("margin"), "predicted_class")
    names += [n for n in runtime.outputs if n in ALIASES]
    return [{"name": n, "datatype": metas[n][0], "shape": metas[n][1]} for n in names]


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes (413) whether or not Content-Length says so."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, f"Content-Length {declared!r} is not a number")
        if size > limit:
            raise ApiError(413, f"request body of {size} bytes exceeds the limit of {limit} bytes")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_infer(body: bytes, header_length: str | None) -> tuple[InferRequest, bytes]:
    """Split a v2 request into its JSON header and binary tail (binary tensor extension)."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise ApiError(400, f"Inference-Header-Content-Length {header_length!r} is not a number")
        if not 0 < n <= len(body):
            raise ApiError(400, f"Inference-Header-Content-Length {n} is outside the body's {len(body)} bytes")
        head, tail = body[:n], body[n:]
    else:
        head, tail = body, b""
    try:
        obj = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON ({exc}); send the inference request as JSON "
                            f"(Content-Type: application/json), or its JSON header followed by the binary tensors "
                            f"with Inference-Header-Content-Length")
    try:
        return InferRequest.model_validate(obj), tail
    except Exception as exc:  # pydantic.ValidationError: say which field
        errors = getattr(exc, "errors", lambda: [])()
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:5])
        raise ApiError(422, f"invalid inference request: {where or exc}; send a JSON object like "
                            '{"inputs": [{"name": "x", "shape": [N, C, H, W], "datatype": "FP32", "data": [...]}]}')


def tensor_from(inp: TensorInput, tail: bytes, runtime: OnnxPurifier, max_images: int) -> np.ndarray:
    """The v2 input tensor (JSON data, or the binary part of the body) -> a validated float32 batch."""
    if inp.name != "x":
        raise ApiError(400, f"unknown input {inp.name!r}; the model's input is 'x'")
    if inp.datatype not in INPUT_DTYPES:
        raise ApiError(400, f"input 'x' datatype {inp.datatype!r} is not supported; use one of {INPUT_DTYPES}")
    shape = tuple(inp.shape)
    want = tuple(runtime.image_shape)
    if len(shape) != 4 or shape[1:] != want or any(d < 0 for d in shape):
        raise ApiError(400, f"input 'x' has shape {list(shape)}, the model expects [N, {', '.join(map(str, want))}]")
    if shape[0] > max_images:
        raise ApiError(413, f"input 'x' holds {shape[0]} images, over the server's cap of {max_images} images per "
                            f"request; split it into requests of at most {max_images} images")
    if shape[0] < 1:
        raise ApiError(400, f"input 'x' has shape {list(shape)}: a batch of 0 images; send at least 1")
    count = int(np.prod(shape))
    dtype = np.dtype(DTYPES[inp.datatype])
    size = (inp.parameters or {}).get("binary_data_size")
    if size is not None:
        if inp.data is not None:
            raise ApiError(400, "input 'x' has both 'data' and binary_data_size")
        if not isinstance(size, int) or size != count * dtype.itemsize:
            raise ApiError(400, f"input 'x' binary_data_size {size!r} does not match shape {list(shape)} of "
                                f"{inp.datatype} ({count * dtype.itemsize} bytes)")
        if size > len(tail):
            raise ApiError(400, f"input 'x' binary_data_size {size} runs past the body's binary part "
                                f"({len(tail)} bytes)")
        arr = np.frombuffer(tail, dtype=dtype, count=count).reshape(shape)
    else:
        if inp.data is None:
            raise ApiError(400, "input 'x' has no 'data' (and no binary_data_size)")
        data = inp.data
        while data and isinstance(data[0], list):  # v2 allows nested (row-major) lists
            data = [v for row in data for v in (row if isinstance(row, list) else [row])]
        if len(data) != count:
            raise ApiError(400, f"input 'x' holds {len(data)} values, shape {list(shape)} needs {count}")
        bad = next((v for v in data if isinstance(v, bool) or not isinstance(v, (int, float))), None)
        if bad is not None:
            raise ApiError(400, f"input 'x' holds a non-numeric value {bad!r}")
        if inp.datatype == "UINT8":
            ints = np.asarray(data)
            if ints.dtype.kind == "f" and not np.all(ints == np.round(ints)):
                raise ApiError(400, "input 'x' is UINT8 but holds a fractional value")
            if ints.min() < 0 or ints.max() > 255:
                raise ApiError(400, f"input 'x' is UINT8 but holds values in [{ints.min()}, {ints.max()}]")
            arr = ints.astype(np.uint8).reshape(shape)
        else:
            arr = np.asarray(data, dtype=np.float64).reshape(shape)
            if not np.isfinite(arr).all():
                idx = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
                raise ApiError(400, f"input 'x' holds a non-finite value {arr[idx]} at index {list(idx)}")
            arr = arr.astype(np.float32)
    try:
        return runtime.validate(arr)
    except ValueError as exc:
        raise ApiError(400, f"input 'x': {exc}")
