"""``purifier purify``: files in batch through onnxruntime (torch-free), with the exit codes of the README."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from .common import _model, _shipped_names, main
from .jobs import ray_line, stop_on_signals, summary_line

# `purifier purify` exit codes (its --help and README say the same)
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


@main.command("purify")
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--model", required=True, callback=_model,
              help=f"A shipped model name ({_shipped_names()}), a model directory (pipeline.onnx or purifier.onnx) "
                   f"or an .onnx file.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--resize", is_flag=True, help="Resize images of another size instead of failing them.")
@click.option("--format", "fmt", type=click.Choice(["png", "npz"]), default="png", show_default=True,
              help="png: one image per input, same relative layout; npz: one purified.npz.")
@click.option("--resume/--no-resume", default=None,
              help="Skip inputs already in OUT's manifest or error log (default: on when OUT holds a manifest).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="onnxruntime's provider: auto takes CUDA when a GPU answers; summary.json says which ran.")
@click.option("--precision", type=click.Choice(["fp32", "int8"]),
              help="fp32 (a model directory's default) or int8: its pipeline.int8.onnx (purifier export --int8). "
                   "An .onnx file runs at the precision its metadata names.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this process; ray: an actor pool on a Ray cluster (pip install 'purifier[cluster]'); "
                   "npz output then stays one shard per batch under npz-parts/.")
@click.option("--ray-address", metavar="ADDR",
              help="--engine ray: the cluster to join (auto, HOST:PORT, ray://HOST:PORT); default: a local "
                   "cluster started for the job.")
@click.option("--actors", type=click.IntRange(min=1),
              help="--engine ray: actors in the pool, one onnxruntime session each (default: one per CPU of the "
                   "cluster; with --device cuda, one per GPU).")
@click.option("--quiet", is_flag=True, help="No progress bar and no summary line.")
def purify_cmd(inputs, model, out_dir, batch_size, resize, fmt, resume, device, precision, engine, ray_address,
               actors, quiet):
    """Purify image files, folders and .npy/.npz arrays on onnxruntime (no torch needed).

    Writes purified images, manifest.jsonl (one line per input), errors.jsonl (one line per failure, with the
    reason) and summary.json. Files in a folder that are neither images nor arrays (notes.txt) are skipped and
    listed: in summary.json (skipped_files) and in the summary line. A rerun into the same OUT resumes: inputs
    already in the manifest or the error log are not redone, and the failures recorded earlier still count.

    Ctrl-C (SIGINT) or SIGTERM: the images already loaded are purified and recorded, summary.json is written
    and the job exits 130; a second Ctrl-C stops at once. Rerun the same command to resume.

    \b
    Exit codes:
      0    every input purified (skipped non-image files do not count)
      1    some inputs failed, in this run or earlier ones into OUT (errors.jsonl)
      2    usage error (a bad option, model or output folder); nothing was done
      130  interrupted (SIGINT, SIGTERM): summary.json written; rerun resumes

    Example: purifier purify photos/ batch.npz --model fashion-mnist --out purified/

    On a Ray cluster (ray start --head, then ray start --address HEAD:6379 on the other nodes; inputs and OUT on a
    file system every node mounts): purifier purify photos/ --model fashion-mnist --out purified/ --engine ray
    --ray-address auto
    """
    import signal

    if engine != "ray":
        for name, value in (("--ray-address", ray_address), ("--actors", actors)):
            if value is not None:
                raise click.UsageError(f"{name} {value} applies to --engine ray only (the engine is {engine!r})")

    bar = None
    if not quiet and sys.stderr.isatty():
        bar = click.progressbar(length=1, label="purify", file=sys.stderr, show_pos=True)

    def on_batch(done, total):
        bar.length = total
        bar.update(done - bar.pos)

    newline = "\n" if bar is not None else ""  # off the progress bar's line

    def notice(signum):
        if not quiet:
            name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
            click.echo(f"{newline}{name}: stopping after the images already loaded, then writing summary.json "
                       f"({name} again stops at once)", err=True)

    try:
        from serve.batch import purify_files  # onnxruntime: a Ctrl-C while it loads is an interrupt too
        from serve.runtime import select_model

        model = str(select_model(model, precision))
        with stop_on_signals(notice) as should_stop:
            progress = on_batch if bar is not None else None
            if engine == "ray":
                from serve.ray_batch import purify_files_ray

                stats = purify_files_ray(list(inputs), model, out_dir, batch_size, resize, fmt, resume, device,
                                         actors, ray_address, on_batch=progress, should_stop=should_stop)
            else:
                stats = purify_files(list(inputs), model, out_dir, batch_size, resize, fmt, resume, device,
                                     progress, should_stop)
    except (FileNotFoundError, ValueError, ImportError, ConnectionError) as exc:
        raise click.UsageError(str(exc)) from exc
    except KeyboardInterrupt:
        click.echo(f"{newline}stopped at once; rerun the same command to resume (manifest: "
                   f"{Path(out_dir) / 'manifest.jsonl'})", err=True)
        sys.exit(EXIT_INTERRUPTED)
    finally:
        if bar is not None:
            bar.render_finish()
    if not quiet:
        click.echo(summary_line(stats, Path(out_dir)) + (ray_line(Path(out_dir)) if engine == "ray" else ""),
                   err=True)
    sys.exit(EXIT_INTERRUPTED if stats.interrupted else EXIT_FAILED if stats.failed else EXIT_OK)
