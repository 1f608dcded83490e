"""One training run of a purifier in front of a classifier, owned by the library: ``fit``.

    import purifier
    run = purifier.fit(my_classifier, "npz:data.npz", "runs/mine", purifier.FitConfig(epochs=5))
    robust = run.purified_classifier(grad="full")      # an nn.Module returning logits, for attack libraries

``fit`` takes any ``nn.Module`` that maps B x C x H x W images in [0, 1] to B x K logits, keeps it frozen (its
``state_digest`` is compared before and after), trains the CVAE with the PuVAE loss using it as the CE source,
then optionally trains against attacks on the whole pipeline (``FitConfig.adversarial``; mode ``cvae`` trains the
CVAE alone against attacks through the frozen classifier, the middleware setting), calibrates the rejection
threshold on the held-out validation split and writes a self-describing model directory:

    OUT/cvae.safetensors + cvae.json        the CVAE, with its design, loss, split, history, threshold, provenance
    OUT/classifier.json (+ its weights)     the classifier it was trained against (``classifier_io``)

Every command reads such a directory (``purifier evaluate --model``, ``purifier export``), whether the CLI or
Python wrote it: the CLI's ``train`` is a call of this function.
"""
from __future__ import annotations

import copy
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import checkpoint, designs
from .config import FitConfig  # noqa: F401  (re-exported)
from .classifier_io import ClassifierError, ClassifierSource, check_classifier, state_digest, write_into
from .data import Dataset, load_dataset, train_val_split
from .pipeline import purify
from .resume import Snapshots, data_digest

STATE_DIR = ".training-state"  # inside the model directory while a run is unfinished


class FitError(ValueError):
    """A run that cannot start as configured (the data, the model settings, the init model); nothing was trained."""


@dataclass(frozen=True)
class ModelDir:
    """A model directory that ``fit`` wrote (or any directory holding cvae.* and classifier.*)."""

    path: Path

    @property
    def record(self) -> dict:
        return checkpoint.read_record(self.path / "cvae")

    @property
    def threshold(self) -> float | None:
        calib = self.record["meta"].get("rejection_calibration")
        return calib["threshold"] if calib else None

    def purifier(self):
        return designs.load_purifier(self.path / "cvae")

    def classifier(self) -> nn.Module:
        return checkpoint.load(self.path / "classifier", expect="classifier")

    def purified_classifier(self, grad: str = "bpda"):
        from .pipeline import PurifiedClassifier

        return PurifiedClassifier(self.classifier(), self.purifier(), grad=grad).eval()


def as_dataset(data, class_names=None) -> Dataset:
    """A ``Dataset``, a spec (``fashion-mnist``, ``npz:PATH``, ``folder:PATH``) or ``(x, y)`` arrays -> train Dataset."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (str, Path)):
        return load_dataset(str(data), "train")
    if isinstance(data, (tuple, list)) and len(data) == 2:
        from .data import images_to_float

        x = images_to_float(np.asarray(data[0]))
        y = np.asarray(data[1])
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"labels must be a vector of {len(x)} integers, got {y.dtype} of shape {y.shape}")
        names = tuple(class_names) if class_names is not None else \
            tuple(str(k) for k in range(int(y.max(initial=0)) + 1))
        return Dataset("arrays", "train", x, y.astype(np.int64), names)
    raise TypeError(f"data must be a Dataset, a dataset spec or an (x, y) pair, got {type(data).__name__}")


def n_val(n: int, val_size="auto") -> int:
    """How many of n items the validation split holds (``val_size``: a count, a fraction or auto)."""
    if val_size == "auto":
        return min(5000, max(1, n // 10))
    count = int(round(val_size * n)) if isinstance(val_size, float) else int(val_size)
    if not 0 < count < n:
        raise ValueError(f"validation size {val_size!r} leaves no train or no validation data of {n} items")
    return count


def split(ds: Dataset, val_size="auto", seed: int = 0):
    """(train x, train y, validation x, validation y) as tensors, the split ``train_val_split`` makes."""
    tr, va = train_val_split(len(ds.y), n_val(len(ds.y), val_size), seed)
    t = torch.from_numpy
    return t(ds.x[tr]), t(ds.y[tr]), t(ds.x[va]), t(ds.y[va])


def provenance(command: str | None = None) -> dict:
    """Where a checkpoint came from: the command (or the Python call) and the software it ran on."""
    from .provenance import cpu_model

    return {"command": command or "purifier.fit (Python API)", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": cpu_model(), "python": platform.python_version()}


def rejection_threshold(purifier, x_val: torch.Tensor, percentile: float = 99.0, source: str = "") -> dict:
    """The ``percentile`` of the chosen class's score over clean held-out images: above it, an input is flagged."""
    best = purify(purifier, x_val)["scores"].min(1).values.numpy()
    return {"threshold": float(np.percentile(best, percentile)), "percentile": percentile, "n": len(best),
            "source": source}


def _as_module(classifier, what: str):
    """(module, ClassifierSource or None) from a module, a ClassifierSource or a checkpoint path."""
    if isinstance(classifier, nn.Module):
        return classifier, None
    if isinstance(classifier, ClassifierSource):
        return classifier.load(), classifier
    if isinstance(classifier, (str, Path)):
        from .classifier_io import source_of

        src = source_of(classifier)
        return src.load(), src
    raise TypeError(f"{what} must be an nn.Module, a ClassifierSource or a checkpoint path, "
                    f"got {type(classifier).__name__}")


def fit(classifier, data, out, config: FitConfig = FitConfig(), *, target=None, init=None,
        classifier_source: ClassifierSource | None = None, target_source: ClassifierSource | None = None,
        class_names=None, command: str | None = None, on_step=None, resume: bool = False,
        save_every: int = 200, prior=None) -> ModelDir:
    """Train a purifier for ``classifier`` on ``data`` and write the model directory ``out``; returns it.

    classifier: the frozen CE source (an ``nn.Module`` B x C x H x W in [0, 1] -> B x K logits, a
        ``ClassifierSource``, or a checkpoint path). Its weights never change (checked by ``state_digest``).
    data: a ``Dataset``, a dataset spec (``fashion-mnist``, ``npz:PATH``, ``folder:PATH``) or ``(x, y)`` arrays
        (``class_names`` names their classes); a validation split is held out by ``config.val_size`` and seed.
    target: the classifier the pipeline feeds in the adversarial stage (default: ``classifier``); modes other
        than ``cvae`` train it (a copy when it is the source), and OUT/classifier holds the trained one.
    init: a model directory whose CVAE to start from (instead of a fresh one from the dataset preset).
    classifier_source / target_source: how to record a module given as an ``nn.Module`` (a plain module is
        recorded by its class only, and OUT/classifier is then not written: pass a source to get a complete
        directory). ``command``: the command line recorded as provenance. ``on_step(epoch, step, steps, stats)``.
    resume / save_every: each stage saves its full training state to OUT/.training-state/STAGE.safetensors every
        ``save_every`` steps; with ``resume`` a run continues from there (settings and data must match) and ends
        with the weights an uninterrupted run would have. The state is removed once the directory is written.
    prior: a project classifier checkpoint (usually adversarially trained), the robust prior of an adversarial
        stage with ``prior_weight`` > 0: the stage attacks and trains the purifier whose rule is score_c - mu *
        log p_prior(c | x), and the directory holds it as OUT/prior (``attach_prior`` adds one without training).
    """
    from .adversarial import train_pipeline_adversarial
    from .losses import PuVAELoss
    from .train import TrainConfig, seed_everything, train_cvae

    start_all = time.perf_counter()
    source, src_ref = _as_module(classifier, "classifier")
    src_ref = classifier_source or src_ref
    ds = as_dataset(data, class_names)
    check_classifier(source, ds.image_shape, ds.num_classes, "the classifier")
    design = designs.get(config.design)
    adv = config.adversarial
    try:
        x, y, xv, yv = split(ds, config.val_size, config.seed)
        loss = PuVAELoss(**{**design.loss, **config.loss, "tc_dataset_size": len(x)})
    except ValueError as exc:
        raise FitError(str(exc)) from exc
    digest_before = state_digest(source)
    weight = adv.prior_weight if adv is not None else 0.0
    if bool(weight) != (prior is not None):
        raise FitError(f"a robust prior needs both the prior classifier (prior=, --prior) and an adversarial stage "
                       f"with prior_weight > 0; got prior={prior!r}, prior_weight={weight}")
    prior_module = prior_stem = None
    if prior is not None:
        if design.purifier.get("kind", "puvae") != "puvae":
            raise FitError(f"design {design.name}: the robust prior is an option of PuVAE's one-pass purifier")
        prior_stem, prior_module = _load_prior(prior, ds.image_shape, ds.num_classes)

    seed_everything(config.seed)
    if init is not None:
        if config.model:
            raise FitError(f"init takes the architecture of its CVAE; drop the model overrides {config.model}")
        cvae = checkpoint.load(Path(init) / "cvae", expect="cvae")
        if tuple(cvae.cfg.image_shape) != ds.image_shape or cvae.cfg.num_classes != ds.num_classes:
            raise FitError(f"init CVAE {init} expects {cvae.cfg.image_shape} x {cvae.cfg.num_classes} classes, "
                           f"the data is {ds.image_shape} x {ds.num_classes}")
    else:
        try:
            cvae = designs.build_model(design, ds.name, ds.image_shape, ds.num_classes, **config.model)
        except ValueError as exc:
            raise FitError(f"design {design.name}: {exc}") from exc

    meta = {"dataset": ds.name, "class_names": list(ds.class_names), "loss": loss.to_dict(),
            "design": design.name, "fit": config.to_dict(),
            "purifier": {**design.purifier, "prior_weight": weight} if weight else design.purifier,
            "classifier_source": src_ref.to_dict() if src_ref else {"kind": "module", "class": type(source).__name__},
            "source": _name(src_ref, source), "source_sha256": src_ref.sha256() if src_ref else digest_before,
            "n_train": len(x), "n_val": len(xv), **provenance(command)}
    if prior_stem is not None:
        meta["prior"] = {"from": str(prior), "sha256": checkpoint.read_record(prior_stem)["weights_sha256"],
                         "weight": weight}
    state_dir = Path(out) / STATE_DIR
    if state_dir.exists() and not resume:
        raise FitError(f"{out} holds the saved state of an unfinished run ({state_dir}); resume it (resume=True, "
                       f"--resume) or delete that folder to start afresh")
    fingerprint = {"fit": config.to_dict(), "data": data_digest(x, y, xv, yv), "classifier": digest_before,
                   "init": checkpoint.read_record(Path(init) / "cvae")["weights_sha256"] if init else None}
    if prior_stem is not None:
        fingerprint["prior"] = meta["prior"]["sha256"]

    def snapshots(stage: str) -> Snapshots:
        return Snapshots(state_dir / f"{stage}.safetensors", save_every, resume, {**fingerprint, "stage": stage})

    stages = {}
    if config.epochs:
        cfg = TrainConfig(epochs=int(config.epochs), batch_size=config.batch_size, lr=config.lr, seed=config.seed,
                          precision=config.precision)
        snaps = snapshots("puvae")
        history = train_cvae(cvae, source, x, y, xv, yv, cfg, loss, on_step, snaps)
        stages["puvae"] = {"train": cfg.to_dict(), "history": history, "train_seconds": snaps.seconds,
                           "resumed_at_step": snaps.resumed_at}
        meta.update(train=cfg.to_dict(), history=history, train_seconds=stages["puvae"]["train_seconds"],
                    resumed_at_step=snaps.resumed_at, val_argmin_acc=history[-1]["val_argmin_acc"])

    tgt, tgt_ref = source, src_ref
    if adv is not None:
        if target is not None:
            tgt, ref = _as_module(target, "target")
            tgt_ref = target_source or ref
            check_classifier(tgt, ds.image_shape, ds.num_classes, "the target classifier")
        if adv.trains_classifier and tgt is source:
            tgt = copy.deepcopy(source)  # the CE source stays frozen; the target that trains is a copy
        digest_target = state_digest(tgt)
        cfg = TrainConfig(epochs=config.adversarial_epochs, batch_size=config.batch_size, lr=config.lr,
                          seed=config.seed, precision=config.precision)
        snaps = snapshots("adversarial")
        history = train_pipeline_adversarial(cvae, tgt, source, x, y, xv, yv, cfg, loss, adv,
                                             config.adversarial_epochs, on_step, snaps, prior_module)
        stages["adversarial"] = {"train": cfg.to_dict(), "history": history, "train_seconds": snaps.seconds,
                                 "resumed_at_step": snaps.resumed_at}
        if "puvae" in stages:
            meta["pretrain"] = stages["puvae"]
        last = history[-1]
        meta.update(train=cfg.to_dict(), adversarial=adv.to_dict(), history=history,
                    train_seconds=stages["adversarial"]["train_seconds"], resumed_at_step=snaps.resumed_at,
                    val_purified_acc=last["val_purified_acc"],
                    val_adaptive=last["val_adaptive"], target=_name(tgt_ref, tgt),
                    target_sha256=tgt_ref.sha256() if tgt_ref else digest_target,
                    init=str(init) if init is not None else None,
                    init_sha256=checkpoint.read_record(Path(init) / "cvae")["weights_sha256"] if init else None)
        if not adv.trains_classifier and state_digest(tgt) != digest_target:
            raise RuntimeError("the frozen target classifier's weights changed during training")
    digest_after = state_digest(source)
    if digest_after != digest_before:
        raise RuntimeError(f"the classifier's weights changed during training ({digest_before[:12]} -> "
                           f"{digest_after[:12]}); it must stay frozen")
    meta["classifier_frozen"] = {"state_sha256_before": digest_before, "state_sha256_after": digest_after}

    purifier = designs.purifier_from_spec(cvae, meta["purifier"], prior=prior_module).eval()
    meta["rejection_calibration"] = rejection_threshold(
        purifier, xv, config.percentile, f"{ds.name} validation split ({len(xv)} images, seed {config.seed})")
    meta["fit_seconds"] = time.perf_counter() - start_all  # this sitting; train_seconds spans every sitting

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tgt_ref is not None:
        trained = adv is not None and (adv.trains_classifier or tgt_ref.kind == "checkpoint")
        write_into(out, tgt_ref, tgt, {**meta, "trained": bool(adv and adv.trains_classifier)} if trained else None,
                   trained=trained)
    elif adv is not None and adv.trains_classifier:
        raise ClassifierError("a trained target given as a plain nn.Module cannot be written into the model "
                              "directory; pass target_source (a ClassifierSource) to record it")
    if prior_stem is not None:
        copy_prior(prior_stem, out)
    checkpoint.save(cvae, out / "cvae", meta)
    shutil.rmtree(state_dir, ignore_errors=True)
    return ModelDir(out)


def copy_prior(prior_stem: Path, out: Path) -> None:
    """Copy the prior classifier checkpoint ``prior_stem`` (.json + .safetensors) to OUT/prior, each file atomically."""
    from serve.files import atomic_write

    for suffix in (".json", ".safetensors"):
        src = checkpoint.file_of(prior_stem, suffix)
        atomic_write(out / f"prior{suffix}", lambda tmp, src=src: shutil.copyfile(src, tmp))


def _load_prior(prior, image_shape, num_classes) -> tuple[str, nn.Module]:
    """A robust prior's checkpoint stem and its classifier in eval mode; ``FitError`` naming ``prior`` unless it is
    a project classifier checkpoint that takes the data's images and gives its K classes."""
    stem = checkpoint.stem_of(prior)
    try:
        designs.prior_record(stem)
    except (FileNotFoundError, ValueError) as exc:
        raise FitError(f"prior {prior}: {exc}") from None
    module = checkpoint.load(stem, expect="classifier").eval()
    check_classifier(module, image_shape, num_classes, f"the prior {prior}")
    return stem, module


def attach_prior(model, prior, weight: float, out, *, command: str | None = None) -> ModelDir:
    """A copy of the model directory ``model`` whose purifier also consults ``prior``, a project classifier
    checkpoint (usually an adversarially trained one): score_c - weight * log p_prior(c | x) (``Purifier``'s
    robust prior; ``weight`` in the units of the rule's scores, per-pixel MSE under PuVAE's rule).

    The CVAE and the target classifier are copied with their weights unchanged, the prior's checkpoint is copied
    to OUT/prior, and the CVAE's record gets the purifier spec with ``prior_weight``, the prior's sha256 (and under
    ``replaces`` the record of the prior ``model`` had, the one a CVAE trained through a prior was trained with) and
    a rejection threshold recalibrated under the new rule on the model's own validation split. ``out`` must not
    exist; the directory appears whole or not at all.
    """
    src, out = ModelDir(Path(model)), Path(out)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
        raise ValueError(f"weight must be a finite number > 0, got {weight!r}")
    if out.exists():
        raise FileExistsError(f"{out} exists; attach_prior writes a new model directory")
    meta = copy.deepcopy(src.record["meta"])
    cvae = checkpoint.load(src.path / "cvae", expect="cvae").eval()
    prior_stem, prior_module = _load_prior(prior, cvae.cfg.image_shape, cvae.cfg.num_classes)
    spec = {**(meta.get("purifier") or {"selection": "mse"}), "prior_weight": weight}
    purifier = designs.purifier_from_spec(cvae, spec, prior=prior_module).eval()  # checks the weight
    if not {"dataset", "n_val", "train"} <= set(meta) or meta["dataset"] == "arrays":
        raise FitError(f"{src.path}: the CVAE's record names no dataset and validation split to recalibrate the "
                       f"rejection threshold on")
    _, _, xv, _ = split(load_dataset(meta["dataset"], "train"), meta["n_val"], meta["train"]["seed"])
    percentile = (meta.get("rejection_calibration") or {}).get("percentile", 99.0)
    meta.update(purifier=purifier.spec, prior={
        "from": str(prior), "sha256": checkpoint.read_record(prior_stem)["weights_sha256"], "weight": weight,
        "from_model": str(src.path), "attached": provenance(command or "purifier.attach_prior (Python API)"),
        **({"replaces": meta["prior"]} if meta.get("prior") else {})},
        rejection_calibration=rejection_threshold(
            purifier, xv, percentile, f"{meta['dataset']} validation split ({len(xv)} images, seed "
                                      f"{meta['train']['seed']}), under the rule with the prior"))
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for f in src.path.iterdir():
            if f.is_file() and f.name.startswith("classifier"):
                shutil.copyfile(f, tmp / f.name)
        copy_prior(prior_stem, tmp)
        checkpoint.save(cvae, tmp / "cvae", meta)
        if out.exists():
            raise FileExistsError(f"{out} appeared while attach_prior wrote it; left as it is")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ModelDir(out)


def _name(ref: ClassifierSource | None, module: nn.Module) -> str:
    if ref is None:
        return f"<{type(module).__name__} given in Python>"
    return {"checkpoint": ref.path, "onnx": ref.path, "factory": f"{ref.factory} + {ref.weights}"}[ref.kind]


__all__ = ["fit", "attach_prior", "FitConfig", "FitError", "ModelDir", "as_dataset", "split", "n_val", "rejection_threshold", "provenance"]
