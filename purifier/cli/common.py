"""What every command shares: the ``purifier`` group, dataset and checkpoint loading that turns a bad value into
a usage error naming it, the progress bar, and the options of more than one command."""
from __future__ import annotations

import contextlib
import dataclasses
import shlex
import sys
import time

import click

DATA_HELP = ("Dataset: 'fashion-mnist', 'npz:PATH' (x, y[, x_test, y_test, class_names]) or 'folder:DIR' "
             "(DIR/CLASS/*.png, or DIR/train/... and DIR/test/...).")
PRECISION_HELP = ("Training steps in fp32, or under bf16 autocast (validation stays fp32): 1.9 to 3 times the steps/s "
                  "on CPUs with AVX512-BF16 or AMX, ten times slower without (results/train_speed.md).")


@contextlib.contextmanager
def progress(label: str, total: int, quiet: bool):
    """Progress on stderr, off with --quiet; yields an on_step callback. A terminal gets a bar; a log file (stderr
    not a terminal: a run in the background, CI) gets a line at every 5% of the steps."""
    if quiet:
        yield None
        return
    if not sys.stderr.isatty():
        every, start = max(1, total // 20), time.perf_counter()

        def on_line(epoch, step, steps, stats):
            done = epoch * steps + step + 1  # a resumed run counts from where it resumed
            if done % every == 0 or done == total:
                click.echo(f"{label}: step {done}/{max(total, done)} ({100 * done / max(total, done):.0f}%), "
                           f"epoch {epoch + 1}, "
                           f"loss {stats['loss']:.3f}, {time.perf_counter() - start:.0f} s", err=True)

        yield on_line
        return
    with click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True) as bar:
        def on_step(epoch, step, steps, stats):
            bar.label = f"{label} epoch {epoch + 1} loss {stats['loss']:.3f}"
            bar.update(1)

        yield on_step


def _dataset(spec: str, split: str):
    """Load a dataset, turning a missing or malformed one into a usage error that names it."""
    from ..data import load_dataset

    try:
        return load_dataset(spec, split)
    except (FileNotFoundError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--data") from exc


def _split(data: str, val_size, seed: int):
    from ..fitting import split

    ds = _dataset(data, "train")
    try:
        return (ds, *split(ds, val_size, seed))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--val-size") from exc


def _provenance() -> dict:
    """Where a checkpoint came from: the command line and the software it ran on."""
    from ..fitting import provenance

    return provenance(shlex.join(["purifier", *sys.argv[1:]]))


def _load(path, kind: str, option: str):
    """Load a checkpoint, turning a missing or wrong file into a usage error that names it."""
    from .. import checkpoint

    try:
        return checkpoint.load(path, expect=kind)
    except (FileNotFoundError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint=option) from exc


def config_option(cls, name: str, *decls: str, **kwargs):
    """A click option for field ``name`` of the config dataclass ``cls``, its default (and, unless given, its type)
    taken from the field, so the command line and the library cannot disagree. Tuples become comma lists."""
    f = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    if f is None:
        raise ValueError(f"{cls.__name__} has no field {name!r}")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if isinstance(default, tuple):
        default = ",".join(map(str, default))
    if default is not None and "type" not in kwargs and not isinstance(default, (str, bool)):
        kwargs["type"] = type(default)
    kwargs.setdefault("show_default", True)
    return click.option(*(decls or (f"--{name.replace('_', '-')}",)), default=default, **kwargs)


def resume_options(fn):
    """--resume and --save-every, shared by the training commands."""
    fn = click.option("--save-every", default=200, show_default=True, type=click.IntRange(min=1),
                      help="Save the full training state every this many steps (and at each epoch's end).")(fn)
    return click.option("--resume", is_flag=True,
                        help="Continue an interrupted run from its saved state (same settings and data); "
                             "ends with the weights an uninterrupted run would have.")(fn)


def _val_size(value: str):
    if value == "auto":
        return value
    try:
        return float(value) if "." in value else int(value)
    except ValueError:
        raise click.BadParameter(f"expected a count or a fraction, got {value!r}")


@click.group()
@click.version_option(package_name="purifier")
def main():
    """PuVAE purification: train, evaluate and run a class-conditional VAE in front of a classifier."""


def _classifier_path(path, option: str):
    from ..classifier_io import source_of

    try:
        return source_of(path)
    except (FileNotFoundError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint=option) from exc


def _model(ctx, param, value):
    """--model: a shipped model name (``purifier.registry.MODELS``) or a path -> its path; a usage error if absent."""
    from ..registry import resolve

    if value is None:
        return None
    try:
        return resolve(value)
    except FileNotFoundError as exc:
        raise click.BadParameter(str(exc)) from exc


def _shipped_names() -> str:
    from ..registry import known

    return known()
