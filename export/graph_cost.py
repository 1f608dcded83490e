"""Multiply-accumulates of an ONNX model's Conv, ConvTranspose, Gemm and MatMul nodes, counted from its graph.

The shapes come from running the model once on onnxruntime with every counted node's input and output exposed
as graph outputs (exact for dynamic axes such as the B*K batch of the K-way decoder). Each node is also given
the GEMM it lowers to (M x K times K x N), the sizes a GEMM throughput limit is measured at:
  Conv           M = N*Ho*Wo, K = Ci/g*kh*kw, N = Co   (im2col)
  ConvTranspose  M = N*H*W,   K = Ci,        N = Co/g*kh*kw   (GEMM, then col2im)
  Gemm / MatMul  as written
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnxruntime as ort

COUNTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class NodeCost:
    name: str
    op: str
    macs: int
    gemm: tuple[int, int, int]  # (M, K, N) of the GEMM the node lowers to; macs = M*K*N (times g for groups)

    def to_dict(self) -> dict:
        return asdict(self)


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def node_costs(model: str | os.PathLike | onnx.ModelProto, batch: int, image_shape=(1, 28, 28)) -> list[NodeCost]:
    """The counted nodes of ``model`` (a path or a ModelProto, left unchanged) for one input batch of ``batch``
    images, in graph order."""
    if isinstance(model, onnx.ModelProto):
        model = onnx.ModelProto.FromString(model.SerializeToString())
    else:
        model = onnx.load(str(model))
    nodes = [n for n in model.graph.node if n.op_type in COUNTED]
    known = {o.name for o in model.graph.output} | {i.name for i in model.graph.initializer}
    wanted = [t for n in nodes for t in (*n.input[:2], n.output[0]) if t and t not in known]
    for name in dict.fromkeys(wanted):
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.log_severity_level, opts.graph_optimization_level = 3, ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = np.zeros((batch, *image_shape), np.float32)
    names = [o.name for o in session.get_outputs()]
    shapes = {n: v.shape for n, v in zip(names, session.run(names, {"x": x}))}
    shapes.update({i.name: tuple(i.dims) for i in model.graph.initializer})
    return [_cost(n, shapes) for n in nodes]


def _cost(node, shapes) -> NodeCost:
    a, w, y = shapes[node.input[0]], shapes[node.input[1]], shapes[node.output[0]]
    if node.op_type == "Conv":  # w: Co x Ci/g x kh x kw, so M*K*N counts every group
        m, k, n = y[0] * int(np.prod(y[2:])), int(np.prod(w[1:])), w[0]
        return NodeCost(node.name, node.op_type, m * k * n, (m, k, n))
    if node.op_type == "ConvTranspose":
        g = _attr(node, "group", 1)
        m, k, n = a[0] * int(np.prod(a[2:])), a[1] // g, w[1] * int(np.prod(w[2:]))
        return NodeCost(node.name, node.op_type, m * k * n * g, (m, k, n))
    if node.op_type == "Gemm":
        m, k = (a[1], a[0]) if _attr(node, "transA", 0) else (a[0], a[1])
        n = w[0] if _attr(node, "transB", 0) else w[1]
        return NodeCost(node.name, node.op_type, m * k * n, (m, k, n))
    m, k, n = int(np.prod(a[:-1])), a[-1], w[-1]  # MatMul: batch dims folded into M
    return NodeCost(node.name, node.op_type, m * k * n, (m, k, n))


def total_macs(model: str | os.PathLike | onnx.ModelProto, batch: int, image_shape=(1, 28, 28)) -> int:
    return sum(c.macs for c in node_costs(model, batch, image_shape))


__all__ = ["node_costs", "total_macs", "NodeCost", "COUNTED"]
