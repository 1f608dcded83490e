"""Two rows of one results file on the same images: how many images each holds that the other loses, and whether
that difference is more than chance (the exact two-sided McNemar test on those discordant images).

    python -m benchmarks.paired results/byo.json "A: the same, with the smoothness term at weight 200" \
        "A: the weight-200 row, 1 epoch more at selection temperature 0.003" \
        --out results/paired-default.json

When two rows agree on most images, their difference is far less uncertain than their separate standard errors
suggest: the paired count is the test for picking one row over another. The default mask is the per-image worst
case the rows' headline figure counts (``adaptive_robust``: every adaptive attack, targeted ones included); both
rows must have been measured with the same attack settings (their ``profile`` and, for two purifier rows, their
targeted runner-up classes, where both record them; targeted attacks aim at a purifier's selection, so a
classifier row records 0 and pairs with any purifier row of its profile). ``--labels DATASET`` adds each row's figure per class, on the labels of the first test
images of DATASET (the images the benchmarks attack, in order).
"""
from __future__ import annotations

import json
import shlex
import sys
from math import comb
from pathlib import Path

import click

from benchmarks.results import markdown_table, write_results
from purifier.provenance import git_commit

ROOT = Path(__file__).resolve().parents[1]


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value: the chance of a split at least this uneven of ``only_a + only_b``
    discordant images if either row were as likely to hold each of them."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def compare(rows: dict, a: str, b: str, mask: str = "adaptive_robust") -> dict:
    """The paired counts of rows ``a`` and ``b`` of a results file's ``rows``; ``ValueError`` naming what is missing
    or does not line up."""
    for name in (a, b):
        if name not in rows:
            raise ValueError(f"no row {name!r} in the results file (rows: {', '.join(rows)})")
        if not isinstance(rows[name].get(mask), list):
            raise ValueError(f"row {name!r} has no per-image {mask!r} list")
    # where both rows record it (older rows may not); targeted is not an attack setting of a classifier row (no
    # CVAE, no selection to target), so it is compared only between purifier rows
    check_targeted = not any(n_row.get("cvae", "") is None for n_row in (rows[a], rows[b]))
    for key in ("profile", "targeted") if check_targeted else ("profile",):
        if key in rows[a] and key in rows[b] and rows[a][key] != rows[b][key]:
            raise ValueError(f"rows {a!r} and {b!r} were measured with different {key} ({rows[a].get(key)!r} "
                             f"against {rows[b].get(key)!r}): not the same attacks")
    ma, mb = rows[a][mask], rows[b][mask]
    if len(ma) != len(mb):
        raise ValueError(f"row {a!r} has {len(ma)} images in {mask!r}, row {b!r} has {len(mb)}: not the same images")
    both = sum(1 for x, y in zip(ma, mb) if x and y)
    only_a = sum(1 for x, y in zip(ma, mb) if x and not y)
    only_b = sum(1 for x, y in zip(ma, mb) if y and not x)
    return {"a": a, "b": b, "mask": mask, "n": len(ma), "held_by_both": both, "only_a": only_a, "only_b": only_b,
            "neither": len(ma) - both - only_a - only_b, "accuracy_a": sum(map(bool, ma)) / len(ma),
            "accuracy_b": sum(map(bool, mb)) / len(mb), "mcnemar_p": mcnemar_p(only_a, only_b),
            "checkpoints": {a: rows[a].get("checkpoints"), b: rows[b].get("checkpoints")}}


def per_class(comparison: dict, rows: dict, labels, class_names: list[str]) -> list[dict]:
    """Each row's share of ``mask`` per class, ``labels`` the classes of the images the rows' lists are over."""
    a, b, mask = comparison["a"], comparison["b"], comparison["mask"]
    if len(labels) < comparison["n"]:
        raise ValueError(f"{len(labels)} labels for {comparison['n']} images")
    out = []
    for c, name in enumerate(class_names):
        idx = [i for i in range(comparison["n"]) if int(labels[i]) == c]
        if idx:
            out.append({"class": name, "n": len(idx),
                        "accuracy_a": sum(bool(rows[a][mask][i]) for i in idx) / len(idx),
                        "accuracy_b": sum(bool(rows[b][mask][i]) for i in idx) / len(idx)})
    return out


def render(report: dict) -> str:
    c = report["comparison"]
    table = markdown_table(
        ["row", "robust (n {})".format(c["n"]), "images only this row holds"],
        [[c["a"], f"{c['accuracy_a']:.1%}", c["only_a"]], [c["b"], f"{c['accuracy_b']:.1%}", c["only_b"]]])
    what = ": the per-image worst case of the headline figure" if c["mask"] == "adaptive_robust" else ""
    return (f"From `{report['results']}` ({c['mask']}{what}). "
            f"Held by both: {c['held_by_both']}; by neither: {c['neither']}.\n\n{table}\n\n"
            f"Exact two-sided McNemar test on the {c['only_a'] + c['only_b']} images the rows disagree on: "
            f"p = {c['mcnemar_p']:.2g}." + render_classes(report))


def render_classes(report: dict) -> str:
    """The per-class table, when the report has one."""
    if "per_class" not in report:
        return ""
    c = report["comparison"]
    rows = [[r["class"], r["n"], f"{r['accuracy_a']:.1%}", f"{r['accuracy_b']:.1%}",
             f"{r['accuracy_b'] - r['accuracy_a']:+.1%}"] for r in report["per_class"]]
    return (f"\n\nPer class ({report['labels']} test labels):\n\n"
            + markdown_table(["class", "images", c["a"], c["b"], "difference"], rows))


@click.command()
@click.argument("results", type=click.Path(exists=True, dir_okay=False))
@click.argument("row_a")
@click.argument("row_b")
@click.option("--mask", default="adaptive_robust", show_default=True, help="The per-image list compared.")
@click.option("--labels", help="Dataset whose first test labels the rows' images carry: adds a per-class table.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write OUT (.json) and its .md; else print the table.")
def main(results, row_a, row_b, mask, labels, out):
    report = json.loads(Path(results).read_text())
    try:
        comparison = compare(report["rows"], row_a, row_b, mask)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    rel = Path(results).resolve()
    rel = rel.relative_to(ROOT) if rel.is_relative_to(ROOT) else rel
    result = {"command": shlex.join(["python", "-m", "benchmarks.paired", *sys.argv[1:]]), "commit": git_commit(ROOT),
              "results": rel.as_posix(), "results_commit": report.get("commit"), "comparison": comparison}
    if labels:
        from purifier.data import load_dataset

        ds = load_dataset(labels, "test")
        try:
            result["per_class"] = per_class(comparison, report["rows"], ds.y, ds.class_names)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--labels") from None
        result["labels"] = labels
    if out:
        write_results(out, result, "# Two rows on the same images", render(result))
    click.echo(render(result))


if __name__ == "__main__":
    main()
