"""End-to-end throughput of `purifier purify` on the 10,000 Fashion-MNIST test images as PNG files.

    python -m benchmarks.cli_throughput --out results/cli.json

Writes the PNGs to a temporary folder, runs the command in a subprocess (a cold process, as an operator
would), times it wall-clock, and splits the job's own time into file reading and decoding, onnxruntime, and
encoding and writing outputs (from the job's summary.json).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import onnxruntime as ort
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

from purifier.data import load_dataset  # noqa: E402
from purifier.provenance import cpu_model, git_commit  # noqa: E402

from serve.models import MODELS  # noqa: E402
from benchmarks.results import markdown_table, write_results  # noqa: E402  (benchmarks/results.py)


def write_pngs(n: int, folder: Path) -> None:
    """The first ``n`` Fashion-MNIST test images as 28x28 grayscale PNGs ``00000.png``... in ``folder``."""
    x = load_dataset("fashion-mnist", "test").x[:n]
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate((x[:, 0] * 255).round().astype(np.uint8)):
        Image.fromarray(img).save(folder / f"{i:05d}.png")


@click.command()
@click.option("--model", default=str(MODELS["fashion-mnist"].path), show_default=True)
@click.option("--n", default=10000, show_default=True)
@click.option("--batch-size", default=256, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--out", default=str(ROOT / "results" / "cli.json"), show_default=True)
def main(model, n, batch_size, device, out):
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in", Path(tmp) / "out"
        write_pngs(n, src)
        cmd = [sys.executable, "-m", "purifier.cli", "purify", str(src), "--model", model, "--out", str(dst),
               "--batch-size", str(batch_size), "--device", device, "--quiet"]
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True)
        wall = time.perf_counter() - start
        summary = json.loads((dst / "summary.json").read_text())
        manifest_lines = sum(1 for _ in open(dst / "manifest.jsonl", encoding="utf-8"))
    sec = summary["seconds"]
    shares = {k: sec[k] / sec["total"] for k in ("load", "onnxruntime", "write")}
    shares["other (start-up, discovery, logs)"] = 1 - sum(shares.values())
    report = {
        "command": " ".join(["python", "-m", "benchmarks.cli_throughput", *sys.argv[1:]]), "commit": git_commit(ROOT),
        "settings": {"n": n, "batch_size": batch_size, "device": device, "model": model, "format": "png",
                     "inputs": "PNG files, 28x28 L",
                     "job": " ".join(["purifier", *cmd[3:]])},
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "providers": summary["providers"]},
        "versions": {"onnxruntime": ort.__version__, "numpy": np.__version__, "python": platform.python_version()},
        "wall_seconds": wall, "images_per_s_wall": n / wall, "job_seconds": sec,
        "images_per_s_job": n / sec["total"], "share_of_job_time": shares,
        "done": summary["done"], "failed": summary["failed"], "manifest_lines": manifest_lines,
    }
    table = markdown_table(["what", "value"], [
        ["images", n], ["onnxruntime provider", ", ".join(summary["providers"])],
        ["wall-clock, cold process", f"{wall:.1f} s ({n / wall:.0f} images/s)"],
        ["job time (inside the process)", f"{sec['total']:.1f} s ({n / sec['total']:.0f} images/s)"],
        *[[f"share: {k}", f"{100 * v:.1f}%"] for k, v in shares.items()]])
    write_results(out, report, f"`purifier purify` on {n} Fashion-MNIST PNGs ({cpu_model()}, {os.cpu_count()} "
                               f"cores, batch {batch_size})", table)
    click.echo(table)


if __name__ == "__main__":
    main()
