"""Render a model directory's MODEL_CARD.md from its checkpoint JSONs and an evaluation report.

Every number in the card is read from those files; nothing is typed by hand.

    python -m benchmarks.model_card [--made-by 'make TARGET'] MODEL_DIR EVAL_REPORT [results/adversarial.json ...]

For a model made by adversarial training through the pipeline (``purifier train --adversarial``) the card names
the run it started from and its training record. Given benchmark results files (``results/adversarial.json``,
``results/variants.json``, one per profile), it quotes every row measured on these exact weights (matched by
sha256) from each.
"""
import hashlib
import json
import shlex
from pathlib import Path

import click

from benchmarks.protocol import older_suite, suite_text


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def classifier_words(clf: dict) -> str:
    """The target classifier as its record names it: a project architecture, a factory or an ONNX graph."""
    if "config" in clf:
        return f"PuVAE paper architecture {clf['config']['arch'].upper()}"
    src = clf.get("source", {})
    if src.get("kind") == "factory":
        return f"a user's network, built by `{src['factory']}` from `{src['weights']}`"
    return f"a user's ONNX graph, `{src.get('path')}`"


def pct(v):
    return f"{100 * v:.2f}%"


def trained_lines(cm: dict, km: dict, total: float, source_note: str) -> list[str]:
    """The plain training run; a classifier brought trained (a factory or ONNX record without a training record)
    gets the CVAE's rows only."""
    cvae_row = (f"| CVAE | {json.dumps(cm['train'])}, loss {json.dumps(cm['loss'])} | {cm['train_seconds']:.0f} | "
                f"argmin = label {pct(cm['val_argmin_acc'])} |")
    if "command" not in km:
        return ["", "## How it was trained",
                f"CE source classifier of the CVAE: {source_note}. The classifier came trained; this repository's "
                "commands never changed it (the digest of its parameters and buffers is the same before and after "
                "training, recorded in `cvae.json`).", "", "```", cm["command"], "```", "",
                f"| step | settings | seconds | held-out validation ({cm.get('n_val', '?')} train images) |",
                "| --- | --- | --- | --- |", cvae_row, "",
                f"The CVAE took {cm['train_seconds'] / 60:.1f} minutes on {cm.get('threads')} threads of "
                f"{cm.get('cpu')} (torch {cm.get('torch')}).", ""]
    return [
        "",
        "## How it was trained",
        f"CE source classifier of the CVAE: {source_note}.",
        "",
        "```",
        km["command"],
        cm["command"],
        "```",
        "",
        f"| step | settings | seconds | held-out validation ({km['n_val']} train images) |",
        "| --- | --- | --- | --- |",
        f"| classifier | {json.dumps(km['train'])} | {km['train_seconds']:.0f} | accuracy {pct(km['val_acc'])} |",
        cvae_row,
        "",
        f"Training took {total / 60:.1f} minutes in all (classifier {km.get('train_seconds', 0) / 60:.1f} on "
        f"{km.get('threads')} threads of {km.get('cpu')}, CVAE {cm['train_seconds'] / 60:.1f} on {cm.get('threads')} "
        f"of {cm.get('cpu')}) (torch {km.get('torch')}).",
        "",
    ]


def where_now(sha: str, recorded: str) -> list[str]:
    """The starting CVAE's current home, found by its sha256 among the repository's model directories."""
    root = Path(__file__).resolve().parents[1] / "models"
    homes = [str(p.parent.relative_to(root.parent)) for p in sorted(root.glob("*/cvae.json"))
             if json.loads(p.read_text())["weights_sha256"] == sha]
    homes = [h for h in homes if h != recorded]
    return [f"That starting CVAE (same sha256) now lives in `{homes[0]}`.", ""] if homes else []


def trained_prior_words(cm: dict) -> str:
    """The robust prior the CVAE was trained through: the model's own, or the one an attached prior replaced."""
    prior = cm["prior"]
    while prior is not None and prior.get("attached"):
        prior = prior.get("replaces")
    rule = (f"at mu {cm['adversarial']['prior_weight']}: score_c = MSE_c - mu * log p(c | x); the training attacks, "
            f"the selection CE, the smoothness KL and the adaptive check score with it.")
    if prior is None:  # attached by an earlier release, which kept no record of the prior it replaced
        return f" The purifier's rule held a robust prior (its record replaced when the prior above was attached) {rule}"
    return f" The purifier's rule holds the robust prior `{prior['from']}` (`{prior['sha256'][:16]}…`, frozen) {rule}"


def adversarial_lines(cm: dict) -> list[str]:
    adv = cm["adversarial"]
    return [
        "",
        "## How it was trained: adversarial training through the pipeline",
        f"Mode `{adv['mode']}`, {cm['train']['epochs']} epochs, from the CVAE of `{cm['init']}` "
        f"(`{str(cm['init_sha256'])[:16]}…`) and the target classifier `{cm['target']}` "
        f"(`{cm['target_sha256'][:16]}…`); CE source `{cm['source']}` (frozen). Every batch is attacked with "
        f"{' and '.join(adv['attacks'])} PGD-{adv['steps']} at L-infinity eps {adv['eps']} "
        + ("(every image under each, its worst result kept)" if adv.get("combine") == "worst"
           else "(one slice of the batch each)")
        + f"; selection CE weight {adv['sel_weight']}, target CE on the true class's reconstruction "
          f"{adv['pipe_weight']}, classifier clean/adversarial mix {adv['clf_mix']}"
        + (f", smoothness of the decision rule (KL from the clean selection softmax to the attacked one) "
           f"{adv['smooth_weight']}." if adv.get("smooth_weight") else ".")
        + (f" The adaptive check below attacks at eps {adv['val_eps']}." if adv.get("val_eps") is not None else "")
        + (trained_prior_words(cm) if adv.get("prior_weight") else ""),
        "",
        *where_now(cm["init_sha256"], cm["init"]),
        "```",
        cm["command"],
        "```",
        "",
        "| epoch | validation purified accuracy | adaptive check (200 validation images, 10-step selection + "
        "full gradient; an upper bound) |",
        "| --- | --- | --- |",
        *[f"| {h['epoch']:.2f} | {pct(h['val_purified_acc'])} | {pct(h['val_adaptive'])} |" for h in cm["history"]],
        "",
        f"{cm['train_seconds'] / 60:.1f} minutes on {cm.get('threads')} thread(s) of {cm.get('cpu')} "
        f"(torch {cm.get('torch')}).",
        "",
    ]


def robustness_lines(cvae_sha: str, clf_sha: str, bench_paths: tuple[str, ...], prior_sha: str | None = None,
                     prior_weight: float | None = None) -> list[str]:
    """Every row of each benchmark results file measured on these exact weights (matched by sha256, the robust
    prior's and its weight too: None for a model without one): one table per file, one line per row (several rows share weights
    when only the decision rule differs)."""
    lines = []
    for bench_path in bench_paths:
        bench = json.loads(Path(bench_path).read_text())
        rows = [r for r in bench["rows"].values()
                if r["checkpoints"].get("cvae") == cvae_sha and r["checkpoints"]["classifier"] == clf_sha
                and r["checkpoints"].get("prior") == prior_sha
                and (r["checkpoints"].get("purifier") or {}).get("prior_weight") == prior_weight]
        if not rows:
            continue
        p = bench["profile"]
        latent = any("latent" in r for r in rows)
        targeted = p.get("targeted", 0)
        # the file's command published the table; a row in it may have been measured by an earlier run of it
        lines += [f"## Robustness, profile {bench['profile_name']} (`{bench_path}`, last published by "
                  f"`{bench['command']}`)",
                  f"L-infinity eps {p['eps']}, first {p['n']} test images; {suite_text(p)}; Square and AutoAttack "
                  f"(APGD-CE/DLR through BPDA) on the first {p['n_art']}."
                  + (" Latent attack (Kos et al.): AS = its success rate, lower is better." if latent else ""), "",
                  "| row | clean | oblivious | adaptive worst case | Square | AutoAttack | worst of all |"
                  + (" latent AS_ignore-target / AS_target |" if latent else "")
                  + (" targeted attacks in it |" if targeted else ""),
                  "| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if latent else "")
                  + (" --- |" if targeted else "")]
        for r in rows:
            la = r.get("latent")
            lines.append(f"| {r['name']} | {pct(r['clean'])} | {pct(r['oblivious'])} | {pct(r['adaptive'])} | "
                         f"{pct(r['art']['square'])} | {pct(r['art']['autoattack'])} | {pct(r['worst_of_all'])} |"
                         + (f" {pct(la['AS_ignore_target'])} / {pct(la['AS_target'])} |" if la else
                            " - |" if latent else "")
                         + (" not run (measured before them) |" if older_suite(r, targeted) else " yes |"
                            if targeted else ""))
        lines.append("")
    return lines


def model_words(kind: str, c: dict) -> str:
    if kind == "hcvae":
        return (f"hierarchical class-conditional VAE, blocks {tuple(c['latent_dims'])} (top first), channels "
                f"{tuple(c['channels'])}, a label embedding per block, {'the decoder reads every block, ' if c['skip'] else ''}"
                f"purifies from the first {c['k']} posterior(s) and the conditional priors (temperature {c['temperature']})")
    return (f"class-conditional VAE, latent {c['latent_dim']}, channels {tuple(c['channels'])}, {c['conditioning']} "
            "conditioning")


def main(model_dir: str, report_path: str, *bench_paths: str, made_by: str | None = None) -> None:
    """Print the card; ``made_by`` names the make target that made the model (guessed from its record if not
    given: a copied model, like the shipped default, cannot tell)."""
    command = shlex.join([*(["--made-by", made_by] if made_by else []), model_dir, report_path, *bench_paths])
    model_dir = Path(model_dir)
    cvae = json.loads((model_dir / "cvae.json").read_text())
    # a design's directory holds its CVAE only: the target is the classifier it was trained against
    clf_json = model_dir / "classifier.json"
    if not clf_json.is_file():
        clf_json = Path(__file__).resolve().parents[1] / f"{cvae['meta']['source']}.json"
    clf = json.loads(clf_json.read_text())
    report = json.loads(Path(report_path).read_text())
    cm, km = cvae["meta"], clf["meta"]
    c = cvae["config"]
    total = cm["train_seconds"] + km.get("train_seconds", 0)
    design = cm.get("design", "puvae")
    made_by = made_by or (("make adversarial" if "adversarial" in cm else "make plain-model") if design == "puvae"
                          else "make variants-adversarial" if "adversarial" in cm else "make variants")
    source_note = ("the same network as the target classifier"
                   if cm.get("source_sha256") == clf["weights_sha256"] else f"`{cm.get('source')}`")
    lines = [
        f"# Model card: PuVAE purifier for {cm['dataset']}",
        "",
        f"Made by the repository's own commands (`{made_by}`); this card is",
        f"generated by `python -m benchmarks.model_card {command}` "
        "from the files beside it.",
        "",
        "## Files",
        "| file | what | sha256 |",
        "| --- | --- | --- |",
        f"| `{'classifier' if clf_json.parent == model_dir else cvae['meta']['source']}"
        f"{'.onnx' if clf.get('source', {}).get('kind') == 'onnx' else '.safetensors'}` + `.json` | "
        f"target classifier, {classifier_words(clf)} | `{clf['weights_sha256'][:16]}…` |",
        f"| `cvae.safetensors` + `.json` | {model_words(cvae['kind'], c)} | `{cvae['weights_sha256'][:16]}…` |",
    ]
    prior = cm.get("prior")
    if prior:
        record = json.loads((model_dir / "prior.json").read_text())
        lines.append(f"| `prior.safetensors` + `.json` | robust prior in the rule at mu {prior['weight']} (from "
                     f"`{prior['from']}`), {classifier_words(record)} | `{record['weights_sha256'][:16]}…` |")
    if cm.get("design", "puvae") != "puvae":
        lines[0] = f"# Model card: purifier design `{cm['design']}` for {cm['dataset']}"
        lines += ["", f"Design `{cm['design']}` (`purifier train --arch {cm['design']}`; docs/designs.md): "
                      f"loss {json.dumps(cm['loss'])}; purifier {json.dumps(cm.get('purifier'))}."]
    for name in ("purifier.onnx", "pipeline.onnx"):
        if (model_dir / name).is_file():
            import onnx

            props = {p.key: p.value for p in onnx.load(str(model_dir / name), load_external_data=False).metadata_props}
            deprecated = json.loads(props.get("deprecated_outputs", "{}"))  # recon_error, an alias of scores
            outputs = ", ".join(n for n in json.loads(props["outputs"]) if n not in deprecated)
            lines.append(f"| `{name}` | ONNX ({outputs}); selection "
                         f"{props['selection']}, rejection threshold {float(props['rejection_threshold']):.5f} "
                         f"({json.loads(props['rejection_calibration'])['percentile']}th percentile of clean "
                         f"validation error) | `{sha256(model_dir / name)[:16]}…` |")
    if prior and prior.get("attached"):
        lines += ["", f"The prior was attached to the trained model without retraining it (`{prior['attached']['command']}`); "
                      "the rejection threshold is recalibrated under the rule with it. The training below is the "
                      "CVAE's, under the rule it had then" + (f" (a robust prior at mu {cm['adversarial']['prior_weight']})."
                      if (cm.get("adversarial") or {}).get("prior_weight") else ", without a prior.")]
    if "adversarial" in cm:
        lines += adversarial_lines(cm)
    else:
        lines += trained_lines(cm, km, total, source_note)
    robust = robustness_lines(cvae["weights_sha256"], clf["weights_sha256"], bench_paths,
                              prior["sha256"] if prior else None, prior["weight"] if prior else None)
    lines += robust
    lines += [
        f"## Clean accuracy ({report['dataset']} {report['split']} split, {report['n']} images)",
        "```",
        f"purifier evaluate --model {model_dir} "
        + ("".join(f"--selection {sel} " for sel in report["selections"])
           if list(report["selections"]) != ["mse", "likelihood"] else "") + f"--out {report_path}",
        "```",
        "| pipeline | accuracy | argmin = label | prediction = argmin |",
        "| --- | --- | --- | --- |",
        f"| target classifier alone | {pct(report['classifier']['accuracy'])} | | |",
    ]
    for sel, r in report["selections"].items():
        lines.append(f"| purified, {sel} selection | {pct(r['accuracy'])} | {pct(r['argmin_acc'])} | "
                     f"{pct(r['pred_eq_argmin'])} |")
    # a rule with a robust prior is the model's own: its per-class figures, not the plain MSE rule's
    shown = "design" if prior and "design" in report["selections"] else "mse"
    lines += ["", f"Per class (purified, {'the rule with the prior' if shown == 'design' else 'MSE selection'}):", "",
              "| class | classifier alone | purified | argmin = label |", "| --- | --- | --- | --- |"]
    for name, r in report["selections"][shown]["per_class"].items():
        lines.append(f"| {name} | {pct(r['classifier_accuracy'])} | {pct(r['accuracy'])} | {pct(r['argmin_acc'])} |")
    lines += ["", "## Limits"]
    if robust:
        lines += ["Each robustness figure above is one benchmark run's, on the images and settings it names, and an",
                  "upper bound: a stronger attack may break more. Only the adaptive columns say whether this is a",
                  "defense; a purifier that holds only against attacks that ignore it is not robust.", ""]
    else:
        lines += ["Clean accuracy only. Robustness under attack, adaptive attacks above all, is measured by the",
                  "benchmarks; a purifier that only holds against attacks that ignore it is not robust.", ""]
    print("\n".join(lines))


@click.command()
@click.option("--made-by", help="The make target that made the model (default: guessed from its record).")
@click.argument("model_dir")
@click.argument("report_path")
@click.argument("bench_paths", nargs=-1)
def cli(made_by, model_dir, report_path, bench_paths):
    main(model_dir, report_path, *bench_paths, made_by=made_by)


if __name__ == "__main__":
    cli()
