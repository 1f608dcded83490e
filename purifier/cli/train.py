"""``purifier train-classifier`` and ``purifier train-vae``: the reference classifiers and the Defense-GAN-style
baseline's VAE."""
from __future__ import annotations

import time
from pathlib import Path

import click

from ..config import PRECISIONS, AdversarialTraining, TrainConfig
from .common import DATA_HELP, PRECISION_HELP, _provenance, _split, _val_size, config_option, main, progress, resume_options


@main.command("train-classifier")
@click.option("--data", default="fashion-mnist", show_default=True, help=DATA_HELP)
@click.option("--arch", type=click.Choice(["a", "b"]), default="a", show_default=True,
              help="Classifier architecture: PuVAE paper's A (conv64-5x5 x2) or B (conv128-3x3, conv64-3x3).")
@click.option("--out", type=click.Path(), required=True, help="Checkpoint path (writes OUT.safetensors + OUT.json).")
@config_option(TrainConfig, "epochs", type=click.IntRange(min=1), help="Whole passes over the data.")
@config_option(TrainConfig, "batch_size", type=click.IntRange(min=1))
@config_option(TrainConfig, "lr")
@config_option(TrainConfig, "seed")
@click.option("--val-size", default="auto", show_default=True,
              help="Held-out validation count or fraction; auto: 5000 or a tenth of the data, whichever is less.")
@config_option(TrainConfig, "augment", "--augment/--no-augment", help="Random horizontal flips and 2-pixel shifts.")
@config_option(TrainConfig, "precision", type=click.Choice(PRECISIONS), help=PRECISION_HELP)
@click.option("--adversarial", type=click.Choice(["none", "pgd", "trades", "fgsm"]), default="none",
              show_default=True, help="pgd: Madry PGD adversarial training; trades: TRADES (Zhang et al. 2019); "
                                      "fgsm: Goodfellow's FGSM adversarial loss.")
@config_option(AdversarialTraining, "eps", "--adv-eps", help="L-infinity budget of the training attack.")
@config_option(AdversarialTraining, "steps", "--adv-steps", help="PGD steps (step size 2.5 * eps / steps).")
@config_option(AdversarialTraining, "mix", "--adv-mix", help="FGSM loss: weight of the clean term (alpha).")
@config_option(AdversarialTraining, "beta", "--adv-beta", help="TRADES: weight of the KL term.")
@config_option(AdversarialTraining, "val_n", "--val-robust-n", type=click.IntRange(min=0),
              help="Adversarial: validation images attacked (PGD-20) after each epoch; the best epoch's weights "
                   "are kept (0: off, the last epoch's).")
@click.option("--patience", type=click.IntRange(min=1),
              help="Adversarial: stop after this many epochs without a better validation robust accuracy.")
@resume_options
@click.option("--quiet", is_flag=True)
def train_classifier_cmd(data, arch, out, epochs, batch_size, lr, seed, val_size, augment, precision, adversarial,
                         adv_eps, adv_steps, adv_mix, adv_beta, val_robust_n, patience, resume, save_every, quiet):
    """Train a reference classifier (the source or the target), plainly or adversarially."""
    from .. import checkpoint
    from ..models.classifiers import Classifier, ClassifierConfig
    from ..resume import Snapshots, StateError, data_digest
    from ..train import kept_epoch, seed_everything, train_classifier

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
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, augment=augment, precision=precision)
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
    final = kept_epoch(history)
    meta = {"dataset": ds.name, "class_names": list(ds.class_names), "train": cfg.to_dict(),
            "adversarial": adv.to_dict() if adv else None,
            "n_train": len(x), "n_val": len(xv), "history": history, "train_seconds": snaps.seconds,
            "resumed_at_step": snaps.resumed_at, "epochs_run": len(history), **final,
            **_provenance()}
    stem = checkpoint.save(model, out, meta)
    state.unlink(missing_ok=True)
    robust = f", robust {final['val_robust']:.4f} (epoch {final['best_epoch']})" if "val_robust" in final else ""
    click.echo(f"classifier {arch}: val accuracy {final['val_acc']:.4f}{robust} in {snaps.seconds:.0f} s "
               f"-> {stem}.json")


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
    from .. import checkpoint
    from ..models.defensegan import VAE, VAEConfig
    from ..train import TrainConfig, seed_everything, train_vae

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
