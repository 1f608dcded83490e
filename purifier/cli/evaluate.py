"""``purifier evaluate`` and ``purifier export``."""
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
              type=click.Choice(["mse", "likelihood", "iwae", "design"]), default=("mse", "likelihood"),
              show_default=True, help="Decision rules to compare; design: the purifier the model's checkpoint records.")
@click.option("--candidates", type=int, help="Reconstruct only the K classes the classifier ranks highest on the raw "
                                             "input (1 <= K <= the model's classes; default: every class).")
@click.option("--out", type=click.Path(), help="Write the full report (per class too) as JSON.")
def evaluate_cmd(model_dir, cvae, classifier_source, data, split, n, selections, candidates, out):
    """Clean accuracy of the target classifier alone and behind the purifier, per selection rule."""
    import torch

    from .. import checkpoint
    from ..checkpoint import write_json
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
    try:
        report = evaluate(clf, cvae_m, x, y, selections, ds.class_names, candidates=candidates)
    except ValueError as exc:  # a rule the candidate mode does not take (iwae, analysis by synthesis)
        if candidates is None:
            raise
        raise click.UsageError(f"--candidates {candidates}: {exc}") from None
    report.update({"dataset": ds.name, "split": split, "cvae_path": cvae_path,
                   "classifier_path": classifier_source.path or classifier_source.factory,
                   "classifier_source": classifier_source.to_dict(),
                   "cvae_sha256": checkpoint.read_record(cvae_path)["weights_sha256"],
                   "classifier_sha256": classifier_source.sha256(),
                   "torch": torch.__version__, "threads": torch.get_num_threads()})
    ranked = f"; purifier reconstructs the {candidates} classes the classifier ranks highest" if candidates else ""
    click.echo(f"{ds.name} {split}, {len(y)} images{ranked}")
    click.echo(_table(report))
    if out:
        write_json(out, report)
        click.echo(f"report -> {out}")


@main.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="Output directory (default: RUN_DIR).")
@classifier_options("--classifier", "Target classifier checkpoint (default RUN_DIR/classifier; without one, only "
                                    "purifier.onnx is written).")
@click.option("--selection", type=click.Choice(["mse", "likelihood", "iwae"]),
              help="Decision rule (default: the one the model's design records; PuVAE: mse).")
@click.option("--percentile", default=99.0, show_default=True,
              help="Rejection threshold: this percentile of the best reconstruction error on clean validation data.")
@click.option("--int8", "int8", is_flag=True,
              help="Also write pipeline.int8.onnx (and purifier.int8.onnx): onnxruntime static quantisation, "
                   "QDQ, per-channel int8 weights, activations calibrated on training images (--precision int8 "
                   "loads it).")
@click.option("--calibration-images", default=256, show_default=True, type=click.IntRange(min=1),
              help="With --int8: training images (seeded sample) the activation ranges are calibrated on.")
@click.option("--triton", "triton_repo", type=click.Path(file_okay=False),
              help="Also write a Triton model repository for pipeline.onnx here (see --triton-backend).")
@click.option("--triton-name", default="purifier", show_default=True, help="Model name in the Triton repository.")
@click.option("--triton-backend", type=click.Choice(["both", "onnx", "python"]), default="both", show_default=True,
              help="onnx: REPO/NAME (ONNX Runtime backend, the graph's outputs); python: REPO/NAME-python (Python "
                   "backend running serve's OnnxPurifier: margin, rejected, predicted_class too); both.")
@click.option("--triton-max-batch", default=256, show_default=True, type=click.IntRange(min=1),
              help="max_batch_size in config.pbtxt (dynamic batching on).")
def export_cmd(run_dir, out, classifier_source, selection, percentile, int8, calibration_images, triton_repo,
               triton_name, triton_backend, triton_max_batch):
    """Export RUN_DIR's CVAE (+ target classifier) to purifier.onnx and pipeline.onnx, parity-checked.

    Example: purifier export models/fashion-mnist --out models/fashion-mnist
    """
    from export.onnx_export import ExportError, export_run

    from ..classifier_io import ClassifierError

    if not (Path(run_dir) / "cvae.json").is_file():
        raise click.BadParameter(f"{Path(run_dir) / 'cvae.json'} does not exist: RUN_DIR must hold a trained "
                                 f"purifier (purifier train --out RUN_DIR)", param_hint="RUN_DIR")
    if classifier_source is None and (Path(run_dir) / "classifier.json").is_file():
        classifier_source = _classifier_path(Path(run_dir) / "classifier", "RUN_DIR")
    try:
        results = export_run(Path(run_dir) / "cvae", classifier_source, out or run_dir, selection, percentile)
    except (ExportError, ClassifierError) as exc:
        raise click.UsageError(f"cannot export: {exc}") from exc
    if classifier_source is None:
        click.echo(f"no classifier in {run_dir} and none given (--classifier, --classifier-factory or "
                   f"--classifier-onnx): wrote purifier.onnx only", err=True)
    for name, r in results.items():
        worst = max(max(d.values()) for d in r.parity.values())
        click.echo(f"{name}: {r.path} (parity at batch {sorted(r.parity)}: max abs diff {worst:.2e}; "
                   f"rejection threshold {float(r.metadata['rejection_threshold']):.5f})")
    if int8:
        from export.quantize import quantize_model

        for name, r in results.items():
            try:
                path = quantize_model(r.path, n=calibration_images)
            except ValueError as exc:
                raise click.UsageError(f"cannot quantise {r.path}: {exc}") from exc
            click.echo(f"{name} int8: {path} (static QDQ, calibrated on {calibration_images} training images)")
    else:
        for r in results.values():
            stale = r.path.with_name(f"{r.path.stem}.int8{r.path.suffix}")
            if stale.is_file():
                click.echo(f"{stale} was quantised from the previous {r.path.name}: rerun with --int8 to refresh it",
                           err=True)
    if triton_repo:
        from export.triton import write_triton_repos

        source = results["pipeline"].path if "pipeline" in results else next(iter(results.values())).path
        try:
            model_dirs = write_triton_repos(source, triton_repo, triton_name, triton_backend, triton_max_batch)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
        for model_dir in model_dirs:
            files = "1/model.py + 1/model.onnx" if (model_dir / "1" / "model.py").is_file() else "1/model.onnx"
            click.echo(f"triton: {model_dir}/config.pbtxt + {files} (from {source})")
