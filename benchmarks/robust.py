"""Robust accuracy of the purifier beside real baselines, under every threat model of the benchmark protocol.

    python -m benchmarks.robust --profile full     # results/robust-full.{json,md} + plots, under 2 hours on 2 cores
    python -m benchmarks.robust --profile quick    # minutes; for development, never quoted

Defenses, on the same test images in the same run: no defense (the target classifier), PGD adversarial
training (Madry), the FGSM adversarial loss (Goodfellow, alpha 0.5), a Defense-GAN-style purifier (Adam in an
unconditional VAE decoder's latent space, L steps, R restarts) and the shipped PuVAE purifier, all in front of
(or being) the same architecture. Threat models (../shared/BENCHMARK_PROTOCOL.md):

  none        the bare classifier attacked and classified directly (PGD, best iterate)
  oblivious   PGD on the classifier (last iterate), then the defense (the same examples for every purifier)
  adaptive    per-example worst case over attacks on the whole pipeline: for PuVAE the selection attack, full
              gradient, BPDA and softmin, then the targeted attacks toward the profile's runner-up classes
              (``benchmarks/protocol.py``); for Defense-GAN BPDA; for classifiers PGD (there is no purifier)
  black-box   ART's Square attack (scores only) against the whole pipeline

plus AutoAttack-style APGD-CE, APGD-DLR and Square from ART (against the BPDA-attached purifier through
``purifier.art_bridge``), CW-L2 for the median perturbation size, the latent attack of Kos et al. on the CVAE,
the reject option's defended rate against attacks that pay to stay under the threshold, the protocol's sanity
checks and a speed table. Each section is cached under ``--work`` so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import click
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from purifier import __version__, checkpoint  # noqa: E402
from purifier.attacks import PGD, RejectOption, ce_objective  # noqa: E402
from purifier.data import load_dataset  # noqa: E402
from purifier.models.defensegan import DefenseGAN  # noqa: E402
from purifier.pipeline import PurifiedClassifier, Purifier  # noqa: E402
from purifier.provenance import cpu_model, git_commit  # noqa: E402
from purifier.robust import (Attack, chunked, latent_attack_report, pgd_attack, purifier_attacks,  # noqa: E402
                             purifier_objectives, worst_case)
from serve.png import image_grid, write_png  # noqa: E402
from serve.runtime import OnnxPurifier  # noqa: E402

from benchmarks.protocol import art_attacks, gradient_checks, se  # noqa: E402  (benchmarks/protocol.py)
from benchmarks.results import cached, markdown_table, write_results  # noqa: E402  (benchmarks/results.py)
from benchmarks.speed import time_it  # noqa: E402  (benchmarks/speed.py)


@dataclass(frozen=True)
class Profile:
    n: int                      # first n test images for every robust figure (clean accuracy: all 10,000)
    steps: int                  # PGD steps (step 2.5 * eps / steps, random start)
    restarts_headline: int      # restarts of every adaptive attack at the headline eps; 1 elsewhere
    eps_linf: tuple = (0.05, 0.1, 0.2, 0.3)
    eps_l2: tuple = (1.0, 2.0, 3.0)
    n_l2: int = 150             # L2 rows on the first n_l2 images (4 attacks through the purifier each)
    headline: float = 0.1
    n_art: int = 500            # AutoAttack and Square on the first n_art images, at the headline eps
    square_queries: int = 1000
    apgd_iters: int = 100
    n_cw: int = 50
    cw_iters: int = 20
    n_dg: int = 50              # Defense-GAN-style: attacked on the first n_dg images, at the headline eps only
    n_dg_clean: int = 500       # Defense-GAN-style clean accuracy on the first n_dg_clean images
    dg_steps: int = 200         # L
    dg_restarts: int = 10       # R
    dg_attack_restarts: int = 1  # PGD restarts against it (each PGD step runs L x R decoder passes per image)
    n_latent: int = 200
    latent_steps: int = 200
    n_sanity: int = 200
    sanity_steps: tuple = (40, 100)
    reject_penalty: float = 10.0
    clean_n: int = 10000
    speed_reps: int = 5
    batch_size: int = 250
    seed: int = 0
    targeted: int = 3           # PuVAE's worst case adds targeted attacks toward this many runner-up classes


PROFILES = {
    "full": Profile(n=1000, steps=100, restarts_headline=5),
    "quick": Profile(n=200, steps=40, restarts_headline=1, eps_l2=(2.0,), n_l2=200, n_art=100, square_queries=300,
                     apgd_iters=40, n_cw=20, cw_iters=10, n_dg=30, n_dg_clean=200, n_latent=50, latent_steps=100,
                     n_sanity=100, sanity_steps=(20, 40), clean_n=2000, speed_reps=3),
    # a smoke test of every code path, for CI; its numbers mean nothing
    "tiny": Profile(n=6, steps=2, restarts_headline=2, eps_linf=(0.1, 0.3), eps_l2=(2.0,), n_l2=4, n_art=4,
                    square_queries=5, apgd_iters=2, n_cw=3, cw_iters=2, n_dg=3, n_dg_clean=6, dg_steps=3,
                    dg_restarts=2, n_latent=3, latent_steps=3, n_sanity=4, sanity_steps=(1, 2), clean_n=50,
                    speed_reps=1, batch_size=4, targeted=1),
}

DEFENSES = ("no defense", "PGD-AT", "FGSM-AT", "Defense-GAN-style", "PuVAE purifier")
CLASSIFIER_ROWS = ("no defense", "PGD-AT", "FGSM-AT")


class Bench:
    def __init__(self, profile: Profile, model_dir: Path, baselines: Path, work: Path, on_progress):
        self.p, self.work, self.say = profile, work, on_progress
        torch.manual_seed(profile.seed)
        self.cvae = checkpoint.load(model_dir / "cvae", expect="cvae")
        self.clf = checkpoint.load(model_dir / "classifier", expect="classifier")
        self.purifier = Purifier(self.cvae).eval()
        self.onnx = OnnxPurifier(model_dir / "pipeline.onnx", device="cpu")
        self.threshold = self.onnx.threshold
        self.pgd_at = checkpoint.load(baselines / "pgd-at", expect="classifier")
        self.fgsm_at = checkpoint.load(baselines / "fgsm-at", expect="classifier")
        vae = checkpoint.load(baselines / "defensegan-vae", expect="vae")
        self.dg = DefenseGAN(vae, steps=profile.dg_steps, restarts=profile.dg_restarts, seed=profile.seed).eval()
        self.paths = {"model": model_dir, "baselines": baselines}
        self.checkpoints = {name: checkpoint.read_record(path)["weights_sha256"] for name, path in {
            "cvae": model_dir / "cvae", "classifier": model_dir / "classifier", "pgd-at": baselines / "pgd-at",
            "fgsm-at": baselines / "fgsm-at", "defensegan-vae": baselines / "defensegan-vae"}.items()}
        test = load_dataset("fashion-mnist", "test")
        self.x_all, self.y_all = torch.from_numpy(test.x), torch.from_numpy(test.y)
        self.x, self.y = self.x_all[:profile.n], self.y_all[:profile.n]
        for m in (self.clf, self.pgd_at, self.fgsm_at):
            for q in m.parameters():
                q.requires_grad_(False)
        for q in self.cvae.parameters():
            q.requires_grad_(False)

    # ---- the defenses as functions -------------------------------------------------------------------------
    def classifier_of(self, defense: str):
        return {"PGD-AT": self.pgd_at, "FGSM-AT": self.fgsm_at}.get(defense, self.clf)

    def logits(self, defense: str, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if defense == "PuVAE purifier":
                return self.clf(self.purifier(x)["purified"])
            if defense == "Defense-GAN-style":
                return self.clf(self.dg(x)["purified"])
            return self.classifier_of(defense)(x)

    def best_error(self, x: torch.Tensor) -> torch.Tensor:
        """The purifier's best reconstruction error per image (what the reject option thresholds)."""
        with torch.no_grad():
            return torch.cat([self.purifier(x[i:i + 500])["scores"].min(1).values for i in range(0, len(x), 500)])

    def holds(self, defense: str):
        return lambda x, y: self.logits(defense, x).argmax(1) == y

    def pgd(self, eps: float, norm: str = "Linf", steps: int | None = None, best: bool = True) -> PGD:
        return PGD(eps=eps, steps=steps or self.p.steps, norm=norm, seed=self.p.seed, best_iterate=best)

    def adaptive_attacks(self, defense: str, eps: float, norm: str, restarts: int, steps: int | None = None,
                         reject: RejectOption | None = None) -> list[Attack]:
        """The adaptive attacks on ``defense``, strongest first (the order only changes the cost)."""
        pgd = self.pgd(eps, norm, steps)
        if defense == "PuVAE purifier":
            return purifier_attacks(self.clf, self.purifier, pgd, restarts, reject, self.p.targeted)
        if defense == "Defense-GAN-style":
            return [pgd_attack("BPDA", pgd, ce_objective(PurifiedClassifier(self.clf, self.dg, grad="bpda")),
                               min(restarts, self.p.dg_attack_restarts))]
        return [pgd_attack("PGD", pgd, ce_objective(self.classifier_of(defense)), restarts)]

    # ---- caching -------------------------------------------------------------------------------------------
    def cached(self, name: str, fn):
        return cached(self.work, name, fn, self.say)

    # ---- sections ------------------------------------------------------------------------------------------
    def clean(self) -> dict:
        out = {}
        n = self.p.clean_n
        x, y = self.x_all[:n], self.y_all[:n]
        for d in DEFENSES:
            m = n if d != "Defense-GAN-style" else min(n, self.p.n_dg_clean)
            acc = chunked(lambda a, b: self.logits(d, a).argmax(1) == b, x[:m], y[:m], 500)
            out[d] = {"accuracy": float(acc.float().mean()), "n": m}
        err = self.best_error(x)
        out["PuVAE purifier"]["false_alarm_rate"] = float((err > self.threshold).float().mean())
        out["PuVAE purifier"]["threshold"] = self.threshold
        return out

    def robust_grid(self, norm: str, eps: float) -> dict:
        """One eps: none / oblivious / adaptive for every defense (Defense-GAN on its subset)."""
        n = self.p.n if norm == "Linf" else self.p.n_l2
        x, y = self.x[:n], self.y[:n]
        restarts = self.p.restarts_headline if (norm == "Linf" and eps == self.p.headline) else 1
        out = {"eps": eps, "norm": norm, "n": n, "restarts": restarts, "defenses": {}}
        # oblivious: PGD-100 on the target classifier, last iterate, one restart; shared by both purifiers
        obl = chunked(lambda a, b: self.pgd(eps, norm, best=False).run(ce_objective(self.clf), a, b),
                      x, y, self.p.batch_size)
        for d in DEFENSES:
            m = min(n, self.p.n_dg) if d == "Defense-GAN-style" else n
            if d == "Defense-GAN-style" and (norm, eps) != ("Linf", self.p.headline):
                continue  # L x R decoder passes per forward: attacked at the headline eps only
            holds = self.holds(d)
            attacks = self.adaptive_attacks(d, eps, norm, restarts)
            res = worst_case(attacks, holds, x[:m], y[:m], self.p.batch_size)
            row = {"n": m, "adaptive": res["accuracy"], "steps": res["steps"],
                   "broken_by": {a.name: res["broken_by"].count(a.name) for a in attacks},
                   "adaptive_robust": res["robust"].tolist()}
            if d in CLASSIFIER_ROWS:
                row["none"] = row["oblivious"] = res["accuracy"]  # no purifier: every threat model is white-box
            else:
                with torch.no_grad():
                    row["oblivious"] = float(chunked(holds, obl[:m], y[:m], self.p.batch_size).float().mean())
            if d == "PuVAE purifier" and norm == "Linf" and eps == self.p.headline:
                save = {"x": x.numpy(), "adv": res["adversarial"].numpy()}
                np.savez_compressed(self.work / f"adv-{norm}-{eps}.npz", **save)
            out["defenses"][d] = row
        return out

    def reject(self) -> dict:
        """The reject option at the headline eps: defended rate (correct or rejected) under attacks with and
        without a penalty for crossing the threshold, worst case over all of them."""
        eps, r = self.p.headline, self.p.restarts_headline
        x, y = self.x, self.y

        def defended(a, b):
            with torch.no_grad():
                out = self.purifier(a)
                ok = self.clf(out["purified"]).argmax(1) == b
                return ok | (out["scores"].min(1).values > self.threshold)

        attacks = []
        for penalty in (0.0, self.p.reject_penalty):
            rj = RejectOption(self.threshold, penalty)
            for a in self.adaptive_attacks("PuVAE purifier", eps, "Linf", r, reject=rj):
                attacks.append(replace(a, name=f"{a.name} (penalty {penalty:g})"))
        res = worst_case(attacks, defended, x, y, self.p.batch_size)
        err = self.best_error(res["adversarial"])
        return {"eps": eps, "n": len(y), "restarts": r, "penalty": self.p.reject_penalty, "threshold": self.threshold,
                "defended": res["accuracy"], "steps": res["steps"],
                "rejected_among_adversarial": float((err > self.threshold).float().mean())}

    def _art(self, model, preprocess=None):
        from purifier.art_bridge import art_classifier
        return art_classifier(model, self.purifier if preprocess else None, grad=preprocess or "bpda")

    def art_attacks(self) -> dict:
        """AutoAttack (APGD-CE, APGD-DLR, Square) and Square alone from ART at the headline eps."""
        eps, n = self.p.headline, self.p.n_art
        out = {"eps": eps, "n": n, "square_queries": self.p.square_queries, "apgd_iters": self.p.apgd_iters,
               "defenses": {}}
        targets = {"no defense": (self._art(self.clf), None), "PGD-AT": (self._art(self.pgd_at), None),
                   "FGSM-AT": (self._art(self.fgsm_at), None),
                   "PuVAE purifier": (self._art(self.clf, "bpda"), self._art(self.clf, "none"))}
        for d, (white, black) in targets.items():
            res = art_attacks(white, black or white, self.holds(d), self.x[:n], self.y[:n], eps, self.p.square_queries,
                              self.p.apgd_iters, self.p.batch_size, self.p.seed)
            del res["n"]
            out["defenses"][d] = {**res, "gradients": "BPDA through purifier.art_bridge" if d == "PuVAE purifier"
                                  else "the classifier's own"}
        return out

    def cw(self) -> dict:
        """CW-L2 (ART) median perturbation size of successful examples, bare classifier and BPDA purifier."""
        from art.attacks.evasion import CarliniL2Method

        n = self.p.n_cw
        x, y = self.x[:n].numpy(), self.y[:n].numpy()
        out = {"n": n, "max_iter": self.p.cw_iters, "binary_search_steps": 5, "max_halving": 2, "max_doubling": 2,
               "learning_rate": 0.01, "initial_const": 0.1, "defenses": {}}
        for d, est in (("no defense", self._art(self.clf)), ("PGD-AT", self._art(self.pgd_at)),
                       ("PuVAE purifier", self._art(self.clf, "bpda"))):
            # ART's line search runs up to max_halving + max_doubling extra forward passes per iteration
            attack = CarliniL2Method(est, confidence=0.0, learning_rate=0.01, binary_search_steps=5,
                                     max_iter=self.p.cw_iters, initial_const=0.1, max_halving=2, max_doubling=2,
                                     batch_size=self.p.batch_size, verbose=False)
            adv = attack.generate(x, y=y)
            holds = self.holds(d)
            clean_ok = holds(torch.from_numpy(x), torch.from_numpy(y)).numpy()
            fooled = clean_ok & ~holds(torch.from_numpy(adv), torch.from_numpy(y)).numpy()
            norms = np.sqrt(((adv - x) ** 2).reshape(n, -1).sum(1))
            # among the images the defense gets right when clean: how many CW breaks, and how far it had to go
            out["defenses"][d] = {"clean_correct": int(clean_ok.sum()),
                                  "success_rate": float(fooled.sum() / max(1, clean_ok.sum())),
                                  "median_l2": float(np.median(norms[fooled])) if fooled.any() else None}
        return out

    def latent(self) -> dict:
        """Kos et al.'s latent attack on the CVAE: source reconstructed like a target of another class."""
        return latent_attack_report(self.purifier, self.clf, self.x_all, self.y_all, self.p.n_latent,
                                    self.p.latent_steps, self.p.seed, self.p.batch_size)

    def sanity(self, grids: dict) -> dict:
        checks = {}
        n = self.p.n_sanity
        x, y = self.x[:n], self.y[:n]
        # 1. robust accuracy does not rise with eps
        for d in DEFENSES:
            accs = [(e, grids[f"Linf-{e}"]["defenses"][d]["adaptive"], grids[f"Linf-{e}"]["defenses"][d]["n"])
                    for e in self.p.eps_linf if d in grids[f"Linf-{e}"]["defenses"]]
            if len(accs) < 2:
                continue
            rises = [(a, b) for (a, b) in zip(accs, accs[1:]) if b[1] > a[1] + 2 * se(a[1], a[2])]
            checks[f"monotone in eps: {d}"] = {"pass": not rises, "values": accs}
        # 2. at eps = 1.0 (L-infinity) robust accuracy is near 0
        for d in DEFENSES:
            m = min(n, self.p.n_dg) if d == "Defense-GAN-style" else n
            attacks = self.adaptive_attacks(d, 1.0, "Linf", 1, steps=self.p.sanity_steps[0])
            acc = worst_case(attacks, self.holds(d), x[:m], y[:m], self.p.batch_size)["accuracy"]
            checks[f"eps 1.0 near 0: {d}"] = {"pass": acc <= 0.05, "value": acc, "n": m,
                                              "steps": self.p.sanity_steps[0], "limit": 0.05}
        # 3. more steps do not raise robust accuracy beyond noise (each adaptive attack alone, 1 restart)
        few, many = self.p.sanity_steps
        for d in ("PuVAE purifier", "PGD-AT"):
            for i, a in enumerate(self.adaptive_attacks(d, self.p.headline, "Linf", 1, steps=few)):
                b = self.adaptive_attacks(d, self.p.headline, "Linf", 1, steps=many)[i]
                acc_few = worst_case([a], self.holds(d), x, y, self.p.batch_size)["accuracy"]
                acc_many = worst_case([b], self.holds(d), x, y, self.p.batch_size)["accuracy"]
                checks[f"more steps ({few} -> {many}) no higher: {d}, {a.name}"] = {
                    "pass": acc_many <= acc_few + 2 * se(acc_few, n), "values": [acc_few, acc_many], "n": n}
        # 4. adaptive <= oblivious; restarts never raise (cumulative by construction, recorded)
        for key, g in grids.items():
            for d in ("PuVAE purifier", "Defense-GAN-style"):
                if d not in g["defenses"]:
                    continue
                r = g["defenses"][d]
                checks[f"adaptive <= oblivious: {d}, {key}"] = {
                    "pass": r["adaptive"] <= r["oblivious"] + 2 * se(r["oblivious"], r["n"]),
                    "values": [r["adaptive"], r["oblivious"]]}
        # 5. the gradient through the attacked module is not zero
        xg, yg = self.x[:64], self.y[:64]
        grads = {**purifier_objectives(self.clf, self.purifier),
                 "Defense-GAN BPDA": ce_objective(PurifiedClassifier(self.clf, self.dg, grad="bpda"))}
        dg = grads.pop("Defense-GAN BPDA")
        checks.update(gradient_checks(grads, xg, yg))
        checks.update(gradient_checks({"Defense-GAN BPDA": dg}, xg[:8], yg[:8]))  # a Defense-GAN forward is costly
        # 6. randomness: each defense is deterministic (same output twice), so EOT has nothing to average
        with torch.no_grad():
            same_pu = bool(torch.equal(self.purifier(xg)["purified"], self.purifier(xg)["purified"]))
            xd = xg[:8]
            same_dg = bool(torch.equal(self.dg(xd)["purified"], self.dg(xd)["purified"]))
        checks["deterministic (EOT not needed): PuVAE purifier"] = {"pass": same_pu}
        checks["deterministic (EOT not needed): Defense-GAN-style"] = {"pass": same_dg}
        # 7. the ART bridge computes what the pipeline computes
        est = self._art(self.clf, "bpda")
        art_logits = est.predict(xg.numpy())
        ours = self.logits("PuVAE purifier", xg).numpy()
        g_art = est.loss_gradient(xg.numpy(), np.eye(10, dtype=np.float32)[yg.numpy()])
        a = xg.clone().requires_grad_(True)
        torch.nn.functional.cross_entropy(PurifiedClassifier(self.clf, self.purifier, "bpda")(a), yg).backward()
        cos = float(np.dot(g_art.ravel(), a.grad.numpy().ravel())
                    / (np.linalg.norm(g_art) * np.linalg.norm(a.grad.numpy()) + 1e-12))
        diff = float(np.abs(art_logits - ours).max())
        checks["ART bridge equals the pipeline"] = {"pass": diff < 1e-4 and cos > 0.999, "max_logit_diff": diff,
                                                   "bpda_gradient_cosine": cos}
        return checks

    def speed(self) -> dict:
        """ms/image at batch 1 and 256: classifier, PuVAE in torch and onnxruntime, Defense-GAN-style in torch."""
        x = self.x_all.numpy()
        configs = {
            "classifier (torch eager)": lambda a: self.clf(torch.from_numpy(a)),
            "PuVAE purifier + classifier (torch eager)": lambda a: self.logits("PuVAE purifier", torch.from_numpy(a)),
            "PuVAE purifier + classifier (onnxruntime cpu)": lambda a: self.onnx.session.run(["logits"], {"x": a}),
            "Defense-GAN-style + classifier (torch eager)":
                lambda a: self.logits("Defense-GAN-style", torch.from_numpy(a)),
        }
        out = {}
        for name, fn in configs.items():
            for batch, images in ((1, 16), (256, 256)):
                reps = self.p.speed_reps
                if name.startswith("Defense"):  # about a minute per batch of 256: fewer images and repetitions
                    images, reps = (4, reps) if batch == 1 else (images, min(reps, 3))
                    if self.p.speed_reps < 3:
                        images = min(images, 16)
                with torch.no_grad():
                    r = time_it(fn, x[:images], batch, reps)
                out[f"{name} @ batch {batch}"] = {"name": name, **r}
        for batch in (1, 256):
            ours = out[f"PuVAE purifier + classifier (onnxruntime cpu) @ batch {batch}"]["ms_per_image"]
            ours_torch = out[f"PuVAE purifier + classifier (torch eager) @ batch {batch}"]["ms_per_image"]
            dg = out[f"Defense-GAN-style + classifier (torch eager) @ batch {batch}"]["ms_per_image"]
            out[f"ratio @ batch {batch}"] = {"defensegan_over_puvae_torch": dg / ours_torch,
                                             "defensegan_over_puvae_onnxruntime": dg / ours}
        return out


def headline_rows(report: dict) -> list[list]:
    h = report["profile"]["headline"]
    g = report["grids"][f"Linf-{h}"]["defenses"]
    art = report["art"]["defenses"]
    rows = []
    for d in DEFENSES:
        r = g[d]
        a = art.get(d)
        none = f"{r['none']:.3f}" if "none" in r else "n/a (defense in place)"
        bb = f"{a['square']:.3f}" if a else "not run (see notes)"
        worst = "not run (see notes)"
        if a:
            n = report["art"]["n"]
            rob = np.array(r["adaptive_robust"][:n]) & np.array(a["square_robust"]) & np.array(a["autoattack_robust"])
            worst = f"{rob.mean():.3f}"
        rows.append([d, f"{report['clean'][d]['accuracy']:.4f} ({report['clean'][d]['n']})", none,
                     f"{r['oblivious']:.3f}", f"{r['adaptive']:.3f} ({r['n']})", bb,
                     f"{a['autoattack']:.3f}" if a else "not run", worst])
    return rows


def render(report: dict) -> str:
    p = report["profile"]
    parts = [f"Fashion-MNIST test set, first {p['n']} images; L-infinity eps {p['headline']}; PGD-{p['steps']} "
             f"(step 2.5*eps/steps, random start, best iterate), {p['restarts_headline']} restarts per adaptive "
             f"attack at eps {p['headline']} (1 elsewhere); seed {p['seed']}. Square ({p['square_queries']} queries) "
             f"and AutoAttack-style APGD-CE/APGD-DLR ({p['apgd_iters']} iterations, 1 start) from ART on "
             f"the first {p['n_art']}. Defense-GAN-style: L={p['dg_steps']}, R={p['dg_restarts']}, attacked on the "
             f"first {p['n_dg']} at eps {p['headline']} only. Clean accuracy on the first {p['clean_n']} "
             f"(Defense-GAN-style: {p['n_dg_clean']}). PuVAE's adaptive worst case: the selection attack, full "
             f"gradient, BPDA and softmin"
             + (f", then targeted selection and targeted logit margins toward each of the {p['targeted']} runner-up "
                f"classes." if p.get("targeted") else "."),
             "",
             "### Headline",
             markdown_table(["defense", "clean (n)", "none", "oblivious", "adaptive worst case (n)",
                             "black-box (Square)", "AutoAttack (BPDA for PuVAE)", f"worst of all (first {p['n_art']})"],
                            headline_rows(report))]
    for norm, grid_eps in (("Linf", p["eps_linf"]), ("L2", p["eps_l2"])):
        rows = []
        for d in DEFENSES:
            for tm in ("oblivious", "adaptive"):
                vals = [report["grids"][f"{norm}-{e}"]["defenses"].get(d, {}).get(tm) for e in grid_eps]
                rows.append([d, tm, *["—" if v is None else f"{v:.3f}" for v in vals]])
        parts += ["", f"### {norm}: robust accuracy against eps (classifier rows: white-box PGD in both lines)",
                  markdown_table(["defense", "threat model", *[str(e) for e in grid_eps]], rows)]
    h = report["grids"][f"Linf-{p['headline']}"]["defenses"]["PuVAE purifier"]
    parts += ["", f"### PuVAE purifier at eps {p['headline']}: which attack broke each image (first to succeed, "
                  "strongest first)",
              markdown_table(["attack", "images broken"], [[k, v] for k, v in h["broken_by"].items()])]
    rj = report["reject"]
    c = report["clean"]["PuVAE purifier"]
    parts += ["", "### Reject option (PuVAE purifier)",
              markdown_table(["threshold", "clean false alarms", f"defended at eps {rj['eps']} (worst case, n "
                              f"{rj['n']})", "adversarial examples flagged"],
                             [[f"{rj['threshold']:.5f}", f"{c['false_alarm_rate']:.4f}", f"{rj['defended']:.3f}",
                               f"{rj['rejected_among_adversarial']:.3f}"]])]
    cw = report["cw"]
    parts += ["", f"### CW-L2 (ART, {cw['max_iter']} iterations x {cw['binary_search_steps']} binary-search steps, "
                  f"first {cw['n']})",
              markdown_table(["defense", "success rate (of clean-correct)", "median L2 of successful examples"],
                             [[d, f"{v['success_rate']:.3f} (of {v['clean_correct']})",
                               "—" if v["median_l2"] is None else f"{v['median_l2']:.3f}"]
                              for d, v in cw["defenses"].items()])]
    la = report["latent"]
    parts += ["", f"### Latent attack on the CVAE (Kos et al.; lambda {la['lambda']}, {la['steps']} Adam steps, "
                  f"first {la['n']} test images as sources)",
              markdown_table(["AS_ignore-target", "AS_target", "SSIM(target recon, adv recon)",
                              "L2(target recon, adv recon)", "mean L2 / Linf of the perturbation"],
                             [[f"{la['AS_ignore_target']:.3f}", f"{la['AS_target']:.3f}",
                               f"{la['ssim_target_vs_adv_recon']:.3f}", f"{la['l2_target_vs_adv_recon']:.3f}",
                               f"{la['l2_source_vs_adv']:.3f} / {la['linf_source_vs_adv']:.3f}"]])]
    sp = report["speed"]
    rows = [[v["name"], v["batch"], f"{v['ms_per_image']:.3f}", f"{v['images_per_s']:.0f}"]
            for k, v in sp.items() if not k.startswith("ratio") and k != "seconds"]
    parts += ["", "### Speed", markdown_table(["configuration", "batch", "ms/image", "images/s"], rows),
              "", "Defense-GAN-style / PuVAE time per image: " + "; ".join(
                  f"batch {b}: {sp[f'ratio @ batch {b}']['defensegan_over_puvae_torch']:.0f}x (both torch), "
                  f"{sp[f'ratio @ batch {b}']['defensegan_over_puvae_onnxruntime']:.0f}x (PuVAE in onnxruntime)"
                  for b in (1, 256))]
    failing = [k for k, v in report["sanity"].items() if not v["pass"]]
    parts += ["", "### Sanity checks",
              f"{len(report['sanity']) - len(failing)} of {len(report['sanity'])} pass."
              + (" Failing (the numbers they touch are not trustworthy): " + "; ".join(failing) if failing else ""),
              "", markdown_table(["check", "pass", "values"],
                                 [[k, "yes" if v["pass"] else "**no**",
                                   json.dumps({a: b for a, b in v.items() if a != "pass"})] for k, v in
                                  report["sanity"].items()])]
    return "\n".join(parts)


def plots(report: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = report["profile"]
    files = []
    for norm, grid_eps in (("Linf", p["eps_linf"]), ("L2", p["eps_l2"])):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for ax, tm in zip(axes, ("oblivious", "adaptive")):
            for d in DEFENSES:
                pts = [(e, report["grids"][f"{norm}-{e}"]["defenses"][d][tm]) for e in grid_eps
                       if d in report["grids"][f"{norm}-{e}"]["defenses"]]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=d)
            ax.set_title(f"{tm} ({norm})")
            ax.set_xlabel("eps")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("robust accuracy")
        axes[1].legend(fontsize=8)
        fig.suptitle(f"Fashion-MNIST, first {p['n']} test images, PGD-{p['steps']} (profile {report['profile_name']})")
        fig.tight_layout()
        path = out.with_name(f"{out.stem}-{norm}.png")
        fig.savefig(path.with_suffix(".tmp.png"), dpi=100)
        plt.close(fig)
        path.with_suffix(".tmp.png").replace(path)
        files.append(path.name)
    return files


@click.command()
@click.option("--profile", "profile_name", type=click.Choice(sorted(PROFILES)), default="quick", show_default=True)
@click.option("--model", "model_dir", default=str(ROOT / "models" / "fashion-mnist-plain"), show_default=True,
              help="The PuVAE model measured (results/robust-full.json: plain PuVAE, the default before "
                   "adversarial training).")
@click.option("--baselines", default=str(ROOT / "models" / "baselines"), show_default=True)
@click.option("--n", type=int, help="Override the profile's image count.")
@click.option("--out", help="Results file (default results/robust-PROFILE.json).")
@click.option("--work", help="Cache of finished sections, for resuming (default: results/.robust-PROFILE-work).")
@click.option("--threads", type=int, help="torch threads (default: torch's).")
def main(profile_name, model_dir, baselines, n, out, work, threads):
    if threads:
        torch.set_num_threads(threads)
    profile = PROFILES[profile_name] if n is None else replace(PROFILES[profile_name], n=n)
    out = Path(out or ROOT / "results" / f"robust-{profile_name}.json")
    work = Path(work or out.parent / f".{out.stem}-work")
    work.mkdir(parents=True, exist_ok=True)
    settings = json.loads(json.dumps(asdict(profile)))  # as it reads back (tuples become lists)
    recorded = work / "profile.json"
    if recorded.is_file() and json.loads(recorded.read_text()) != settings:
        raise click.UsageError(f"{work} holds sections measured with other settings ({recorded}); remove it or "
                               f"pass another --work")
    recorded.write_text(json.dumps(settings))
    start = time.perf_counter()
    bench = Bench(profile, Path(model_dir), Path(baselines), work, lambda m: click.echo(m, err=True))
    report = {"command": shlex.join(["python", "-m", "benchmarks.robust", *sys.argv[1:]]), "commit": git_commit(ROOT),
              "version": __version__, "profile_name": profile_name, "profile": asdict(profile),
              "threat_model_notes": {
                  "classifier rows": "no purifier: none, oblivious and adaptive are all white-box PGD on the model",
                  "Defense-GAN-style adaptive": "BPDA only, with dg_attack_restarts restarts (fewer than the "
                                                "protocol's 5: cost), so an upper bound; the full gradient would "
                                                "unroll L x R Adam steps; the defense is deterministic (fixed "
                                                "starting points), so no EOT",
                  "Defense-GAN-style black-box/AutoAttack": "not run: one forward costs L x R decoder passes, "
                                                             "thousands of queries per image are out of budget",
                  "oblivious": "one restart at every eps; PGD-100 last iterate on the target classifier",
                  "AutoAttack": "ART's AutoAttack with a reduced list: APGD-CE and APGD-DLR (1 start each); Square "
                                "(1 restart) runs alone as the black-box column and enters the worst of all; the "
                                "standard list adds DeepFool and 5 starts/restarts"},
              "checkpoints": bench.checkpoints, "paths": {k: str(v) for k, v in bench.paths.items()},
              "software": {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
                           "art": __import__("art").__version__,
                           "onnxruntime": __import__("onnxruntime").__version__},
              "machine": {"cpu": cpu_model(), "torch_threads": torch.get_num_threads()}}
    report["clean"] = bench.cached("clean", bench.clean)
    grids = {}
    for norm, eps_list in (("Linf", profile.eps_linf), ("L2", profile.eps_l2)):
        for eps in eps_list:
            grids[f"{norm}-{eps}"] = bench.cached(f"grid-{norm}-{eps}", lambda: bench.robust_grid(norm, eps))
    report["grids"] = grids
    report["reject"] = bench.cached("reject", bench.reject)
    report["art"] = bench.cached("art", bench.art_attacks)
    report["cw"] = bench.cached("cw", bench.cw)
    report["latent"] = bench.cached("latent", bench.latent)
    report["sanity"] = bench.cached("sanity", lambda: bench.sanity(grids))
    report["sanity"].pop("seconds", None)
    report["speed"] = bench.cached("speed", bench.speed)
    report["seconds"] = time.perf_counter() - start
    report["section_seconds"] = {k: v.get("seconds") for k, v in report.items()
                                 if isinstance(v, dict) and "seconds" in v}
    report["plots"] = plots(report, out)
    adv = np.load(work / f"adv-Linf-{profile.headline}.npz")
    x_adv = torch.from_numpy(adv["adv"][:10])
    with torch.no_grad():
        purified = bench.purifier(x_adv)["purified"].numpy()
    grid_path = out.with_name(f"{out.stem}-grid.png")
    write_png(grid_path, image_grid([adv["x"][:10], adv["adv"][:10], purified]))
    report["plots"].append(grid_path.name)
    heading = (f"# Robust accuracy, profile {profile_name}\n\nGenerated by benchmarks/robust.py; image grid "
               f"{grid_path.name}: rows clean, adaptive worst-case adversarial (eps {profile.headline}), purified.")
    write_results(out, report, heading, render(report))
    click.echo(render(report).split("### L")[0])
    click.echo(f"{report['seconds']:.0f} s; -> {out}", err=True)


if __name__ == "__main__":
    main()
