"""A user's deployed ``classifier.onnx`` as a frozen, differentiable torch module.

Training a purifier against the classifier a user already serves, and attacking the whole pipeline, both need
gradients through that classifier; its ONNX file is the one artifact every user has. ``inspect_classifier``
reads the file's interface without touching external data; ``to_torch`` converts it with onnx2torch and checks
the result against onnxruntime on the caller's images before anything trusts it.

onnx2torch (1.5.x) registers converters for most operators only up to opset 17, while ``torch.onnx.export``
writes opset 20 by default, with ``Reshape(allowzero=1)``. ``to_torch`` therefore rewrites what it can without
changing the function (``allowzero`` on a constant shape that holds no zero is a no-op) and down-converts the
opset with ``onnx.version_converter`` until every node has a converter; the onnxruntime check runs on the
original file, so a rewrite that changed the function would be caught.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from purifier.checkpoint import sha256_file
from purifier.classifier_io import ClassifierError

LAYOUTS = ("nchw", "nhwc")
PARITY_ATOL = 1e-4  # max |torch - onnxruntime| / max(1, |onnxruntime|)
_DOWN_OPSETS = (18, 17, 16, 15, 14, 13)  # tried in this order when the model's own opset lacks converters


class OnnxClassifierError(ClassifierError):
    """The ONNX classifier cannot be used as given; the message names the value and the fix."""


def _dim(d) -> int | str:
    if d.HasField("dim_value"):
        return int(d.dim_value)
    return d.dim_param or "?"


def _tensors(graph: onnx.GraphProto):
    """Every TensorProto a graph holds: initializers, sparse initializers, tensor attributes, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _tensors(g)


def _check_external_data(model: onnx.ModelProto, path: Path) -> list[str]:
    """The external-data files the model names (relative to its folder); refuses one outside that folder."""
    folder = path.resolve().parent
    locations = set()
    for tensor in _tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = {e.key: e.value for e in tensor.external_data}.get("location", "")
        target = (folder / location).resolve()
        if not target.is_relative_to(folder) or target == folder:
            raise OnnxClassifierError(
                f"{path}: initializer {tensor.name!r} keeps its data at {location!r} ({target}), outside the "
                f"model's folder {folder}; refusing to read it. Keep external data files beside the .onnx file "
                f"(onnx.save(..., save_as_external_data=True, location='weights.bin')).")
        locations.add(location)
    return sorted(locations)


def _opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise OnnxClassifierError("the model imports no default-domain opset; it is not an ONNX operator graph")


def guess_layout(shape: list) -> str:
    """'nhwc' for a rank-4 shape whose last dim is 1 or 3 and second is not; else 'nchw'."""
    if len(shape) == 4 and shape[3] in (1, 3) and shape[1] not in (1, 3):
        return "nhwc"
    return "nchw"


def inspect_classifier(path: str | os.PathLike, *, require_dynamic_batch: bool = True) -> dict:
    """The interface of ``path``'s classifier, read without loading external data.

    Returns ``{"input_name", "input_shape" (ints, str for symbolic dims), "output_name", "opset" (default
    domain), "layout" ("nchw" or "nhwc", guessed from the shape), "batch_dynamic", "external_data" (the data
    files it names, relative to its folder)}``. Refuses
    (``OnnxClassifierError``) external data outside the file's folder, a graph with other than one input
    (initializers aside) or one output, a non-float32 input and, unless ``require_dynamic_batch`` is False, a
    fixed batch size.
    """
    path = Path(path)
    if not path.is_file():
        raise OnnxClassifierError(f"{path}: no such file; pass the path of the classifier's .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: not an ONNX file
        raise OnnxClassifierError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from e
    external = _check_external_data(model, path)
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise OnnxClassifierError(
            f"{path}: the graph has {len(inputs)} inputs {[i.name for i in inputs]}; a classifier takes exactly "
            f"one image batch. Re-export it with a single input.")
    if len(graph.output) != 1:
        raise OnnxClassifierError(
            f"{path}: the graph has {len(graph.output)} outputs {[o.name for o in graph.output]}; a classifier "
            f"returns exactly one B x K logits tensor. Re-export it with that output only.")
    tensor_type = inputs[0].type.tensor_type
    if tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise OnnxClassifierError(
            f"{path}: input {inputs[0].name!r} is "
            f"{onnx.TensorProto.DataType.Name(tensor_type.elem_type)}; the purifier feeds float32 images. "
            f"Re-export the classifier with a float32 input.")
    if not tensor_type.HasField("shape") or not tensor_type.shape.dim:
        raise OnnxClassifierError(f"{path}: input {inputs[0].name!r} declares no shape; re-export it with its "
                                  f"input shape (batch x channels x height x width)")
    shape = [_dim(d) for d in tensor_type.shape.dim]
    batch_dynamic = not isinstance(shape[0], int) or shape[0] == -1
    if require_dynamic_batch and not batch_dynamic:
        raise OnnxClassifierError(
            f"{path}: input {inputs[0].name!r} has a fixed batch size {shape[0]} (shape {shape}); export the "
            f"classifier with a dynamic batch axis (torch.onnx.export(..., dynamic_shapes=({{0: "
            f"torch.export.Dim('batch')}},)) or dynamic_axes={{{inputs[0].name!r}: {{0: 'batch'}}}})")
    return {"input_name": inputs[0].name, "input_shape": shape, "output_name": graph.output[0].name,
            "opset": _opset(model), "layout": guess_layout(shape), "batch_dynamic": batch_dynamic,
            "external_data": external}


def _constant(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for node in graph.node:
        if node.op_type == "Constant" and name in node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
    return None


def _drop_noop_allowzero(model: onnx.ModelProto) -> None:
    """Clear ``Reshape(allowzero=1)`` where the shape is a constant without zeros: allowzero only changes what a 0
    in the shape means, and onnx2torch refuses the attribute outright."""
    for node in model.graph.node:
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx"):
            continue
        for attr in list(node.attribute):
            if attr.name == "allowzero" and attr.i == 1:
                shape = _constant(model.graph, node.input[1])
                if shape is not None and not (shape == 0).any():
                    node.attribute.remove(attr)


def _opsets(model: onnx.ModelProto) -> dict[str, int]:
    return {("" if e.domain == "ai.onnx" else e.domain): int(e.version) for e in model.opset_import}


def _unsupported(model: onnx.ModelProto) -> list[tuple[str, str, int]]:
    """(domain, op_type, opset) of every node onnx2torch has no converter for, in graph order, once each."""
    from onnx2torch.node_converters import get_converter

    opsets = _opsets(model)
    missing = []
    for node in model.graph.node:
        domain = "" if node.domain == "ai.onnx" else node.domain
        key = (domain, node.op_type, opsets.get(domain, 0))
        if key in missing:
            continue
        try:
            get_converter(operation_type=node.op_type, version=key[2], domain=domain)
        except NotImplementedError:
            missing.append(key)
    return missing


def _for_onnx2torch(model: onnx.ModelProto, path: Path) -> tuple[onnx.ModelProto, int]:
    """``model`` at the highest opset (its own first) where every node has an onnx2torch converter."""
    import onnx.version_converter

    _drop_noop_allowzero(model)
    own = _opset(model)
    missing = _unsupported(model)
    if not missing:
        return model, own
    tried = [v for v in _DOWN_OPSETS if v < own]
    for target in tried:
        try:
            candidate = onnx.version_converter.convert_version(model, target)
        except Exception:  # no adapter for some operator at this opset: try the next one
            continue
        if not _unsupported(candidate):
            return candidate, target
    ops = "; ".join(f"operator {op!r} (domain {domain!r}, opset {opset}) has no onnx2torch converter"
                    for domain, op, opset in missing)
    tried = f"; down-converting to opsets {tried[-1]}-{tried[0]} did not help" if tried else ""
    raise OnnxClassifierError(
        f"{path}: {ops}{tried}. Replace the operator in the classifier (or re-export it with torch.onnx.export(..., "
        f"opset_version=17)) to train or attack through it.")


def _failing_operator(model: onnx.ModelProto, error: NotImplementedError) -> str:
    """The first node whose onnx2torch converter raises NotImplementedError, with its message."""
    from onnx2torch.node_converters import get_converter
    from onnx2torch.onnx_graph import OnnxGraph

    opsets = _opsets(model)
    graph = OnnxGraph(onnx.shape_inference.infer_shapes(model).graph)
    for node in graph.nodes.values():
        try:
            get_converter(operation_type=node.operation_type, version=opsets.get(node.domain or "", 0),
                          domain=node.domain or "")(node, graph)
        except NotImplementedError as e:
            where = f" (node {node.name!r})" if node.name else ""
            return f"operator {node.operation_type!r}{where}: {e}"
        except Exception:
            continue
    return f"the model: {error}"


def _ort_run(path: Path, input_name: str, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {input_name: x})[0]


def _model_input(x_check: np.ndarray, info: dict, layout: str, path: Path) -> np.ndarray:
    x = np.asarray(x_check, dtype=np.float32)
    if x.ndim != 4 or len(x) == 0:
        raise OnnxClassifierError(f"x_check has shape {x.shape}; pass a non-empty N x C x H x W batch of images")
    if layout == "nhwc":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    declared = info["input_shape"]
    if len(declared) != 4 or any(isinstance(d, int) and d != s for d, s in zip(declared[1:], x.shape[1:])):
        raise OnnxClassifierError(
            f"{path}: input {info['input_name']!r} is declared {declared}; x_check (N x C x H x W "
            f"{list(np.shape(x_check))}) in layout {layout!r} is {list(x.shape)}. Pass images of the "
            f"classifier's size or the right layout ('nchw' or 'nhwc').")
    return x


class OnnxClassifier(nn.Module):
    """A converted ONNX classifier: ``x`` (B x C x H x W, or B x H x W x C when ``layout`` is 'nhwc', as the ONNX
    model takes it) -> logits (B x K). Frozen: no parameter requires grad, and it stays in eval mode."""

    def __init__(self, graph: nn.Module, info: dict):
        super().__init__()
        self.graph = graph
        self.info = info
        self.layout = info["layout"]

    def train(self, mode: bool = True):
        # the deployed classifier is fixed: a parent's .train() (a purifier being trained in front of it) must not
        # switch its BatchNorm to batch statistics or turn its Dropout on
        super().train(mode)
        self.graph.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)


def to_torch(path: str | os.PathLike, x_check: np.ndarray | None = None, layout: str | None = None,
             atol: float = PARITY_ATOL) -> OnnxClassifier:
    """``path``'s classifier as a frozen torch module, checked against onnxruntime on ``x_check``.

    ``x_check``: N x C x H x W float32 images in the value range the classifier takes (transposed to N x H x W x C
    for the check when ``layout`` is 'nhwc'; None: 16 uniform random images of the declared input shape);
    ``layout`` None: the layout guessed from the input shape. The module takes the
    layout the ONNX model takes and returns B x K logits; it is in eval mode, its parameters do not require grad,
    and its output is differentiable w.r.t. its input (checked: a non-zero input gradient on ``x_check``).
    ``module.info`` records the interface, the file's sha256, the opset converted at and the parity found.
    """
    path = Path(path)
    info = inspect_classifier(path)
    layout = info["layout"] if layout is None else layout
    if layout not in LAYOUTS:
        raise OnnxClassifierError(f"layout {layout!r} is not one of {LAYOUTS}")
    info["layout"] = layout
    if x_check is None:
        dims = info["input_shape"][1:]
        if len(dims) != 3 or not all(isinstance(d, int) for d in dims):
            raise OnnxClassifierError(f"{path}: input shape {info['input_shape']} is not N x C x H x W with fixed "
                                      f"C, H and W; pass x_check images to check the conversion on")
        chw = dims if layout == "nchw" else [dims[2], dims[0], dims[1]]
        x_check = np.random.default_rng(0).random((16, *chw), dtype=np.float32)
    x = _model_input(x_check, info, layout, path)
    model = onnx.load(str(path))  # external data now known to lie inside the model's folder
    model, opset = _for_onnx2torch(model, path)

    import onnx2torch

    try:
        graph = onnx2torch.convert(model)
    except NotImplementedError as e:
        raise OnnxClassifierError(
            f"{path}: onnx2torch cannot convert {_failing_operator(model, e)}; replace the operator in the "
            f"classifier to train or attack through it") from e
    expected = _ort_run(path, info["input_name"], x)
    if expected.ndim != 2 or expected.shape[0] != len(x):
        raise OnnxClassifierError(
            f"{path}: output {info['output_name']!r} has shape {list(expected.shape)} on a batch of {len(x)}; a "
            f"classifier must return B x K logits. Flatten it in the model before exporting.")
    module = OnnxClassifier(graph, {**info, "path": str(path), "sha256": sha256_file(path),
                                    "converted_opset": opset}).eval()
    module.requires_grad_(False)
    with torch.no_grad():
        got = module(torch.from_numpy(x))
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != expected.shape:
        raise OnnxClassifierError(f"{path}: the converted module returns {getattr(got, 'shape', type(got))}, "
                                  f"onnxruntime {list(expected.shape)}")
    diff = float((np.abs(got.numpy() - expected) / np.maximum(1.0, np.abs(expected))).max())
    if not diff <= atol:  # also catches NaN
        raise OnnxClassifierError(
            f"{path}: the onnx2torch conversion differs from onnxruntime by {diff:.3g} (> atol {atol}) on x_check; "
            f"the converted module cannot stand in for the deployed classifier")
    module.info["parity"] = diff
    _check_gradient(module, x[:8], path)
    return module


def _check_gradient(module: OnnxClassifier, x: np.ndarray, path: Path) -> None:
    """A zero or undefined input gradient would make training against the classifier and attacks on it silently
    meaningless (gradient masking); a random projection of the logits avoids the sum of softmax being constant."""
    with torch.enable_grad():  # loading may happen inside a caller's no_grad block
        x = torch.from_numpy(x).requires_grad_(True)
        out = module(x)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
        (grad,) = torch.autograd.grad((out * weights).sum(), x, allow_unused=True)
    if grad is None or not torch.isfinite(grad).all() or not grad.abs().sum() > 0:
        raise OnnxClassifierError(
            f"{path}: the converted classifier's gradient w.r.t. its input is "
            f"{'undefined' if grad is None else 'zero or not finite'} on x_check; training a purifier against it "
            f"or attacking it needs gradients (remove non-differentiable operators such as ArgMax or Round)")


__all__ = ["inspect_classifier", "to_torch", "guess_layout", "OnnxClassifier", "OnnxClassifierError", "LAYOUTS"]
