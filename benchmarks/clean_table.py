"""The clean-accuracy table of the shipped models, rendered from their ``purifier evaluate`` results files.

    python -m benchmarks.clean_table --out results/clean-accuracy.json \
        results/eval-middleware-cvae-alone-smooth200-tau3-prior1-mu2.json results/eval-fashion-mnist-plain.json \
        results/adversarial/eval-joint.json

Each column is one results file (all 10,000 Fashion-MNIST test images, as ``make default-model``, ``make
plain-model`` and ``make adversarial`` write them); the rows are its figures as percentages. docs/robustness.md quotes the table (``make docs-tables``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]

from purifier.provenance import git_commit  # noqa: E402
from serve.models import MODELS  # noqa: E402

from benchmarks.results import markdown_table, write_results  # noqa: E402  (benchmarks/results.py)

ROWS = [
    ("target classifier alone, on unpurified images", lambda e: e["classifier"]["accuracy"]),
    # the rule the model directory records (``design``: the MSE with a robust prior where it has one)
    ("purified, the model's own rule (the default's: MSE with its robust prior)",
     lambda e: e["selections"].get("design", e["selections"]["mse"])["accuracy"]),
    ("purified, MSE selection alone (PuVAE's rule)", lambda e: e["selections"]["mse"]["accuracy"]),
    ("purified, likelihood selection (negative ELBO)", lambda e: e["selections"]["likelihood"]["accuracy"]),
    ("purified prediction = chosen class (MSE)", lambda e: e["selections"]["mse"]["pred_eq_argmin"]),
]


def shipped_as(cvae_sha256: str, path: str) -> str:
    """The column of an evaluation: the shipped model with these CVAE weights, by name and folder (an evaluation
    records where the model was when it ran, which may have moved since)."""
    for m in MODELS.values():  # the first name of a folder is its main one
        record = m.path / "cvae.json"
        if record.is_file() and json.loads(record.read_text())["weights_sha256"] == cvae_sha256:
            return f"{m.name} (models/{m.folder})"
    raise click.BadParameter(f"{path}: no shipped model has its CVAE weights (sha256 {cvae_sha256[:16]}...)")


@click.command()
@click.argument("evals", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(), default="results/clean-accuracy.json", show_default=True)
def main(evals, out):
    columns = {}
    for path in evals:
        e = json.loads(Path(path).read_text())
        columns[shipped_as(e["cvae_sha256"], path)] = {
            "source": path, "n": e["n"], "split": e["split"], "cvae_sha256": e["cvae_sha256"],
            "classifier_sha256": e["classifier_sha256"], "rows": {name: fn(e) for name, fn in ROWS}}
    report = {"command": " ".join(["python", "-m", "benchmarks.clean_table", *sys.argv[1:]]),
              "commit": git_commit(ROOT), "columns": columns}
    table = markdown_table(["pipeline", *(f"{m}, n {c['n']}" for m, c in columns.items())],
                           [[name, *(f"{100 * c['rows'][name]:.2f}%" for c in columns.values())] for name, _ in ROWS])
    write_results(out, report, "# Clean accuracy of the shipped models (Fashion-MNIST test set)", table)
    click.echo(table)


if __name__ == "__main__":
    main()
