"""The GPU checks in one run: speed on CUDA (fp32, and fp16), and CUDA's outputs against the CPU's.

    python -m benchmarks.gpu_check --out results/gpu.json

On a machine with onnxruntime-gpu and a CUDA GPU:

1. ``benchmarks/speed.py`` as it stands (its onnxruntime rows on CPU and, since a GPU answers, on CUDA), into a
   temporary file whose report is kept whole under ``speed``;
2. the pipeline converted to fp16 with onnxruntime's own float16 tool (inputs and outputs kept float32), timed
   on CUDA beside the fp32 pipeline, interleaved, at batch 1, 256 and 1024; if the tool or the fp16 session is
   not available, the results say why and the fp32 parts stand;
3. parity on ``--n`` test images: the CUDA fp32 (and fp16) pipeline against the CPU one: max abs difference of
   logits, purified images and scores, the fraction with the same predicted and chosen class.

Writes ``results/gpu.{json,md}`` with the GPU named by nvidia-smi. Without a CUDA provider that starts on a GPU it
refuses (exit 2) and writes nothing.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]

from serve.models import MODELS  # noqa: E402
from serve.runtime import CUDA, OnnxPurifier, cuda_driver_gpus, resolve_model  # noqa: E402

BATCHES = {1: 64, 256: 1024, 1024: 8192}  # batch size -> images per repetition
EXIT_REFUSED = 2


def refusal(model: Path) -> str | None:
    """Why the CUDA checks cannot run here, or None when onnxruntime's CUDA provider starts on a GPU."""
    if CUDA not in ort.get_available_providers():
        return (f"this onnxruntime build ({ort.__version__}) has no CUDA provider (providers: "
                f"{ort.get_available_providers()}); install onnxruntime-gpu")
    if cuda_driver_gpus() == 0:
        return ("no GPU answers: the CUDA driver reports 0 devices (no NVIDIA driver, no GPU, or "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    try:
        OnnxPurifier(model, device="cuda")
    except RuntimeError as exc:
        return str(exc)
    return None


def gpus() -> list[dict]:
    """The GPUs as nvidia-smi names them (name, driver, memory), or one entry saying why it could not tell."""
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    try:
        text = subprocess.run(query, capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return [{"name": f"unknown (nvidia-smi: {exc})"}]
    rows = [[f.strip() for f in line.split(",")] for line in text.strip().splitlines()]
    return [dict(zip(("name", "driver", "memory"), row)) for row in rows]


def fp16_copy(src: Path, dst: Path) -> str | None:
    """``src`` converted to fp16 inside (float32 inputs and outputs, metadata kept) at ``dst``; or why not."""
    try:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:
        return f"onnxruntime's float16 converter is not available here ({exc})"
    try:
        onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))
    except Exception as exc:  # the converter raises many types on graphs it cannot handle
        return f"the float16 conversion failed ({type(exc).__name__}: {exc})"
    return None


def run_all(rt: OnnxPurifier, x: np.ndarray, batch: int = 256) -> dict:
    outs = [rt(x[i:i + batch]) for i in range(0, len(x), batch)]
    return {k: np.concatenate([o[k] for o in outs]) for k in ("logits", "purified", "scores",
                                                               "predicted_class", "chosen_class")}


def parity(reference: dict, other: dict) -> dict:
    """How far ``other``'s outputs are from ``reference``'s (both from ``run_all`` on the same images)."""
    diff = {f"max_abs_diff_{k}": float(np.abs(other[k] - reference[k]).max())
            for k in ("logits", "purified", "scores")}
    same = {f"same_{k}": float(np.mean(other[k] == reference[k])) for k in ("predicted_class", "chosen_class")}
    # where another class's reconstruction was kept the logits differ by a whole image; apart from those:
    agree = other["chosen_class"] == reference["chosen_class"]
    diff["max_abs_diff_logits_same_chosen"] = float(np.abs(other["logits"][agree] - reference["logits"][agree]).max(
        initial=0.0))
    return {**diff, **same, "images": len(reference["logits"])}


def speed_report(model: Path, reps: int, tmp: Path) -> dict:
    """``benchmarks/speed.py --model MODEL --reps REPS`` as it stands; its results file's report, or ``error``
    saying why it failed (the CUDA checks above it stand either way)."""
    out = tmp / "speed.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--model", str(model.parent),
                        "--reps", str(reps), "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": f"python -m benchmarks.speed exited {r.returncode}: {r.stderr[-2000:]}"}
    return json.loads(out.read_text())


def check(model: Path, device: str, x: np.ndarray, reps: int, tmp: Path) -> dict:
    """The fp32/fp16 timings on ``device`` and the parity against the CPU (``device`` cpu: the checks' own test)."""
    from benchmarks.speed import time_interleaved  # noqa: E402  (benchmarks/speed.py; imports torch)

    cpu = OnnxPurifier(model, device="cpu")
    runtimes = {"fp32": OnnxPurifier(model, device=device)}
    fp16 = {"available": False}
    reason = fp16_copy(model, tmp / "pipeline.fp16.onnx")
    if reason is None:
        try:
            runtimes["fp16"] = OnnxPurifier(tmp / "pipeline.fp16.onnx", device=device)
            fp16 = {"available": True, "how": "onnxruntime.transformers.float16.convert_float_to_float16"
                                             "(keep_io_types=True)"}
        except Exception as exc:  # an op the provider has no fp16 kernel for, among others
            reason = f"the fp16 session did not start ({type(exc).__name__}: {exc})"
    if reason is not None:
        fp16["reason"] = reason
    fns = {name: (lambda a, rt=rt: rt.session.run(None, {"x": a})) for name, rt in runtimes.items()}
    timings = {}
    for batch, images in BATCHES.items():
        rows = time_interleaved(fns, x[:images], batch, reps)
        for name, row in rows.items():
            timings.setdefault(name, {})[str(batch)] = row
    reference = run_all(cpu, x)
    return {"providers": {name: rt.providers for name, rt in runtimes.items()}, "fp16": fp16, "timings": timings,
            "parity_vs_cpu": {name: parity(reference, run_all(rt, x)) for name, rt in runtimes.items()}}


def table(report: dict) -> str:
    from benchmarks.results import markdown_table  # noqa: E402  (benchmarks/results.py)

    c = report["cuda"]
    rows = [[f"{name} (onnxruntime {', '.join(c['providers'][name])})", b, f"{v['ms_per_image']:.4f}",
             f"{v['images_per_s']:.0f}"] for name, r in c["timings"].items() for b, v in r.items()]
    text = markdown_table(["pipeline", "batch", "ms/image", "images/s"], rows)
    rows = [[name, f"{p['max_abs_diff_logits']:.2e}", f"{p['max_abs_diff_logits_same_chosen']:.2e}",
             f"{p['max_abs_diff_purified']:.2e}", f"{p['max_abs_diff_scores']:.2e}",
             f"{100 * p['same_predicted_class']:.2f}%", f"{100 * p['same_chosen_class']:.2f}%"]
            for name, p in c["parity_vs_cpu"].items()]
    text += "\n\nAgainst the CPU provider (fp32) on the same images:\n\n" + markdown_table(
        ["pipeline", "max abs logits diff", "the same, where the chosen class agrees", "max abs purified diff",
         "max abs scores diff", "same predicted class", "same chosen class"], rows)
    if not c["fp16"]["available"]:
        text += f"\n\nfp16: not measured: {c['fp16']['reason']}."
    speed = report.get("speed")
    if speed is not None and "error" in speed:
        text += f"\n\nbenchmarks/speed.py failed here: {speed['error'].strip().splitlines()[-1]}"
    elif speed is not None:
        rows = [[name, b, f"{v['ms_per_image']:.3f}", f"{v['images_per_s']:.0f}"]
                for name, r in speed["results"].items() if "onnxruntime" in name for b, v in r.items()]
        text += "\n\nbenchmarks/speed.py on this machine (its onnxruntime rows):\n\n" + markdown_table(
            ["pipeline", "batch", "ms/image", "images/s"], rows)
    return text


@click.command()
@click.option("--model", default=str(MODELS["fashion-mnist"].path), show_default=True,
              help="A model directory (pipeline.onnx) or a pipeline .onnx file.")
@click.option("--n", default=10000, show_default=True, type=click.IntRange(min=1024),
              help="Test images for the parity check (and the timings' pool).")
@click.option("--reps", default=7, show_default=True, type=click.IntRange(min=1))
@click.option("--speed/--no-speed", default=True, show_default=True, help="Run benchmarks/speed.py too.")
@click.option("--out", default=str(ROOT / "results" / "gpu.json"), show_default=True)
def main(model, n, reps, speed, out):
    model = resolve_model(model)
    reason = refusal(model)
    if reason is not None:
        click.echo(f"gpu_check: refused, nothing measured or written: {reason}", err=True)
        sys.exit(EXIT_REFUSED)
    from purifier.data import load_dataset
    from purifier.provenance import cpu_model, git_commit
    from benchmarks.results import write_results  # noqa: E402  (benchmarks/results.py)

    x = load_dataset("fashion-mnist", "test").x[:n]
    with tempfile.TemporaryDirectory() as tmp:
        report = {
            "command": " ".join(["python", "-m", "benchmarks.gpu_check", *sys.argv[1:]]), "commit": git_commit(ROOT),
            "model": str(model), "settings": {"n": n, "reps": reps, "batches": BATCHES},
            "method": f"median of {reps} interleaved rounds (fp32, fp16) after a warm-up each; inputs copied from "
                      "host memory on every call, as `purifier purify` and the server do",
            "machine": {"gpus": gpus(), "cpu": cpu_model(), "cores": os.cpu_count()},
            "versions": {"onnxruntime": ort.__version__, "numpy": np.__version__,
                         "python": platform.python_version()},
            "cuda": check(model, "cuda", x, reps, Path(tmp)),
        }
        if speed:
            report["speed"] = speed_report(model, reps, Path(tmp))
    gpu = report["machine"]["gpus"][0]["name"]
    text = table(report)
    write_results(out, report, f"GPU check ({gpu}; {report['machine']['cpu']}, {os.cpu_count()} cores)", text)
    click.echo(text)


if __name__ == "__main__":
    main()
