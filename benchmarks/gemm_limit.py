"""The machine's GEMM throughput at the sizes a model's Conv, ConvTranspose and Gemm nodes lower to, and the
limit it puts on the model: the time the nodes would take if each ran as fast as a plain GEMM of its size.

fp32: numpy's matmul (its BLAS) and onnxruntime's MatMul; int8: onnxruntime's MatMulInteger (uint8 activations
times int8 weights, int32 accumulation: the kernel its QLinearConv/QGemm use). The weight side is a graph
initializer, as in the model. Rates are 2 * M * K * N / median seconds.
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SQUARE = 1024  # the peak: a square GEMM of this size


def _median_seconds(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _session(m: int, k: int, n: int, precision: str, threads: int | None):
    rng = np.random.default_rng(0)
    if precision == "fp32":
        b = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "b")
        node = helper.make_node("MatMul", ["a", "b"], ["y"])
        a_type, y_type, a = TensorProto.FLOAT, TensorProto.FLOAT, rng.standard_normal((m, k)).astype(np.float32)
    else:
        b = numpy_helper.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), "b")
        node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
        a_type, y_type, a = TensorProto.UINT8, TensorProto.INT32, rng.integers(0, 256, (m, k)).astype(np.uint8)
    graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("a", a_type, [m, k])],
                              [helper.make_tensor_value_info("y", y_type, [m, n])], [b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]), a


def gemm_rate(m: int, k: int, n: int, engine: str, reps: int = 5, threads: int | None = None) -> float:
    """FLOP/s of one (M x K) @ (K x N) GEMM; engine: numpy, onnxruntime (fp32) or onnxruntime-int8."""
    if engine == "numpy":
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)
        seconds = _median_seconds(lambda: a @ b, reps)
    else:
        session, a = _session(m, k, n, "int8" if engine == "onnxruntime-int8" else "fp32", threads)
        seconds = _median_seconds(lambda: session.run(None, {"a": a}), reps)
    return 2.0 * m * k * n / seconds


def limit(costs, engines: tuple[str, ...], reps: int = 5) -> dict:
    """The GEMM limit on a model's counted nodes (``export.graph_cost.node_costs``): per node, the best rate of
    ``engines`` at its GEMM size; the limit time is sum(2 * macs / rate); its FLOP/s, total FLOP / that time."""
    nodes, seconds, flop = [], 0.0, 0.0
    for c in costs:
        m, k, n = c.gemm
        rates = {e: gemm_rate(m, k, n, e, reps) for e in engines}
        best = max(rates.values())
        seconds += 2.0 * c.macs / best
        flop += 2.0 * c.macs
        nodes.append({**c.to_dict(), "gflops": {e: r / 1e9 for e, r in rates.items()}})
    return {"engines": list(engines), "seconds": seconds, "flop": flop, "gflops": flop / seconds / 1e9,
            "nodes": nodes}


def peak(engines: tuple[str, ...], reps: int = 5) -> dict:
    """GFLOP/s of a square SQUARE^3 GEMM per engine."""
    return {e: gemm_rate(SQUARE, SQUARE, SQUARE, e, reps) / 1e9 for e in engines}
