"""Adversarial training through the whole pipeline: purifier and target classifier trained against the adaptive
attacks they are measured with (``purifier train --adversarial MODE``).

Each batch is attacked with PGD (L-infinity, ``steps`` steps of 2.5 * eps / steps, random start, last iterate)
against the current pipeline, one slice of the batch per attack in ``attacks`` (``combine="split"``), or every
image by every attack, keeping its worst result (``combine="worst"``):

  ``selection``  the selection attack on the decision rule (``attacks.selection_objective``)
  ``targeted``   the selection margin toward one wrong class: the one whose reconstruction fits the clean input
                 best (the benchmark's ``targeted selection r1``; an untargeted margin can stall between classes)
  ``full``       cross-entropy through the chosen class's encoder and decoder (argmin held fixed)
  ``bpda``       cross-entropy with the purifier crossed as the identity

then the parts being trained take a step on the attacked batch:

  CVAE        PuVAE loss on the clean batch (recon + KL + CE of the frozen source + selection CE)
              + sel_weight * selection CE on the adversarial batch (the true class's reconstruction must fit
                the attacked input best)
              + pipe_weight * CE of the target classifier on the true class's reconstruction of the attacked input
              + smooth_weight * KL(selection softmax on the clean batch || on the attacked batch), TRADES's
                smoothness term (Zhang et al. 2019) on the decision rule instead of a classifier's logits
  classifier  CE on the purified clean batch and the purified adversarial batch (mixed by ``clf_mix``); in
              ``joint`` mode the target also receives the CVAE's pipe term through its weights

Modes: ``cvae`` (target frozen), ``classifier`` (CVAE frozen), ``alternating`` (one optimiser step for the CVAE,
the next for the classifier, each on freshly attacked batches) and ``joint`` (one step for both on the same
batch). The source classifier of the CE term stays frozen in every mode.
"""
from __future__ import annotations

import copy
import math
import time

import torch
from torch import nn
from torch.nn import functional as F

from .attacks import PGD, pipeline_objective, selection_objective
from .losses import PuVAELoss
from .models.cvae import CVAE
from .pipeline import Purifier, class_scores, purify
from .resume import Checkpointer, Snapshots
from .config import MODES, TRAIN_ATTACKS, PipelineAdversarial  # noqa: F401  (re-exported)
from .train import StepCallback, TrainConfig, predict, seed_everything, step_precision

def _objective(name: str, classifier: nn.Module, purifier: Purifier):
    if name == "selection":
        return selection_objective(classifier, purifier)
    if name == "targeted":
        from .robust import targeted_objectives

        return targeted_objectives(classifier, purifier, 1)["targeted selection r1"][1]
    return pipeline_objective(classifier, purifier, name)


def attack_batch(classifier: nn.Module, purifier: Purifier, x: torch.Tensor, y: torch.Tensor, pgd: PGD,
                 attacks, generator: torch.Generator, combine: str = "split") -> torch.Tensor:
    """``combine="split"``: one slice of the batch per attack, each slice attacked by its attack. ``"worst"``: every
    image attacked by every attack, keeping per image the worst result (``worst_of``). Modules must be in eval
    mode."""
    from .robust import runner_up

    def run(name, xs, ys):
        if name == "targeted":  # the target rides in the label, as the benchmark's targeted attacks take it
            ys = ys * purifier.num_classes + runner_up(purifier, xs, ys, 1)
        return pgd.run(_objective(name, classifier, purifier), xs, ys, generator)

    if combine == "worst":
        return worst_of(classifier, purifier, [run(name, x, y) for name in attacks], y)
    out = x.clone()
    for name, idx in zip(attacks, torch.arange(len(x)).chunk(len(attacks))):
        if len(idx):
            out[idx] = run(name, x[idx], y[idx])
    return out


@torch.no_grad()
def worst_of(classifier: nn.Module, purifier: Purifier, candidates: list[torch.Tensor],
             y: torch.Tensor) -> torch.Tensor:
    """Per image, the candidate that breaks the pipeline (the target's prediction on the purified input is wrong),
    and among those, or if none does, the one with the largest selection margin: the true class's reconstruction
    error minus the best wrong class's (the first candidate on ties). The MAX strategy of Maini et al. (ICML 2020)
    for training against a union of attacks."""
    keys = []
    for c in candidates:
        out = purifier(c)
        scores = out["scores"]
        wrong = scores.scatter(1, y[:, None], float("inf")).min(1).values
        margin = scores.gather(1, y[:, None])[:, 0] - wrong
        broken = classifier(out["purified"]).argmax(1) != y
        keys.append(torch.where(broken, margin + 1e6, margin))
    pick = torch.stack(keys).argmax(0)
    return torch.stack(candidates)[pick, torch.arange(len(y))]


def cvae_adversarial_terms(cvae: CVAE, target: nn.Module, xa: torch.Tensor, y: torch.Tensor,
                           sel_tau: float, clean: torch.Tensor | None = None, purifier: Purifier | None = None) -> dict:
    """Selection CE and the target's CE on the true class's reconstruction, both on the attacked batch; with
    ``clean`` (the batch before the attack), also ``adv_smooth``: the KL divergence from the selection softmax
    (over -score / sel_tau) on the clean batch to the one on the attacked batch, gradients through both. The
    scores are the MSE, plus ``purifier``'s robust prior term when it has one (``Purifier.with_prior``)."""
    def scores_of(x, out):
        s = class_scores(x, out, "mse")
        return purifier.with_prior(x, s) if purifier is not None else s

    out = cvae.reconstruct_all(xa, deterministic=True)
    scores = scores_of(xa, out)
    true_recon = out["recon"][torch.arange(len(y)), y]
    terms = {"adv_sel": F.cross_entropy(-scores / sel_tau, y),
             "adv_sel_acc": (scores.argmin(1) == y).float().mean(),
             "adv_pipe": F.cross_entropy(target(true_recon), y)}
    if clean is not None:
        clean_scores = scores_of(clean, cvae.reconstruct_all(clean, deterministic=True))
        terms["adv_smooth"] = F.kl_div(F.log_softmax(-scores / sel_tau, 1), F.log_softmax(-clean_scores / sel_tau, 1),
                                       reduction="batchmean", log_target=True)
    return terms


def _freeze(module: nn.Module, frozen: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(not frozen)


@torch.no_grad()
def purified_accuracy(cvae: CVAE | Purifier, classifier: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Clean accuracy of ``classifier`` behind ``cvae`` (a model under PuVAE's rule, or a whole purifier)."""
    purified = purify(cvae if isinstance(cvae, Purifier) else Purifier(cvae), x)["purified"]
    return float((predict(classifier, purified) == y).float().mean())


def adaptive_check(cvae: CVAE | Purifier, classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                   steps: int, seed: int = 0, targeted: int = 1) -> dict:
    """``pipeline_check`` of ``Purifier(cvae)`` (or of ``cvae``, a whole purifier), the figures a training log
    records."""
    out = pipeline_check(cvae if isinstance(cvae, Purifier) else Purifier(cvae), classifier, x, y, eps, steps, seed,
                         targeted)
    return {k: v for k, v in out.items() if k != "robust"}


def pipeline_check(purifier: nn.Module, classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                   steps: int, seed: int = 0, targeted: int = 1) -> dict:
    """A cheap adaptive check of any purifier module (``Purifier`` or one with another decision rule) in front of
    ``classifier``: selection and full-gradient PGD (best iterate), then the targeted attacks toward the
    ``targeted`` runner-up classes (selection and logit margins), per-image worst case; ``robust`` holds the
    per-image result. Upper bound only; the benchmark measures properly."""
    from .robust import pgd_attack, targeted_attacks, worst_case

    purifier.eval()
    classifier.eval()
    pgd = PGD(eps=eps, steps=steps, seed=seed)
    attacks = [pgd_attack(name, pgd, _objective(name, classifier, purifier)) for name in ("selection", "full")]
    attacks += targeted_attacks(classifier, purifier, pgd, targeted) if targeted else []

    def holds(a, b):
        with torch.no_grad():
            return classifier(purifier(a)["purified"]).argmax(1) == b

    res = worst_case(attacks, holds, x, y, batch_size=len(x))
    return {"val_adaptive": res["accuracy"], "val_adaptive_n": len(x), "val_adaptive_steps": steps,
            "val_adaptive_targeted": targeted, "robust": res["robust"].tolist()}


def train_pipeline_adversarial(cvae: CVAE, target: nn.Module, source: nn.Module, x: torch.Tensor, y: torch.Tensor,
                               x_val: torch.Tensor, y_val: torch.Tensor, cfg: TrainConfig, loss: PuVAELoss,
                               adv: PipelineAdversarial, epochs: float,
                               on_step: StepCallback | None = None,
                               snapshots: Snapshots | None = None, prior: nn.Module | None = None) -> list[dict]:
    """Train ``cvae`` and/or ``target`` in place as ``adv.mode`` says, for ``epochs`` (may be fractional) passes
    over (x, y); returns a record every ``adv.val_every`` epochs (and at the end) with the mean training terms
    since the last one, validation clean purified accuracy and a cheap adaptive check. ``source`` (the CE term's
    classifier) is never trained; pass a copy if it is the same object as ``target``. On return every parameter
    of ``cvae`` and ``target`` requires grad again and both are in eval mode. ``snapshots``: save the full state
    every ``snapshots.every`` steps and at each record, and resume from it (``resume.Snapshots``). ``prior``
    (frozen, never trained): the robust prior of a run with ``adv.prior_weight`` > 0; the training attacks, the
    selection terms and the validation check then use the purifier's rule with it (PuVAE's clean loss keeps the
    plain MSE rule).
    """
    if source is target and adv.trains_classifier:
        raise ValueError("source and target are the same module; pass a frozen copy as the source")
    seed_everything(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    source.eval()
    _freeze(source, True)
    _freeze(cvae, not adv.trains_cvae)
    _freeze(target, not adv.trains_classifier)
    if prior is not None:
        prior.eval()
        _freeze(prior, True)
    purifier = Purifier(cvae, prior=prior, prior_weight=adv.prior_weight)
    pgd = PGD(eps=adv.eps, steps=adv.steps, best_iterate=False)
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    total = max(1, round(epochs * steps_per_epoch))
    every = max(1, round(adv.val_every * steps_per_epoch))

    def optimiser(params):
        opt = torch.optim.Adam(params, lr=cfg.lr)
        # alternating: each optimiser steps on every other batch, and its schedule spans its own steps
        t_max = math.ceil(total / 2) if adv.mode == "alternating" else total
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, t_max) if cfg.lr_decay else None
        return opt, sched

    groups = {}
    if adv.mode == "joint":
        groups["joint"] = optimiser([*cvae.parameters(), *target.parameters()])
    else:
        if adv.trains_cvae:
            groups["cvae"] = optimiser(list(cvae.parameters()))
        if adv.trains_classifier:
            groups["classifier"] = optimiser(list(target.parameters()))

    ckpt = Checkpointer(snapshots, {"cvae": cvae, "target": target},
                        {k: opt for k, (opt, _) in groups.items()}, {k: sc for k, (_, sc) in groups.items()},
                        {"attack": gen})
    loop = ckpt.restore() or {"step": 0, "history": [], "sums": {}, "counts": {}, "perm": None,
                              "record_seconds": 0.0, "seconds": 0.0}
    history, sums, counts, first = loop["history"], loop["sums"], loop["counts"], loop["step"]
    perm = loop["perm"] if first % steps_per_epoch else None
    sitting = start = time.perf_counter()
    before = loop["record_seconds"]

    def position(step_done: int) -> dict:
        return {"step": step_done, "history": history, "sums": sums, "counts": counts, "perm": perm,
                "record_seconds": before + time.perf_counter() - start,
                "seconds": loop["seconds"] + time.perf_counter() - sitting}

    def adversarial_step(turn: str, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """One batch's attack and loss for the parts whose turn it is (the total loss and its named terms)."""
        cvae.eval()
        target.eval()
        xa = attack_batch(target, purifier, xb, yb, pgd, adv.attacks, gen, adv.combine)
        terms = {}
        total_loss = xb.new_zeros(())
        if turn in ("cvae", "joint"):
            cvae.train()
            clean = loss(cvae, source, xb, yb)
            advt = cvae_adversarial_terms(cvae, target, xa, yb, loss.sel_tau, xb if adv.smooth_weight else None,
                                          purifier)
            total_loss = total_loss + clean["loss"] + adv.sel_weight * advt["adv_sel"] + \
                adv.pipe_weight * advt["adv_pipe"] + adv.smooth_weight * advt.get("adv_smooth", 0.0)
            terms.update({f"cvae_{k}" if k == "loss" else k: v for k, v in clean.items()}, **advt)
        if turn in ("classifier", "joint"):
            target.train()
            with torch.no_grad():
                cvae.eval()
                pur = purifier(torch.cat([xb, xa]))["purified"]
            logits_clean, logits_adv = target(pur).chunk(2)
            clf = adv.clf_mix * F.cross_entropy(logits_clean, yb) + \
                (1 - adv.clf_mix) * F.cross_entropy(logits_adv, yb)
            total_loss = total_loss + clf
            terms.update({"clf_loss": clf, "clf_clean_acc": (logits_clean.argmax(1) == yb).float().mean(),
                          "clf_adv_acc": (logits_adv.argmax(1) == yb).float().mean()})
        return total_loss, terms

    for step in range(first, total):
        epoch, i = divmod(step, steps_per_epoch)
        if i == 0 or perm is None:
            perm = torch.randperm(len(x), generator=gen)
        idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        xb, yb = x[idx], y[idx]
        # which parts step now: alternating takes turns, CVAE first
        turn = ("cvae" if step % 2 == 0 else "classifier") if adv.mode == "alternating" else adv.mode
        with step_precision(cfg.precision):
            total_loss, terms = adversarial_step(turn, xb, yb)
        opt, sched = groups[turn]
        opt.zero_grad(set_to_none=True)
        total_loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        terms["loss"] = total_loss
        stats = {k: float(v.detach()) for k, v in terms.items()}
        for k, v in stats.items():  # per term: alternating logs CVAE and classifier terms on alternate batches
            sums[k] = sums.get(k, 0.0) + v
            counts[k] = counts.get(k, 0) + 1
        if on_step is not None:
            on_step(epoch, i, steps_per_epoch, stats)
        if (step + 1) % every == 0 or step == total - 1:
            cvae.eval()
            target.eval()
            record = {"epoch": (step + 1) / steps_per_epoch, **{k: v / counts[k] for k, v in sums.items()},
                      "seconds": before + time.perf_counter() - start,
                      "val_purified_acc": purified_accuracy(purifier, target, x_val, y_val),
                      **adaptive_check(purifier, target, x_val[:adv.val_n], y_val[:adv.val_n], adv.check_eps, adv.val_steps,
                                        targeted=adv.val_targeted)}
            history.append(record)
            sums, counts, start, before = {}, {}, time.perf_counter(), 0.0
            ckpt.save(position(step + 1))
        elif ckpt.due(step + 1):
            ckpt.save(position(step + 1))
    if snapshots is not None:
        snapshots.seconds = loop["seconds"] + time.perf_counter() - sitting
    cvae.eval()
    target.eval()
    _freeze(cvae, False)
    _freeze(target, False)
    return history


def frozen_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).eval()

