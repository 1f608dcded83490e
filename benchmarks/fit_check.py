"""Does a defense's robustness fit its own training data? The same attack on images the run trained on, on
held-out validation images and on test images: a training-set figure well above the other two is robust
overfitting (more data or regularisation would help); the three together at the same level is underfitting (the
model cannot fit robustness even where it was trained, so longer training and a stronger training attack do not
help, while capacity or another decision rule might).

    python -m benchmarks.fit_check                # results/fit-check.{json,md}

Purifier rows: the adaptive check of adversarial training (``purifier.adversarial.adaptive_check``: selection and
full-gradient PGD, then the targeted selection and logit-margin attacks toward the best-fitting runner-up class;
random start, best iterate, per-image worst case, seed 0), with the frozen or trained classifier of the model
directory. Classifier rows: PGD on the classifier (``purifier.train.robust_accuracy``). Each on ``--n`` images of
each set: the first of the run's training split (``purifier.fitting.split`` with the seed and validation size its
checkpoint records), the validation split past the 200 images the run's own check attacked, and the test set.
The training log's ``adv_sel_acc`` (purifiers: selection accuracy on the training batch under the one training
attack each slice of it got) or ``adv_acc`` (classifiers), from the record of the kept weights, stands beside
them. Rows are cached in ``--work`` by weights.
"""
from __future__ import annotations

import platform
import shlex
import sys
import time
from pathlib import Path

import click
import torch

ROOT = Path(__file__).resolve().parents[1]

from purifier import checkpoint  # noqa: E402
from purifier.provenance import cpu_model, git_commit  # noqa: E402

from benchmarks.results import cached, markdown_table, write_results  # noqa: E402

# (row, model directory or classifier checkpoint, what it is)
ROWS = [
    ("CVAE alone, weight-200 smoothness", "models/middleware/cvae-alone-smooth200", "frozen standard A"),
    ("the same, 1 epoch more at selection temperature 0.003",
     "models/middleware/cvae-alone-smooth200-tau3", "frozen standard A"),
    ("that recipe 1 epoch more through a robust prior (converged PGD-AT, mu 0.001)",
     "models/middleware/cvae-alone-smooth200-tau3-prior1", "frozen standard A"),
    ("the same, the prior's weight raised to 0.002 (the default)",
     "models/middleware/cvae-alone-smooth200-tau3-prior1-mu2", "frozen standard A"),
    ("the wider CVAE, 1 epoch more", "models/middleware/wide-smooth200-more", "frozen standard A"),
    ("ks-cov-coupled + adv. training, + smoothness term", "models/variants/ks-cov-coupled/adversarial-smooth",
     "classifier trained with it"),
    ("adv. training: alternating, PGD-7 + targeted", "models/adversarial/alternating-pgd7",
     "classifier trained with it"),
    ("PGD-AT (converged)", "models/baselines/pgd-at-converged", "classifier alone"),
    ("TRADES (converged)", "models/baselines/trades-converged", "classifier alone"),
]
VAL_SKIP = 200  # the validation images every adversarial-training run's own check attacked


def sets(meta: dict, n: int) -> dict:
    """The first ``n`` images the run trained on, held-out validation images past ``VAL_SKIP``, and test images."""
    from purifier.data import load_dataset
    from purifier.fitting import split

    ds = load_dataset(meta["dataset"], "train")
    x, y, xv, yv = split(ds, meta["n_val"], meta["train"]["seed"])
    if len(xv) < VAL_SKIP + n:
        raise click.BadParameter(f"the run held out {len(xv)} validation images; --n {n} needs {VAL_SKIP + n}",
                                 param_hint="--n")
    te = load_dataset(meta["dataset"], "test")
    return {"train": (x[:n], y[:n]), "validation": (xv[VAL_SKIP:VAL_SKIP + n], yv[VAL_SKIP:VAL_SKIP + n]),
            "test": (torch.from_numpy(te.x[:n]), torch.from_numpy(te.y[:n]))}


def weights(path: str) -> tuple[bool, dict]:
    """Whether ``path`` is a model directory (a purifier) rather than a classifier checkpoint, and the record of the
    weights that name its row: the CVAE's, or the classifier's."""
    purifier = (ROOT / path / "cvae.json").is_file()
    return purifier, checkpoint.read_record(ROOT / path / "cvae" if purifier else ROOT / path)


def measure(path: str, n: int, eps: float, steps: int) -> dict:
    """One row: robust accuracy on each set, the training log's last attacked-selection accuracy where it has one."""
    from purifier.adversarial import adaptive_check
    from purifier.designs import load_purifier
    from purifier.train import robust_accuracy

    purifier, record = weights(path)
    meta = record["meta"]
    if purifier:  # the purifier its directory records (a robust prior's classifier too)
        pur, clf = load_purifier(ROOT / path / "cvae"), checkpoint.load(ROOT / path / "classifier")
        attack = lambda x, y: adaptive_check(pur, clf, x, y, eps, steps, targeted=1)["val_adaptive"]  # noqa: E731
    else:
        clf = checkpoint.load(ROOT / path)
        attack = lambda x, y: robust_accuracy(clf, x, y, eps, steps)  # noqa: E731
    out = {"weights_sha256": record["weights_sha256"], "kind": "purifier" if purifier else "classifier"}
    for name, (x, y) in sets(meta, n).items():
        t0 = time.perf_counter()
        out[name] = float(attack(x, y))
        out[f"{name}_seconds"] = time.perf_counter() - t0
    history = meta.get("history") or [{}]
    kept = history[history[-1]["best_epoch"] - 1] if "best_epoch" in history[-1] else history[-1]
    out["log_adv_sel_acc"] = kept.get("adv_sel_acc")
    out["log_train_adv_acc"] = kept.get("adv_acc")
    return out


@click.command()
@click.option("--n", default=500, show_default=True, help="Images of each set.")
@click.option("--eps", default=0.1, show_default=True, help="L-infinity budget.")
@click.option("--steps", default=20, show_default=True, help="PGD steps of every attack.")
@click.option("--out", default="results/fit-check.json", show_default=True, type=click.Path())
@click.option("--work", help="Cache of finished rows (default: results/.fit-check-work).")
@click.option("--threads", type=int, help="torch threads (default: torch's).")
def main(n, eps, steps, out, work, threads):
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    out = Path(out)
    work = Path(work or out.parent / f".{out.stem}-work")
    work.mkdir(parents=True, exist_ok=True)
    report = {"command": shlex.join(["python", "-m", "benchmarks.fit_check", *sys.argv[1:]]),
              "commit": git_commit(ROOT),
              "software": {"torch": torch.__version__, "python": platform.python_version()},
              "machine": {"cpu": cpu_model(), "torch_threads": torch.get_num_threads()},
              "settings": {"n": n, "eps": eps, "steps": steps, "val_skip": VAL_SKIP, "seed": 0}, "rows": {}}
    for name, path, what in ROWS:
        record = weights(path)[1]
        prior = record["meta"].get("prior")  # rows that share a CVAE differ by their prior
        key = (f"row-{record['weights_sha256'][:16]}" + (f"-prior{prior['sha256'][:16]}-mu{prior['weight']}" if prior else "")
               + f"-n{n}-eps{eps}-steps{steps}")
        report["rows"][name] = {"path": path, "classifier": what,
                                **cached(work, key, lambda: measure(path, n, eps, steps),
                                         lambda m: click.echo(m, err=True))}
    report["seconds"] = time.perf_counter() - start
    write_results(out, report, "# Robustness on the training set, the validation set and the test set", render(report))
    click.echo(render(report))


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def render(report: dict) -> str:
    s = report["settings"]
    rows = [[name, r["classifier"], pct(r["train"]), pct(r["validation"]), pct(r["test"]), pct(r["train"] - r["test"]),
             pct(r["log_adv_sel_acc"] if r["kind"] == "purifier" else r["log_train_adv_acc"])]
            for name, r in report["rows"].items()]
    return (f"L-infinity eps {s['eps']}, {s['steps']} steps, {s['n']} images of each set, seed {s['seed']}. Purifier "
            f"rows: the adaptive check of adversarial training (selection and full-gradient PGD, then the targeted "
            f"selection and logit-margin attacks toward the best-fitting runner-up class; per-image worst case); "
            f"classifier rows: PGD on the classifier. Train: the first images of the run's own training split; "
            f"validation: its held-out split past the first {s['val_skip']}; test: the first test images. Training "
            f"log: accuracy on the attacked training batch in the record of the kept weights (purifiers: the selection "
            f"under the one training attack each slice of the batch got; classifiers: under the training attack), "
            f"averaged while training.\n\n"
            + markdown_table(["row", "classifier", "train", "validation", "test", "train - test",
                              "training log"], rows))


if __name__ == "__main__":
    main()
