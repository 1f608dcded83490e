"""``purifier demo``: PGD on test images, purified through onnxruntime."""
from __future__ import annotations

import time
from pathlib import Path

import click

from .common import _shipped_names, main

@main.command("demo")
@click.option("--model", "model_dir", default="fashion-mnist", show_default=True,
              help=f"A shipped model name ({_shipped_names()}) or a model directory holding cvae.json, "
                   f"classifier.json and pipeline.onnx.")
@click.option("--n", default=1000, show_default=True, help="First N test images.")
@click.option("--eps", default=0.1, show_default=True, help="L-infinity budget.")
@click.option("--steps", default=40, show_default=True, help="PGD steps (step size 2.5 * eps / steps).")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default="demo-out", show_default=True,
              help="Writes grid.png (rows labelled clean / adversarial (BPDA) / purified) and report.json here.")
def demo_cmd(model_dir, n, eps, steps, seed, out):
    """Attack the model with PGD-Linf, purify every attacked image through onnxruntime, and print the table.

    Four attacks: oblivious (on the classifier alone), BPDA and full gradient (through the whole pipeline),
    and the selection attack, which drives the purifier's decision rule itself (it raises the true class's
    reconstruction error above the best wrong class's). The selection attack is the one that decides the
    result on the shipped models: it sets the 'adaptive worst' row (an image counts only if it survives
    BPDA, full gradient and selection).

    Example: purifier demo --model fashion-mnist --n 1000 --eps 0.1 --steps 40
    """
    from serve.png import image_grid, write_png

    from ..checkpoint import write_json
    from ..demo import GRID_ROWS, check_model_dir, format_table, run_demo

    try:
        check_model_dir(model_dir)  # a bad --model is a usage error; the report names the model as asked
    except (FileNotFoundError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="'--model'") from exc
    start = time.perf_counter()
    report = run_demo(model_dir, n=n, eps=eps, steps=steps, seed=seed,
                      on_progress=lambda name: click.echo(f"attacked: {name}", err=True))
    grid = report.pop("grid")
    report["seconds"] = time.perf_counter() - start
    write_png(Path(out) / "grid.png", image_grid(grid, labels=list(GRID_ROWS)))

    write_json(Path(out) / "report.json", report)
    click.echo(format_table(report))
    click.echo(f"image grid (rows: {', '.join(GRID_ROWS)}) -> {Path(out) / 'grid.png'}; "
               f"report -> {Path(out) / 'report.json'}; {report['seconds']:.0f} s in all")
