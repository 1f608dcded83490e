"""`purifier purify --engine ray` against `purifier purify` on the same Fashion-MNIST test images as PNG files.

    python -m benchmarks.ray_batch --out results/ray-batch.json

Writes the PNGs once to a temporary folder, then runs both commands as cold processes, alternating (local, ray,
local, ray, ... ``--reps`` rounds), so drift in the machine's load falls on both alike. Without ``--ray-address``
the Ray command starts its own local cluster on this machine's CPUs, as a user's first try would. Reported:
wall-clock images/s of the whole command, and job images/s from each run's summary.json (for Ray without the
seconds Ray took to start); the onnxruntime providers each run used; whether the two manifests agree.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]

from purifier.provenance import cpu_model, git_commit  # noqa: E402

from serve.models import MODELS  # noqa: E402
from benchmarks.cli_throughput import write_pngs  # noqa: E402  (benchmarks/cli_throughput.py)
from benchmarks.results import markdown_table, write_results  # noqa: E402  (benchmarks/results.py)


def run_job(args: list[str], out: Path) -> dict:
    """One cold `purifier purify` into ``out`` (emptied first): wall seconds, summary.json, the manifest by key."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "purifier.cli", "purify", *args, "--out", str(out), "--quiet"]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    manifest = {}
    for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines():
        m = json.loads(line)
        manifest[(Path(m["source"]).name, m["index"])] = m
    return {"wall_s": wall, "summary": summary, "manifest": manifest}


def agreement(a: dict, b: dict) -> dict:
    """How far two manifests (by input) agree: same inputs, same predicted and chosen classes, same scores."""
    common = a.keys() & b.keys()
    diff = max((abs(a[k]["score"] - b[k]["score"]) for k in common), default=0.0)
    return {"same_inputs": a.keys() == b.keys(), "inputs": len(common),
            "same_predicted_class": sum(a[k]["predicted_class"] == b[k]["predicted_class"] for k in common),
            "same_chosen_class": sum(a[k]["chosen_class"] == b[k]["chosen_class"] for k in common),
            "max_abs_score_diff": diff}


@click.command()
@click.option("--model", default=str(MODELS["fashion-mnist"].path), show_default=True)
@click.option("--n", default=10000, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--actors", type=click.IntRange(min=1), help="Ray actors (default: the engine's, one per CPU).")
@click.option("--ray-address", help="Join this Ray cluster instead of starting a local one per run.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--reps", default=2, show_default=True, type=click.IntRange(min=1), help="Rounds of both commands.")
@click.option("--note", default="", help="What else the machine was doing, recorded in the results.")
@click.option("--out", default=str(ROOT / "results" / "ray-batch.json"), show_default=True)
def main(model, n, batch_size, actors, ray_address, device, reps, note, out):
    common = ["--model", model, "--batch-size", str(batch_size), "--device", device]
    ray_args = ["--engine", "ray", *(["--actors", str(actors)] if actors else []),
                *(["--ray-address", ray_address] if ray_address else [])]
    engines = {"local": common, "ray": [*common, *ray_args]}
    load_before = os.getloadavg()
    runs = {name: [] for name in engines}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        write_pngs(n, src)
        for r in range(reps):
            for name, args in engines.items():
                job = run_job([str(src), *args], Path(tmp) / f"out-{name}")
                job["summary"]["wall_s"] = job["wall_s"]
                runs[name].append(job)
                click.echo(f"round {r + 1}/{reps}, {name}: {job['wall_s']:.1f} s wall", err=True)
    load_after = os.getloadavg()
    parity = agreement(runs["local"][-1]["manifest"], runs["ray"][-1]["manifest"])
    engines_report = {}
    for name, jobs in runs.items():
        summaries = [j["summary"] for j in jobs]
        wall = statistics.median(s["wall_s"] for s in summaries)
        job_s = statistics.median(s["seconds"]["total"] - s.get("ray", {}).get("start_seconds", 0.0)
                                  for s in summaries)
        last = summaries[-1]
        engines_report[name] = {
            "command": " ".join(["purifier", "purify", "IN", *engines[name], "--out", "OUT", "--quiet"]),
            "wall_seconds_median": wall, "images_per_s_wall": n / wall,
            "job_seconds_median": job_s, "images_per_s_job": n / job_s,
            "providers": last["providers"], "done": last["done"], "failed": last["failed"],
            "ray": last.get("ray"), "actors": last.get("actors"), "runs": summaries}
    report = {
        "command": shlex.join(["python", "-m", "benchmarks.ray_batch", *sys.argv[1:]]), "commit": git_commit(ROOT),
        "settings": {"n": n, "batch_size": batch_size, "actors": actors, "ray_address": ray_address,
                     "device": device, "reps": reps, "model": model, "format": "png",
                     "inputs": "Fashion-MNIST test images as PNG files, 28x28 L", "order": "alternating rounds"},
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average_before": load_before,
                    "load_average_after": load_after, "note": note},
        "versions": {"onnxruntime": ort.__version__, "ray": _ray_version(), "numpy": np.__version__,
                     "python": platform.python_version()},
        "engines": engines_report, "parity": parity,
    }
    ray_info = engines_report["ray"]["ray"]
    table = markdown_table(
        ["engine", "onnxruntime provider", "wall-clock (cold process)", "images/s, wall", "images/s, job"],
        [[name, _providers_text(e["providers"]), f"{e['wall_seconds_median']:.1f} s",
          f"{e['images_per_s_wall']:.0f}", f"{e['images_per_s_job']:.0f}"] for name, e in engines_report.items()])
    table += (f"\n\nRay: {ray_info['actors']} actors x {ray_info['cpus_per_actor']:g} CPU on {ray_info['nodes']} "
              f"node(s), {ray_info['start_seconds']:.1f} s to start Ray (in the wall-clock, not in the job figure). "
              f"Manifests agree on {parity['same_predicted_class']}/{parity['inputs']} predicted and "
              f"{parity['same_chosen_class']}/{parity['inputs']} chosen classes (max score difference "
              f"{parity['max_abs_score_diff']:.2g}). Load average before/after: "
              f"{load_before[0]:.1f}/{load_after[0]:.1f}." + (f" {note}" if note else ""))
    write_results(out, report, f"`purifier purify` on one process and on Ray, {n} Fashion-MNIST PNGs "
                               f"({cpu_model()}, {os.cpu_count()} cores, batch {batch_size}, median of {reps})",
                  table)
    click.echo(table)


def _providers_text(providers: list) -> str:
    """``[CUDA, CPU]`` -> "CUDA, CPU"; the Ray engine's list of distinct lists (actors that disagree) -> "A / B"."""
    if providers and isinstance(providers[0], list):
        return " / ".join(", ".join(p) for p in providers)
    return ", ".join(providers)


def _ray_version() -> str:
    import ray

    return ray.__version__


if __name__ == "__main__":
    main()
