"""Robust-accuracy evaluation: the per-example worst case over attacks and restarts, the latent attack of
Kos et al. on the purifier's own autoencoder, and SSIM.

The worst case runs attacks in order and restarts within each attack; an image already broken is not attacked
again (early exit), so the result is the per-example minimum over everything listed at a fraction of the cost.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .attacks import (PGD, Objective, RejectOption, candidate_exclusion_objective, pipeline_objective,
                      selection_objective)

# holds(adv, y) -> B bools: does each image still count (classified correctly, or defended)?
Holds = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Attack:
    """One entry of a worst case: ``make(x, y, restart) -> adversarial x`` under a name."""

    name: str
    make: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
    restarts: int = 1


def pgd_attack(name: str, pgd: PGD, objective: Objective, restarts: int = 1) -> Attack:
    """PGD on ``objective``; restart r draws its random start from seed ``pgd.seed + r``."""
    def make(x, y, restart):
        gen = torch.Generator().manual_seed(pgd.seed + restart)
        return pgd.run(objective, x, y, gen)

    return Attack(name, make, restarts)


def purifier_objectives(classifier: nn.Module, purifier: nn.Module,
                        reject: RejectOption | None = None) -> dict[str, Objective]:
    """The adaptive objectives on classifier(purifier(x)) of the benchmark protocol, by name, strongest first:
    selection attack, full gradient, BPDA, softmin; a purifier that reconstructs only k < K candidate classes is
    attacked first through its ranking (``candidate exclusion``: push the true class out of the candidates)."""
    c, p = classifier, purifier
    first = {}
    if getattr(p, "candidates", None) is not None and p.candidates < p.num_classes:
        first["candidate exclusion"] = candidate_exclusion_objective(c, p, reject)
    return {**first, "selection": selection_objective(c, p, reject),
            "full gradient": pipeline_objective(c, p, "full", reject=reject),
            "BPDA": pipeline_objective(c, p, "bpda", reject=reject),
            "softmin": pipeline_objective(c, p, "softmin", reject=reject)}


def purifier_attacks(classifier: nn.Module, purifier: nn.Module, pgd: PGD, restarts: int = 1,
                     reject: RejectOption | None = None, targeted: int = 0) -> list[Attack]:
    """PGD on each of ``purifier_objectives``, in that order (the order only changes the cost of the worst case),
    then, with ``targeted`` = k > 0, the targeted attacks toward the k runner-up classes; with ``reject``, each
    pays its penalty for crossing the threshold and is judged by the reject option."""
    attacks = [pgd_attack(name, pgd, objective, restarts)
               for name, objective in purifier_objectives(classifier, purifier, reject).items()]
    if targeted:
        attacks += targeted_attacks(classifier, purifier, pgd, targeted, restarts, reject)
    return attacks


def runner_up(purifier: nn.Module, x: torch.Tensor, y: torch.Tensor, rank: int) -> torch.Tensor:
    """Per image, the wrong class whose reconstruction fits the clean input ``rank``-th best (1 = closest)."""
    with torch.no_grad():
        scores = purifier(x)["scores"].scatter(1, y[:, None], float("inf"))
    return scores.argsort(1)[:, rank - 1]


def targeted_objectives(classifier: nn.Module, purifier: nn.Module, k: int,
                        reject: RejectOption | None = None) -> dict[str, Objective]:
    """The protocol's targeted attacks (item 5), toward each of the ``k`` runner-up classes t:
    ``targeted selection rN``: maximise score(x, y) - score(x, t), so that t's reconstruction is chosen;
    ``targeted logits rN``: maximise logit_t - logit_y through the softmin over the reconstructions.
    An untargeted margin follows whichever class is closest at each step and can stall between two; these do not.

    PGD narrows its batch to the images still standing and hands the objective their labels only, so the target
    rides in the label: the objectives take y * K + t (``pack_target``) and judge success by the true label y.
    With ``reject``, each subtracts the reject option's penalty and counts a success only when not flagged."""
    from .pipeline import PurifiedClassifier

    soft = PurifiedClassifier(classifier, purifier, grad="softmin")
    num_classes = purifier.num_classes

    def unpack(yt):
        return yt // num_classes, yt % num_classes

    def selection(adv, yt):
        y, t = unpack(yt)
        out = purifier(adv)
        s = out["scores"]
        value = (s.gather(1, y[:, None]) - s.gather(1, t[:, None])).sum()
        with torch.no_grad():
            wrong = classifier(out["purified"]).argmax(1) != y
        return judged(value, wrong, s)

    def logits(adv, yt):
        y, t = unpack(yt)
        purified, out = soft.purify_with_scores(adv)
        z = classifier(purified)
        value = (z.gather(1, t[:, None]) - z.gather(1, y[:, None])).sum()
        return judged(value, z.argmax(1) != y, out["scores"])

    def judged(value, wrong, scores):
        if reject is None:
            return value, wrong
        return value - reject.cost(scores), reject.broken(wrong, scores.detach())

    out = {}
    for r in range(1, k + 1):
        out[f"targeted selection r{r}"] = (r, selection)
        out[f"targeted logits r{r}"] = (r, logits)
    return out


def targeted_attacks(classifier: nn.Module, purifier: nn.Module, pgd: PGD, k: int = 3,
                     restarts: int = 1, reject: RejectOption | None = None) -> list[Attack]:
    """PGD on each of ``targeted_objectives``; the runner-up classes are ranked on each clean input."""
    attacks = []
    for name, (rank, objective) in targeted_objectives(classifier, purifier, k, reject).items():
        def make(x, y, restart, rank=rank, objective=objective):
            t = runner_up(purifier, x, y, rank)
            gen = torch.Generator().manual_seed(pgd.seed + restart)
            return pgd.run(objective, x, y * purifier.num_classes + t, gen)

        attacks.append(Attack(name, make, restarts))
    return attacks


def chunked(fn: Callable, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    """fn(x_chunk, y_chunk) -> tensor, over chunks of ``batch_size``, concatenated."""
    return torch.cat([fn(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def worst_case(attacks: list[Attack], holds: Holds, x: torch.Tensor, y: torch.Tensor, batch_size: int = 250,
               start: torch.Tensor | None = None, state: dict | None = None,
               on_step: Callable[[dict], None] | None = None, adversarial: torch.Tensor | None = None) -> dict:
    """Per-example worst case over ``attacks`` (each with its restarts), with early exit.

    ``start``: B bools, the images that count before any attack (default: ``holds`` on the clean images).
    ``adversarial``: the tensor (shaped like ``x``) the breaking examples are written into, in place, so a caller
    can keep them across a resume (default: a copy of ``x``).
    Returns ``robust`` (B bools after every attack), ``accuracy``, ``adversarial`` (per image, the example
    that broke it, else the clean image), ``broken_by`` (attack name or None per image), and ``steps``: the
    robust accuracy after each attack and restart, in order, with the seconds each took.

    Resumable: ``on_step(state)`` gets a JSON-able state after every attack and restart, and ``state`` resumes
    from one (attacks and restarts already in it are skipped; each restart draws its own seeded start, so the
    result is the same). Images broken before a resume keep their clean image in ``adversarial`` unless the
    caller passes the tensor it saved.
    """
    if state is not None:
        robust = torch.tensor(state["robust"], dtype=torch.bool)
        broken_by, steps = list(state["broken_by"]), list(state["steps"])
    else:
        with torch.no_grad():
            robust = chunked(holds, x, y, batch_size) if start is None else start.clone()
        broken_by, steps = [None] * len(x), []
    done = {(s["attack"], s["restart"]) for s in steps}
    adversarial = x.clone() if adversarial is None else adversarial
    for attack in attacks:
        for restart in range(attack.restarts):
            if (attack.name, restart) in done:
                continue
            idx = robust.nonzero().squeeze(1)
            t0 = time.perf_counter()
            if len(idx):
                adv = chunked(lambda a, b: attack.make(a, b, restart), x[idx], y[idx], batch_size)
                with torch.no_grad():
                    still = chunked(holds, adv, y[idx], batch_size)
                fell = idx[~still]
                adversarial[fell] = adv[~still]
                robust[fell] = False
                for i in fell.tolist():
                    broken_by[i] = attack.name
            steps.append({"attack": attack.name, "restart": restart, "attacked": len(idx),
                          "accuracy": float(robust.float().mean()), "seconds": time.perf_counter() - t0})
            if on_step is not None:
                on_step({"robust": robust.tolist(), "broken_by": broken_by, "steps": steps})
    return {"robust": robust, "accuracy": float(robust.float().mean()), "adversarial": adversarial,
            "broken_by": broken_by, "steps": steps}


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5,
         data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per image, Gaussian window, mean over the valid SSIM map.

    a, b: B x C x H x W -> B. (MS-SSIM needs images larger than 160 px, so 28 x 28 images use SSIM.)
    """
    coords = torch.arange(window, dtype=a.dtype) - (window - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma ** 2))
    g = (g / g.sum())
    kernel = (g[:, None] * g[None, :]).expand(a.shape[1], 1, window, window).contiguous()

    def blur(t):
        return F.conv2d(t, kernel, groups=a.shape[1])

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a.pow(2)
    var_b = blur(b * b) - mu_b.pow(2)
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a.pow(2) + mu_b.pow(2) + c1) * (var_a + var_b + c2)
    return (num / den).flatten(1).mean(1)


def latent_codes(purifier: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The purifier's latent code of each image: the encoder means under every class, B x (K * latent); for a
    hierarchical model, the means of every posterior block the purifier uses (``codes``)."""
    out = purifier.cvae.reconstruct_all(x, deterministic=True)
    return out.get("codes", out["mu"]).flatten(1)


def latent_attack(purifier: nn.Module, x_source: torch.Tensor, x_target: torch.Tensor, lam: float = 1.0,
                  steps: int = 200, lr: float = 0.01, noise: float = 0.01, seed: int = 0) -> torch.Tensor:
    """Kos et al. 2018: minimise lam * ||x_s - x*||_2 + ||mu(x_t) - mu(x*)||_2 with Adam from a noisy copy
    of the source, so that the source is reconstructed like the target. Returns x* in [0, 1].

    For the class-conditional purifier, mu is the encoder's mean under every class (``latent_codes``): the
    purifier encodes the input once per class, and the attack must move all of them.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        goal = latent_codes(purifier, x_target)
    adv = (x_source + noise * torch.randn(x_source.shape, generator=gen)).clamp(0, 1).requires_grad_(True)
    opt = torch.optim.Adam([adv], lr=lr)
    for _ in range(steps):
        loss = (lam * (adv - x_source).flatten(1).norm(dim=1)
                + (latent_codes(purifier, adv) - goal).norm(dim=1)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            adv.clamp_(0, 1)  # projected Adam: stay a valid image
    return adv.detach()


def latent_attack_report(purifier: nn.Module, classifier: nn.Module, x_pool: torch.Tensor, y_pool: torch.Tensor,
                         n: int, steps: int = 200, seed: int = 0, batch_size: int = 250) -> dict:
    """Kos et al.'s latent attack on the first n images of a pool, each against a target of another class (the
    next pool image from n on, cyclically, whose class differs), scored as the VAE-robustness papers do:
    AS_ignore-target (the purified prediction is not the source's class) and AS_target (it is the target's),
    SSIM and L2 between the target's and the adversarial image's purified reconstructions."""
    xs, ys = x_pool[:n], y_pool[:n]
    pool_x, pool_y = x_pool[n:], y_pool[n:]
    t_idx, j = [], 0
    for label in ys.tolist():
        while int(pool_y[j % len(pool_y)]) == label:
            j += 1
        t_idx.append(j % len(pool_y))
        j += 1
    xt, yt = pool_x[t_idx], pool_y[t_idx]
    adv = chunked(lambda a, b: latent_attack(purifier, a, b, steps=steps, seed=seed), xs, xt, batch_size)
    with torch.no_grad():
        p_adv = purifier(adv)["purified"]
        p_tgt = purifier(xt)["purified"]
        pred = classifier(p_adv).argmax(1)
    return {"n": n, "lambda": 1.0, "steps": steps, "lr": 0.01, "noise": 0.01,
            "AS_ignore_target": float((pred != ys).float().mean()), "AS_target": float((pred == yt).float().mean()),
            "ssim_target_vs_adv_recon": float(ssim(p_tgt, p_adv).mean()),
            "l2_target_vs_adv_recon": float((p_tgt - p_adv).flatten(1).norm(dim=1).mean()),
            "l2_source_vs_adv": float((adv - xs).flatten(1).norm(dim=1).mean()),
            "linf_source_vs_adv": float((adv - xs).abs().flatten(1).max(1).values.mean())}

