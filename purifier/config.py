"""The settings of training runs, as frozen dataclasses, with no torch import: the command line builds its options
from them (``purifier.cli.common.config_option``) without loading torch, and the training modules re-export them."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from . import designs

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    lr_decay: bool = True  # cosine to zero over the run
    augment: bool = False  # classifiers: random horizontal flips and shifts of up to 2 pixels
    precision: str = "fp32"  # bf16: each step's forward passes under torch.autocast(bfloat16); validation in fp32

    def __post_init__(self):
        check_precision(self.precision)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AdversarialTraining:
    """Adversarial training of a classifier, the baselines of the benchmark protocol.

    ``pgd``:    Madry et al. 2018: train on the last iterate of PGD-L-infinity (``steps`` steps of
                2.5 * eps / steps from a uniform random start) instead of the clean batch.
    ``trades``: Zhang et al. 2019: CE(f(x), y) + beta * KL(f(x) || f(x')), x' the last iterate of ``steps``
                signed-gradient steps of 2.5 * eps / steps on that KL from x + 0.001 * N(0, 1).
    ``fgsm``:   Goodfellow et al. 2015's adversarial loss: mix * CE(x) + (1 - mix) * CE(x + eps * sign(grad)).
    Adversarial examples are made in eval mode (no dropout), from the model being trained.

    Validation: after each epoch, PGD-``val_steps`` (best iterate, fixed seed) at ``eps`` on the first ``val_n``
    validation images gives ``val_robust``; the weights of the epoch with the best ``val_robust`` are the ones
    kept (early stopping as in Rice et al. 2020), and ``patience`` epochs without a better one end the run.
    """

    kind: str = "pgd"
    eps: float = 0.1
    steps: int = 7
    mix: float = 0.5
    beta: float = 6.0
    val_n: int = 1000
    val_steps: int = 20
    patience: int | None = None

    def __post_init__(self):
        if self.kind not in ("pgd", "trades", "fgsm"):
            raise ValueError(f"adversarial training kind must be 'pgd', 'trades' or 'fgsm', got {self.kind!r}")
        if not 0 < self.eps <= 1:
            raise ValueError(f"adversarial eps must be in (0, 1], got {self.eps}")
        if self.steps < 1:
            raise ValueError(f"adversarial steps must be at least 1, got {self.steps}")
        if not 0 <= self.mix <= 1:
            raise ValueError(f"adversarial mix must be in [0, 1], got {self.mix}")
        if self.beta < 0:
            raise ValueError(f"TRADES beta must be >= 0, got {self.beta}")
        if self.val_n < 0 or self.val_steps < 1:
            raise ValueError(f"validation attack needs val_n >= 0 and val_steps >= 1, got {self.val_n}, "
                             f"{self.val_steps}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be at least 1 epoch, got {self.patience}")

    def to_dict(self) -> dict:
        return asdict(self)


MODES = ("cvae", "classifier", "alternating", "joint")
TRAIN_ATTACKS = ("selection", "targeted", "full", "bpda")
COMBINE = ("split", "worst")


@dataclass(frozen=True)
class PipelineAdversarial:
    mode: str = "joint"
    eps: float = 0.1
    steps: int = 3
    attacks: tuple = ("selection", "full")
    sel_weight: float = 100.0  # selection CE on the attacked batch (same temperature as the clean term)
    pipe_weight: float = 10.0  # target CE on the true class's reconstruction of the attacked batch
    # TRADES-style smoothness of the decision rule: KL(selection softmax on the clean batch || on the attacked batch)
    smooth_weight: float = 0.0
    clf_mix: float = 0.5  # classifier loss: clf_mix * clean + (1 - clf_mix) * adversarial
    val_n: int = 200  # validation images attacked at each validation record
    val_steps: int = 10
    val_every: float = 0.25  # epochs between validation records (and at the end)
    val_targeted: int = 1  # runner-up classes the validation check's targeted attacks aim at (0: untargeted only)
    val_eps: float | None = None  # L-infinity budget of the validation check (None: eps, the training budget)
    # split: one slice of the batch per attack; worst: every image under every attack, its worst result kept
    combine: str = "split"
    # mu of the purifier's robust prior (score_c - mu * log p_prior(c | x)) in the attacks and the selection terms;
    # 0: PuVAE's MSE rule. The prior classifier itself is given to ``fit`` (``prior=``).
    prior_weight: float = 0.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"adversarial mode must be one of {MODES}, got {self.mode!r}")
        bad = [a for a in self.attacks if a not in TRAIN_ATTACKS]
        if bad or not self.attacks:
            raise ValueError(f"training attacks must be a non-empty subset of {TRAIN_ATTACKS}, got {self.attacks!r}")
        if not 0 < self.eps <= 1:
            raise ValueError(f"adversarial eps must be in (0, 1], got {self.eps}")
        if self.val_eps is not None and not 0 < self.val_eps <= 1:
            raise ValueError(f"validation eps must be in (0, 1], got {self.val_eps}")
        if self.combine not in COMBINE:
            raise ValueError(f"combine must be one of {COMBINE}, got {self.combine!r}")
        if self.steps < 1:
            raise ValueError(f"adversarial steps must be at least 1, got {self.steps}")
        if self.smooth_weight < 0:
            raise ValueError(f"smooth_weight must be >= 0, got {self.smooth_weight}")
        if not 0 <= self.clf_mix <= 1:
            raise ValueError(f"clf_mix must be in [0, 1], got {self.clf_mix}")
        if not 0 <= self.prior_weight < float("inf"):
            raise ValueError(f"prior_weight must be a finite number >= 0, got {self.prior_weight}")

    @property
    def check_eps(self) -> float:
        return self.eps if self.val_eps is None else self.val_eps

    @property
    def trains_cvae(self) -> bool:
        return self.mode != "classifier"

    @property
    def trains_classifier(self) -> bool:
        return self.mode != "cvae"

    def to_dict(self) -> dict:
        # val_eps, combine and prior_weight are left out at their defaults, so the settings of runs saved before
        # they existed still compare equal
        d = {**asdict(self), "attacks": list(self.attacks)}
        default = {"val_eps": None, "combine": "split", "prior_weight": 0.0}
        return {k: v for k, v in d.items() if k not in default or v != default[k]}


@dataclass(frozen=True)
class FitConfig:
    """Settings of one run. ``epochs``: the PuVAE stage (whole passes; 0 to start from ``init`` alone);
    ``adversarial_epochs``: the adversarial stage after it (fractional), run when ``adversarial`` is set."""

    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    val_size: int | float | str = "auto"   # count, fraction, or auto: 5,000 or a tenth, whichever is less
    design: str = "puvae"
    loss: dict = field(default_factory=dict)    # PuVAELoss overrides of the design's (beta, ce_weight, ...)
    model: dict = field(default_factory=dict)   # CVAE overrides of the dataset preset (latent_dim, channels, ...)
    adversarial: object | None = None           # a PipelineAdversarial
    adversarial_epochs: float = 0.0
    percentile: float = 99.0                    # rejection threshold: this percentile of clean validation scores
    precision: str = "fp32"                     # training steps in fp32 or under bf16 autocast (TrainConfig)

    def __post_init__(self):
        if self.epochs < 0 or self.epochs != int(self.epochs):
            raise ValueError(f"epochs must be a whole number >= 0, got {self.epochs!r}")
        if self.adversarial is not None and self.adversarial_epochs <= 0:
            raise ValueError(f"adversarial training needs adversarial_epochs > 0, got {self.adversarial_epochs!r}")
        if self.adversarial is None and self.epochs == 0:
            raise ValueError("nothing to train: epochs is 0 and no adversarial stage is set")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile!r}")
        designs.get(self.design)
        check_precision(self.precision)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["adversarial"] = self.adversarial.to_dict() if self.adversarial is not None else None
        return d
