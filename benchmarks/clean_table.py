"""The clean-accuracy table of the shipped models, rendered from their ``purifier evaluate`` results files.

    python -m benchmarks.clean_table --out results/clean-accuracy.json \
        results/eval-fashion-mnist.json results/eval-fashion-mnist-plain.json

Each column is one results file (all 10,000 Fashion-MNIST test images, as ``make default-model`` and
``make plain-model`` write them); the rows are its figures as percentages. docs/robustness.md quotes the table (``make docs-tables``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]

from purifier.provenance import git_commit  # noqa: E402

from benchmarks.results import markdown_table, write_results  # noqa: E402  (benchmarks/results.py)

ROWS = [
    ("target classifier alone, on unpurified images", lambda e: e["classifier"]["accuracy"]),
    ("purified, MSE selection (PuVAE's rule, the default)", lambda e: e["selections"]["mse"]["accuracy"]),
    ("purified, likelihood selection (negative ELBO)", lambda e: e["selections"]["likelihood"]["accuracy"]),
    ("purified prediction = chosen class (MSE)", lambda e: e["selections"]["mse"]["pred_eq_argmin"]),
]


@click.command()
@click.argument("evals", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(), default="results/clean-accuracy.json", show_default=True)
def main(evals, out):
    columns = {}
    for path in evals:
        e = json.loads(Path(path).read_text())
        # eval-NAME.json holds the figures of models/NAME (its cvae_path is where it was when evaluated)
        columns[f"models/{Path(path).stem.removeprefix('eval-')}"] = {
            "source": path, "n": e["n"], "split": e["split"], "cvae_sha256": e["cvae_sha256"],
            "classifier_sha256": e["classifier_sha256"], "rows": {name: fn(e) for name, fn in ROWS}}
    report = {"command": " ".join(["python", "-m", "benchmarks.clean_table", *sys.argv[1:]]),
              "commit": git_commit(ROOT), "columns": columns}
    table = markdown_table(["pipeline", *(f"`{m}` (n {c['n']})" for m, c in columns.items())],
                           [[name, *(f"{100 * c['rows'][name]:.2f}%" for c in columns.values())] for name, _ in ROWS])
    write_results(out, report, "# Clean accuracy of the shipped models (Fashion-MNIST test set)", table)
    click.echo(table)


if __name__ == "__main__":
    main()
