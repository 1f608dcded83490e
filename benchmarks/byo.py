"""The middleware setting, measured: a purifier in front of a frozen, standard classifier that a user brings,
beside the classifier alone and beside adversarial training of that same architecture (what a user would pick
instead of a purifier).

    python -m benchmarks.byo --profile full       # results/byo.{json,md,png}: the protocol's headline settings
    python -m benchmarks.byo --profile standard   # results/byo-standard.*
    python -m benchmarks.byo --profile quick      # minutes; never quoted

Two classifiers, each frozen in every purifier row (the purifier trains around it, never into it):
  A       the project's architecture A, trained plainly (models/fashion-mnist-plain/classifier);
  ResNet  a small ResNet the project did not make (benchmarks/byo_models.py), brought in as the user would:
          through ``--classifier-factory benchmarks/byo_models.py:small_resnet`` + its safetensors, and through
          its ``model.onnx`` (converted by onnx2torch for training and attacks).
Per classifier: no defense; plain PuVAE trained with it as the CE source; PuVAE after the adversarial-training
mode that trains the CVAE alone against attacks through it (``purifier train --adversarial cvae``); and PGD
adversarial training of the same architecture (its training length in the note).

Every row is measured by ``benchmarks/protocol.py`` (oblivious; adaptive worst case over the selection attack,
full gradient, BPDA and softmin, then the targeted attacks toward the profile's runner-up classes: targeted
selection margins and targeted logit margins through the softmin; Square and APGD-CE/DLR through BPDA; the
protocol's sanity checks): the table gives the adaptive figure without and with the targeted attacks. Rows
are cached under ``--work`` by their weights' sha256 and resume where they stopped.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import click
import torch

ROOT = Path(__file__).resolve().parents[1]

from purifier import checkpoint  # noqa: E402

from benchmarks.protocol import (PROFILES, Bench, Row, adaptive_cells, attack_seconds, choose_rows, converged_baselines,  # noqa: E402
                      measure_rows, publish, report_head, speed_threads, speed_together, suite_text)
from benchmarks.results import markdown_table  # noqa: E402

def default_rows(plain: str, baselines: str, byo: str, middleware: str) -> list[Row]:
    """The table's rows; the one on the shipped default's weights (``serve.models``) says so in its note."""
    from serve.models import MODELS

    default = MODELS["fashion-mnist"].path.resolve()
    return [replace(r, note=f"{r.note}; the default") if r.cvae and r.purifier is None
            and (ROOT / r.cvae).parent.resolve() == default else r for r in _rows(plain, baselines, byo, middleware)]


def _rows(plain: str, baselines: str, byo: str, middleware: str) -> list[Row]:
    return [
        Row("A: no defense", f"{plain}/classifier", note="standard training, 12 epochs"),
        Row("A: plain PuVAE", f"{plain}/classifier", f"{plain}/cvae", "CVAE trained with A as CE source"),
        Row("A: PuVAE + adv. training of the CVAE alone", f"{middleware}/classifier", f"{middleware}/cvae",
            "from plain PuVAE; A frozen"),
        Row("A: the same, 2 more epochs against PGD-7 selection, full gradient and BPDA", f"{middleware}-pgd7/classifier",
            f"{middleware}-pgd7/cvae", "from the row above; A frozen"),
        Row("A: the same, with the targeted selection attack added to training", f"{middleware}-targeted/classifier",
            f"{middleware}-targeted/cvae", "from the CVAE-alone row; A frozen; PGD-7"),
        Row("A: the same, with TRADES's smoothness term on the selection softmax", f"{middleware}-smooth/classifier",
            f"{middleware}-smooth/cvae", "as the row above, + 600 * KL(clean || attacked selection softmax)"),
        Row("A: the same, with the smoothness term at weight 200", f"{middleware}-smooth200/classifier",
            f"{middleware}-smooth200/cvae", "+ 200 * KL(clean || attacked selection softmax)"),
        Row("A: the weight-200 row, 1 epoch more with the training attacks at eps 0.125",
            f"{middleware}-smooth200-eps125/classifier", f"{middleware}-smooth200-eps125/cvae",
            "from the row above; its recipe, training attacks at eps 0.125, validation check at 0.1; A frozen"),
        Row("A: the weight-200 row, 1 epoch more at selection temperature 0.003",
            f"{middleware}-smooth200-tau3/classifier", f"{middleware}-smooth200-tau3/cvae",
            "from the weight-200 row; its recipe, selection CE and smoothness KL over -MSE / 0.003 (was 0.001); "
            "A frozen"),
        Row("A: the weight-200 row, 1 epoch more at selection temperature 0.01",
            f"{middleware}-smooth200-tau10/classifier", f"{middleware}-smooth200-tau10/cvae",
            "from the weight-200 row; its recipe, selection CE and smoothness KL over -MSE / 0.01 (was 0.001); "
            "A frozen"),
        Row("A: the weight-200 row, 1 epoch more with the decision terms at 3 times their weights",
            f"{middleware}-smooth200-decision3/classifier", f"{middleware}-smooth200-decision3/cvae",
            "from the weight-200 row; its recipe with selection CE 300 on clean and on attacked inputs and "
            "smoothness 600 (were 100, 100, 200) against reconstruction and KL; A frozen"),
        Row("A: the weight-200 row, half an epoch more against the worst of the training attacks",
            f"{middleware}-smooth200-worst/classifier", f"{middleware}-smooth200-worst/cvae",
            "from the weight-200 row; its recipe with every image under all four training attacks, its worst result "
            "kept (--adv-combine worst); A frozen"),
        Row("A: the temperature-0.003 row with a robust prior, weight 0.001",
            f"{middleware}-smooth200-tau3-with-prior/classifier", f"{middleware}-smooth200-tau3-with-prior/cvae",
            "its CVAE and A unchanged; the converged PGD-AT of A attached as a robust prior, rule "
            "MSE_c - 0.001 * log p(c | x) (make middleware-tau-prior)"),
        Row("A: the temperature-0.003 row, 1 epoch more through the robust prior",
            f"{middleware}-smooth200-tau3-prior1/classifier", f"{middleware}-smooth200-tau3-prior1/cvae",
            "from the temperature-0.003 row; its recipe with the converged PGD-AT of A in the rule at mu 0.001, "
            "attacked and trained through (make middleware-prior); A frozen"),
        Row("A: the row through the robust prior, its weight raised to 0.002",
            f"{middleware}-smooth200-tau3-prior1-mu2/classifier", f"{middleware}-smooth200-tau3-prior1-mu2/cvae",
            "the CVAE of the row through the prior and A unchanged; rule MSE_c - 0.002 * log p(c | x) under the "
            "same prior (make middleware-prior-mu2)"),
        Row("A: the default, the prior's weight raised to 0.02",
            f"{middleware}-smooth200-tau3-prior1-mu2/classifier", f"{middleware}-smooth200-tau3-prior1-mu2/cvae",
            "the default's CVAE, A and prior; rule MSE_c - 0.02 * log p(c | x): a point of the rule's trade-off "
            "near the prior's own clean accuracy (results/rule-probe-frontier.md), not a candidate default",
            purifier={"selection": "mse", "prior_weight": 0.02}),
        *capacity_rows(middleware),
        *converged_baselines(baselines, "A: "),
        Row("ResNet (factory): no defense", f"{byo}/resnet/classifier", note="standard training (train.json)"),
        Row("ResNet (factory): plain PuVAE", f"{byo}/resnet-puvae/classifier", f"{byo}/resnet-puvae/cvae",
            "CVAE trained with the ResNet as CE source"),
        Row("ResNet (factory): PuVAE + adv. training of the CVAE alone", f"{byo}/resnet-cvae-alone/classifier",
            f"{byo}/resnet-cvae-alone/cvae", "from plain PuVAE; ResNet frozen"),
        Row("ResNet (ONNX): no defense", f"{byo}/resnet-onnx-puvae/classifier", note="its model.onnx via onnx2torch"),
        Row("ResNet (ONNX): plain PuVAE", f"{byo}/resnet-onnx-puvae/classifier", f"{byo}/resnet-onnx-puvae/cvae",
            "trained through --classifier-onnx"),
        Row("ResNet (ONNX): PuVAE + adv. training of the CVAE alone", f"{byo}/resnet-onnx-cvae-alone/classifier",
            f"{byo}/resnet-onnx-cvae-alone/cvae", "trained through --classifier-onnx"),
        Row("ResNet: PGD-AT", f"{byo}/resnet-pgd-at/classifier",
            note="eps 0.1, PGD-10, best validation robust epoch (train.json)"),
    ]


def capacity_rows(middleware: str) -> list[Row]:
    """A wider CVAE against the preset's width, each 1 epoch of the weight-200 recipe from plain PuVAE
    (``make middleware-capacity``), the wider one an epoch more (``make middleware-wide-more``) and one more at
    selection temperature 0.003 (``make middleware-wide-tau``)."""
    d = Path(middleware).parent
    recipe = "1 epoch: PGD-7 selection, targeted, full gradient, BPDA, + 200 * KL; A frozen"
    return [
        Row("A: plain PuVAE + 1 epoch of the weight-200 recipe", f"{d}/narrow-smooth200/classifier",
            f"{d}/narrow-smooth200/cvae", f"from plain PuVAE; {recipe}"),
        Row("A: a CVAE twice as wide, the same epoch", f"{d}/wide-smooth200/classifier", f"{d}/wide-smooth200/cvae",
            f"channels 32,64, latent 32, hidden 512 (3.3M parameters, preset 0.84M); plain PuVAE 2 epochs, "
            f"then {recipe}"),
        Row("A: the wider CVAE, 1 epoch more", f"{d}/wide-smooth200-more/classifier",
            f"{d}/wide-smooth200-more/cvae", "from the row above; the same recipe, a fresh cosine schedule"),
        Row("A: the wider CVAE, 1 epoch more at selection temperature 0.003", f"{d}/wide-smooth200-tau3/classifier",
            f"{d}/wide-smooth200-tau3/cvae", "from 'the wider CVAE, 1 epoch more'; the same recipe, selection CE and "
            "smoothness KL over -MSE / 0.003 (was 0.001)"),
    ]


def training(row: Row) -> dict | None:
    """The purifier's training: its stages, epochs and seconds (read from the CVAE's checkpoint)."""
    if row.cvae is None:
        meta = checkpoint.read_record(ROOT / row.classifier).get("meta", {})
        return {"seconds": meta.get("train_seconds"), "epochs": meta.get("train", {}).get("epochs"),
                "adversarial": meta.get("adversarial")} if meta.get("train_seconds") else None
    meta = checkpoint.read_record(ROOT / row.cvae)["meta"]
    out = {"seconds": meta.get("train_seconds"), "epochs": meta.get("train", {}).get("epochs"),
           "adversarial": meta.get("adversarial"), "command": meta.get("command")}
    if meta.get("adversarial"):
        out["history"] = [{k: h.get(k) for k in ("epoch", "val_purified_acc", "val_adaptive")}
                          for h in meta["history"]]
    return out


def table(rows: dict, training: dict, speed: dict, p: dict) -> str:
    """One profile's rows as a markdown table."""
    cells = []
    for r in rows.values():
        fails = [k for k, v in r["sanity"].items() if isinstance(v, dict) and not v["pass"]]
        t = training.get(r["name"]) or {}
        cells.append([r["name"], f"{r['clean']:.4f}", f"{r['oblivious']:.3f}", *adaptive_cells(r, p.get("targeted", 0)),
                      f"{r['art']['square']:.3f}", f"{r['art']['autoattack']:.3f}", f"{r['worst_of_all']:.3f}",
                      f"{speed[r['name']]['batch 256']['images_per_s']:.0f}",
                      f"{t['seconds']:.0f}" if t.get("seconds") else "-",
                      "all pass" if not fails else "FAIL: " + "; ".join(fails), r["note"]])
    return markdown_table(["row", "clean", "oblivious", f"adaptive (n {p['n']})", "adaptive + targeted", "Square",
                           "AutoAttack", f"worst of all (n {p['n_art']})", "images/s", "training s",
                           "sanity checks", "note"], cells)


def settings(p: dict, threads: int) -> str:
    return (f"Robust figures on the first {p['n']} images, L-infinity eps {p['eps']}; {suite_text(p)}. Square "
            f"({p['square_queries']} queries) and APGD-CE + APGD-DLR ({p['apgd_iters']} iterations, through BPDA) "
            f"from ART on the first {p['n_art']}; worst of all = every attack together on those. Clean accuracy on "
            f"the first {p['clean_n']}. images/s: torch eager, batch 256, {threads} threads.")


def render(report: dict) -> str:
    p = report["profile"]
    lines = [f"Fashion-MNIST test set. {settings(p, speed_threads(report))} Every purifier row's "
             "classifier is frozen. Training seconds: the row's last training stage.", "",
             table(report["rows"], report["training"], report["speed"], p)]
    other = report.get("other_profile")
    if other and other["rows"]:
        q = other["profile"]
        lines += ["", f"### The other rows at the {other['profile_name']} profile, from {other['file']} "
                      f"(`{other['command']}` at commit {other['commit'][:10]})",
                  f"Not measured at this file's profile. {settings(q, speed_threads(other))}", "",
                  table(other["rows"], other["training"], other["speed"], q)]
    everything = {**report["training"], **(other["training"] if other else {})}
    curves = [[k, f"{t['epochs']:g}", f"{t['seconds']:.0f}", " -> ".join(f"{h['val_adaptive']:.2f}"
                                                                        for h in t["history"])]
              for k, t in everything.items() if t and t.get("history")]
    if curves:
        lines += ["", "### Adversarial training of the CVAE alone (validation adaptive check: 200 held-out train "
                      "images, 10-step selection + full gradient; an upper bound)",
                  markdown_table(["row", "epochs", "seconds", "check every 0.25 epoch"], curves)]
    return "\n".join(lines)


def other_profile(table_rows: list[Row], measured: dict, path: Path) -> dict | None:
    """The rows of the table that ``measured`` lacks, from the results file of a smaller profile (``path``):
    the second classifier's rows may stand at the standard profile, labelled so, beside the full profile's."""
    if not path.is_file():
        return None
    other = json.loads(path.read_text())
    names = [r.name for r in table_rows if r.name not in measured and r.name in other["rows"]]
    return {"file": path.name, "profile_name": other["profile_name"],
            "profile": other["profile"], "command": other["command"], "commit": other["commit"],
            "machine": other["machine"], "rows": {n: other["rows"][n] for n in names},
            "training": {n: other["training"].get(n) for n in names},
            "speed": {n: other["speed"][n] for n in names}}


@click.command()
@click.option("--profile", "profile_name", type=click.Choice(sorted(PROFILES)), default="quick", show_default=True)
@click.option("--plain", default="models/fashion-mnist-plain", show_default=True,
              help="Model directory of the standard classifier A and its plain PuVAE.")
@click.option("--baselines", default="models/baselines", show_default=True)
@click.option("--byo", default="models/byo", show_default=True, help="Directory of the ResNet's runs.")
@click.option("--middleware", default="models/middleware/cvae-alone", show_default=True,
              help="The CVAE adversarially trained alone in front of A.")
@click.option("--row", "rows", multiple=True,
              help="A row to measure, by name; repeat for more (default: every row). The table also holds the "
                   "other rows already measured with unchanged weights, from their caches.")
@click.option("--out", help="Results file (default results/byo.json for the full profile, byo-PROFILE otherwise).")
@click.option("--work", help="Cache of finished rows (default: results/.OUT-work).")
@click.option("--threads", type=int, help="torch threads (default: torch's).")
def main(profile_name, plain, baselines, byo, middleware, rows, out, work, threads):
    if threads:
        torch.set_num_threads(threads)
    out = Path(out or ROOT / "results" / ("byo.json" if profile_name == "full" else f"byo-{profile_name}.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(work or out.parent / f".{out.stem}-work")
    work.mkdir(parents=True, exist_ok=True)
    table = default_rows(plain, baselines, byo, middleware)
    chosen = choose_rows(table, rows,
                         "train them first: make byo-models byo-pgd-at converged-baselines "
                         "(docs/bring-your-own-classifier.md)")
    start = time.perf_counter()
    bench = Bench(PROFILES[profile_name], work, lambda m: click.echo(m, err=True))
    report = report_head("byo.py", profile_name)
    report["rows"] = measure_rows(bench, chosen, table, out)
    all_rows = [r for r in table if r.name in report["rows"]]
    report["training"] = {r.name: training(r) for r in all_rows}
    report["attack_seconds"] = {k: attack_seconds(v) for k, v in report["rows"].items()}
    report["speed"] = speed_together(bench, all_rows)
    if profile_name == "full":
        report["other_profile"] = other_profile(table, report["rows"], out.with_name("byo-standard.json"))
    publish(report, out, "A purifier in front of a classifier you bring", render(report), start)


if __name__ == "__main__":
    main()
