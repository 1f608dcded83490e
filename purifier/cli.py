"""The ``purifier`` command line: thin wrappers over the library.

Torch is imported inside the commands that need it, so ``purifier --help`` and the torch-free commands
work on the base install.
"""
from __future__ import annotations

import contextlib
import platform
import shlex
import sys
import time
from pathlib import Path

import click

from .designs import DESIGNS as DESIGN_NAMES

DATA_HELP = "Dataset: 'fashion-mnist' or 'npz:PATH' (x, y[, x_test, y_test, class_names])."


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
    import torch

    from .data import train_val_split

    ds = _dataset(data, "train")
    if val_size == "auto":
        val_size = min(5000, max(1, len(ds.y) // 10))
    try:
        tr, va = train_val_split(len(ds.y), val_size, seed)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--val-size") from exc
    t = torch.from_numpy
    return ds, t(ds.x[tr]), t(ds.y[tr]), t(ds.x[va]), t(ds.y[va])


def _provenance() -> dict:
    """Where a checkpoint came from: the command line and the software it ran on."""
    import torch

    from .provenance import cpu_model

    return {"command": shlex.join(["purifier", *sys.argv[1:]]), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": cpu_model(), "python": platform.python_version()}


def _load(path, kind: str, option: str):
    """Load a checkpoint, turning a missing or wrong file into a usage error that names it."""
    from . import checkpoint

    try:
        return checkpoint.load(path, expect=kind)
    except (FileNotFoundError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint=option) from exc


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
              help="PuVAE paper architecture A (conv64-5x5 x2) or B (conv128-3x3, conv64-3x3).")
@click.option("--out", type=click.Path(), required=True, help="Checkpoint path (writes OUT.safetensors + OUT.json).")
@click.option("--epochs", default=10, show_default=True)
@click.option("--batch-size", default=128, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--val-size", default="auto", show_default=True,
              help="Held-out validation count or fraction; auto: 5000 or a tenth of the data, whichever is less.")
@click.option("--augment/--no-augment", default=False, show_default=True,
              help="Random horizontal flips and 2-pixel shifts.")
@click.option("--adversarial", type=click.Choice(["none", "pgd", "fgsm"]), default="none", show_default=True,
              help="pgd: Madry PGD adversarial training; fgsm: Goodfellow's FGSM adversarial loss.")
@click.option("--adv-eps", default=0.1, show_default=True, help="L-infinity budget of the training attack.")
@click.option("--adv-steps", default=7, show_default=True, help="PGD steps (step size 2.5 * eps / steps).")
@click.option("--adv-mix", default=0.5, show_default=True, help="FGSM loss: weight of the clean term (alpha).")
@click.option("--quiet", is_flag=True)
def train_classifier_cmd(data, arch, out, epochs, batch_size, lr, seed, val_size, augment, adversarial, adv_eps,
                         adv_steps, adv_mix, quiet):
    """Train a reference classifier (the source or the target), plainly or adversarially."""
    from . import checkpoint
    from .models.classifiers import Classifier, ClassifierConfig
    from .train import AdversarialTraining, TrainConfig, seed_everything, train_classifier

    try:
        adv = None if adversarial == "none" else AdversarialTraining(adversarial, adv_eps, adv_steps, adv_mix)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    ds, x, y, xv, yv = _split(data, _val_size(val_size), seed)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, augment=augment)
    seed_everything(seed)
    model = Classifier(ClassifierConfig(arch=arch, image_shape=ds.image_shape, num_classes=ds.num_classes))
    start = time.perf_counter()
    with progress(f"classifier {arch}", epochs * ((len(x) + batch_size - 1) // batch_size), quiet) as on_step:
        history = train_classifier(model, x, y, xv, yv, cfg, on_step, adv)
    seconds = time.perf_counter() - start
    meta = {"dataset": ds.name, "class_names": list(ds.class_names), "train": cfg.to_dict(),
            "adversarial": adv.to_dict() if adv else None,
            "n_train": len(x), "n_val": len(xv), "history": history, "train_seconds": seconds,
            "val_acc": history[-1]["val_acc"], **_provenance()}
    stem = checkpoint.save(model, out, meta)
    click.echo(f"classifier {arch}: val accuracy {history[-1]['val_acc']:.4f} in {seconds:.0f} s -> {stem}.json")


@main.command("train")
@click.option("--data", default="fashion-mnist", show_default=True, help=DATA_HELP)
@click.option("--source", type=click.Path(), help="Frozen source classifier checkpoint for the CE term.")
@click.option("--out", type=click.Path(), required=True, help="Run directory (writes cvae.safetensors + cvae.json).")
@click.option("--epochs", default=10.0, show_default=True, help="Passes over the data (fractional with --adversarial).")
@click.option("--batch-size", default=128, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--val-size", default="auto", show_default=True,
              help="Held-out validation count or fraction; auto: 5000 or a tenth of the data, whichever is less.")
@click.option("--latent-dim", type=int, help="Latent size (default: the dataset preset's).")
@click.option("--channels", help="Encoder/decoder conv widths, e.g. 16,32 (default: the preset's).")
@click.option("--conditioning", type=click.Choice(["onehot", "embedding"]))
@click.option("--arch", type=click.Choice(sorted(DESIGN_NAMES)),
              help="Purifier design (model, extra loss terms, decision rule); see README 'choosing a purifier'. "
                   "Loss options given here override the design's. [puvae; with --init: the init model's]")
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
              help="Adversarial training through the whole pipeline: which parts train against attacks on it.")
@click.option("--init", "init_dir", type=click.Path(),
              help="Adversarial: start from this model directory's CVAE (default: a fresh CVAE).")
@click.option("--target", type=click.Path(),
              help="Adversarial: the target classifier the pipeline feeds, trained unless the mode is cvae "
                   "(default: --source). Written to OUT/classifier.")
@click.option("--adv-eps", default=0.1, show_default=True, help="L-infinity budget of the training attacks.")
@click.option("--adv-steps", default=3, show_default=True, help="PGD steps of the training attacks.")
@click.option("--adv-attacks", default="selection,full", show_default=True,
              help="Training attacks, each on its slice of the batch: selection, full, bpda.")
@click.option("--adv-sel-weight", default=100.0, show_default=True, help="Selection CE on attacked inputs.")
@click.option("--adv-pipe-weight", default=10.0, show_default=True,
              help="Target CE on the true class's reconstruction of attacked inputs.")
@click.option("--adv-clf-mix", default=0.5, show_default=True, help="Classifier loss: weight of the clean term.")
@click.option("--quiet", is_flag=True)
def train_cmd(data, source, out, epochs, batch_size, lr, seed, val_size, latent_dim, channels, conditioning, arch,
              beta, ce_weight, sel_weight, sel_tau, sel_negatives, tc_weight, ks_weight, cv_weight, couple_alpha,
              adversarial, init_dir, target, adv_eps, adv_steps, adv_attacks, adv_sel_weight, adv_pipe_weight,
              adv_clf_mix, quiet):
    """Train the class-conditional VAE with the PuVAE loss (recon + beta*KL + ce_weight*CE [+ sel_weight*SEL]),
    or another design of the purifier family (--arch), or, with --adversarial, purifier and/or target
    classifier against attacks on the whole pipeline."""
    from . import checkpoint, designs
    from .losses import PuVAELoss
    from .train import TrainConfig, seed_everything, train_cvae

    if arch is None:
        arch = _load(Path(init_dir) / "cvae", "cvae", "--init").meta.get("design", "puvae") if init_dir else "puvae"
    design = designs.get(arch)
    given = {k: v for k, v in (("beta", beta), ("ce_weight", ce_weight), ("sel_weight", sel_weight),
                               ("sel_tau", sel_tau), ("sel_negatives", sel_negatives), ("tc_weight", tc_weight),
                               ("ks_weight", ks_weight), ("cv_weight", cv_weight), ("couple_alpha", couple_alpha))
             if v is not None}
    ce_weight = given.get("ce_weight", design.loss.get("ce_weight", PuVAELoss.ce_weight))
    if ce_weight and not source:
        raise click.UsageError("--ce-weight > 0 needs --source CLASSIFIER (or pass --ce-weight 0)")
    ds, x, y, xv, yv = _split(data, _val_size(val_size), seed)
    src = _load(source, "classifier", "--source") if source else None
    if src is not None and (tuple(src.cfg.image_shape) != ds.image_shape or src.cfg.num_classes != ds.num_classes):
        raise click.UsageError(f"source classifier expects {src.cfg.image_shape} x {src.cfg.num_classes} classes, "
                               f"the data is {ds.image_shape} x {ds.num_classes} classes")
    if channels is not None:
        widths = tuple(int(c) for c in channels.split(",") if c.strip().isdigit())
        if len(widths) != 2 or min(widths) < 1 or len(channels.split(",")) != 2:
            raise click.BadParameter(f"expected two positive widths like 16,32, got {channels!r}", param_hint="--channels")
        channels = widths
    overrides = {k: v for k, v in (("latent_dim", latent_dim), ("channels", channels),
                                   ("conditioning", conditioning)) if v is not None}
    if epochs <= 0 or (adversarial == "none" and epochs != int(epochs)):
        raise click.BadParameter(f"expected a positive whole number of epochs (fractions only with --adversarial), "
                                 f"got {epochs:g}", param_hint="--epochs")
    cfg = TrainConfig(epochs=int(epochs) if adversarial == "none" else epochs, batch_size=batch_size, lr=lr,
                      seed=seed)
    try:
        loss = PuVAELoss(**{**design.loss, **given, "tc_dataset_size": len(x)})
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    seed_everything(seed)
    if init_dir:
        cvae = _load(Path(init_dir) / "cvae", "cvae", "--init")
        if overrides:
            raise click.UsageError("--init takes the architecture of its CVAE; drop --latent-dim/--channels/"
                                   "--conditioning")
    else:
        try:
            cvae = designs.build_model(design, ds.name, ds.image_shape, ds.num_classes, **overrides)
        except ValueError as exc:
            raise click.UsageError(f"--arch {arch}: {exc}") from exc
    spec = {"design": design.name, "purifier": design.purifier}
    if adversarial != "none":
        _train_adversarial(ds, x, y, xv, yv, cvae, src, source, target or source, out, cfg, loss, adversarial,
                           adv_eps, adv_steps, adv_attacks, adv_sel_weight, adv_pipe_weight, adv_clf_mix,
                           init_dir, quiet, spec)
        return
    if init_dir:
        raise click.UsageError("--init is for --adversarial runs (fine-tuning); plain training starts fresh")
    start = time.perf_counter()
    with progress("cvae", cfg.epochs * ((len(x) + batch_size - 1) // batch_size), quiet) as on_step:
        history = train_cvae(cvae, src, x, y, xv, yv, cfg, loss, on_step)
    seconds = time.perf_counter() - start
    meta = {"dataset": ds.name, "class_names": list(ds.class_names), "train": cfg.to_dict(), "loss": loss.to_dict(),
            **spec, "source": str(source) if source else None,
            "source_sha256": checkpoint.read_record(source)["weights_sha256"] if source else None,
            "n_train": len(x), "n_val": len(xv), "history": history, "train_seconds": seconds,
            "val_argmin_acc": history[-1]["val_argmin_acc"], **_provenance()}
    stem = checkpoint.save(cvae, Path(out) / "cvae", meta)
    click.echo(f"{design.name}: validation argmin = label {history[-1]['val_argmin_acc']:.4f} in {seconds:.0f} s -> {stem}.json")


def _train_adversarial(ds, x, y, xv, yv, cvae, src, source, target_path, out, cfg, loss, mode, eps, steps, attacks,
                       sel_weight, pipe_weight, clf_mix, init_dir, quiet, spec):
    from . import checkpoint
    from .adversarial import PipelineAdversarial, frozen_copy, train_pipeline_adversarial

    if src is None or not target_path:
        raise click.UsageError("--adversarial needs --source CLASSIFIER (the CE term's; also the target unless "
                               "--target is given)")
    names = tuple(a.strip() for a in attacks.split(",") if a.strip())
    try:
        adv = PipelineAdversarial(mode=mode, eps=eps, steps=steps, attacks=names, sel_weight=sel_weight,
                                  pipe_weight=pipe_weight, clf_mix=clf_mix)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    target = _load(target_path, "classifier", "--target")
    steps_total = round(cfg.epochs * ((len(x) + cfg.batch_size - 1) // cfg.batch_size))
    start = time.perf_counter()
    with progress(f"adversarial {mode}", steps_total, quiet) as on_step:
        history = train_pipeline_adversarial(cvae, target, frozen_copy(src), x, y, xv, yv, cfg, loss, adv,
                                             cfg.epochs, on_step)
    seconds = time.perf_counter() - start
    last = history[-1]
    meta = {"dataset": ds.name, "class_names": list(ds.class_names), "train": cfg.to_dict(), "loss": loss.to_dict(),
            "adversarial": adv.to_dict(), **spec, "source": str(source),
            "source_sha256": checkpoint.read_record(source)["weights_sha256"],
            "init": str(init_dir) if init_dir else None,
            "init_sha256": checkpoint.read_record(Path(init_dir) / "cvae")["weights_sha256"] if init_dir else None,
            "target": str(target_path), "target_sha256": checkpoint.read_record(target_path)["weights_sha256"],
            "n_train": len(x), "n_val": len(xv), "history": history, "train_seconds": seconds,
            "val_purified_acc": last["val_purified_acc"], "val_adaptive": last["val_adaptive"], **_provenance()}
    stem = checkpoint.save(cvae, Path(out) / "cvae", meta)
    checkpoint.save(target, Path(out) / "classifier", {**meta, "trained": adv.trains_classifier})
    click.echo(f"adversarial {mode}: validation purified accuracy {last['val_purified_acc']:.4f}, adaptive check "
               f"{last['val_adaptive']:.4f} ({adv.val_n} images, {adv.val_steps}-step selection + full gradient) "
               f"in {seconds:.0f} s -> {stem.parent}")


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
              help="Directory holding cvae.* and classifier.* checkpoints.")
@click.option("--cvae", type=click.Path(), help="CVAE checkpoint (default MODEL/cvae).")
@click.option("--classifier", type=click.Path(), help="Target classifier checkpoint (default MODEL/classifier).")
@click.option("--data", default="fashion-mnist", show_default=True, help=DATA_HELP)
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
@click.option("--n", type=int, help="Evaluate on the first N images only.")
@click.option("--selection", "selections", multiple=True,
              type=click.Choice(["mse", "likelihood", "iwae", "design"]), default=("mse", "likelihood"),
              show_default=True, help="Decision rules to compare; design: the purifier the model's checkpoint records.")
@click.option("--out", type=click.Path(), help="Write the full report (per class too) as JSON.")
def evaluate_cmd(model_dir, cvae, classifier, data, split, n, selections, out):
    """Clean accuracy of the target classifier alone and behind the purifier, per selection rule."""
    import torch

    from . import checkpoint
    from .checkpoint import write_json
    from .evaluate import evaluate

    if not (model_dir or (cvae and classifier)):
        raise click.UsageError("give --model DIR, or both --cvae and --classifier")
    cvae_path = cvae or str(Path(model_dir) / "cvae")
    clf_path = classifier or str(Path(model_dir) / "classifier")
    cvae_m, clf = _load(cvae_path, "cvae", "--cvae/--model"), _load(clf_path, "classifier", "--classifier/--model")
    ds = _dataset(data, split)
    if ds.image_shape != tuple(cvae_m.cfg.image_shape) or ds.num_classes != cvae_m.cfg.num_classes:
        raise click.UsageError(f"the model expects {cvae_m.cfg.image_shape} x {cvae_m.cfg.num_classes} classes, "
                               f"{data} holds {ds.image_shape} x {ds.num_classes} classes")
    x, y = torch.from_numpy(ds.x[:n]), torch.from_numpy(ds.y[:n])
    report = evaluate(clf, cvae_m, x, y, selections, ds.class_names)
    report.update({"dataset": ds.name, "split": split, "cvae_path": cvae_path, "classifier_path": clf_path,
                   "cvae_sha256": checkpoint.read_record(cvae_path)["weights_sha256"],
                   "classifier_sha256": checkpoint.read_record(clf_path)["weights_sha256"],
                   "torch": torch.__version__, "threads": torch.get_num_threads()})
    click.echo(f"{ds.name} {split}, {len(y)} images")
    click.echo(_table(report))
    if out:
        write_json(out, report)
        click.echo(f"report -> {out}")


@main.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="Output directory (default: RUN_DIR).")
@click.option("--classifier", type=click.Path(), help="Target classifier checkpoint (default RUN_DIR/classifier).")
@click.option("--selection", type=click.Choice(["mse", "likelihood", "iwae"]),
              help="Decision rule (default: the one the model's design records; PuVAE: mse).")
@click.option("--percentile", default=99.0, show_default=True,
              help="Rejection threshold: this percentile of the best reconstruction error on clean validation data.")
@click.option("--triton", "triton_repo", type=click.Path(file_okay=False),
              help="Also write a Triton model repository for pipeline.onnx here (REPO/NAME/1/model.onnx + config.pbtxt).")
@click.option("--triton-name", default="purifier", show_default=True, help="Model name in the Triton repository.")
@click.option("--triton-max-batch", default=256, show_default=True, type=click.IntRange(min=1),
              help="max_batch_size in config.pbtxt (dynamic batching on).")
def export_cmd(run_dir, out, classifier, selection, percentile, triton_repo, triton_name, triton_max_batch):
    """Export RUN_DIR's CVAE (+ target classifier) to purifier.onnx and pipeline.onnx, parity-checked.

    Example: purifier export models/fashion-mnist --out models/fashion-mnist
    """
    from export.onnx_export import ExportError, export_run

    try:
        results = export_run(Path(run_dir) / "cvae", classifier or Path(run_dir) / "classifier", out or run_dir,
                             selection, percentile)
    except ExportError as exc:
        raise click.UsageError(f"cannot export: {exc}") from exc
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


@main.command("demo")
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False), default="models/fashion-mnist",
              show_default=True)
@click.option("--n", default=1000, show_default=True, help="First N test images.")
@click.option("--eps", default=0.1, show_default=True, help="L-infinity budget.")
@click.option("--steps", default=40, show_default=True, help="PGD steps (step size 2.5 * eps / steps).")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default="demo-out", show_default=True,
              help="Writes grid.png (clean / BPDA-adversarial / purified) and report.json here.")
def demo_cmd(model_dir, n, eps, steps, seed, out):
    """Attack the shipped model with PGD (oblivious, BPDA, full gradient), purify through onnxruntime."""
    from serve.png import image_grid, write_png

    from .checkpoint import write_json
    from .demo import format_table, run_demo

    start = time.perf_counter()
    report = run_demo(model_dir, n=n, eps=eps, steps=steps, seed=seed,
                      on_progress=lambda name: click.echo(f"attacked: {name}", err=True))
    grid = report.pop("grid")
    report["seconds"] = time.perf_counter() - start
    write_png(Path(out) / "grid.png", image_grid(grid))

    write_json(Path(out) / "report.json", report)
    click.echo(format_table(report))
    click.echo(f"image grid (rows: clean, BPDA-adversarial, purified) -> {Path(out) / 'grid.png'}; "
               f"report -> {Path(out) / 'report.json'}; {report['seconds']:.0f} s in all")


@main.command("purify")
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--model", required=True, type=click.Path(exists=True),
              help="A model directory (pipeline.onnx or purifier.onnx) or an .onnx file.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--resize", is_flag=True, help="Resize images of another size instead of failing them.")
@click.option("--format", "fmt", type=click.Choice(["png", "npz"]), default="png", show_default=True,
              help="png: one image per input, same relative layout; npz: one purified.npz.")
@click.option("--resume/--no-resume", default=None,
              help="Skip inputs already in OUT's manifest (default: on when OUT holds one).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar and no summary line.")
def purify_cmd(inputs, model, out_dir, batch_size, resize, fmt, resume, device, quiet):
    """Purify image files, folders and .npy/.npz arrays on onnxruntime (no torch needed).

    Writes purified images, manifest.jsonl (one line per input), errors.jsonl (one line per failure, with the
    reason) and summary.json. Exit code 0: all inputs purified; 1: some failed; 2: usage error.

    Example: purifier purify photos/ batch.npz --model models/fashion-mnist --out purified/
    """
    from serve.batch import purify_files

    bar = None
    if not quiet and sys.stderr.isatty():
        bar = click.progressbar(length=1, label="purify", file=sys.stderr, show_pos=True)

    def on_batch(done, total):
        bar.length = total
        bar.update(done - bar.pos)

    try:
        stats = purify_files(list(inputs), model, out_dir, batch_size, resize, fmt, resume, device,
                             on_batch if bar is not None else None)
    except (FileNotFoundError, ValueError) as exc:
        raise click.UsageError(str(exc)) from exc
    finally:
        if bar is not None:
            bar.render_finish()
    if not quiet:
        rate = stats.done / stats.seconds["total"] if stats.seconds["total"] else 0.0
        click.echo(f"done {stats.done}, failed {stats.failed}, rejected {stats.rejected}, skipped (resumed) "
                   f"{stats.skipped}; {rate:.0f} images/s; manifest: {Path(out_dir) / 'manifest.jsonl'}", err=True)
    sys.exit(1 if stats.failed else 0)


def _add_serve():
    from serve.cli import serve_command

    main.add_command(serve_command)


_add_serve()

if __name__ == "__main__":
    main()
