"""``purifier evaluate``: clean accuracy of the classifier alone and behind the purifier."""
from __future__ import annotations

from pathlib import Path

import click

from .classifier import classifier_options, load_classifier
from .common import DATA_HELP, _classifier_path, _dataset, _load, main

def _table(report: dict) -> str:
    rows = [f"{'pipeline':<28}{'accuracy':>10}{'argmin=label':>14}{'pred=argmin':>13}{'seconds':>9}",
            f"{'classifier alone':<28}{report['classifier']['accuracy']:>10.4f}{'':>14}{'':>13}"
            f"{report['classifier']['seconds']:>9.1f}"]
    for sel, r in report["selections"].items():
        rows.append(f"{'purified, ' + sel + ' selection':<28}{r['accuracy']:>10.4f}{r['argmin_acc']:>14.4f}"
                    f"{r['pred_eq_argmin']:>13.4f}{r['seconds']:>9.1f}")
    return "\n".join(rows)


@main.command("evaluate")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False),
              help="Directory holding cvae.* and classifier.* checkpoints (required unless --cvae and a classifier "
                   "option are given).")
@click.option("--cvae", type=click.Path(), help="CVAE checkpoint (default MODEL/cvae).")
@classifier_options("--classifier", "Target classifier checkpoint (default MODEL/classifier).")
@click.option("--data", default="fashion-mnist", show_default=True, help=DATA_HELP)
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
@click.option("--n", type=int, help="Evaluate on the first N images only.")
@click.option("--selection", "selections", multiple=True,
              type=click.Choice(["mse", "likelihood", "iwae", "design"]),
              help="Decision rules to compare; design: the purifier the model's checkpoint records. [default: mse "
                   "and likelihood, with design first when the model's rule holds a robust prior]")
@click.option("--candidates", type=int, help="Reconstruct only the K classes the classifier ranks highest on the raw "
                                             "input (1 <= K <= the model's classes; default: every class).")
@click.option("--out", type=click.Path(), help="Write the full report (per class too) as JSON.")
def evaluate_cmd(model_dir, cvae, classifier_source, data, split, n, selections, candidates, out):
    """Clean accuracy of the target classifier alone and behind the purifier, per selection rule."""
    import torch

    from .. import checkpoint
    from ..checkpoint import write_json
    from ..designs import load_prior, prior_path
    from ..evaluate import evaluate
    from ..pipeline import check_candidates

    if not (model_dir or (cvae and classifier_source)):
        raise click.UsageError("give --model DIR, or both --cvae and --classifier")
    cvae_path = cvae or str(Path(model_dir) / "cvae")
    cvae_m = _load(cvae_path, "cvae", "--cvae/--model")
    try:
        check_candidates(candidates, cvae_m.cfg.num_classes)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--candidates") from None
    if classifier_source is None:
        classifier_source = _classifier_path(Path(model_dir) / "classifier", "--classifier/--model")
    ds = _dataset(data, split)
    clf = load_classifier(classifier_source, ds.x[:64], "--classifier/--model")
    if ds.image_shape != tuple(cvae_m.cfg.image_shape) or ds.num_classes != cvae_m.cfg.num_classes:
        raise click.UsageError(f"the model expects {cvae_m.cfg.image_shape} x {cvae_m.cfg.num_classes} classes, "
                               f"{data} holds {ds.image_shape} x {ds.num_classes} classes")
    x, y = torch.from_numpy(ds.x[:n]), torch.from_numpy(ds.y[:n])
    spec = cvae_m.meta.get("purifier") or {"selection": "mse"}
    if not selections:
        selections = ("design", "mse", "likelihood") if spec.get("prior_weight") else ("mse", "likelihood")
    try:
        prior = load_prior(cvae_path, spec) if "design" in selections else None
    except FileNotFoundError as exc:
        raise click.UsageError(f"--selection design: {exc}") from None
    try:
        report = evaluate(clf, cvae_m, x, y, selections, ds.class_names, candidates=candidates, prior=prior)
    except ValueError as exc:  # a rule the candidate mode does not take (iwae, analysis by synthesis)
        if candidates is None:
            raise
        raise click.UsageError(f"--candidates {candidates}: {exc}") from None
    report.update({"dataset": ds.name, "split": split, "cvae_path": cvae_path,
                   "classifier_path": classifier_source.path or classifier_source.factory,
                   "classifier_source": classifier_source.to_dict(),
                   "cvae_sha256": checkpoint.read_record(cvae_path)["weights_sha256"], "purifier": spec,
                   **({"prior_sha256": checkpoint.read_record(prior_path(cvae_path))["weights_sha256"]}
                      if prior is not None else {}),
                   "classifier_sha256": classifier_source.sha256(),
                   "torch": torch.__version__, "threads": torch.get_num_threads()})
    ranked = f"; purifier reconstructs the {candidates} classes the classifier ranks highest" if candidates else ""
    click.echo(f"{ds.name} {split}, {len(y)} images{ranked}")
    click.echo(_table(report))
    if out:
        write_json(out, report)
        click.echo(f"report -> {out}")
