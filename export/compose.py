"""``pipeline.onnx`` = the project's ``purifier.onnx`` followed by the user's own ``classifier.onnx``.

One graph, input ``x`` (N x C x H x W float32 in [0, 1]) -> ``purified``, ``chosen_class``, ``scores``,
``logits`` and ``recon_error`` (the deprecated alias of ``scores``, ``export.outputs``), in that order, so the
torch-free runtime serves a user's classifier exactly like the project's fused pipeline; a ``purifier.onnx`` of an
earlier release (``recon_error`` without ``scores``) is taken too. Between the two graphs sit what the classifier
expects and the purifier does not give: a Transpose to N x H x W x C (``layout="nhwc"``) and the per-channel
normalisation ``(x - mean) / std``. The result is checked in onnxruntime against the two files run one after the
other; a failure writes nothing.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx.compose
import onnx.version_converter
from onnx import helper, numpy_helper

from export.onnx_classifier import LAYOUTS, OnnxClassifierError, inspect_classifier
from export.outputs import ALIAS, PIPELINE_OUTPUTS, PURIFIER_OUTPUTS, SCORES, alias_scores
from purifier.checkpoint import sha256_file
from purifier.classifier_io import ClassifierError

PARITY_ATOL = 1e-4  # per output: absolute below 1, relative above
PREFIX = "classifier/"


class ComposeError(ClassifierError):
    """The purifier and the classifier cannot be joined as given, or the joined graph fails its check."""


def _opset(model: onnx.ModelProto) -> int:
    return next(int(e.version) for e in model.opset_import if e.domain in ("", "ai.onnx"))


def _purifier_shape(model: onnx.ModelProto, path: Path) -> tuple[int, int, int]:
    inputs = {i.name: i for i in model.graph.input}
    outputs = [o.name for o in model.graph.output]
    accepted = ([*PURIFIER_OUTPUTS, ALIAS], [*PURIFIER_OUTPUTS[:-1], ALIAS])  # this release's, an earlier one's
    if "x" not in inputs or outputs not in accepted:
        raise ComposeError(f"{path}: inputs {list(inputs)} and outputs {outputs}; expected input 'x' and outputs "
                           f"{accepted[0]}. Pass a purifier.onnx written by `purifier export`.")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs["x"].type.tensor_type.shape.dim]
    if len(dims) != 4 or None in dims[1:]:
        raise ComposeError(f"{path}: input 'x' has dims {dims}; expected N x C x H x W with fixed C, H, W")
    return tuple(dims[1:])


def _check_shapes(info: dict, chw: tuple[int, int, int], layout: str, path: Path) -> None:
    c, h, w = chw
    expected = [c, h, w] if layout == "nchw" else [h, w, c]
    declared = info["input_shape"]
    if len(declared) != 4 or any(isinstance(d, int) and d != e for d, e in zip(declared[1:], expected)):
        hint = ""
        if info["layout"] != layout:
            hint = (f" (the classifier's input looks {info['layout'].upper()}: pass layout={info['layout']!r}, on the "
                    f"command line --classifier-layout {info['layout']})")
        raise ComposeError(
            f"{path}: the classifier's input {info['input_name']!r} is declared {declared}; the purifier gives "
            f"N x C x H x W = {['N', c, h, w]}, which is {['N', *expected]} in layout {layout!r}{hint}")


def _normalisation(mean, std, channels: int) -> tuple[np.ndarray, np.ndarray] | None:
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise ComposeError(f"mean={mean!r}, std={std!r}: give both (per channel) or neither")
    mean = np.asarray(mean, dtype=np.float32).reshape(-1)
    std = np.asarray(std, dtype=np.float32).reshape(-1)
    if len(mean) != channels or len(std) != channels:
        raise ComposeError(f"mean {mean.tolist()} and std {std.tolist()} must have one value per channel "
                           f"({channels})")
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        raise ComposeError(f"mean {mean.tolist()} / std {std.tolist()}: values must be finite and std > 0")
    return mean, std


def _preprocess(x: np.ndarray, layout: str, norm) -> np.ndarray:
    """The numpy reference of what the composed graph inserts between the two models."""
    if layout == "nhwc":
        x = x.transpose(0, 2, 3, 1)
    if norm is not None:
        shape = (1, -1, 1, 1) if layout == "nchw" else (1, 1, 1, -1)
        x = (x - norm[0].reshape(shape)) / norm[1].reshape(shape)
    return np.ascontiguousarray(x, dtype=np.float32)


def _classifier_side(classifier: onnx.ModelProto, info: dict, chw, layout: str, norm) -> tuple[onnx.ModelProto, str]:
    """Prefix the classifier's names, put the transpose/normalisation in front of its input and rename its output
    to ``logits``. Returns the model and the name of its new input (the purified N x C x H x W batch)."""
    model = onnx.compose.add_prefix(classifier, PREFIX)
    graph = model.graph
    old_input, old_output = PREFIX + info["input_name"], PREFIX + info["output_name"]
    new_input = old_input
    nodes = []
    if layout == "nhwc" or norm is not None:
        new_input = PREFIX + "purified_nchw"
        current = new_input
        if layout == "nhwc":
            nodes.append(helper.make_node("Transpose", [current], [PREFIX + "pre/nhwc"], perm=[0, 2, 3, 1],
                                          name=PREFIX + "pre/Transpose"))
            current = PREFIX + "pre/nhwc"
        if norm is not None:
            shape = (1, -1, 1, 1) if layout == "nchw" else (1, 1, 1, -1)
            graph.initializer.extend([numpy_helper.from_array(norm[0].reshape(shape), PREFIX + "pre/mean"),
                                      numpy_helper.from_array(norm[1].reshape(shape), PREFIX + "pre/std")])
            nodes.append(helper.make_node("Sub", [current, PREFIX + "pre/mean"], [PREFIX + "pre/centred"],
                                          name=PREFIX + "pre/Sub"))
            nodes.append(helper.make_node("Div", [PREFIX + "pre/centred", PREFIX + "pre/std"], [old_input],
                                          name=PREFIX + "pre/Div"))
        else:
            nodes.append(helper.make_node("Identity", [current], [old_input], name=PREFIX + "pre/Identity"))
        position = next(i for i, v in enumerate(graph.input) if v.name == old_input)
        graph.input.pop(position)
        graph.input.insert(position, helper.make_tensor_value_info(new_input, onnx.TensorProto.FLOAT,
                                                                   ["N", *chw]))
    nodes_after = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + nodes_after)  # nodes stay topologically sorted
    graph.node.append(helper.make_node("Identity", [old_output], ["logits"], name=PREFIX + "logits"))
    logits = onnx.ValueInfoProto()
    logits.CopyFrom(graph.output[0])
    logits.name = "logits"
    del graph.output[:]
    graph.output.append(logits)
    return model, new_input


def _align(purifier: onnx.ModelProto, classifier: onnx.ModelProto, paths) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Both at one default-domain opset (the higher: up-conversion has adapters for every operator) and IR."""
    p_op, c_op = _opset(purifier), _opset(classifier)
    if p_op != c_op:
        target = max(p_op, c_op)
        try:
            if p_op < target:
                purifier = onnx.version_converter.convert_version(purifier, target)
            else:
                classifier = onnx.version_converter.convert_version(classifier, target)
        except Exception as e:
            raise ComposeError(
                f"{paths[0]} is opset {p_op}, {paths[1]} opset {c_op}; converting to opset {target} failed "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Re-export the classifier with "
                f"torch.onnx.export(..., opset_version={p_op}).") from e
    ir = max(purifier.ir_version, classifier.ir_version)
    purifier.ir_version = classifier.ir_version = ir
    return purifier, classifier


def _session(model_or_path):
    """An onnxruntime CPU session on a path or a serialised model (bytes)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    model = model_or_path if isinstance(model_or_path, bytes) else str(model_or_path)
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def _parity(composed: Path, purifier: bytes, classifier_onnx: Path, input_name: str, layout: str, norm,
            x: np.ndarray, atol: float) -> dict:
    purifier_out = _session(purifier).run(list(PURIFIER_OUTPUTS), {"x": x})
    logits = _session(classifier_onnx).run(None, {input_name: _preprocess(purifier_out[0], layout, norm)})[0]
    expected = dict(zip(PIPELINE_OUTPUTS, [*purifier_out, logits]))
    got = dict(zip([*PIPELINE_OUTPUTS, ALIAS], _session(composed).run([*PIPELINE_OUTPUTS, ALIAS], {"x": x})))
    if not np.array_equal(got[ALIAS], got[SCORES], equal_nan=True):
        raise ComposeError(f"composed output {ALIAS!r} is not equal to {SCORES!r}")
    report = {}
    for name in PIPELINE_OUTPUTS:
        e, g = expected[name], got[name]
        if e.shape != g.shape:
            raise ComposeError(f"composed output {name!r} has shape {list(g.shape)}, the two graphs give "
                               f"{list(e.shape)}")
        if name == "chosen_class":
            if not np.array_equal(e, g):
                raise ComposeError(f"composed chosen_class differs from purifier.onnx's on "
                                   f"{int((e != g).sum())} of {len(e)} images")
            report[name] = 0.0
            continue
        report[name] = float((np.abs(g - e) / np.maximum(1.0, np.abs(e))).max())
        if not report[name] <= atol:  # also catches NaN
            raise ComposeError(f"composed output {name!r} differs from the two graphs run in turn by "
                               f"{report[name]:.3g} (> atol {atol})")
    return report


def compose_pipeline(purifier_onnx: str | os.PathLike, classifier_onnx: str | os.PathLike,
                     out_path: str | os.PathLike, *, layout: str = "nchw", mean=None, std=None,
                     metadata: dict | None = None, x_check: np.ndarray | None = None,
                     atol: float = PARITY_ATOL) -> dict:
    """Write ``purifier_onnx`` followed by ``classifier_onnx`` as one ONNX graph at ``out_path``.

    ``layout``: what the classifier takes ('nchw', or 'nhwc': a Transpose is inserted). ``mean``/``std``: per
    channel (length C), the normalisation the classifier expects on [0, 1] images, inserted as Sub/Div.
    ``metadata``: added to (and overriding) the purifier's ``metadata_props``; non-str values JSON-encoded.
    ``x_check``: N x C x H x W images for the parity check (default 64 uniform ones, seed 0): the composed graph
    and the two files run in turn must give equal chosen classes and outputs within ``atol`` (absolute below 1,
    relative above), else ``ComposeError`` and nothing is written. The file is written atomically.

    Returns ``{"path", "parity": {output: max difference}, "metadata"}``.
    """
    purifier_onnx, classifier_onnx, out_path = Path(purifier_onnx), Path(classifier_onnx), Path(out_path)
    if layout not in LAYOUTS:
        raise ComposeError(f"layout {layout!r} is not one of {LAYOUTS}: give the layout the classifier takes")
    info = inspect_classifier(classifier_onnx)  # external data, one input/output, dynamic batch
    try:
        purifier = onnx.load(str(purifier_onnx))
    except Exception as e:
        raise ComposeError(f"{purifier_onnx}: not a readable ONNX model ({type(e).__name__}: {e})") from e
    chw = _purifier_shape(purifier, purifier_onnx)
    _check_shapes(info, chw, layout, classifier_onnx)
    norm = _normalisation(mean, std, chw[0])
    if x_check is None:
        x_check = np.random.default_rng(0).random((64, *chw), dtype=np.float32)
    x_check = np.asarray(x_check, dtype=np.float32)
    if x_check.ndim != 4 or tuple(x_check.shape[1:]) != chw or len(x_check) == 0:
        raise ComposeError(f"x_check has shape {list(x_check.shape)}; the purifier takes "
                           f"N x {' x '.join(map(str, chw))}")

    alias_scores(purifier)  # an earlier release's recon_error is renamed scores
    purifier_bytes = purifier.SerializeToString()  # the purifier the parity check runs
    classifier = onnx.load(str(classifier_onnx))
    del classifier.metadata_props[:]  # merge_models refuses differing values; the pipeline's are set below
    purifier, classifier = _align(purifier, classifier, (purifier_onnx, classifier_onnx))
    classifier, new_input = _classifier_side(classifier, info, chw, layout, norm)
    try:
        model = onnx.compose.merge_models(purifier, classifier, io_map=[("purified", new_input)],
                                          outputs=list(PIPELINE_OUTPUTS))
    except (ValueError, onnx.checker.ValidationError) as e:
        raise ComposeError(f"cannot merge {purifier_onnx} and {classifier_onnx}: {e}") from e
    if [o.name for o in model.graph.output] != list(PIPELINE_OUTPUTS):
        raise ComposeError(f"merged outputs are {[o.name for o in model.graph.output]}, not {list(PIPELINE_OUTPUTS)}")
    # merge_models lists both models' opset imports; keep one entry per domain
    opsets = {}
    for entry in model.opset_import:
        opsets.setdefault(entry.domain, entry.version)
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in opsets.items())
    model.producer_name, model.producer_version = purifier.producer_name, purifier.producer_version

    props = {p.key: p.value for p in purifier.metadata_props}
    if "kind" in props:
        props["kind"] = "pipeline"
    props["classifier"] = json.dumps({
        "file": classifier_onnx.name, "sha256": sha256_file(classifier_onnx), "input_name": info["input_name"],
        "input_shape": info["input_shape"], "opset": info["opset"], "layout": layout,
        "mean": None if norm is None else np.asarray(mean, dtype=float).reshape(-1).tolist(),
        "std": None if norm is None else np.asarray(std, dtype=float).reshape(-1).tolist()})
    props.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    del model.metadata_props[:]
    helper.set_model_props(model, props)
    alias_scores(model)  # the purifier's alias node is written again, last; metadata_props outputs follow
    props = {p.key: p.value for p in model.metadata_props}

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".compose-") as tmp:
        tmp_path = Path(tmp) / out_path.name
        onnx.save(model, str(tmp_path))
        try:
            onnx.checker.check_model(str(tmp_path))
        except onnx.checker.ValidationError as e:
            raise ComposeError(f"the composed model fails onnx.checker: {e}") from e
        parity = _parity(tmp_path, purifier_bytes, classifier_onnx, info["input_name"], layout, norm, x_check, atol)
        os.replace(tmp_path, out_path)
    return {"path": out_path, "parity": parity, "metadata": props}


__all__ = ["compose_pipeline", "ComposeError", "OnnxClassifierError", "PIPELINE_OUTPUTS"]
