"""Graph rewrites that keep an exported model's function and make onnxruntime's CPU kernels faster on it.

``convtranspose_as_conv``: a ConvTranspose of stride 2, kernel 4, pads 1 (the decoder's upsampling) becomes four
2 x 2 Convs, one per output phase, and a DepthToSpace (DCR) that interleaves them. Output pixel 2m + r along an
axis takes input m - 1 and m (r = 0, kernel taps 3 and 1) or m and m + 1 (r = 1, taps 2 and 0), so each phase is
an ordinary correlation with a 2-tap kernel and asymmetric padding: the same multiply-accumulates, run by
onnxruntime's blocked (NCHWc) Conv instead of its ConvTranspose (GEMM + col2im), and quantisable to QLinearConv
(onnxruntime's CPU provider has no int8 ConvTranspose). Outputs agree to fp32 rounding (summation order).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

# phase r -> {tap index in the 2-window: ConvTranspose kernel index}
_TAPS = {0: (3, 1), 1: (2, 0)}
MIN_OUT_CHANNELS = 8  # below it (the decoder's last layer, 1 channel) onnxruntime's ConvTranspose measured faster


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _rewritable(node, inits, min_out_channels: int) -> bool:
    if node.op_type != "ConvTranspose" or node.input[1] not in inits:
        return False
    a = _attrs(node)
    w = inits[node.input[1]]
    return (list(a.get("strides", [1, 1])) == [2, 2] and list(a.get("kernel_shape", w.shape[2:])) == [4, 4]
            and list(a.get("pads", [0] * 4)) == [1, 1, 1, 1] and a.get("group", 1) == 1
            and list(a.get("dilations", [1, 1])) == [1, 1] and not any(a.get("output_padding", []))
            and not a.get("output_shape") and a.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
            and w.ndim == 4 and w.shape[1] >= min_out_channels)


def _phases(node, w: np.ndarray) -> tuple[list, list]:
    """Four Conv nodes (one per output phase, in DCR order) and their weights."""
    nodes, weights = [], []
    bias = list(node.input[2:3])
    for rh in (0, 1):
        for rw in (0, 1):
            k = np.empty((w.shape[1], w.shape[0], 2, 2), np.float32)  # Co x Ci x 2 x 2
            for th, kh in enumerate(_TAPS[rh]):
                for tw, kw in enumerate(_TAPS[rw]):
                    k[:, :, th, tw] = w[:, :, kh, kw].T
            name = f"{node.name or node.output[0]}_phase{rh}{rw}"
            weights.append(numpy_helper.from_array(k, f"{name}_weight"))
            # r = 0 reads m - 1 and m (pad before), r = 1 reads m and m + 1 (pad after)
            nodes.append(helper.make_node("Conv", [node.input[0], f"{name}_weight", *bias], [f"{name}_out"],
                                          name=name, kernel_shape=[2, 2], pads=[1 - rh, 1 - rw, rh, rw]))
    return nodes, weights


def convtranspose_as_conv(model: onnx.ModelProto, min_out_channels: int = MIN_OUT_CHANNELS) -> int:
    """Rewrite ``model`` in place; returns how many ConvTranspose nodes were replaced."""
    graph = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    new_nodes, count = [], 0
    for node in graph.node:
        if not _rewritable(node, inits, min_out_channels):
            new_nodes.append(node)
            continue
        phases, weights = _phases(node, inits[node.input[1]].astype(np.float32))
        graph.initializer.extend(weights)
        concat = f"{node.name or node.output[0]}_phases"
        new_nodes += [*phases, helper.make_node("Concat", [p.output[0] for p in phases], [concat], axis=1,
                                                name=concat),
                      helper.make_node("DepthToSpace", [concat], [node.output[0]], blocksize=2, mode="DCR",
                                       name=f"{node.name or node.output[0]}_interleave")]
        count += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return count


__all__ = ["convtranspose_as_conv", "MIN_OUT_CHANNELS"]
