"""``purifier train``: one call of ``purifier.fit``; ``purifier attach-prior``: one call of ``purifier.attach_prior``."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from ..designs import DESIGNS as DESIGN_NAMES
from .classifier import classifier_options, load_classifier
from ..config import COMBINE, PRECISIONS, FitConfig, PipelineAdversarial
from .common import (DATA_HELP, PRECISION_HELP, _classifier_path, _dataset, _load, _val_size, config_option, main, progress,
                     resume_options)


@main.command("train")
@click.option("--data", default="fashion-mnist", show_default=True, help=DATA_HELP)
@classifier_options("--source", "The classifier to protect: a project checkpoint (the CE term's frozen source; "
                                "also the target unless --target is given).")
@click.option("--out", type=click.Path(), required=True,
              help="Run directory (writes cvae.safetensors + cvae.json, and the classifier it was trained against).")
@click.option("--epochs", default=10.0, show_default=True, help="Passes over the data (fractional with --adversarial).")
@config_option(FitConfig, "batch_size", type=click.IntRange(min=1))
@config_option(FitConfig, "lr")
@config_option(FitConfig, "seed")
@config_option(FitConfig, "precision", type=click.Choice(PRECISIONS), help=PRECISION_HELP)
@click.option("--val-size", default="auto", show_default=True,
              help="Held-out validation count or fraction; auto: 5000 or a tenth of the data, whichever is less.")
@click.option("--latent-dim", type=int, help="Latent size (default: the dataset preset's).")
@click.option("--channels", help="Encoder/decoder conv widths, e.g. 16,32 (default: the preset's).")
@click.option("--hidden", type=click.IntRange(min=1), help="Fully connected layer's width (default: the preset's).")
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
@config_option(PipelineAdversarial, "eps", "--adv-eps", help="L-infinity budget of the training attacks.")
@config_option(PipelineAdversarial, "steps", "--adv-steps", help="PGD steps of the training attacks.")
@config_option(PipelineAdversarial, "attacks", "--adv-attacks",
               help="Training attacks, each on its slice of the batch: selection, targeted (the selection margin toward "
                    "the runner-up class), full, bpda.")
@config_option(PipelineAdversarial, "sel_weight", "--adv-sel-weight", help="Selection CE on attacked inputs.")
@config_option(PipelineAdversarial, "pipe_weight", "--adv-pipe-weight",
               help="Target CE on the true class's reconstruction of attacked inputs.")
@config_option(PipelineAdversarial, "smooth_weight", "--adv-smooth-weight",
               help="TRADES-style smoothness of the decision rule: KL(selection softmax, clean || attacked).")
@config_option(PipelineAdversarial, "clf_mix", "--adv-clf-mix", help="Classifier loss: weight of the clean term.")
@config_option(PipelineAdversarial, "prior_weight", "--adv-prior-weight",
               help="mu of a robust prior in the purifier's rule (score_c - mu * log p_prior(c | x)), attacked and "
                    "trained through; needs --prior.")
@click.option("--prior", type=click.Path(),
              help="The robust prior's classifier checkpoint (usually adversarially trained), copied to OUT/prior.")
@config_option(PipelineAdversarial, "val_eps", "--adv-val-eps", type=float,
               help="L-infinity budget of the validation check [default: --adv-eps].")
@config_option(PipelineAdversarial, "combine", "--adv-combine", type=click.Choice(COMBINE),
               help="split: one slice of each batch per training attack; worst: every image under every attack, "
                    "its worst result kept (costs as many attacks per image as --adv-attacks names).")
@resume_options
@click.option("--quiet", is_flag=True)
def train_cmd(data, classifier_source, out, epochs, batch_size, lr, seed, precision, val_size, latent_dim, channels,
              hidden, conditioning, arch, beta, ce_weight, sel_weight, sel_tau, sel_negatives, tc_weight, ks_weight,
              cv_weight, couple_alpha, adversarial, init_dir, target, adv_eps, adv_steps, adv_attacks,
              adv_sel_weight, adv_pipe_weight, adv_smooth_weight, adv_clf_mix, adv_prior_weight, prior, adv_val_eps,
              adv_combine, resume, save_every, quiet):
    """Train the class-conditional VAE with the PuVAE loss (recon + beta*KL + ce_weight*CE [+ sel_weight*SEL])
    in front of a classifier (yours: --classifier-factory or --classifier-onnx), or another design of the
    purifier family (--design), or, with --adversarial, purifier and/or target classifier against attacks on the
    whole pipeline. A call of ``purifier.fit``."""
    from .. import designs
    from ..classifier_io import ClassifierError
    from ..fitting import FitError, fit, n_val
    from ..losses import PuVAELoss
    from ..resume import StateError

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
    model = {k: v for k, v in (("latent_dim", latent_dim), ("channels", channels), ("hidden", hidden),
                                ("conditioning", conditioning))
             if v is not None}
    if epochs <= 0 or (adversarial == "none" and epochs != int(epochs)):
        raise click.BadParameter(f"expected a positive whole number of epochs (fractions only with --adversarial), "
                                 f"got {epochs:g}", param_hint="--epochs")
    if init_dir and adversarial == "none":
        raise click.UsageError("--init is for --adversarial runs (fine-tuning); plain training starts fresh")
    if init_dir and model:
        raise click.UsageError("--init takes the architecture of its CVAE; drop --latent-dim/--channels/--hidden/"
                               "--conditioning")
    if (adv_prior_weight or prior) and (adversarial == "none" or not adv_prior_weight or not prior):
        raise click.UsageError(f"a robust prior trains with --adversarial, --adv-prior-weight > 0 and --prior "
                               f"together; got --adversarial {adversarial}, --adv-prior-weight {adv_prior_weight}, "
                               f"--prior {prior}")
    try:
        adv = None
        if adversarial != "none":
            adv = PipelineAdversarial(mode=adversarial, eps=adv_eps, steps=adv_steps,
                                      attacks=tuple(a.strip() for a in adv_attacks.split(",") if a.strip()),
                                      sel_weight=adv_sel_weight, pipe_weight=adv_pipe_weight,
                                      smooth_weight=adv_smooth_weight, clf_mix=adv_clf_mix,
                                      val_eps=adv_val_eps, combine=adv_combine, prior_weight=adv_prior_weight)
        config = FitConfig(epochs=0 if adv else int(epochs), batch_size=batch_size, lr=lr, seed=seed,
                           precision=precision, val_size=_val_size(val_size), design=arch, loss=loss, model=model,
                           adversarial=adv, adversarial_epochs=epochs if adv else 0.0)
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
                      resume=resume, save_every=save_every, prior=prior)
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


@main.command("attach-prior")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--prior", required=True, type=click.Path(),
              help="A project classifier checkpoint (usually adversarially trained) whose log-posterior on the raw "
                   "input joins the purifier's rule.")
@click.option("--weight", required=True, type=float,
              help="mu in score_c - mu * log p_prior(c | x), in the units of the rule's scores (per-pixel MSE).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The new model directory (must not exist).")
def attach_prior_cmd(model_dir, prior, weight, out):
    """A copy of MODEL_DIR whose purifier also consults a robust prior classifier; the CVAE and the target
    classifier are unchanged, the rejection threshold is recalibrated under the new rule. Export it with
    ``purifier export OUT``.

    Example: purifier attach-prior models/middleware/cvae-alone-smooth200-tau3 --prior
    models/baselines/pgd-at-converged --weight 0.001 --out runs/with-prior
    """
    from ..classifier_io import ClassifierError
    from ..designs import prior_record
    from ..fitting import FitError, attach_prior

    try:
        prior_record(prior)
    except FileNotFoundError as exc:
        raise click.BadParameter(f"{exc}: --prior must be a project classifier checkpoint", param_hint="--prior")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--prior")
    if not (Path(model_dir) / "cvae.json").is_file():
        raise click.BadParameter(f"{Path(model_dir) / 'cvae.json'} does not exist: MODEL_DIR must hold a trained "
                                 f"purifier", param_hint="MODEL_DIR")
    try:
        run = attach_prior(model_dir, prior, weight, out, command=shlex.join(["purifier", *sys.argv[1:]]))
    except (ClassifierError, FitError, OSError, ValueError) as exc:
        raise click.UsageError(str(exc)) from exc
    calib = run.record["meta"]["rejection_calibration"]
    click.echo(f"{run.path}: purifier {run.record['meta']['purifier']}, rejection threshold {calib['threshold']:.5f} "
               f"({calib['percentile']}th percentile of {calib['n']} validation images)")
