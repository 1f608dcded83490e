"""Throughput and latency of the classifier alone, the purified pipeline in torch eager, and in onnxruntime.

    python -m benchmarks.speed --model models/middleware/cvae-alone-smooth200-tau3-prior1-mu2 --out results/speed.json

Per configuration and batch size (1, 64 and 256): one warm-up pass, then ``--reps`` timed repetitions over the
same real test images; the median is reported as ms/image and images/s, with ratios beside them. The machine
(CPU model and flags, thread counts, load) and software versions are recorded in the results file.

The limit, measured in the same run: the pipeline's multiply-accumulates counted from its ONNX graph (Conv,
ConvTranspose, Gemm, MatMul; ``export.graph_cost``), and the time those nodes would take if each ran as fast as a
plain GEMM of the size it lowers to on this machine (fp32: the better of numpy and onnxruntime MatMul; int8:
onnxruntime MatMulInteger; ``benchmarks/gemm_limit.py``). Achieved FLOP/s = 2 * MACs / the pipeline's median time;
the fraction is achieved over the limit's FLOP/s.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]

from purifier import __version__, checkpoint  # noqa: E402
from purifier.data import load_dataset  # noqa: E402
from purifier.designs import load_purifier  # noqa: E402
from purifier.pipeline import PurifiedClassifier  # noqa: E402
from purifier.provenance import cpu_model, git_commit  # noqa: E402
from export.graph_cost import node_costs  # noqa: E402
from serve.models import MODELS  # noqa: E402
from serve.runtime import OnnxPurifier  # noqa: E402

from benchmarks.gemm_limit import SQUARE, limit, peak  # noqa: E402  (benchmarks/gemm_limit.py)
from benchmarks.results import markdown_table, write_results  # noqa: E402  (benchmarks/results.py)

BATCHES = {1: 64, 64: 1024, 256: 1024}  # batch size -> images per repetition
FP32_GEMM, INT8_GEMM = ("numpy", "onnxruntime"), ("onnxruntime-int8",)


def time_it(fn, x: np.ndarray, batch: int, reps: int) -> dict:
    chunks = [x[i:i + batch] for i in range(0, len(x), batch)]
    for c in chunks[: max(1, len(chunks) // 4)]:  # warm-up
        fn(c)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for c in chunks:
            fn(c)
        times.append(time.perf_counter() - start)
    return _timing(times, batch, len(x))


def time_interleaved(fns: dict, x: np.ndarray, batch: int, reps: int) -> dict:
    """``time_it`` for several configurations in rounds, each once per round (its own warm-up, then one timed
    pass), median over the rounds: drift in the machine's state (clock, other load) falls on all of them alike
    instead of on whichever ran first."""
    runs = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            runs[name] += time_it(fn, x, batch, 1)["all_s"]
    return {name: _timing(times, batch, len(x)) for name, times in runs.items()}


def _timing(times: list[float], batch: int, images: int) -> dict:
    med = statistics.median(times)
    return {"batch": batch, "images": images, "reps": len(times), "median_s": med, "ms_per_image": 1000 * med / images,
            "images_per_s": images / med, "all_s": times}


@click.command()
@click.option("--model", "model_dir", default=str(MODELS["fashion-mnist"].path), show_default=True)
@click.option("--reps", default=7, show_default=True)
@click.option("--out", default=str(ROOT / "results" / "speed.json"), show_default=True)
def main(model_dir, reps, out):
    model_dir = Path(model_dir)
    classifier = checkpoint.load(model_dir / "classifier", expect="classifier")
    pipeline = PurifiedClassifier(classifier, load_purifier(model_dir / "cvae"), grad="none").eval()
    x_all = load_dataset("fashion-mnist", "test").x
    configs = {
        "classifier (torch eager)": lambda a: classifier(torch.from_numpy(a)),
        "purifier + classifier (torch eager)": lambda a: pipeline(torch.from_numpy(a)),
    }
    runtimes = {"cpu": OnnxPurifier(model_dir / "pipeline.onnx", device="cpu")}
    auto = OnnxPurifier(model_dir / "pipeline.onnx", device="auto")
    if "CUDAExecutionProvider" in auto.providers:
        runtimes["cuda"] = auto
    int8 = None
    if (model_dir / "pipeline.int8.onnx").is_file():
        int8 = OnnxPurifier(model_dir, device="cpu", precision="int8")
        configs["purifier + classifier int8 (onnxruntime cpu)"] = lambda a: int8.session.run(["logits"], {"x": a})
    # the classifier alone in onnxruntime too, so the pipeline's cost is also compared like for like
    tmp = tempfile.TemporaryDirectory()
    clf_path = Path(tmp.name) / "classifier.onnx"
    torch.onnx.export(classifier, (torch.rand(2, 1, 28, 28),), dynamo=True, input_names=["x"], output_names=["logits"],
                      dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1 << 20)}}).save(str(clf_path))
    for name, rt in runtimes.items():
        clf_session = ort.InferenceSession(str(clf_path), providers=rt.providers)
        configs[f"classifier (onnxruntime {name})"] = lambda a, s=clf_session: s.run(["logits"], {"x": a})
        configs[f"purifier + classifier (onnxruntime {name})"] = lambda a, rt=rt: rt.session.run(["logits"], {"x": a})
    results = {}
    with torch.no_grad():
        for name, fn in configs.items():
            results[name] = {str(b): time_it(fn, x_all[:n], b, reps) for b, n in BATCHES.items()}
            click.echo(f"{name}: " + ", ".join(f"batch {b}: {r['images_per_s']:.0f} img/s "
                                               f"({r['ms_per_image']:.3f} ms/img)" for b, r in results[name].items()),
                       err=True)
    eager = results["purifier + classifier (torch eager)"]
    ratios = {}
    for name, r in results.items():
        # cost relative to the classifier alone in the same runtime
        base = results["classifier " + name[name.index("("):]]
        ratios[name] = {b: {"cost_vs_classifier_same_runtime": r[b]["ms_per_image"] / base[b]["ms_per_image"],
                            "speedup_vs_torch_pipeline": eager[b]["ms_per_image"] / r[b]["ms_per_image"]}
                        for b in r}
    limits = gemm_limits(model_dir, results, int8 is not None, reps)
    commit = git_commit(ROOT)
    report = {
        "command": " ".join(["python", "-m", "benchmarks.speed", *sys.argv[1:]]), "commit": commit,
        "model": str(model_dir), "data": "fashion-mnist test images (first N per batch size)",
        "machine": {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "load_average_at_end": os.getloadavg(),
                    "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "onnxruntime_threads": "default (intra-op = physical cores)",
                    "onnxruntime_providers": {k: v.providers for k, v in runtimes.items()}},
        "versions": {"purifier": __version__, "torch": torch.__version__, "onnxruntime": ort.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "method": f"median of {reps} repetitions after one warm-up pass; images per repetition {BATCHES}",
        "results": results, "ratios": ratios, "limit": limits,
    }

    table = markdown_table(
        ["pipeline", "batch", "ms/image", "images/s", "cost vs classifier (same runtime)", "speed-up vs torch pipeline"],
        [[name, b, f"{v['ms_per_image']:.3f}", f"{v['images_per_s']:.0f}",
          f"{ratios[name][b]['cost_vs_classifier_same_runtime']:.2f}x",
          f"{ratios[name][b]['speedup_vs_torch_pipeline']:.2f}x"] for name, r in results.items() for b, v in r.items()])
    load = ", ".join(f"{v:.1f}" for v in report["machine"]["load_average_at_end"])
    write_results(out, report, f"Speed ({report['machine']['cpu']}, {report['machine']['cores']} cores, load average "
                               f"{load} at the end (1, 5, 15 min); {report['method']})",
                  table + "\n\n" + limit_table(limits))
    click.echo(table)
    click.echo(limit_table(limits))


def cpu_flags() -> list[str]:
    """The SIMD flags of /proc/cpuinfo that decide which GEMM kernels run (AVX2/AVX-512, VNNI, BF16, AMX)."""
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))


def gemm_limits(model_dir: Path, results: dict, with_int8: bool, reps: int) -> dict:
    """Per batch size: MACs from the graph, the GEMM limit, achieved FLOP/s and the fraction of the limit."""
    out = {"square_gemm_gflops": {"size": SQUARE, **peak(FP32_GEMM + INT8_GEMM, reps)}, "batches": {}}
    rows = {"fp32": ("purifier + classifier (onnxruntime cpu)", FP32_GEMM)}
    if with_int8:
        rows["int8"] = ("purifier + classifier int8 (onnxruntime cpu)", INT8_GEMM)
    for b in BATCHES:
        costs = node_costs(model_dir / "pipeline.onnx", b)
        entry = {"macs": sum(c.macs for c in costs), "macs_per_image": sum(c.macs for c in costs) / b}
        for precision, (name, engines) in rows.items():
            lim = limit(costs, engines, reps)
            seconds = results[name][str(b)]["median_s"] * b / results[name][str(b)]["images"]  # one batch
            achieved = lim["flop"] / seconds / 1e9
            entry[precision] = {"pipeline": name, "seconds_per_batch": seconds, "achieved_gflops": achieved,
                                "limit_gflops": lim["gflops"], "fraction_of_limit": achieved / lim["gflops"],
                                "limit": lim}
        out["batches"][str(b)] = entry
    return out


def limit_table(limits: dict) -> str:
    peaks = limits["square_gemm_gflops"]
    rows = [[b, precision, f"{e['macs_per_image'] / 1e6:.2f}", f"{v['achieved_gflops']:.1f}",
             f"{v['limit_gflops']:.1f}", f"{100 * v['fraction_of_limit']:.0f}%", " + ".join(v["limit"]["engines"])]
            for b, e in limits["batches"].items() for precision, v in e.items() if precision in ("fp32", "int8")]
    return (f"GEMM limit (square {peaks['size']}^3 GEMM: numpy {peaks['numpy']:.1f}, onnxruntime MatMul "
            f"{peaks['onnxruntime']:.1f}, onnxruntime MatMulInteger int8 {peaks['onnxruntime-int8']:.1f} "
            f"GFLOP/s)\n\n"
            + markdown_table(["batch", "precision", "MMACs/image (graph)", "achieved GFLOP/s",
                              "GEMM limit GFLOP/s (per-node sizes)", "fraction of limit", "GEMM measured with"], rows))


if __name__ == "__main__":
    main()
