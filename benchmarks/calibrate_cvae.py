"""The sweep behind the default CVAE recipe: what moves validation argmin accuracy per unit of compute.

    python -m benchmarks.calibrate_cvae --out results/cvae-calibration.json

Each variant trains a CVAE for ``--epochs`` epochs on the first ``--n-train`` images of the training split
(after the same 5,000-image validation hold-out as the default model), with the shipped standard classifier A as the
frozen CE source, and reports the rate at which the MSE rule picks the true class on 2,000 validation images.
The test set is never used. Short budgets: these numbers choose directions, they are not the model's.
"""
from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import click
import torch

ROOT = Path(__file__).resolve().parents[1]

from purifier import checkpoint  # noqa: E402
from purifier.data import load_dataset, train_val_split  # noqa: E402
from purifier.losses import PuVAELoss  # noqa: E402
from purifier.provenance import git_commit  # noqa: E402
from purifier.models.cvae import CVAE, CVAEConfig  # noqa: E402
from purifier.train import TrainConfig, train_cvae  # noqa: E402

from benchmarks.results import markdown_table, write_results  # noqa: E402  (benchmarks/results.py)

VARIANTS = {
    # name: (CVAE config, loss)
    "plain PuVAE (sel 0), channels 32,64": (CVAEConfig(channels=(32, 64)), PuVAELoss(sel_weight=0)),
    "sel 1, channels 32,64": (CVAEConfig(channels=(32, 64)), PuVAELoss(sel_weight=1)),
    "sel 20, channels 32,64": (CVAEConfig(channels=(32, 64)), PuVAELoss(sel_weight=20)),
    "sel 100, channels 32,64": (CVAEConfig(channels=(32, 64)), PuVAELoss(sel_weight=100)),
    "sel 100, channels 16,32": (CVAEConfig(channels=(16, 32)), PuVAELoss(sel_weight=100)),
    "sel 100, channels 16,32, no CE term": (CVAEConfig(channels=(16, 32)), PuVAELoss(sel_weight=100, ce_weight=0)),
    "sel 100, channels 16,32, 4 hard negatives": (CVAEConfig(channels=(16, 32)),
                                                  PuVAELoss(sel_weight=100, sel_negatives=4)),
}


@click.command()
@click.option("--source", default=str(ROOT / "models" / "fashion-mnist-plain" / "classifier"), show_default=True)
@click.option("--n-train", default=20000, show_default=True)
@click.option("--n-val", default=2000, show_default=True)
@click.option("--epochs", default=2, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--out", default=str(ROOT / "results" / "cvae-calibration.json"), show_default=True)
def main(source, n_train, n_val, epochs, seed, out):
    ds = load_dataset("fashion-mnist", "train")
    tr, va = train_val_split(len(ds.y), 5000, 0)
    x, y = torch.from_numpy(ds.x[tr[:n_train]]), torch.from_numpy(ds.y[tr[:n_train]])
    xv, yv = torch.from_numpy(ds.x[va[:n_val]]), torch.from_numpy(ds.y[va[:n_val]])
    src = checkpoint.load(source, expect="classifier")
    rows = []
    for name, (cfg, loss) in VARIANTS.items():
        torch.manual_seed(seed)
        cvae = CVAE(cfg)
        start = time.perf_counter()
        history = train_cvae(cvae, src, x, y, xv, yv, TrainConfig(epochs=epochs, seed=seed), loss)
        rows.append({"variant": name, "cvae": cfg.to_dict(), "loss": loss.to_dict(),
                     "val_argmin_acc": history[-1]["val_argmin_acc"], "seconds": time.perf_counter() - start,
                     "history": history})
        click.echo(f"{name}: val argmin = label {rows[-1]['val_argmin_acc']:.4f} in {rows[-1]['seconds']:.0f} s",
                   err=True)
    commit = git_commit(ROOT)
    report = {"command": " ".join(["python", "-m", "benchmarks.calibrate_cvae", *sys.argv[1:]]), "commit": commit,
              "settings": {"n_train": n_train, "n_val": n_val, "epochs": epochs, "seed": seed, "source": source,
                           "data": "fashion-mnist train split minus the 5,000-image validation hold-out (seed 0)"},
              "versions": {"torch": torch.__version__, "python": platform.python_version(),
                           "threads": torch.get_num_threads()},
              "rows": rows}

    table = markdown_table(["variant", "validation argmin = label", "seconds"],
                           [[r["variant"], f"{100 * r['val_argmin_acc']:.1f}%", f"{r['seconds']:.0f}"] for r in rows])
    write_results(out, report, f"CVAE calibration: {epochs} epochs on {n_train} training images, argmin accuracy "
                               f"on {n_val} validation images (seed {seed}).", table)
    click.echo(table)


if __name__ == "__main__":
    main()
