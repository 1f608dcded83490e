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
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import click
import numpy as np
import torch

from purifier import checkpoint
from purifier.attacks import PGD, RejectOption, ce_objective
from purifier.models.defensegan import DefenseGAN
from purifier.pipeline import PurifiedClassifier
from purifier.robust import Attack, chunked, latent_attack_report, pgd_attack, purifier_objectives, worst_case
from serve.png import image_grid, write_png
from serve.runtime import OnnxPurifier

from benchmarks import protocol
from benchmarks.checks import defense_checks
from benchmarks.protocol import OLDER_SUITE, ROOT, Row, checkpoints_of, output_paths, report_head, training_length
from benchmarks.results import markdown_table, write_results
from benchmarks.speed import time_interleaved, time_it


@dataclass(frozen=True)
class Profile(protocol.Profile):
    """The protocol's profile (n, steps, restarts at the headline ``eps``, ART, sanity, reject, speed, seed,
    targeted) plus the sweep's own settings; ``restarts`` apply at the headline eps, 1 restart elsewhere."""
    eps_linf: tuple = (0.05, 0.1, 0.2, 0.3)
    eps_l2: tuple = (1.0, 2.0, 3.0)
    n_l2: int = 150             # L2 rows on the first n_l2 images (4 attacks through the purifier each)
    n_cw: int = 50
    cw_iters: int = 20
    n_dg: int = 50              # Defense-GAN-style: attacked on the first n_dg images, at the headline eps only
    n_dg_clean: int = 500       # Defense-GAN-style clean accuracy on the first n_dg_clean images
    dg_steps: int = 200         # L
    dg_restarts: int = 10       # R
    dg_attack_restarts: int = 1  # PGD restarts against it (each PGD step runs L x R decoder passes per image)
    dg_speed_images: tuple = (4, 256)  # Defense-GAN-style timed on this many images at batch 1 and 256
    n_latent: int = 200
    latent_steps: int = 200


# the sweep's settings on top of protocol.PROFILES[name]; a Defense-GAN-style forward costs about 1 s per image here
SWEEP = {
    "full": {},
    "quick": dict(eps_l2=(2.0,), n_l2=100, n_cw=20, cw_iters=10, n_dg=10, n_dg_clean=100, dg_speed_images=(2, 32),
                  n_latent=50, latent_steps=100),
    # a smoke test of every code path, for CI; its numbers mean nothing
    "tiny": dict(eps_linf=(0.1, 0.3), eps_l2=(2.0,), n_l2=4, n_cw=3, cw_iters=2, n_dg=3, n_dg_clean=6, dg_steps=3,
                 dg_restarts=2, dg_speed_images=(2, 4), n_latent=3, latent_steps=3),
}
PROFILES = {name: Profile(**asdict(protocol.PROFILES[name]), **sweep) for name, sweep in SWEEP.items()}

DEFENSES = ("no defense", "PGD-AT", "FGSM-AT", "Defense-GAN-style", "PuVAE purifier")
CLASSIFIER_ROWS = ("no defense", "PGD-AT", "FGSM-AT")
# what results files written before the labels were recorded measured: models/baselines/pgd-at and fgsm-at
LEGACY_LABELS = {"PGD-AT": "PGD-AT (3 epochs)", "FGSM-AT": "FGSM-AT (3 epochs)"}


def baseline_label(defense: str, path: Path) -> tuple[str, str]:
    """(table label with the training length, note) of an adversarially trained baseline from its checkpoint."""
    meta = checkpoint.read_record(path).get("meta", {})
    adv = meta.get("adversarial", {})
    if "best_epoch" in meta:
        short = f"converged, {meta.get('epochs_run')} epochs"
    else:
        short = f"{meta.get('train', {}).get('epochs')} epochs"
    how = f"PGD-{adv.get('steps')}" if adv.get("kind") == "pgd" else adv.get("kind", "?").upper()
    shown = path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path
    return f"{defense} ({short})", f"{shown}: eps {adv.get('eps')}, {how}, {training_length(path)}"


class Bench(protocol.Bench):
    """The sweep's defenses on the protocol's test images; sections are cached under ``work``."""

    def __init__(self, profile: Profile, model_dir: Path, baselines: Path, pgd_at: Path, work: Path, on_progress):
        super().__init__(profile, work, on_progress)
        torch.manual_seed(profile.seed)
        self.rows = {"no defense": Row("no defense", str(model_dir / "classifier")),
                     "PGD-AT": Row("PGD-AT", str(pgd_at)), "FGSM-AT": Row("FGSM-AT", str(baselines / "fgsm-at")),
                     "PuVAE purifier": Row("PuVAE purifier", str(model_dir / "classifier"), str(model_dir / "cvae"))}
        self.models = {d: self.load(r) for d, r in self.rows.items()}
        self.clf, self.purifier = self.models["PuVAE purifier"]
        self.onnx = OnnxPurifier(model_dir / "pipeline.onnx", device="cpu")
        vae = checkpoint.load(baselines / "defensegan-vae", expect="vae")
        self.dg = DefenseGAN(vae, steps=profile.dg_steps, restarts=profile.dg_restarts, seed=profile.seed).eval()
        self.models["Defense-GAN-style"] = (self.clf, self.dg)
        self.paths = {"model": model_dir, "baselines": baselines, "pgd-at": pgd_at}
        self.labels, self.notes = {}, {}
        for d, path in (("PGD-AT", pgd_at), ("FGSM-AT", baselines / "fgsm-at")):
            self.labels[d], self.notes[d] = baseline_label(d, path)
        self.checkpoints = {**{k: v for k, v in checkpoints_of(self.rows["PuVAE purifier"]).items()
                               if k in ("cvae", "prior", "purifier")},  # the prior of a model with one
                            **{k: checkpoints_of(self.rows[d])["classifier"] for k, d in
                               (("classifier", "no defense"), ("pgd-at", "PGD-AT"), ("fgsm-at", "FGSM-AT"))},
                            "defensegan-vae": checkpoint.read_record(baselines / "defensegan-vae")["weights_sha256"]}

    # ---- the defenses ------------------------------------------------------------------------------------
    def logits(self, defense: str, x: torch.Tensor) -> torch.Tensor:
        clf, pur = self.models[defense]
        with torch.no_grad():
            return clf(x if pur is None else pur(x)["purified"])

    def judge(self, defense: str):
        return self.holds(*self.models[defense])

    def adaptive_attacks(self, defense: str, eps: float, norm: str, restarts: int, steps: int | None = None,
                         reject: RejectOption | None = None) -> list[Attack]:
        """The adaptive attacks on ``defense``, strongest first (the order only changes the cost): the protocol's
        suite (``protocol.Bench.attacks``), BPDA alone for the Defense-GAN-style purifier."""
        clf, pur = self.models[defense]
        if defense == "Defense-GAN-style":
            pgd = PGD(eps=eps, steps=steps or self.p.steps, norm=norm, seed=self.p.seed)
            return [pgd_attack("BPDA", pgd, ce_objective(PurifiedClassifier(clf, pur, grad="bpda")),
                               min(restarts, self.p.dg_attack_restarts))]
        return self.attacks(clf, pur, eps, restarts, steps, reject, norm)

    # ---- sections ------------------------------------------------------------------------------------------
    def clean(self) -> dict:
        out = {}
        n = self.p.clean_n
        x, y = self.x_all[:n], self.y_all[:n]
        for d in DEFENSES:
            m = n if d != "Defense-GAN-style" else min(n, self.p.n_dg_clean)
            acc = chunked(self.judge(d), x[:m], y[:m], 500)
            out[d] = {"accuracy": float(acc.float().mean()), "n": m}
        return out

    def headline_eps(self, norm: str, eps: float) -> bool:
        return norm == "Linf" and eps == self.p.eps

    def robust_grid(self, norm: str, eps: float) -> dict:
        """One eps: none / oblivious / adaptive for every defense (Defense-GAN on its subset). Resumable: each
        finished defense, and the worst-case state of the one under attack, are kept in ``work/partial-grid-...``
        (the headline purifier's adversarial examples beside them), so a run cut off resumes where it stopped."""
        n = self.p.n if norm == "Linf" else self.p.n_l2
        x, y = self.x[:n], self.y[:n]
        restarts = self.p.restarts if self.headline_eps(norm, eps) else 1
        out = {"eps": eps, "norm": norm, "n": n, "restarts": restarts, "defenses": {}}
        parts, save = self.partial(f"grid-{norm}-{eps}", self.checkpoints)
        # oblivious: PGD on the target classifier, last iterate, one restart; shared by both purifiers
        obl = chunked(lambda a, b: PGD(eps=eps, steps=self.p.steps, norm=norm, seed=self.p.seed, best_iterate=False)
                      .run(ce_objective(self.clf), a, b), x, y, self.p.batch_size)
        for d in DEFENSES:
            m = min(n, self.p.n_dg) if d == "Defense-GAN-style" else n
            if d == "Defense-GAN-style" and not self.headline_eps(norm, eps):
                continue  # L x R decoder passes per forward: attacked at the headline eps only
            keep = d == "PuVAE purifier" and self.headline_eps(norm, eps)
            adv_path = self.work / f"adv-{norm}-{eps}.npz"
            if d in parts.get("defenses", {}) and (not keep or adv_path.is_file()):
                out["defenses"][d] = parts["defenses"][d]
                continue
            holds = self.judge(d)
            attacks = self.adaptive_attacks(d, eps, norm, restarts)
            buffer_path = self.work / f"adv-{norm}-{eps}.partial.npz"
            adversarial = x[:m].clone()
            if keep and f"state {d}" in parts and buffer_path.is_file():
                adversarial = torch.from_numpy(np.load(buffer_path)["adv"])

            def progress(state, d=d, adversarial=adversarial):
                if keep:
                    write_npz(buffer_path, adv=adversarial.numpy())
                parts[f"state {d}"] = state
                save()

            res = worst_case(attacks, holds, x[:m], y[:m], self.p.batch_size, state=parts.get(f"state {d}"),
                             on_step=progress, adversarial=adversarial)
            row = {"n": m, "adaptive": res["accuracy"], "steps": res["steps"],
                   "broken_by": {a.name: res["broken_by"].count(a.name) for a in attacks},
                   "adaptive_robust": res["robust"].tolist()}
            if d in CLASSIFIER_ROWS:
                row["none"] = row["oblivious"] = res["accuracy"]  # no purifier: every threat model is white-box
            else:
                row["oblivious"] = float(chunked(holds, obl[:m], y[:m], self.p.batch_size).float().mean())
            if keep:
                write_npz(adv_path, x=x.numpy(), adv=res["adversarial"].numpy())
                buffer_path.unlink(missing_ok=True)
            out["defenses"][d] = row
            parts.setdefault("defenses", {})[d] = row
            parts.pop(f"state {d}", None)
            save()
        return out

    def art_attacks(self) -> dict:
        """ART's Square and AutoAttack (``protocol.Bench.art``) on every defense but the Defense-GAN-style one."""
        p = self.p
        out = {"eps": p.eps, "n": p.n_art, "square_queries": p.square_queries, "apgd_iters": p.apgd_iters,
               "defenses": {}}
        for d in ("no defense", "PGD-AT", "FGSM-AT", "PuVAE purifier"):
            res = self.art(*self.models[d])
            del res["n"]
            out["defenses"][d] = {**res, "gradients": "BPDA through purifier.art_bridge" if d == "PuVAE purifier"
                                  else "the classifier's own"}
        return out

    def cw(self) -> dict:
        """CW-L2 (ART) median perturbation size of successful examples, bare classifier and BPDA purifier."""
        from art.attacks.evasion import CarliniL2Method

        from purifier.art_bridge import art_classifier

        n = self.p.n_cw
        x, y = self.x[:n].numpy(), self.y[:n].numpy()
        out = {"n": n, "max_iter": self.p.cw_iters, "binary_search_steps": 5, "max_halving": 2, "max_doubling": 2,
               "learning_rate": 0.01, "initial_const": 0.1, "defenses": {}}
        for d in ("no defense", "PGD-AT", "PuVAE purifier"):
            est = art_classifier(*self.models[d], grad="bpda")
            # ART's line search runs up to max_halving + max_doubling extra forward passes per iteration
            attack = CarliniL2Method(est, confidence=0.0, learning_rate=0.01, binary_search_steps=5,
                                     max_iter=self.p.cw_iters, initial_const=0.1, max_halving=2, max_doubling=2,
                                     batch_size=self.p.batch_size, verbose=False)
            adv = attack.generate(x, y=y)
            holds = self.judge(d)
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
        """``checks.defense_checks`` on every defense, with the grid's L-infinity figures for the monotone check
        and every grid's adaptive against oblivious figure; the Defense-GAN-style purifier on its subset and
        without the more-steps check (L x R decoder passes per step)."""
        from purifier.art_bridge import art_classifier

        p = self.p
        checks = {}
        for d in DEFENSES:
            clf, pur = self.models[d]
            dg = d == "Defense-GAN-style"
            n = min(p.n_sanity, p.n_dg) if dg else p.n_sanity
            by_eps = [(e, grids[f"Linf-{e}"]["defenses"][d]["adaptive"], grids[f"Linf-{e}"]["defenses"][d]["n"])
                      for e in p.eps_linf if d in grids[f"Linf-{e}"]["defenses"]]
            oblivious = {} if pur is None else {
                f" at {key}": (g["defenses"][d]["adaptive"], g["defenses"][d]["oblivious"], g["defenses"][d]["n"])
                for key, g in grids.items() if d in g["defenses"]}
            k = 8 if dg else 64  # a Defense-GAN-style forward is costly
            if dg:
                objectives = {"Defense-GAN BPDA": ce_objective(PurifiedClassifier(clf, pur, grad="bpda"))}
            else:
                objectives = {"PGD": ce_objective(clf)} if pur is None else purifier_objectives(clf, pur)
            checks.update(defense_checks(
                lambda eps, restarts, steps=None, d=d: self.adaptive_attacks(d, eps, "Linf", restarts, steps),
                self.judge(d), self.x[:n], self.y[:n], eps=p.eps, sanity_steps=p.sanity_steps,
                batch_size=p.batch_size, by_eps=by_eps, oblivious=oblivious, objectives=objectives,
                x_grad=self.x[:k], y_grad=self.y[:k], purifier=pur, more_steps=not dg,
                art=(clf, art_classifier(clf, pur, grad="bpda")) if d == "PuVAE purifier" else None,
                suffix=f" ({d})"))
        return checks

    def speed(self) -> dict:
        """ms/image at batch 1 and 256: classifier, PuVAE in torch and onnxruntime (interleaved, the protocol's
        ``speed_images``; the default memory layout users get), Defense-GAN-style in torch (fewer images)."""
        x = self.x_all.numpy()
        clf, pur = self.load(self.rows["PuVAE purifier"], channels_last=False)
        fns = {"classifier (torch eager)": self.forward(clf, None),
               "PuVAE purifier + classifier (torch eager)": self.forward(clf, pur),
               "PuVAE purifier + classifier (onnxruntime cpu)": lambda a: self.onnx.session.run(["logits"], {"x": a})}
        dg = "Defense-GAN-style + classifier (torch eager)"
        out = {}
        for batch, images, dg_images in zip((1, 256), self.p.speed_images, self.p.dg_speed_images):
            timed = time_interleaved(fns, x[:images], batch, self.p.speed_reps)
            # about a minute per batch of 256: fewer images, at most 3 repetitions
            timed[dg] = time_it(self.forward(clf, self.dg), x[:dg_images], batch, min(self.p.speed_reps, 3))
            for name, r in timed.items():
                out[f"{name} @ batch {batch}"] = {"name": name, **r}
        for batch in (1, 256):
            ours = out[f"PuVAE purifier + classifier (onnxruntime cpu) @ batch {batch}"]["ms_per_image"]
            ours_torch = out[f"PuVAE purifier + classifier (torch eager) @ batch {batch}"]["ms_per_image"]
            t_dg = out[f"{dg} @ batch {batch}"]["ms_per_image"]
            out[f"ratio @ batch {batch}"] = {"defensegan_over_puvae_torch": t_dg / ours_torch,
                                             "defensegan_over_puvae_onnxruntime": t_dg / ours}
        return out


def write_npz(path: Path, **arrays) -> None:
    """``np.savez_compressed`` through a temporary file and a rename: a crash leaves the old file or none."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    tmp.replace(path)


def settings(report: dict) -> dict:
    """The report's profile under protocol.Profile's names (files written before robust.py took them call the
    headline eps ``headline`` and its restarts ``restarts_headline``)."""
    p = dict(report["profile"])
    p.setdefault("eps", p.get("headline"))
    p.setdefault("restarts", p.get("restarts_headline"))
    return p


def labeller(report: dict):
    """The table label of each defense: an adversarially trained baseline's says how long it was trained."""
    labels = report.get("labels", LEGACY_LABELS)
    return lambda d: labels.get(d, d)


def headline_rows(report: dict) -> list[list]:
    h = settings(report)["eps"]
    label = labeller(report)
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
        rows.append([label(d), f"{report['clean'][d]['accuracy']:.4f} ({report['clean'][d]['n']})", none,
                     f"{r['oblivious']:.3f}", f"{r['adaptive']:.3f} ({r['n']})", bb,
                     f"{a['autoattack']:.3f}" if a else "not run", worst])
    return rows


def render(report: dict) -> str:
    p = settings(report)
    label = labeller(report)
    parts = [f"Fashion-MNIST test set, first {p['n']} images; L-infinity eps {p['eps']}; PGD-{p['steps']} "
             f"(step 2.5*eps/steps, random start, best iterate), {p['restarts']} restarts per adaptive "
             f"attack at eps {p['eps']} (1 elsewhere); seed {p['seed']}. Square ({p['square_queries']} queries) "
             f"and AutoAttack-style APGD-CE/APGD-DLR ({p['apgd_iters']} iterations, 1 start) from ART on "
             f"the first {p['n_art']}. Defense-GAN-style: L={p['dg_steps']}, R={p['dg_restarts']}, attacked on the "
             f"first {p['n_dg']} at eps {p['eps']} only. Clean accuracy on the first {p['clean_n']} "
             f"(Defense-GAN-style: {p['n_dg_clean']}). PuVAE's adaptive worst case: the selection attack, full "
             f"gradient, BPDA and softmin"
             + (f", then targeted selection and targeted logit margins toward each of the {p['targeted']} runner-up "
                f"classes." if p.get("targeted") else
                f"; {OLDER_SUITE}."),
             "",
             "### Headline",
             markdown_table(["defense", "clean (n)", "none", "oblivious", "adaptive worst case (n)",
                             "black-box (Square)", "AutoAttack (BPDA for PuVAE)", f"worst of all (first {p['n_art']})"],
                            headline_rows(report))]
    if report.get("baseline_notes"):
        parts += ["", "; ".join(f"{label(d)}: {v}" for d, v in report["baseline_notes"].items()) + "."]
    for norm, grid_eps in (("Linf", p["eps_linf"]), ("L2", p["eps_l2"])):
        rows = []
        for d in DEFENSES:
            for tm in ("oblivious", "adaptive"):
                vals = [report["grids"][f"{norm}-{e}"]["defenses"].get(d, {}).get(tm) for e in grid_eps]
                rows.append([label(d), tm, *["—" if v is None else f"{v:.3f}" for v in vals]])
        parts += ["", f"### {norm}: robust accuracy against eps (classifier rows: white-box PGD in both lines)",
                  markdown_table(["defense", "threat model", *[str(e) for e in grid_eps]], rows)]
    h = report["grids"][f"Linf-{p['eps']}"]["defenses"]["PuVAE purifier"]
    parts += ["", f"### PuVAE purifier at eps {p['eps']}: which attack broke each image (first to succeed, "
                  "strongest first)",
              markdown_table(["attack", "images broken"], [[k, v] for k, v in h["broken_by"].items()])]
    rj = report["reject"]
    false_alarms = rj.get("false_alarm_rate", report["clean"]["PuVAE purifier"].get("false_alarm_rate"))
    parts += ["", "### Reject option (PuVAE purifier)",
              markdown_table(["threshold", "clean false alarms", f"defended at eps {p['eps']} (worst case, n "
                              f"{rj['n']})", "adversarial examples flagged"],
                             [[f"{rj['threshold']:.5f}", f"{false_alarms:.4f}", f"{rj['defended']:.3f}",
                               f"{rj['rejected_among_adversarial']:.3f}"]])]
    cw = report["cw"]
    parts += ["", f"### CW-L2 (ART, {cw['max_iter']} iterations x {cw['binary_search_steps']} binary-search steps, "
                  f"first {cw['n']})",
              markdown_table(["defense", "success rate (of clean-correct)", "median L2 of successful examples"],
                             [[label(d), f"{v['success_rate']:.3f} (of {v['clean_correct']})",
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

    p = settings(report)
    label = labeller(report)
    files = []
    for norm, grid_eps in (("Linf", p["eps_linf"]), ("L2", p["eps_l2"])):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for ax, tm in zip(axes, ("oblivious", "adaptive")):
            for d in DEFENSES:
                pts = [(e, report["grids"][f"{norm}-{e}"]["defenses"][d][tm]) for e in grid_eps
                       if d in report["grids"][f"{norm}-{e}"]["defenses"]]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=label(d))
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
@click.option("--baselines", default=str(ROOT / "models" / "baselines"), show_default=True,
              help="Folder of the FGSM-AT classifier and the Defense-GAN-style VAE.")
@click.option("--pgd-at", "pgd_at", default=str(ROOT / "models" / "baselines" / "pgd-at-converged"),
              show_default=True, help="The PGD-AT baseline (results/robust-full.json: the 3-epoch models/baselines/"
                                      "pgd-at); its tables say how long it was trained.")
@click.option("--n", type=int, help="Override the profile's image count.")
@click.option("--out", help="Results file (default results/robust-PROFILE.json).")
@click.option("--work", help="Cache of finished sections, for resuming (default: results/.robust-PROFILE-work).")
@click.option("--threads", type=int, help="torch threads (default: torch's).")
def main(profile_name, model_dir, baselines, pgd_at, n, out, work, threads):
    if threads:
        torch.set_num_threads(threads)
    profile = PROFILES[profile_name] if n is None else replace(PROFILES[profile_name], n=n)
    out, work = output_paths("robust", profile_name, out, work)
    start = time.perf_counter()
    bench = Bench(profile, Path(model_dir), Path(baselines), Path(pgd_at), work, lambda m: click.echo(m, err=True))
    # the sections cached under work are reused only with the same settings and weights
    settings_now = json.loads(json.dumps({"profile": asdict(profile), "checkpoints": bench.checkpoints}))
    recorded = work / "profile.json"
    if recorded.is_file() and json.loads(recorded.read_text()) != settings_now:
        raise click.UsageError(f"{work} holds sections measured with other settings or weights ({recorded}); "
                               f"remove it or pass another --work")
    recorded.write_text(json.dumps(settings_now))
    report = {**report_head(__file__, profile_name, profile, software=("onnxruntime",)),
              "threat_model_notes": {
                  "classifier rows": "no purifier: none, oblivious and adaptive are all white-box PGD on the model",
                  "Defense-GAN-style adaptive": "BPDA only, with dg_attack_restarts restarts (fewer than the "
                                                "protocol's 5: cost), so an upper bound; the full gradient would "
                                                "unroll L x R Adam steps; the defense is deterministic (fixed "
                                                "starting points), so no EOT",
                  "Defense-GAN-style black-box/AutoAttack": "not run: one forward costs L x R decoder passes, "
                                                             "thousands of queries per image are out of budget",
                  "Defense-GAN-style sanity": "on its first n_dg images, without the more-steps check (L x R "
                                              "decoder passes per step)",
                  "oblivious": f"one restart at every eps; PGD-{profile.steps} last iterate on the target classifier",
                  "AutoAttack": "ART's AutoAttack with a reduced list: APGD-CE and APGD-DLR (1 start each); Square "
                                "(1 restart) runs alone as the black-box column and enters the worst of all; the "
                                "standard list adds DeepFool and 5 starts/restarts"},
              "labels": bench.labels, "baseline_notes": bench.notes,
              "checkpoints": bench.checkpoints, "paths": {k: str(v) for k, v in bench.paths.items()}}
    report["clean"] = bench.cached("clean", bench.clean)
    grids = {}
    for norm, eps_list in (("Linf", profile.eps_linf), ("L2", profile.eps_l2)):
        for eps in eps_list:
            grids[f"{norm}-{eps}"] = bench.cached(f"grid-{norm}-{eps}", lambda: bench.robust_grid(norm, eps))
    report["grids"] = grids
    report["reject"] = bench.reject_section("reject", bench.rows["PuVAE purifier"])
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
    adv = np.load(work / f"adv-Linf-{profile.eps}.npz")
    x_adv = torch.from_numpy(adv["adv"][:10])
    with torch.no_grad():
        purified = bench.purifier(x_adv)["purified"].numpy()
    grid_path = out.with_name(f"{out.stem}-grid.png")
    write_png(grid_path, image_grid([adv["x"][:10], adv["adv"][:10], purified]))
    report["plots"].append(grid_path.name)
    heading = (f"# Robust accuracy, profile {profile_name}\n\nGenerated by benchmarks/robust.py; image grid "
               f"{grid_path.name}: rows clean, adaptive worst-case adversarial (eps {profile.eps}), purified.")
    write_results(out, report, heading, render(report))
    click.echo(render(report).split("### L")[0])
    click.echo(f"{report['seconds']:.0f} s; -> {out}", err=True)


if __name__ == "__main__":
    main()
