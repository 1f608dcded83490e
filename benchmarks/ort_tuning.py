"""What moves the pipeline's throughput on onnxruntime's CPU provider: session options, threads, precision and
a graph rewrite, each timed against the shipped defaults in the same run.

    python -m benchmarks.ort_tuning --model models/middleware/cvae-alone-smooth200-tau3 --out results/ort-tuning.json

Variants (all on the CPU provider): the default session (graph optimisation ORT_ENABLE_ALL, intra-op threads =
physical cores, spinning on); 1 intra-op thread; optimisation levels BASIC and EXTENDED; intra-op spinning off;
the ConvTranspose layer rewritten as four Convs + DepthToSpace (``export.optimize``); fp16 weights and
activations (``onnxruntime.transformers.float16``, fp32 input and outputs kept); the int8 model. Each variant's
outputs are compared with the default's on the same images (largest difference per output, same chosen class and
predicted class). Timing: interleaved rounds, one warm-up pass each, median of ``--reps``.
"""
from __future__ import annotations

import os
import platform
import sys
import tempfile
from pathlib import Path

import click
import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]

from export.optimize import convtranspose_as_conv  # noqa: E402
from purifier import __version__  # noqa: E402
from purifier.data import load_dataset  # noqa: E402
from purifier.provenance import cpu_model, git_commit  # noqa: E402

from serve.models import MODELS  # noqa: E402
from benchmarks.results import markdown_table, write_results  # noqa: E402  (benchmarks/results.py)
from benchmarks.speed import cpu_flags, time_interleaved  # noqa: E402  (benchmarks/speed.py)

BATCHES = {1: 64, 256: 1024}
LEVELS = {"BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}


def session(path: Path, threads: int | None = None, level=None, spinning: bool = True) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if level is not None:
        opts.graph_optimization_level = level
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def variants(model_dir: Path, tmp: Path) -> dict[str, ort.InferenceSession]:
    fp32 = model_dir / "pipeline.onnx"
    rewritten = onnx.load(str(fp32))
    convtranspose_as_conv(rewritten)
    onnx.save(rewritten, str(tmp / "rewritten.onnx"))
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True), str(tmp / "fp16.onnx"))
    out = {"default": session(fp32), "1 intra-op thread": session(fp32, threads=1),
           **{f"optimisation {k}": session(fp32, level=v) for k, v in LEVELS.items()},
           "spinning off": session(fp32, spinning=False),
           "ConvTranspose as 4 Conv + DepthToSpace": session(tmp / "rewritten.onnx"),
           "fp16 (weights and activations)": session(tmp / "fp16.onnx")}
    if (model_dir / "pipeline.int8.onnx").is_file():
        out["int8 (pipeline.int8.onnx)"] = session(model_dir / "pipeline.int8.onnx")
    return out


def agreement(sessions: dict, x: np.ndarray) -> dict:
    names = [o.name for o in sessions["default"].get_outputs()]
    ref = dict(zip(names, sessions["default"].run(names, {"x": x})))
    out = {}
    for name, s in sessions.items():
        got = dict(zip(names, s.run(names, {"x": x})))
        out[name] = {"max_abs_diff": {k: float(np.abs(got[k].astype(np.float64) - ref[k]).max())
                                      for k in ("purified", "scores", "logits")},
                     "same_chosen_class": float((got["chosen_class"] == ref["chosen_class"]).mean()),
                     "same_predicted_class": float((got["logits"].argmax(1) == ref["logits"].argmax(1)).mean())}
    return out


@click.command()
@click.option("--model", "model_dir", default=str(MODELS["fashion-mnist"].path), show_default=True)
@click.option("--reps", default=7, show_default=True)
@click.option("--out", default=str(ROOT / "results" / "ort-tuning.json"), show_default=True)
def main(model_dir, reps, out):
    model_dir = Path(model_dir)
    x = load_dataset("fashion-mnist", "test").x
    with tempfile.TemporaryDirectory() as tmp:
        sessions = variants(model_dir, Path(tmp))
        agree = agreement(sessions, x[:1000])
        fns = {name: (lambda a, s=s: s.run(["logits"], {"x": a})) for name, s in sessions.items()}
        timing = {str(b): time_interleaved(fns, x[:n], b, reps) for b, n in BATCHES.items()}
    report = {
        "command": " ".join(["python", "-m", "benchmarks.ort_tuning", *sys.argv[1:]]), "commit": git_commit(ROOT),
        "model": str(model_dir), "agreement_images": 1000,
        "machine": {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
                    "load_average_at_end": os.getloadavg()},
        "versions": {"purifier": __version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "method": f"interleaved rounds, median of {reps}; images per repetition {BATCHES}",
        "timing": timing, "agreement": agree,
    }
    base = {b: timing[b]["default"]["median_s"] for b in timing}
    table = markdown_table(
        ["variant", *[f"batch {b} ms/image" for b in timing], *[f"batch {b} vs default" for b in timing],
         "max |diff| logits", "same predicted class"],
        [[name, *[f"{timing[b][name]['ms_per_image']:.3f}" for b in timing],
          *[f"{base[b] / timing[b][name]['median_s']:.2f}x" for b in timing],
          f"{agree[name]['max_abs_diff']['logits']:.2g}", f"{100 * agree[name]['same_predicted_class']:.1f}%"]
         for name in sessions])
    load = ", ".join(f"{v:.1f}" for v in report["machine"]["load_average_at_end"])
    write_results(out, report, f"onnxruntime CPU variants ({report['machine']['cpu']}, {report['machine']['cores']} "
                               f"cores, load average {load} at the end; {report['method']})", table)
    click.echo(table)


if __name__ == "__main__":
    main()
