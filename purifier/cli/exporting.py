"""``purifier export``: a trained run to purifier.onnx and pipeline.onnx, optionally int8 and a Triton repository."""
from __future__ import annotations

from pathlib import Path

import click

from .classifier import classifier_options
from .common import _classifier_path, main


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
@click.option("--rewrite-convtranspose", is_flag=True,
              help="Rewrite the decoder's wide stride-2 ConvTranspose layers as four Convs and a DepthToSpace each: "
                   "the same function (parity-checked), faster on onnxruntime's CPU provider; untimed on CUDA.")
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
def export_cmd(run_dir, out, classifier_source, selection, percentile, int8, rewrite_convtranspose, calibration_images,
               triton_repo, triton_name, triton_backend, triton_max_batch):
    """Export RUN_DIR's CVAE (+ target classifier) to purifier.onnx and pipeline.onnx, parity-checked.

    Example: purifier export models/middleware/cvae-alone-smooth200-tau3-prior1-mu2
    """
    from export.onnx_export import ExportError, export_run

    from ..classifier_io import ClassifierError

    if not (Path(run_dir) / "cvae.json").is_file():
        raise click.BadParameter(f"{Path(run_dir) / 'cvae.json'} does not exist: RUN_DIR must hold a trained "
                                 f"purifier (purifier train --out RUN_DIR)", param_hint="RUN_DIR")
    if classifier_source is None and (Path(run_dir) / "classifier.json").is_file():
        classifier_source = _classifier_path(Path(run_dir) / "classifier", "RUN_DIR")
    try:
        results = export_run(Path(run_dir) / "cvae", classifier_source, out or run_dir, selection, percentile,
                             rewrite_convtranspose=rewrite_convtranspose)
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
