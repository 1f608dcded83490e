"""Adversarial training through the whole pipeline, measured: clean accuracy against adaptive robust accuracy at
the headline eps for every training mode, beside plain PuVAE, PGD-AT alone and plain PuVAE in front of PGD-AT.

    python -m benchmarks.adversarial --profile standard   # results/adversarial.{json,md,png}; 9-27 min per row here
    python -m benchmarks.adversarial --profile quick      # minutes; never quoted

Every row is measured by ``benchmarks/protocol.py`` on the same first n test images with the same attacks
(../shared/BENCHMARK_PROTOCOL.md): oblivious PGD on the row's target classifier; the adaptive per-image worst
case over the selection attack, full gradient, BPDA and softmin, then the targeted attacks toward the runner-up
classes (PGD with best-iterate accounting; classifier rows: PGD on the classifier); ART's Square (scores only)
and AutoAttack-style APGD-CE/APGD-DLR through BPDA on the first n_art, which the training never used; the worst
of all of them; the protocol's sanity checks per row; images/s of every row, timed together at the end. The
reject option's defended rate is measured on ``--default``'s row (alternating, PGD-7 + targeted, the best row at the
full profile), else on the row with the best worst case. Each row is cached under ``--work`` and reused while its
weights' sha256 is unchanged, so rows can be added as their training runs finish and an interrupted run resumes; a
row not asked for with ``--row`` enters from its cache or, failing that, from the results file last published, as
it was measured (with the suite it was measured with).
"""
from __future__ import annotations

import time
from pathlib import Path

import click
import torch

ROOT = Path(__file__).resolve().parents[1]

from purifier import checkpoint  # noqa: E402

from benchmarks.protocol import (PROFILES, Bench, Row, attack_seconds, choose_rows, converged_baselines, headline,  # noqa: E402
                      headline_columns, measure_rows, output_paths, publish, report_head, slug, speed_threads, speed_together,
                      suite_text)
from benchmarks.results import markdown_table  # noqa: E402  (benchmarks/results.py)


def default_rows(plain: str, baselines: str, adversarial: str) -> list[Row]:
    a = adversarial
    return [
        *converged_baselines(baselines),
        Row("plain PuVAE", f"{plain}/classifier", f"{plain}/cvae", "standard classifier as target"),
        Row("plain PuVAE + PGD-AT", f"{baselines}/pgd-at", f"{plain}/cvae", "3-epoch PGD-AT as target, no retraining"),
        Row("adv. training: CVAE alone", f"{a}/cvae/classifier", f"{a}/cvae/cvae", "target: 3-epoch PGD-AT, frozen"),
        Row("adv. training: classifier alone", f"{a}/classifier/classifier", f"{a}/classifier/cvae",
            "CVAE frozen (plain)"),
        Row("adv. training: alternating", f"{a}/alternating/classifier", f"{a}/alternating/cvae", ""),
        Row("adv. training: joint", f"{a}/joint/classifier", f"{a}/joint/cvae", "target from the 3-epoch PGD-AT"),
        Row("adv. training: alternating, longer", f"{a}/alternating-longer/classifier",
            f"{a}/alternating-longer/cvae", "alternating + 0.75 epoch more (new cosine schedule)"),
        Row("adv. training: alternating, PGD-7 + targeted", f"{a}/alternating-pgd7/classifier",
            f"{a}/alternating-pgd7/cvae", "alternating, longer + 2 epochs against PGD-7 selection, targeted selection, "
            "full gradient and BPDA"),
    ]


def render(report: dict) -> str:
    p = report["profile"]
    rows = report["rows"]
    parts = [f"Fashion-MNIST test set. Robust figures on the first {p['n']} images, L-infinity eps {p['eps']}; "
             f"{suite_text(p)}. Square ({p['square_queries']} queries, scores only) "
             f"and AutoAttack-style APGD-CE + APGD-DLR ({p['apgd_iters']} iterations, 1 start, through BPDA) from "
             f"ART on the first {p['n_art']}; worst of all = every attack together on those {p['n_art']}. Clean "
             f"accuracy on the first {p['clean_n']}. images/s: purifier + classifier in torch eager, batch 256, "
             f"{speed_threads(report)} threads, median of {p['speed_reps']}.",
             "", markdown_table(headline_columns(p), headline(rows, report["speed"], p.get("targeted", 0)))]
    # columns: every attack of any row's suite in suite order; "-" where a row's (older) suite did not run it
    broken = [r for r in rows.values() if len(r["broken_by"]) > 1]
    names = list(dict.fromkeys(a for r in broken for a in r["broken_by"]))
    if broken:
        parts += ["", "### Which attack broke each image first (strongest first; later ones only see survivors)",
                  markdown_table(["defense", *names],
                                 [[r["name"], *[str(r["broken_by"].get(a, "-")) for a in names]] for r in broken])]
    if report.get("training"):
        parts += ["", "### Training runs (purifier train --adversarial MODE; validation: 5,000 held-out train "
                      "images; adaptive check: 200 of them, 10-step selection + full gradient)",
                  markdown_table(["run", "mode", "epochs", "train attacks", "seconds", "val purified acc",
                                  "val adaptive check (upper bound)"],
                                 [[k, t["mode"], f"{t['epochs']:g}", f"{','.join(t['attacks'])} x {t['steps']} steps",
                                   f"{t['train_seconds']:.0f}", f"{t['val_purified_acc']:.4f}",
                                   " -> ".join(f"{h['val_adaptive']:.2f}" for h in t["history"])]
                                  for k, t in report["training"].items()])]
    rj = report.get("reject")
    if rj:
        parts += ["", f"### Reject option ({rj['row']})",
                  markdown_table(["threshold (99th pct of clean validation error)", "clean false alarms",
                                  f"defended at eps {p['eps']} (worst case with and without penalty {rj['penalty']:g})",
                                  "adversarial examples flagged"],
                                 [[f"{rj['threshold']:.5f}", f"{rj['false_alarm_rate']:.4f}", f"{rj['defended']:.3f}",
                                   f"{rj['rejected_among_adversarial']:.3f}"]])]
    return "\n".join(parts)


def training_record(row: Row) -> dict | None:
    if row.cvae is None:
        return None
    meta = checkpoint.read_record(ROOT / row.cvae).get("meta", {})
    adv = meta.get("adversarial")
    if not adv:
        return None
    return {"mode": adv["mode"], "epochs": meta["train"]["epochs"], "attacks": adv["attacks"], "steps": adv["steps"],
            "eps": adv["eps"], "train_seconds": meta["train_seconds"], "val_purified_acc": meta["val_purified_acc"],
            "command": meta.get("command"),
            "history": [{k: h[k] for k in ("epoch", "val_purified_acc", "val_adaptive")} for h in meta["history"]]}


@click.command()
@click.option("--profile", "profile_name", type=click.Choice(sorted(PROFILES)), default="quick", show_default=True)
@click.option("--plain", default="models/fashion-mnist-plain", show_default=True, help="Plain PuVAE model directory.")
@click.option("--baselines", default="models/baselines", show_default=True)
@click.option("--adversarial", "adv_dir", default="models/adversarial", show_default=True,
              help="Directory of the training runs (one subdirectory per mode).")
@click.option("--default", "default", default="models/adversarial/alternating-pgd7", show_default=True,
              help="The row (matched by sha256) that gets the reject-option measurement: alternating, PGD-7 + "
                   "targeted, the best row at the full profile (results/adversarial-full.md).")
@click.option("--row", "rows", multiple=True,
              help="A row to measure, by name; repeat for more (default: every row). The table also holds the "
                   "other rows already measured with unchanged weights, from their caches.")
@click.option("--out", help="Results file (default results/adversarial.json; other profiles adversarial-PROFILE).")
@click.option("--work", help="Cache of finished rows (default: results/.OUT-work).")
@click.option("--threads", type=int, help="torch threads (default: torch's).")
@click.option("--reject/--no-reject", default=True, show_default=True,
              help="Measure the reject option (a worst case of its own; --no-reject for runs that only fill the "
                   "row cache).")
def main(profile_name, plain, baselines, adv_dir, default, rows, out, work, threads, reject):
    if threads:
        torch.set_num_threads(threads)
    profile = PROFILES[profile_name]
    out, work = output_paths("adversarial", profile_name, out, work)
    table = default_rows(plain, baselines, adv_dir)
    chosen = choose_rows(table, rows, "train them first (Makefile: adversarial, baselines, converged-baselines)")
    start = time.perf_counter()
    bench = Bench(profile, work, lambda m: click.echo(m, err=True))
    report = report_head("adversarial.py", profile_name)
    report["notes"] = {
        "classifier rows": "no purifier: oblivious and adaptive are both white-box PGD on the model",
        "AutoAttack": "ART's AutoAttack with APGD-CE and APGD-DLR (1 start each) through BPDA; Square runs alone "
                      "(scores only, through the purifier) and enters the worst of all; the standard list adds "
                      "DeepFool and 5 starts",
        "layout": "attacks run the models in channels_last (same arithmetic up to float rounding, ~1.5x faster "
                  "here); images/s is timed in the default layout",
        "training attacks": "selection + full gradient, 3-step PGD; evaluation adds BPDA, softmin, Square and "
                            "APGD-CE/DLR and uses 100 steps with best-iterate accounting"}
    results = measure_rows(bench, chosen, table, out)
    all_rows = [r for r in table if r.name in results]
    report["rows"] = results
    report["training"] = {r.name: t for r in all_rows if (t := training_record(r))}
    purifier_rows = [r for r in all_rows if r.cvae]
    if purifier_rows and reject:
        # the reject option is measured on --default's row when it is one, else on the best worst case
        shipped = {"classifier": checkpoint.read_record(ROOT / default / "classifier")["weights_sha256"],
                   "cvae": checkpoint.read_record(ROOT / default / "cvae")["weights_sha256"]}
        chosen = [r for r in purifier_rows if results[r.name]["checkpoints"] == shipped] or \
            [max(purifier_rows, key=lambda r: (results[r.name]["worst_of_all"], results[r.name]["adaptive"]))]
        key = f"reject-{slug(chosen[0].name)}"
        report["reject"] = bench.reject_section(key, chosen[0])
    report["speed"] = speed_together(bench, all_rows)
    # a resumed row's "seconds" is its last run's; the attacks' own timings add up across sessions
    report["section_seconds"] = {k: v["seconds"] for k, v in results.items()}
    report["attack_seconds"] = {k: attack_seconds(v) for k, v in results.items()}
    publish(report, out, "Adversarial training through the pipeline", render(report), start)


if __name__ == "__main__":
    main()
