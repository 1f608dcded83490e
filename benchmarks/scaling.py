"""How the purifier's cost grows: images/s against the number of classes K and against the image size, for the
purifier alone (``purifier.onnx``: x -> purified, chosen class, K scores) and the whole pipeline (purifier +
classifier A, ``pipeline.onnx``), each exported with ``export.onnx_export.export_onnx`` (parity-checked against
torch) to a temporary file and run on onnxruntime's CPU provider.

    python -m benchmarks.scaling --out results/scaling.json

The weights are random (seeded): a timing depends on the graph's shapes, not on what the weights learnt, so no
model is trained for the K and image sizes that have no shipped model. The images are synthetic (uniform in
[0, 1]) of each size. Models: 28x28x1 uses the Fashion-MNIST CVAE preset (``PRESETS["fashion-mnist"]``) with
``num_classes=K``; the other sizes have no named preset, so they get what ``preset_for`` builds for a dataset
without one (the base ``CVAEConfig``, wider convolutions); classifier A (``ClassifierConfig(arch="a")``) with the
same image shape and K. Per configuration and batch size: one warm-up call, then ``--reps`` timed repetitions of
one batch (batch 1: ``BATCH1_CALLS`` single-image calls per repetition), median reported.
"""
from __future__ import annotations

import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path

import click
import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]

from export.onnx_export import export_onnx  # noqa: E402
from purifier import __version__  # noqa: E402
from purifier.models.classifiers import Classifier, ClassifierConfig  # noqa: E402
from purifier.models.cvae import CVAE, preset_for  # noqa: E402
from purifier.pipeline import Purifier  # noqa: E402
from purifier.provenance import cpu_model, git_commit  # noqa: E402

from benchmarks.results import markdown_table, write_results  # noqa: E402  (benchmarks/results.py)
from benchmarks.speed import time_it  # noqa: E402  (benchmarks/speed.py)

SHAPES = {"28x28x1": (1, 28, 28), "32x32x3": (3, 32, 32), "64x64x3": (3, 64, 64)}
PRESET_OF = {"28x28x1": "fashion-mnist"}  # shapes without a named preset get the base CVAEConfig
GRID = "28x28x1=10,20,50,100 32x32x3=10,20 64x64x3=10"
BATCH1_CALLS = 32
PARTS = ("purifier", "pipeline")


def parse_ints(value: str, what: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{what} must be comma-separated integers, got {value!r}") from None
    if not out or min(out) < 1:
        raise click.BadParameter(f"{what} must be positive integers, got {value!r}")
    return out


def parse_grid(value: str) -> dict[str, list[int]]:
    """``"28x28x1=10,20 64x64x3=10"`` -> {image size: [K, ...]}."""
    out = {}
    for part in value.split():
        shape, _, ks = part.partition("=")
        if shape not in SHAPES:
            raise click.BadParameter(f"unknown image size {shape!r} in {part!r}; choose from {list(SHAPES)}",
                                     param_hint="--grid")
        out[shape] = parse_ints(ks, f"--grid {shape}")
    if not out:
        raise click.BadParameter(f"no image size in {value!r}", param_hint="--grid")
    return out


def build(shape_name: str, num_classes: int, seed: int = 0) -> tuple[CVAE, Classifier]:
    torch.manual_seed(seed)
    shape = SHAPES[shape_name]
    cfg = preset_for(PRESET_OF.get(shape_name, "none"), shape, num_classes)
    cvae = CVAE(cfg).eval()
    # A random-init CVAE reconstructs every class almost alike, so the K scores nearly tie and onnxruntime's
    # rounding flips the argmin, which the export's parity check rejects. Larger label weights in the decoder's
    # first layer make each class's reconstruction clearly its own; the graph and its cost are unchanged.
    first = cvae.dec_head[0]
    with torch.no_grad():
        first.weight[:, cfg.latent_dim:].normal_(0.0, 1.0)
    clf = Classifier(ClassifierConfig(arch="a", image_shape=shape, num_classes=num_classes)).eval()
    return cvae, clf


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def measure(shape_name: str, num_classes: int, batches: list[int], reps: int, tmp: Path, seed: int) -> dict:
    """Export both parts for one (shape, K), time them, return settings and timings per part and batch."""
    cvae, clf = build(shape_name, num_classes, seed)
    x = np.random.default_rng(seed).random((max(batches + [BATCH1_CALLS]), *SHAPES[shape_name]), dtype=np.float32)
    out = {"shape": shape_name, "num_classes": num_classes, "cvae_config": cvae.cfg.to_dict(),
           "cvae_preset": PRESET_OF.get(shape_name, "base CVAEConfig (no named preset)"),
           "classifier_config": clf.cfg.to_dict(),
           "cvae_parameters": sum(p.numel() for p in cvae.parameters()),
           "classifier_parameters": sum(p.numel() for p in clf.parameters()), "parts": {}}
    for part in PARTS:
        path = tmp / f"{shape_name}-{num_classes}-{part}.onnx"
        export_onnx(path, Purifier(cvae), clf if part == "pipeline" else None)
        s = session(path)
        out["provider"] = s.get_providers()
        name = "logits" if part == "pipeline" else "chosen_class"
        fn = lambda a, s=s, name=name: s.run([name], {"x": a})  # noqa: E731
        timings = {}
        for b in batches:
            n = BATCH1_CALLS if b == 1 else b
            timings[str(b)] = time_it(fn, x[:n], b, reps)
        out["parts"][part] = timings
        path.unlink()
    return out


def plot(report: dict, out: Path, batch: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"purifier": "--", "pipeline": "-"}
    for i, shape in enumerate(report["settings"]["shapes"]):
        rows = [r for r in report["rows"] if r["shape"] == shape]
        for part in PARTS:
            ks = [r["num_classes"] for r in rows]
            ips = [r["parts"][part][batch]["images_per_s"] for r in rows]
            label = f"{shape}, {'purifier alone' if part == 'purifier' else 'purifier + classifier A'}"
            ax.plot(ks, ips, styles[part], marker="o", color=plt.cm.tab10(i), label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(report["settings"]["classes"])
    ax.set_xticklabels([str(k) for k in report["settings"]["classes"]])
    ax.set_xlabel("number of classes K (reconstructions per image)")
    ax.set_ylabel(f"images/s, batch {batch}")
    ax.set_title(f"onnxruntime CPU, random-init weights ({report['machine']['cpu']}, {report['machine']['cores']} "
                 f"cores)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path.name


@click.command()
@click.option("--grid", "grid_spec", default=GRID, show_default=True,
              help=f"Image sizes (from {list(SHAPES)}) and the K values at each (the larger sizes run at fewer K: "
                   f"their "
                   f"batches of 256 x K reconstructions are the slow end of the grid).")
@click.option("--batches", default="256,1", show_default=True)
@click.option("--reps", default=5, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--out", default=str(ROOT / "results" / "scaling.json"), show_default=True)
def main(grid_spec, batches, reps, seed, out):
    grid, batches = parse_grid(grid_spec), parse_ints(batches, "--batches")
    classes = sorted({k for ks in grid.values() for k in ks})
    load_start = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for shape, k in [(s, k) for s, ks in grid.items() for k in ks]:
            rows.append(measure(shape, k, batches, reps, Path(tmp), seed))
            r = rows[-1]
            click.echo(f"{shape} K={k}: " + ", ".join(
                f"{part} batch {b}: {t['images_per_s']:.0f} img/s" for part, v in r["parts"].items()
                for b, t in v.items()), err=True)
    report = {
        "command": shlex.join(["python", "-m", "benchmarks.scaling", *sys.argv[1:]]), "commit": git_commit(ROOT),
        "settings": {"grid": grid, "classes": classes, "shapes": list(grid), "batches": batches, "reps": reps,
                     "seed": seed, "batch1_calls_per_rep": BATCH1_CALLS,
                     "weights": "random init (seeded), not trained: timing only; the decoder first layer's label "
                                "columns drawn N(0, 1) so the K scores do not tie",
                     "data": "synthetic uniform [0, 1] images of each size",
                     "method": "export_onnx to a temporary file (parity-checked), one warm-up call, then median of "
                               "reps timed repetitions"},
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "provider": rows[0]["provider"] if rows else None,
                    "onnxruntime_threads": "default (intra_op_num_threads = 0: one per physical core)",
                    "torch_threads": torch.get_num_threads(),
                    "load_average_at_start": load_start, "load_average_at_end": os.getloadavg()},
        "versions": {"purifier": __version__, "torch": torch.__version__, "onnxruntime": ort.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "rows": rows,
    }
    head = ["image size", "K", "CVAE preset", "part"] + [f"batch {b} images/s" for b in batches] + \
        [f"batch {b} ms/image" for b in batches] + ["images/s vs K=10 (batch %d)" % batches[0]]
    table_rows = []
    for r in rows:
        base = next((q for q in rows if q["shape"] == r["shape"] and q["num_classes"] == 10), None)
        for part, v in r["parts"].items():
            rel = (f"{v[str(batches[0])]['images_per_s'] / base['parts'][part][str(batches[0])]['images_per_s']:.2f}x"
                   if base else "")
            table_rows.append([r["shape"], r["num_classes"], r["cvae_preset"], part]
                              + [f"{v[str(b)]['images_per_s']:.0f}" for b in batches]
                              + [f"{v[str(b)]['ms_per_image']:.3f}" for b in batches] + [rel])
    m = report["machine"]
    load = ", ".join(f"{v:.2f}" for v in m["load_average_at_end"])
    plot_name = plot(report, Path(out), str(batches[0]))
    write_results(out, report, f"Cost against classes and image size (onnxruntime {ort.__version__}, "
                               f"{m['provider'][0]}, default threads; {m['cpu']}, {m['cores']} cores, load average "
                               f"{load} at the end (1, 5, 15 min); random-init weights, synthetic images; median of "
                               f"{reps} repetitions)",
                  markdown_table(head, table_rows) + f"\n\npurifier: purifier.onnx (K reconstructions and the "
                  f"argmin); pipeline: purifier + classifier A. ![images/s against K]({plot_name})")
    click.echo(markdown_table(head, table_rows))


if __name__ == "__main__":
    main()
