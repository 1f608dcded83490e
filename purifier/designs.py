"""The purifier family of the source papers, each a named design: the model it trains, the loss terms it adds
to PuVAE's, and the purifier (decision rule, inference procedure) it runs. ``purifier train --arch NAME`` trains
one; the model's checkpoint records the purifier spec, so ``load_purifier`` rebuilds the same purifier anywhere.

Designs that only change inference (the likelihood rules, analysis by synthesis) train exactly as PuVAE does:
with the same seed their weights are PuVAE's, bit for bit. The registry imports no torch (the CLI lists it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path


@dataclass(frozen=True)
class Design:
    name: str
    summary: str
    source: str                                     # the paper it comes from
    model: str = "cvae"                             # checkpoint kind: cvae | hcvae
    loss: dict = field(default_factory=dict)        # PuVAELoss overrides
    purifier: dict = field(default_factory=lambda: {"selection": "mse"})
    model_overrides: dict = field(default_factory=dict)

    @property
    def inference_only(self) -> bool:
        """Trains exactly as PuVAE (same model, no extra loss terms): only the purifier differs."""
        return self.model == "cvae" and not self.loss and not self.model_overrides


DESIGNS = {d.name: d for d in [
    Design("puvae", "class-conditional VAE, reconstruction closest to the input by MSE", "Hwang et al. 2019"),
    Design("likelihood", "PuVAE's model, class chosen by the negative ELBO at z = mu (Bernoulli NLL + KL)",
           "Hwang et al. 2019; Schott et al. 2019", purifier={"selection": "likelihood"}),
    Design("iwae", "PuVAE's model, class chosen by an importance-weighted bound, 8 fixed noise draws",
           "Burda et al. 2016", purifier={"selection": "iwae", "samples": 8, "noise_seed": 0}),
    Design("abs", "analysis by synthesis: 10 gradient steps on each class's latent at inference, MSE rule",
           "Schott et al. 2019", purifier={"kind": "abs", "selection": "mse", "steps": 10, "lr": 0.002}),
    Design("ks-cov", "deterministic codes regularised by KS and covariance losses instead of the KL",
           "Saseendran et al.", loss={"beta": 0.0, "ks_weight": 1.0, "cv_weight": 1.0}),
    Design("ks-cov-coupled", "KS/covariance with two-point coupling to latent-attack codes, alpha 0.95",
           "Saseendran et al.", loss={"beta": 0.0, "ks_weight": 1.0, "cv_weight": 1.0, "couple_alpha": 0.95}),
    Design("beta-tc", "beta-TCVAE: total correlation of q(z) penalised with beta 10", "Chen et al. 2018; Willetts et al.",
           loss={"tc_weight": 9.0}),
    Design("seatbelt", "3-block hierarchy, top block beta-TC (beta 10), the decoder reads every block",
           "Willetts et al. (Seatbelt-VAE)", model="hcvae", loss={"tc_weight": 9.0},
           model_overrides={"skip": True, "k": 3}),
    Design("hcvae", "3-block hierarchical CVAE, a label embedding per block; purify from the first posterior "
                    "and the conditional priors (temperature 0)", "conditional VDVAE", model="hcvae",
           model_overrides={"k": 1}),
]}

# Fashion-MNIST preset of the hierarchical model: the flat CVAE's trunk and width, three blocks of 8
HCVAE_PRESETS = {"fashion-mnist": {"latent_dims": (8, 8, 8), "channels": (16, 32), "hidden": 256}}
HCVAE_PRESETS["mnist"] = HCVAE_PRESETS["fashion-mnist"]


def get(name: str) -> Design:
    if name not in DESIGNS:
        raise ValueError(f"unknown design {name!r}; choose from {sorted(DESIGNS)}")
    return DESIGNS[name]


def build_model(design: Design, dataset: str, image_shape, num_classes: int, **overrides):
    """A fresh model for ``design`` from the dataset's preset; ``overrides`` (e.g. latent_dim) on top."""
    from .models.cvae import CVAE, preset_for
    from .models.hcvae import HCVAE, HCVAEConfig

    settings = {**design.model_overrides, **overrides}
    if design.model == "cvae":
        return CVAE(preset_for(dataset, image_shape, num_classes, **settings))
    base = HCVAEConfig(**HCVAE_PRESETS.get(dataset, {}))
    if "latent_dim" in settings:  # one size for every block
        settings["latent_dims"] = (settings.pop("latent_dim"),) * len(base.latent_dims)
    conditioning = settings.pop("conditioning", "embedding")
    if conditioning != "embedding":
        raise ValueError(f"conditioning {conditioning!r}: the hierarchical model embeds the label in every block")
    return HCVAE(replace(base, image_shape=tuple(image_shape), num_classes=num_classes, **settings))


def purifier_from_spec(model, spec: dict | None = None, ranker=None, prior=None):
    """The purifier ``spec`` (a design's ``purifier`` dict, as stored in checkpoints) describes, around ``model``;
    ``ranker``: the classifier that picks the classes of a spec with ``candidates``, ``prior``: the classifier of a
    spec with ``prior_weight`` (see ``Purifier``)."""
    from .abs import LatentOptPurifier
    from .pipeline import Purifier

    spec = dict(spec or {"selection": "mse"})
    kind = spec.pop("kind", "puvae")
    if kind == "abs":
        for option in ("candidates", "prior_weight"):
            if spec.get(option):
                raise ValueError(f"{option}={spec[option]}: an option of PuVAE's one-pass purifier, not of analysis "
                                 f"by synthesis")
        return LatentOptPurifier(model, **spec)
    if kind != "puvae":
        raise ValueError(f"unknown purifier kind {kind!r} in spec; known: puvae, abs")
    return Purifier(model, **spec, ranker=ranker, prior=prior)


def prior_path(path: str | os.PathLike) -> Path:
    """Where a model checkpoint's prior classifier lives: the checkpoint ``prior`` beside it (``MODEL/prior`` for
    ``MODEL/cvae``)."""
    return Path(path).with_name("prior")


def prior_record(path: str | os.PathLike) -> dict:
    """The checkpoint record of a robust prior at ``path``, which must be a project classifier checkpoint (JSON +
    safetensors, ``purifier train-classifier``): ``FileNotFoundError`` or ``ValueError`` naming the path otherwise."""
    from . import checkpoint

    record = checkpoint.read_record(path)
    if record["kind"] != "classifier":
        raise ValueError(f"{path}: a robust prior must be a project classifier checkpoint (purifier "
                         f"train-classifier), got a {record['kind']!r} checkpoint")
    return record


def load_prior(path: str | os.PathLike, spec: dict | None, prior: str | os.PathLike | None = None):
    """The prior classifier a purifier ``spec`` with ``prior_weight`` needs, frozen in eval mode, from ``prior``
    (a classifier checkpoint path) or else the checkpoint ``prior`` beside the model at ``path``; None when the
    spec has no prior."""
    from . import checkpoint

    if not (spec or {}).get("prior_weight"):
        return None
    where = checkpoint.stem_of(prior if prior is not None else prior_path(path))
    try:
        prior_record(where)
    except FileNotFoundError:
        raise FileNotFoundError(f"purifier spec prior_weight={spec['prior_weight']} needs a prior classifier: "
                                f"no checkpoint at {checkpoint.file_of(where, '.json')}") from None
    module = checkpoint.load(where, expect="classifier").eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def load_purifier(path: str | os.PathLike, spec: dict | None = None, prior: str | os.PathLike | None = None):
    """Load a purifier model checkpoint and wrap it as its checkpoint says (``meta.purifier``; PuVAE's MSE rule
    for checkpoints from before designs), or as ``spec`` says. A spec with ``prior_weight`` loads its prior
    classifier from ``prior`` or the checkpoint ``prior`` beside the model. Eval mode."""
    from . import checkpoint

    model = checkpoint.load(path, expect="cvae")
    spec = spec if spec is not None else model.meta.get("purifier")
    return purifier_from_spec(model, spec, prior=load_prior(path, spec, prior)).eval()
