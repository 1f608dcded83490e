"""The ``purifier`` command line: thin wrappers over the library.

Torch is imported inside the commands that need it, so ``purifier --help`` and the torch-free commands
work on the base install.
"""
from __future__ import annotations

import contextlib
import shlex
import sys
import time
from pathlib import Path

import click

from .cli_classifier import classifier_options, load_classifier
from .designs import DESIGNS as DESIGN_NAMES

DATA_HELP = ("Dataset: 'fashion-mnist', 'npz:PATH' (x, y[, x_test, y_test, class_names]) or 'folder:DIR' "
             "(DIR/CLASS/*.png, or DIR/train/... and DIR/test/...).")


@contextlib.contextmanager
def progress(label: str, total: int, quiet: bool):
    """A progress bar on stderr, off with --quiet or when stderr is not a terminal; yields an on_step callback."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr, show_pos=True) as bar:
        def on_step(epoch, step, steps, stats):
            bar.label = f"{label} epoch {epoch + 1} loss {stats['loss']:.3f}"
            bar.update(1)

        yield on_step


def _dataset(spec: str, split: str):
    """Load a dataset, turning a missing or malformed one into a usage error that names it."""
    from .data import load_dataset

    try:
        return load_dataset(spec, split)
    except (FileNotFoundError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--data") from exc


def _split(data: str, val_size, seed: int):
    from .fitting import split

    ds = _dataset(data, "train")
    try:
        return (ds, *split(ds, val_size, seed))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--val-size") from exc


def _provenance() -> dict:
    """Where a checkpoint came from: the command line and the software it ran on."""
    from .fitting import provenance

    return provenance(shlex.join(["purifier", *sys.argv[1:]]))


def _load(path, kind: str, option: str):
    """Load a checkpoint, turning a missing or wrong file into a usage error that names it."""
    from . import checkpoint

    try:
        return checkpoint.load(path, expect=kind)
    except (FileNotFoundError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint=option) from exc


def resume_options(fn):
    """--resume and --save-every, shared by the training commands."""
    fn = click.option("--save-every", default=200, show_default=True, type=click.IntRange(min=1),
                      help="Save the full training state every this many steps (and at each epoch's end).")(fn)
    return click.option("--resume", is_flag=True,
                        help="Continue an interrupted run from its saved state (same settings and data); "
                             "ends with the weights an uninterrupted run would have.")(fn)


def _val_size(value: str):
    if value == "auto":
        return value
    try:
        return float(value) if "." in value else int(value)
    except ValueError:
        raise click.BadParameter(f"expected a count or a fraction, got {value!r}")


@click.group()
@click.version_option(package_name="purifier")
def main():
    """PuVAE purification: train, evaluate and run a class-conditional VAE in front of a classifier."""


@main.command("train-classifier")
@click.option("--data", default="fashion-mnist", show_default=True, help=DATA_HELP)
@click.option("--arch", type=click.Choice(["a", "b"]), default="a", show_default=True,
              help="Classifier architecture: PuVAE paper's A (conv64-5x5 x2) or B (conv128-3x3, conv64-3x3).")
@click.option("--out", type=click.Path(), required=True, help="Checkpoint path (writes OUT.safetensors + OUT.json).")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(min=1), help="Whole passes over the data.")
@click.option("--batch-size", default=128, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--val-size", default="auto", show_default=True,
              help="Held-out validation count or fraction; auto: 5000 or a tenth of the data, whichever is less.")
@click.option("--augment/--no-augment", default=False, show_default=True,
              help="Random horizontal flips and 2-pixel shifts.")
@click.option("--adversarial", type=click.Choice(["none", "pgd", "trades", "fgsm"]), default="none",
              show_default=True, help="pgd: Madry PGD adversarial training; trades: TRADES (Zhang et al. 2019); "
                                      "fgsm: Goodfellow's FGSM adversarial loss.")
@click.option("--adv-eps", default=0.1, show_default=True, help="L-infinity budget of the training attack.")
@click.option("--adv-steps", default=7, show_default=True, help="PGD steps (step size 2.5 * eps / steps).")
@click.option("--adv-mix", default=0.5, show_default=True, help="FGSM loss: weight of the clean term (alpha).")
@click.option("--adv-beta", default=6.0, show_default=True, help="TRADES: weight of the KL term.")
@click.option("--val-robust-n", default=1000, show_default=True, type=click.IntRange(min=0),
              help="Adversarial: validation images attacked (PGD-20) after each epoch; the best epoch's weights "
                   "are kept (0: off, the last epoch's).")
@click.option("--patience", type=click.IntRange(min=1),
              help="Adversarial: stop after this many epochs without a better validation robust accuracy.")
@resume_options
@click.option("--quiet", is_flag=True)
def train_classifier_cmd(data, arch, out, epochs, batch_size, lr, seed, val_size, augment, adversarial, adv_eps,
                         adv_steps, adv_mix, adv_beta, val_robust_n, patience, resume, save_every, quiet):
    """Train a reference classifier (the source or the target), plainly or adversarially."""
    from . import checkpoint
    from .models.classifiers import Classifier, ClassifierConfig
    from .resume import Snapshots, StateError, data_digest
    from .train import AdversarialTraining, TrainConfig, seed_everything, train_classifier

    try:
        adv = None if adversarial == "none" else AdversarialTraining(
            adversarial, adv_eps, adv_steps, adv_mix, adv_beta, val_robust_n, patience=patience)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    state = Path(f"{out}.training-state.safetensors")
    if state.exists() and not resume:
        raise click.UsageError(f"{state} holds the saved state of an unfinished run: pass --resume to continue it, "
                               f"or delete it to start afresh")
    ds, x, y, xv, yv = _split(data, _val_size(val_size), seed)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, augment=augment)
    seed_everything(seed)
    model = Classifier(ClassifierConfig(arch=arch, image_shape=ds.image_shape, num_classes=ds.num_classes))
    snaps = Snapshots(state, save_every, resume, {"arch": arch, "train": cfg.to_dict(),
                                                  "adversarial": adv.to_dict() if adv else None,
                                                  "data": data_digest(x, y, xv, yv)})
    with progress(f"classifier {arch}", epochs * ((len(x) + batch_size - 1) // batch_size), quiet) as on_step:
        try:
            history = train_classifier(model, x, y, xv, yv, cfg, on_step, adv, snaps)
        except StateError as exc:
            raise click.UsageError(str(exc)) from exc
    final = history[history[-1]["best_epoch"] - 1] if adv and val_robust_n else history[-1]
    meta = {"dataset": ds.name, "class_names": list(ds.class_names), "train": cfg.to_dict(),
            "adversarial": adv.to_dict() if adv else None,
            "n_train": len(x), "n_val": len(xv), "history": history, "train_seconds": snaps.seconds,
            "resumed_at_step": snaps.resumed_at, "epochs_run": len(history), "val_acc": final["val_acc"],
            **({"val_robust": final["val_robust"], "best_epoch": final["epoch"]} if "val_robust" in final else {}),
            **_provenance()}
    stem = checkpoint.save(model, out, meta)
    state.unlink(missing_ok=True)
    robust = f", robust {final['val_robust']:.4f} (epoch {final['epoch']})" if "val_robust" in final else ""
    click.echo(f"classifier {arch}: val accuracy {final['val_acc']:.4f}{robust} in {snaps.seconds:.0f} s "
               f"-> {stem}.json")


@main.command("train")
@click.option("--data", default="fashion-mnist", show_default=True, help=DATA_HELP)
@classifier_options("--source", "The classifier to protect: a project checkpoint (the CE term's frozen source; "
                                "also the target unless --target is given).")
@click.option("--out", type=click.Path(), required=True,
              help="Run directory (writes cvae.safetensors + cvae.json, and the classifier it was trained against).")
@click.option("--epochs", default=10.0, show_default=True, help="Passes over the data (fractional with --adversarial).")
@click.option("--batch-size", default=128, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--val-size", default="auto", show_default=True,
              help="Held-out validation count or fraction; auto: 5000 or a tenth of the data, whichever is less.")
@click.option("--latent-dim", type=int, help="Latent size (default: the dataset preset's).")
@click.option("--channels", help="Encoder/decoder conv widths, e.g. 16,32 (default: the preset's).")
@click.option("--conditioning", type=click.Choice(["onehot", "embedding"]))
@click.option("--design", "--arch", "arch", type=click.Choice(sorted(DESIGN_NAMES)),
              help="Purifier design (model, extra loss terms, decision rule; --arch is its older name); see docs/designs.md."
                   " Loss options given here override the design's. "
                   "[puvae; with --init: the init model's]")
@click.option("--beta", type=float, help="KL weight [1; ks-cov designs: 0].")
@click.option("--ce-weight", type=float, help="Weight of the source classifier's CE [10].")
@click.option("--sel-weight", type=float, help="Weight of the selection CE over K classes [100; 0: plain PuVAE].")
@click.option("--sel-tau", type=float, help="Temperature of the selection CE (MSE units) [0.001].")
@click.option("--sel-negatives", type=int,
              help="Selection CE over the true class and this many hard negatives from the source [0: all classes].")
@click.option("--tc-weight", type=float, help="beta-TC: extra weight (beta - 1) on the total correlation [0].")
@click.option("--ks-weight", type=float, help="KS loss on the codes, in units of its prior weight [0].")
@click.option("--cv-weight", type=float, help="Covariance loss on the codes, in units of its prior weight [0].")
@click.option("--couple-alpha", type=float, help="Two-point coupling with latent-attack codes (0: off) [0].")
@click.option("--adversarial", type=click.Choice(["none", "cvae", "classifier", "alternating", "joint"]),
              default="none", show_default=True,
              help="Adversarial training through the whole pipeline: which parts train against attacks on it "
                   "(cvae: the CVAE alone, the classifier stays frozen).")
@click.option("--init", "init_dir", type=click.Path(),
              help="Adversarial: start from this model directory's CVAE (default: a fresh CVAE).")
@click.option("--target", type=click.Path(),
              help="Adversarial: the target classifier the pipeline feeds, trained unless the mode is cvae "
                   "(default: the source). Written to OUT/classifier.")
@click.option("--adv-eps", default=0.1, show_default=True, help="L-infinity budget of the training attacks.")
@click.option("--adv-steps", default=3, show_default=True, help="PGD steps of the training attacks.")
@click.option("--adv-attacks", default="selection,full", show_default=True,
              help="Training attacks, each on its slice of the batch: selection, full, bpda.")
@click.option("--adv-sel-weight", default=100.0, show_default=True, help="Selection CE on attacked inputs.")
@click.option("--adv-pipe-weight", default=10.0, show_default=True,
              help="Target CE on the true class's reconstruction of attacked inputs.")
@click.option("--adv-clf-mix", default=0.5, show_default=True, help="Classifier loss: weight of the clean term.")
@resume_options
@click.option("--quiet", is_flag=True)
def train_cmd(data, classifier_source, out, epochs, batch_size, lr, seed, val_size, latent_dim, channels,
              conditioning, arch, beta, ce_weight, sel_weight, sel_tau, sel_negatives, tc_weight, ks_weight,
              cv_weight, couple_alpha, adversarial, init_dir, target, adv_eps, adv_steps, adv_attacks,
              adv_sel_weight, adv_pipe_weight, adv_clf_mix, resume, save_every, quiet):
    """Train the class-conditional VAE with the PuVAE loss (recon + beta*KL + ce_weight*CE [+ sel_weight*SEL])
    in front of a classifier (yours: --classifier-factory or --classifier-onnx), or another design of the
    purifier family (--design), or, with --adversarial, purifier and/or target classifier against attacks on the
    whole pipeline. A call of ``purifier.fit``."""
    from . import designs
    from .adversarial import PipelineAdversarial
    from .classifier_io import ClassifierError
    from .fitting import FitConfig, FitError, fit, n_val
    from .losses import PuVAELoss
    from .resume import StateError

    if channels is not None:
        widths = tuple(int(c) for c in channels.split(",") if c.strip().isdigit())
        if len(widths) != 2 or min(widths) < 1 or len(channels.split(",")) != 2:
            raise click.BadParameter(f"expected two positive widths like 16,32, got {channels!r}", param_hint="--channels")
        channels = widths
    if classifier_source is None:
        raise click.UsageError("train needs the classifier to protect: --source CHECKPOINT, --classifier-factory "
                               "MODULE:FN with --classifier-weights FILE.safetensors, or --classifier-onnx FILE")
    if arch is None:
        arch = _load(Path(init_dir) / "cvae", "cvae", "--init").meta.get("design", "puvae") if init_dir else "puvae"
    loss = {k: v for k, v in (("beta", beta), ("ce_weight", ce_weight), ("sel_weight", sel_weight),
                              ("sel_tau", sel_tau), ("sel_negatives", sel_negatives), ("tc_weight", tc_weight),
                              ("ks_weight", ks_weight), ("cv_weight", cv_weight), ("couple_alpha", couple_alpha))
            if v is not None}
    model = {k: v for k, v in (("latent_dim", latent_dim), ("channels", channels), ("conditioning", conditioning))
             if v is not None}
    if epochs <= 0 or (adversarial == "none" and epochs != int(epochs)):
        raise click.BadParameter(f"expected a positive whole number of epochs (fractions only with --adversarial), "
                                 f"got {epochs:g}", param_hint="--epochs")
    if init_dir and adversarial == "none":
        raise click.UsageError("--init is for --adversarial runs (fine-tuning); plain training starts fresh")
    if init_dir and model:
        raise click.UsageError("--init takes the architecture of its CVAE; drop --latent-dim/--channels/--conditioning")
    try:
        adv = None
        if adversarial != "none":
            adv = PipelineAdversarial(mode=adversarial, eps=adv_eps, steps=adv_steps,
                                      attacks=tuple(a.strip() for a in adv_attacks.split(",") if a.strip()),
                                      sel_weight=adv_sel_weight, pipe_weight=adv_pipe_weight, clf_mix=adv_clf_mix)
        config = FitConfig(epochs=0 if adv else int(epochs), batch_size=batch_size, lr=lr, seed=seed,
                           val_size=_val_size(val_size), design=arch, loss=loss, model=model, adversarial=adv,
                           adversarial_epochs=epochs if adv else 0.0)
        PuVAELoss(**{**designs.get(arch).loss, **loss})  # a bad loss setting fails here, before any work
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    ds = _dataset(data, "train")
    source = load_classifier(classifier_source, ds.x[:64], "--source")
    tgt = tgt_src = None
    if target:
        tgt_src = _classifier_path(target, "--target")
        tgt = load_classifier(tgt_src, ds.x[:64], "--target")
    try:
        total = round(epochs * -(-(len(ds.y) - n_val(len(ds.y), config.val_size)) // batch_size))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--val-size") from exc
    label = f"adversarial {adversarial}" if adv else "cvae"
    try:
        with progress(label, total, quiet) as on_step:
            run = fit(source, ds, out, config, target=tgt, init=init_dir, classifier_source=classifier_source,
                      target_source=tgt_src, command=shlex.join(["purifier", *sys.argv[1:]]), on_step=on_step,
                      resume=resume, save_every=save_every)
    except (ClassifierError, FitError, StateError) as exc:
        raise click.UsageError(str(exc)) from exc
    meta = run.record["meta"]
    if adv is None:
        click.echo(f"{arch}: validation argmin = label {meta['val_argmin_acc']:.4f} in {meta['train_seconds']:.0f} s "
                   f"-> {run.path / 'cvae.json'}")
    else:
        click.echo(f"adversarial {adversarial}: validation purified accuracy {meta['val_purified_acc']:.4f}, adaptive "
                   f"check {meta['val_adaptive']:.4f} ({adv.val_n} images, {adv.val_steps}-step selection + full "
                   f"gradient) in {meta['train_seconds']:.0f} s -> {run.path}")


def _classifier_path(path, option: str):
    from .classifier_io import source_of

    try:
        return source_of(path)
    except (FileNotFoundError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint=option) from exc


@main.command("train-vae")
@click.option("--data", default="fashion-mnist", show_default=True, help=DATA_HELP)
@click.option("--out", type=click.Path(), required=True, help="Checkpoint path (writes OUT.safetensors + OUT.json).")
@click.option("--epochs", default=20, show_default=True)
@click.option("--batch-size", default=128, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--latent-dim", default=16, show_default=True)
@click.option("--val-size", default="auto", show_default=True,
              help="Held-out validation count or fraction; auto: 5000 or a tenth of the data, whichever is less.")
@click.option("--quiet", is_flag=True)
def train_vae_cmd(data, out, epochs, batch_size, lr, seed, latent_dim, val_size, quiet):
    """Train an unconditional VAE: the generator of the Defense-GAN-style baseline."""
    from . import checkpoint
    from .models.defensegan import VAE, VAEConfig
    from .train import TrainConfig, seed_everything, train_vae

    ds, x, _, xv, _ = _split(data, _val_size(val_size), seed)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    seed_everything(seed)
    vae = VAE(VAEConfig(image_shape=ds.image_shape, latent_dim=latent_dim))
    start = time.perf_counter()
    with progress("vae", epochs * ((len(x) + batch_size - 1) // batch_size), quiet) as on_step:
        history = train_vae(vae, x, xv, cfg, on_step)
    seconds = time.perf_counter() - start
    meta = {"dataset": ds.name, "train": cfg.to_dict(), "n_train": len(x), "n_val": len(xv), "history": history,
            "train_seconds": seconds, "val_loss": history[-1]["val_loss"], **_provenance()}
    stem = checkpoint.save(vae, out, meta)
    click.echo(f"vae: validation negative ELBO {history[-1]['val_loss']:.2f} nats in {seconds:.0f} s -> {stem}.json")


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
@click.option("--out", type=click.Path(), help="Write the full report (per class too) as JSON.")
def evaluate_cmd(model_dir, cvae, classifier_source, data, split, n, selections, out):
    """Clean accuracy of the target classifier alone and behind the purifier, per selection rule."""
    import torch

    from . import checkpoint
    from .checkpoint import write_json
    from .evaluate import evaluate

    if not (model_dir or (cvae and classifier_source)):
        raise click.UsageError("give --model DIR, or both --cvae and --classifier")
    cvae_path = cvae or str(Path(model_dir) / "cvae")
    cvae_m = _load(cvae_path, "cvae", "--cvae/--model")
    if classifier_source is None:
        classifier_source = _classifier_path(Path(model_dir) / "classifier", "--classifier/--model")
    ds = _dataset(data, split)
    clf = load_classifier(classifier_source, ds.x[:64], "--classifier/--model")
    if ds.image_shape != tuple(cvae_m.cfg.image_shape) or ds.num_classes != cvae_m.cfg.num_classes:
        raise click.UsageError(f"the model expects {cvae_m.cfg.image_shape} x {cvae_m.cfg.num_classes} classes, "
                               f"{data} holds {ds.image_shape} x {ds.num_classes} classes")
    x, y = torch.from_numpy(ds.x[:n]), torch.from_numpy(ds.y[:n])
    report = evaluate(clf, cvae_m, x, y, selections, ds.class_names)
    report.update({"dataset": ds.name, "split": split, "cvae_path": cvae_path,
                   "classifier_path": classifier_source.path or classifier_source.factory,
                   "classifier_source": classifier_source.to_dict(),
                   "cvae_sha256": checkpoint.read_record(cvae_path)["weights_sha256"],
                   "classifier_sha256": classifier_source.sha256(),
                   "torch": torch.__version__, "threads": torch.get_num_threads()})
    click.echo(f"{ds.name} {split}, {len(y)} images")
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
@click.option("--triton", "triton_repo", type=click.Path(file_okay=False),
              help="Also write a Triton model repository for pipeline.onnx here (REPO/NAME/1/model.onnx + config.pbtxt).")
@click.option("--triton-name", default="purifier", show_default=True, help="Model name in the Triton repository.")
@click.option("--triton-max-batch", default=256, show_default=True, type=click.IntRange(min=1),
              help="max_batch_size in config.pbtxt (dynamic batching on).")
def export_cmd(run_dir, out, classifier_source, selection, percentile, triton_repo, triton_name, triton_max_batch):
    """Export RUN_DIR's CVAE (+ target classifier) to purifier.onnx and pipeline.onnx, parity-checked.

    Example: purifier export models/fashion-mnist --out models/fashion-mnist
    """
    from export.onnx_export import ExportError, export_run

    from .classifier_io import ClassifierError

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
    if triton_repo:
        from export.triton import write_triton_repo

        source = results["pipeline"].path if "pipeline" in results else next(iter(results.values())).path
        try:
            model_dir = write_triton_repo(source, triton_repo, triton_name, triton_max_batch)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
        click.echo(f"triton: {model_dir}/config.pbtxt + 1/model.onnx (from {source})")


def _model(ctx, param, value):
    """--model: a shipped model name (``purifier.registry.MODELS``) or a path -> its path; a usage error if absent."""
    from .registry import resolve

    if value is None:
        return None
    try:
        return resolve(value)
    except FileNotFoundError as exc:
        raise click.BadParameter(str(exc)) from exc


def _shipped_names() -> str:
    from .registry import known

    return known()


@main.command("demo")
@click.option("--model", "model_dir", default="fashion-mnist", show_default=True, callback=_model,
              help=f"A shipped model name ({_shipped_names()}) or a model directory holding cvae.json, "
                   f"classifier.json and pipeline.onnx.")
@click.option("--n", default=1000, show_default=True, help="First N test images.")
@click.option("--eps", default=0.1, show_default=True, help="L-infinity budget.")
@click.option("--steps", default=40, show_default=True, help="PGD steps (step size 2.5 * eps / steps).")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default="demo-out", show_default=True,
              help="Writes grid.png (rows labelled clean / adversarial (BPDA) / purified) and report.json here.")
def demo_cmd(model_dir, n, eps, steps, seed, out):
    """Attack the model with PGD-Linf, purify every attacked image through onnxruntime, and print the table.

    Four attacks: oblivious (on the classifier alone), BPDA and full gradient (through the whole pipeline),
    and the selection attack, which drives the purifier's decision rule itself (it raises the true class's
    reconstruction error above the best wrong class's). The selection attack is the one that decides the
    result on the shipped models: it sets the 'adaptive worst' row (an image counts only if it survives
    BPDA, full gradient and selection).

    Example: purifier demo --model fashion-mnist --n 1000 --eps 0.1 --steps 40
    """
    from serve.png import image_grid, write_png

    from .checkpoint import write_json
    from .demo import GRID_ROWS, check_model_dir, format_table, run_demo

    try:
        model_dir = check_model_dir(model_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="'--model'") from exc
    start = time.perf_counter()
    report = run_demo(model_dir, n=n, eps=eps, steps=steps, seed=seed,
                      on_progress=lambda name: click.echo(f"attacked: {name}", err=True))
    grid = report.pop("grid")
    report["seconds"] = time.perf_counter() - start
    write_png(Path(out) / "grid.png", image_grid(grid, labels=list(GRID_ROWS)))

    write_json(Path(out) / "report.json", report)
    click.echo(format_table(report))
    click.echo(f"image grid (rows: {', '.join(GRID_ROWS)}) -> {Path(out) / 'grid.png'}; "
               f"report -> {Path(out) / 'report.json'}; {report['seconds']:.0f} s in all")


# `purifier purify` exit codes (its --help and README say the same)
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


@contextlib.contextmanager
def _stop_on_signals(notice):
    """SIGINT and SIGTERM ask the job to stop (yields the ``should_stop`` callable); a second one stops at once
    (KeyboardInterrupt). The old handlers come back afterwards. Outside the main thread, signals are left alone."""
    import signal
    import threading

    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested.is_set
        return

    def on_signal(signum, frame):
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()
        notice(signum)

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested.is_set
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _purify_line(stats, out_dir: Path) -> str:
    """The one-line summary on stderr."""
    rate = stats.done / stats.seconds["total"] if stats.seconds["total"] else 0.0
    failed = f"failed {stats.failed}"
    if stats.failed_earlier:
        failed += f" ({stats.failed_earlier} recorded by an earlier run; --no-resume retries them)"
    parts = [f"done {stats.done}", failed, f"rejected {stats.rejected}", f"resumed {stats.skipped}"]
    if stats.skipped_files:
        names = ", ".join(Path(f["path"]).name for f in stats.skipped_files[:3])
        more = f" and {len(stats.skipped_files) - 3} more" if len(stats.skipped_files) > 3 else ""
        parts.append(f"skipped {len(stats.skipped_files)} non-image file{'s' * (len(stats.skipped_files) != 1)} "
                     f"({names}{more}; listed in summary.json)")
    line = ", ".join(parts) + f"; {rate:.0f} images/s; manifest: {out_dir / 'manifest.jsonl'}"
    if stats.failed:
        line += f", errors: {out_dir / 'errors.jsonl'}"
    if stats.interrupted:
        line = (f"interrupted with {stats.remaining} input{'s' * (stats.remaining != 1)} left (rerun the same "
                f"command to resume): {line}")
    return line


@main.command("purify")
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--model", required=True, callback=_model,
              help=f"A shipped model name ({_shipped_names()}), a model directory (pipeline.onnx or purifier.onnx) "
                   f"or an .onnx file.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--resize", is_flag=True, help="Resize images of another size instead of failing them.")
@click.option("--format", "fmt", type=click.Choice(["png", "npz"]), default="png", show_default=True,
              help="png: one image per input, same relative layout; npz: one purified.npz.")
@click.option("--resume/--no-resume", default=None,
              help="Skip inputs already in OUT's manifest or error log (default: on when OUT holds a manifest).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar and no summary line.")
def purify_cmd(inputs, model, out_dir, batch_size, resize, fmt, resume, device, quiet):
    """Purify image files, folders and .npy/.npz arrays on onnxruntime (no torch needed).

    Writes purified images, manifest.jsonl (one line per input), errors.jsonl (one line per failure, with the
    reason) and summary.json. Files in a folder that are neither images nor arrays (notes.txt) are skipped and
    listed: in summary.json (skipped_files) and in the summary line. A rerun into the same OUT resumes: inputs
    already in the manifest or the error log are not redone, and the failures recorded earlier still count.

    Ctrl-C (SIGINT) or SIGTERM: the images already loaded are purified and recorded, summary.json is written
    and the job exits 130; a second Ctrl-C stops at once. Rerun the same command to resume.

    \b
    Exit codes:
      0    every input purified (skipped non-image files do not count)
      1    some inputs failed, in this run or earlier ones into OUT (errors.jsonl)
      2    usage error (a bad option, model or output folder); nothing was done
      130  interrupted (SIGINT, SIGTERM): summary.json written; rerun resumes

    Example: purifier purify photos/ batch.npz --model fashion-mnist --out purified/
    """
    import signal

    bar = None
    if not quiet and sys.stderr.isatty():
        bar = click.progressbar(length=1, label="purify", file=sys.stderr, show_pos=True)

    def on_batch(done, total):
        bar.length = total
        bar.update(done - bar.pos)

    newline = "\n" if bar is not None else ""  # off the progress bar's line

    def notice(signum):
        if not quiet:
            name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
            click.echo(f"{newline}{name}: stopping after the images already loaded, then writing summary.json "
                       f"({name} again stops at once)", err=True)

    try:
        from serve.batch import purify_files  # onnxruntime: a Ctrl-C while it loads is an interrupt too

        with _stop_on_signals(notice) as should_stop:
            stats = purify_files(list(inputs), model, out_dir, batch_size, resize, fmt, resume, device,
                                 on_batch if bar is not None else None, should_stop)
    except (FileNotFoundError, ValueError) as exc:
        raise click.UsageError(str(exc)) from exc
    except KeyboardInterrupt:
        click.echo(f"{newline}stopped at once; rerun the same command to resume (manifest: "
                   f"{Path(out_dir) / 'manifest.jsonl'})", err=True)
        sys.exit(EXIT_INTERRUPTED)
    finally:
        if bar is not None:
            bar.render_finish()
    if not quiet:
        click.echo(_purify_line(stats, Path(out_dir)), err=True)
    sys.exit(EXIT_INTERRUPTED if stats.interrupted else EXIT_FAILED if stats.failed else EXIT_OK)


def _add_serve():
    from serve.cli import serve_command

    main.add_command(serve_command)


_add_serve()

if __name__ == "__main__":
    main()
