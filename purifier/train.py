"""Training loops. The loop knows nothing of the model: it takes a step function that returns named
losses, and reports progress through callbacks (the CLI draws the progress bar; this module prints nothing).
"""
from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .losses import PuVAELoss
from .models.classifiers import Classifier
from .models.cvae import CVAE
from .pipeline import Purifier, purify
from .config import AdversarialTraining, TrainConfig  # noqa: F401  (re-exported)
from .resume import Checkpointer, Snapshots

# on_step(epoch, step, steps_per_epoch, stats)
StepCallback = Callable[[int, int, int, dict], None]


def step_precision(precision: str):
    """The context a training step's forward passes run in: none for fp32; ``torch.autocast`` to bfloat16 on the
    CPU for bf16 (matmuls and convolutions in bf16, losses and reductions in fp32; backward runs outside it). bf16
    pays only where the CPU computes it natively (AVX512-BF16, AMX: ``native_bf16()``); elsewhere it is emulated
    and about ten times slower (results/train_speed.md)."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (the avx512_bf16 or amx_bf16 flag of /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def augment(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random horizontal flip and translation (zero padding) per image: x B x C x H x W."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    padded = F.pad(x, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


def fit(model: nn.Module, step: Callable[[torch.Tensor, torch.Tensor], dict], x: torch.Tensor, y: torch.Tensor,
        cfg: TrainConfig, on_step: StepCallback | None = None,
        on_epoch: Callable[[int, dict, list], dict | None] | None = None, snapshots: Snapshots | None = None,
        generators: dict[str, torch.Generator] | None = None,
        modules: dict[str, nn.Module] | None = None) -> list[dict]:
    """Minimise ``step(xb, yb)["loss"]`` over (x, y) with Adam; returns one dict of mean stats per epoch.

    ``on_epoch(epoch, record, history)`` (history: the records before this one) may return extra stats (validation
    metrics) to merge into that epoch's record; a record with ``stopped_early`` true ends the run there (early
    stopping). With ``snapshots`` the loop saves its full state every ``snapshots.every`` steps and at each epoch's
    end, and continues from the saved state when ``snapshots.resume`` is set; ``generators`` (the ones ``step`` draws
    from) and ``modules`` (others ``on_epoch`` changes, such as a best-so-far copy) are saved with it.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    steps_per_epoch = (len(x) + cfg.batch_size - 1) // cfg.batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * steps_per_epoch) if cfg.lr_decay else None
    gen = torch.Generator().manual_seed(cfg.seed)
    ckpt = Checkpointer(snapshots, {"model": model, **(modules or {})}, {"adam": opt}, {"adam": sched},
                        {"shuffle": gen, **(generators or {})})
    loop = ckpt.restore() or {"step": 0, "history": [], "sums": {}, "perm": None, "epoch_seconds": 0.0,
                              "seconds": 0.0}
    history, done, stopped = loop["history"], loop["step"], loop.get("stopped", False)
    sitting = time.perf_counter()
    while done < cfg.epochs * steps_per_epoch and not stopped:
        epoch, first = divmod(done, steps_per_epoch)
        model.train()
        start = time.perf_counter()
        if first == 0:
            perm, sums, before = torch.randperm(len(x), generator=gen), {}, 0.0
        else:
            perm, sums, before = loop["perm"], loop["sums"], loop["epoch_seconds"]
        for i in range(first, steps_per_epoch):
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            with step_precision(cfg.precision):
                terms = step(x[idx], y[idx])
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            if sched is not None:
                sched.step()
            stats = {k: float(v.detach()) for k, v in terms.items()}
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            done += 1
            if on_step is not None:
                on_step(epoch, i, steps_per_epoch, stats)
            if ckpt.due(done) and i < steps_per_epoch - 1:
                ckpt.save({"step": done, "history": history, "sums": sums, "perm": perm,
                           "epoch_seconds": before + time.perf_counter() - start,
                           "seconds": loop["seconds"] + time.perf_counter() - sitting})
        record = {"epoch": epoch + 1, **{k: v / steps_per_epoch for k, v in sums.items()},
                  "seconds": before + time.perf_counter() - start}
        model.eval()
        if on_epoch is not None:
            record.update(on_epoch(epoch, record, history) or {})
        history.append(record)
        stopped = bool(record.get("stopped_early"))
        ckpt.save({"step": done, "history": history, "sums": {}, "perm": None, "epoch_seconds": 0.0,
                   "seconds": loop["seconds"] + time.perf_counter() - sitting, "stopped": stopped})
    if snapshots is not None:
        snapshots.seconds = loop["seconds"] + time.perf_counter() - sitting
    model.eval()
    return history


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Argmax predictions of a classifier in eval mode."""
    model.eval()
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """One signed-gradient step of size eps on the cross-entropy, clipped to [0, 1] (no random start)."""
    x = x.detach().requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return (x + eps * grad.sign()).clamp(0, 1).detach()


def trades_attack(model: nn.Module, x: torch.Tensor, eps: float, steps: int,
                  generator: torch.Generator) -> torch.Tensor:
    """TRADES' inner maximisation: KL(f(x) || f(x')) over the L-infinity ball, from x + 0.001 * N(0, 1)."""
    with torch.no_grad():
        p_clean = F.softmax(model(x), 1)
    alpha = 2.5 * eps / steps
    adv = (x + 0.001 * torch.randn(x.shape, generator=generator)).clamp(0, 1)
    for _ in range(steps):
        adv.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(adv), 1), p_clean, reduction="sum")
        grad, = torch.autograd.grad(kl, adv)
        adv = torch.min(torch.max(adv.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return adv.detach()


def robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
                    batch_size: int = 500) -> float:
    """Accuracy under PGD-``steps`` at ``eps`` (best iterate, seed 0): the validation check of adversarial training."""
    from .attacks import PGD

    model.eval()
    pgd = PGD(eps=eps, steps=steps, seed=0)
    right = 0
    for i in range(0, len(x), batch_size):
        adv = pgd(model, x[i:i + batch_size], y[i:i + batch_size])
        right += int((predict(model, adv) == y[i:i + batch_size]).sum())
    return right / max(1, len(x))


def kept_epoch(history: list[dict]) -> dict:
    """The epoch whose weights ``train_classifier`` keeps: the best validation robust epoch where it tracked one,
    else the last; and its record fields (``val_acc``, and ``val_robust`` + ``best_epoch`` where tracked)."""
    final = history[history[-1]["best_epoch"] - 1] if "best_epoch" in history[-1] else history[-1]
    return {"val_acc": final["val_acc"],
            **({"val_robust": final["val_robust"], "best_epoch": final["epoch"]} if "val_robust" in final else {})}


def train_classifier(model: Classifier, x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                     cfg: TrainConfig, on_step: StepCallback | None = None,
                     adversarial: AdversarialTraining | None = None,
                     snapshots: Snapshots | None = None) -> list[dict]:
    """Cross-entropy training, plain or adversarial; validation accuracy recorded each epoch (and, adversarially,
    validation robust accuracy, keeping the best epoch's weights)."""
    from .attacks import PGD

    seed_everything(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    model.to(memory_format=torch.channels_last)  # oneDNN convolutions run faster in NHWC on CPU
    pgd = PGD(eps=adversarial.eps, steps=adversarial.steps, best_iterate=False) if adversarial else None
    best = copy.deepcopy(model) if adversarial else None

    def attacked(xb, yb):
        model.eval()
        try:
            if adversarial.kind == "pgd":
                return pgd(model, xb, yb, generator=gen)
            if adversarial.kind == "trades":
                return trades_attack(model, xb, adversarial.eps, adversarial.steps, gen)
            return fgsm(model, xb, yb, adversarial.eps)
        finally:
            model.train()

    def step(xb, yb):
        xb = augment(xb, gen) if cfg.augment else xb
        if adversarial is None:
            logits = model(xb)
            return {"loss": F.cross_entropy(logits, yb), "acc": (logits.argmax(1) == yb).float().mean()}
        xa = attacked(xb, yb)
        if adversarial.kind == "pgd":
            logits = model(xa)
            return {"loss": F.cross_entropy(logits, yb), "adv_acc": (logits.argmax(1) == yb).float().mean()}
        clean, adv = model(torch.cat([xb, xa])).chunk(2)
        if adversarial.kind == "trades":
            kl = F.kl_div(F.log_softmax(adv, 1), F.softmax(clean, 1), reduction="batchmean")
            loss = F.cross_entropy(clean, yb) + adversarial.beta * kl
            return {"loss": loss, "kl": kl, "acc": (clean.argmax(1) == yb).float().mean(),
                    "adv_acc": (adv.argmax(1) == yb).float().mean()}
        loss = adversarial.mix * F.cross_entropy(clean, yb) + (1 - adversarial.mix) * F.cross_entropy(adv, yb)
        return {"loss": loss, "acc": (clean.argmax(1) == yb).float().mean(),
                "adv_acc": (adv.argmax(1) == yb).float().mean()}

    def on_epoch(epoch, record, history):
        stats = {"val_acc": float((predict(model, x_val) == y_val).float().mean())}
        if adversarial is None or not adversarial.val_n:
            return stats
        stats["val_robust"] = robust_accuracy(model, x_val[:adversarial.val_n], y_val[:adversarial.val_n],
                                              adversarial.eps, adversarial.val_steps)
        earlier = [h["val_robust"] for h in history]
        if not earlier or stats["val_robust"] > max(earlier):
            best.load_state_dict(model.state_dict())
        best_epoch = 1 + max(range(len(earlier) + 1), key=lambda k: ([*earlier, stats["val_robust"]][k], -k))
        stats["best_epoch"] = best_epoch
        if adversarial.patience is not None and epoch + 1 - best_epoch >= adversarial.patience:
            stats["stopped_early"] = True
        return stats

    try:
        history = fit(model, step, x, y, cfg, on_step, on_epoch, snapshots,
                      generators={"attack": gen}, modules={"best": best} if best is not None else None)
        if best is not None and adversarial.val_n:
            model.load_state_dict(best.state_dict())
        return history
    finally:
        model.to(memory_format=torch.contiguous_format)


def train_vae(vae: nn.Module, x: torch.Tensor, x_val: torch.Tensor, cfg: TrainConfig,
              on_step: StepCallback | None = None) -> list[dict]:
    """Train the Defense-GAN-style baseline's unconditional VAE on the negative ELBO; validation ELBO per epoch."""
    from .models.defensegan import vae_loss

    seed_everything(cfg.seed)

    def on_epoch(epoch, record, history):
        with torch.no_grad():
            return {"val_loss": float(sum(vae_loss(vae, x_val[i:i + 1000])["loss"] * len(x_val[i:i + 1000])
                                          for i in range(0, len(x_val), 1000)) / len(x_val))}

    return fit(vae, lambda xb, yb: vae_loss(vae, xb), x, torch.zeros(len(x), dtype=torch.long), cfg, on_step,
               on_epoch)


def train_cvae(cvae: CVAE, source: nn.Module | None, x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor,
               y_val: torch.Tensor, cfg: TrainConfig, loss: PuVAELoss,
               on_step: StepCallback | None = None, snapshots: Snapshots | None = None) -> list[dict]:
    """Train the CVAE with the PuVAE loss against a frozen source classifier.

    Records, per epoch, the validation rate at which the MSE rule selects the true class.
    """
    seed_everything(cfg.seed)
    if source is not None:
        source.eval().to(memory_format=torch.channels_last)
        for p in source.parameters():
            p.requires_grad_(False)

    def on_epoch(epoch, record, history):
        chosen = purify(Purifier(cvae, "mse"), x_val)["chosen_class"]
        return {"val_argmin_acc": float((chosen == y_val).float().mean())}

    try:
        return fit(cvae, lambda xb, yb: loss(cvae, source, xb, yb), x, y, cfg, on_step, on_epoch, snapshots)
    finally:
        if source is not None:
            source.to(memory_format=torch.contiguous_format)
