"""The benchmark protocol (../shared/BENCHMARK_PROTOCOL.md), written once and imported by every benchmark script.

A benchmark is a list of rows (a classifier, optionally with a purifier around it) and its tables; this module
measures a row: clean accuracy; oblivious PGD on the row's target classifier; the adaptive per-image worst case
over the selection attack, full gradient, BPDA and softmin, then the targeted attacks toward the profile's
``targeted`` runner-up classes (targeted selection margins and targeted logit margins through the softmin);
ART's Square (scores only) and AutoAttack-style APGD-CE/APGD-DLR through BPDA; the worst of all of them; the
protocol's sanity checks; the reject option's defended rate; images/s of every row timed together.

Profiles (``PROFILES``) fix every setting; a results file records its profile and the command that made it.
Row caches: ``results/.STEM-work/`` beside ``results/STEM.json`` (``output_paths``), one ``row-NAME.json`` per
finished row, reused while its weights' sha256, its purifier spec and its attack suite are unchanged, and
``partial-NAME.json`` holding a row's finished parts (each attack and restart) so an interrupted row resumes.
"""
from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import click
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from export.onnx_export import calibrate_threshold  # noqa: E402
from purifier import __version__, checkpoint  # noqa: E402
from purifier.checkpoint import write_json  # noqa: E402
from purifier.attacks import PGD, RejectOption, ce_objective  # noqa: E402
from purifier.data import load_dataset  # noqa: E402
from purifier.designs import load_prior, prior_path, purifier_from_spec  # noqa: E402
from purifier.pipeline import Purifier  # noqa: E402
from purifier.provenance import cpu_model, git_commit  # noqa: E402
from purifier.robust import chunked, pgd_attack, purifier_attacks, purifier_objectives, worst_case  # noqa: E402

from benchmarks.checks import defense_checks  # noqa: E402  (benchmarks/checks.py)
from benchmarks.results import cached, write_results  # noqa: E402  (benchmarks/results.py)
from benchmarks.speed import time_interleaved  # noqa: E402  (benchmarks/speed.py)

UNTARGETED = ("selection", "full gradient", "BPDA", "softmin")


@dataclass(frozen=True)
class Profile:
    n: int                    # first n test images for every robust figure
    steps: int                # PGD steps (step 2.5 * eps / steps, random start, best iterate)
    restarts: int             # restarts of every adaptive attack
    eps: float = 0.1
    n_art: int = 250          # Square and AutoAttack on the first n_art
    square_queries: int = 1000
    apgd_iters: int = 100
    n_sanity: int = 100
    sanity_steps: tuple = (20, 100)
    sanity_eps: float = 0.2   # robust accuracy there must not exceed the headline's on the same images
    reject_penalty: float = 10.0
    clean_n: int = 10000
    speed_reps: int = 5
    speed_images: tuple = (64, 1024)  # images timed at batch 1 and at batch 256
    batch_size: int = 250
    seed: int = 0
    targeted: int = 3         # the worst case adds targeted attacks toward this many runner-up classes (0: none)


PROFILES = {
    # the protocol's headline settings; a purifier row took 60-100 minutes here, two rows sharing the 2 cores
    # (attack_seconds in results/adversarial-full.json): 8 to 13 hours for all 8 rows
    "full": Profile(n=1000, steps=100, restarts=5, n_art=500),
    # what results/adversarial.json was run with: 8 rows in about 140 minutes on 2 cores (section_seconds there;
    # Square's 500 queries through the purifier cost most of a row)
    "standard": Profile(n=500, steps=100, restarts=1, n_art=200, square_queries=500),
    "quick": Profile(n=100, steps=20, restarts=1, n_art=50, square_queries=200, apgd_iters=20, n_sanity=50,
                     sanity_steps=(10, 20), clean_n=2000, speed_reps=3),
    "tiny": Profile(n=6, steps=2, restarts=1, n_art=4, square_queries=5, apgd_iters=2, n_sanity=4,
                    sanity_steps=(1, 2), clean_n=50, speed_reps=1, speed_images=(4, 256), batch_size=4, targeted=1),
}


@dataclass(frozen=True)
class Row:
    name: str
    classifier: str           # checkpoint path (relative to the repository root or absolute)
    cvae: str | None = None   # None: the classifier alone, no purifier
    note: str = ""
    purifier: dict | None = None  # the purifier spec around the model (None: the one its checkpoint records)
    prior: str | None = None      # checkpoint of a spec's prior classifier (None: the one beside the model)


CONVERGED = (("PGD-AT (converged)", "pgd-at-converged", "PGD-10"),
             ("TRADES (converged)", "trades-converged", "TRADES, beta 6, 10 KL steps"))


def training_length(path: str | Path) -> str:
    """How long the classifier at ``path`` (relative to the repository root or absolute) was trained, from its
    checkpoint: the epochs run and the epoch whose weights it keeps when training stopped on validation robust
    accuracy, the epochs otherwise."""
    meta = checkpoint.read_record(ROOT / path).get("meta", {})
    if "best_epoch" in meta:
        return (f"{meta.get('epochs_run')} epochs run, weights of epoch {meta['best_epoch']} (best validation robust "
                f"accuracy)")
    return f"{meta.get('train', {}).get('epochs', meta.get('epochs_run'))} epochs"


def converged_baselines(baselines: str, prefix: str = "") -> list[Row]:
    """PGD-AT and TRADES of architecture A trained until the validation robust accuracy stopped rising (``make
    converged-baselines``); each note gives the training length read from the checkpoint."""
    rows = []
    for name, stem, how in CONVERGED:
        path = f"{baselines}/{stem}"
        record = ROOT / f"{path}.json"
        note = f"eps 0.1, {how}: make converged-baselines"
        if record.is_file():
            note = f"eps 0.1, {how}, {training_length(path)}"
        rows.append(Row(prefix + name, path, note=note))
    return rows


def checkpoints_of(row: Row) -> dict:
    """sha256 of the row's weights: a cached row is reused only while they are unchanged."""
    out = {"classifier": checkpoint.read_record(ROOT / row.classifier)["weights_sha256"]}
    if row.cvae:
        record = checkpoint.read_record(ROOT / row.cvae)
        out["cvae"] = record["weights_sha256"]
        spec = row.purifier or record["meta"].get("purifier") or {}
        if spec.get("prior_weight"):  # the prior and its weight, wherever the spec comes from
            out["prior"] = checkpoint.read_record(row_prior(row))["weights_sha256"]
            out["purifier"] = spec
    if row.purifier:
        out["purifier"] = row.purifier
    return out


def row_prior(row: Row) -> Path:
    """The checkpoint of the row's robust prior: ``row.prior``, or the one beside its CVAE."""
    return ROOT / row.prior if row.prior else prior_path(ROOT / row.cvae)


# profile settings that change no row's figures: the speed section's, and the suite, which ``targeted_of`` reads off
# the attacks a row ran
NOT_ROW_SETTINGS = ("speed_reps", "speed_images", "targeted")


def same_attacks(a: dict, b: dict) -> bool:
    """Whether two profiles (as JSON) give a row the same figures: equal but for ``NOT_ROW_SETTINGS``."""
    def keep(p):
        return {k: v for k, v in p.items() if k not in NOT_ROW_SETTINGS}
    return keep(a) == keep(b)


def published_rows(report: dict) -> dict:
    """A results file's rows by name, each with the profile it was measured with (a row written before rows
    recorded theirs has its file's)."""
    return {name: {"profile": report["profile"], **row} for name, row in report.get("rows", {}).items()
            if isinstance(row, dict)}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def art_attacks(white, black, holds, x: torch.Tensor, y: torch.Tensor, eps: float, square_queries: int,
                apgd_iters: int, batch_size: int, seed: int) -> dict:
    """ART's attacks at L-infinity ``eps``: Square (``square_queries``, scores only) on the estimator ``black``,
    and AutoAttack with APGD-CE and APGD-DLR (``apgd_iters``, 1 start each) on ``white`` (through BPDA where a
    purifier is in front); ``holds(x, y)`` judges the examples. Per-image results enter the worst of all."""
    from art.attacks.evasion import AutoAttack, AutoProjectedGradientDescent, SquareAttack

    x, y = x.numpy(), y.numpy()
    np.random.seed(seed)
    sq = SquareAttack(black, norm=np.inf, eps=eps, max_iter=square_queries, p_init=0.8, nb_restarts=1,
                      batch_size=batch_size, verbose=False)
    t0 = time.perf_counter()
    x_sq = sq.generate(x, y=y)
    sq_s = time.perf_counter() - t0
    apgd = [AutoProjectedGradientDescent(white, norm=np.inf, eps=eps, eps_step=2 * eps, max_iter=apgd_iters,
                                         nb_random_init=1, batch_size=batch_size, loss_type=loss, verbose=False)
            for loss in ("cross_entropy", "difference_logits_ratio")]
    # Square ran alone above (scores only); the worst of all takes both
    aa = AutoAttack(white, norm=np.inf, eps=eps, eps_step=2 * eps, attacks=apgd, batch_size=batch_size)
    t0 = time.perf_counter()
    x_aa = aa.generate(x, y=y)
    aa_s = time.perf_counter() - t0
    ok_sq = holds(torch.from_numpy(x_sq), torch.from_numpy(y))
    ok_aa = holds(torch.from_numpy(x_aa), torch.from_numpy(y))
    return {"n": len(y), "square": float(ok_sq.float().mean()), "autoattack": float(ok_aa.float().mean()),
            "square_robust": ok_sq.tolist(), "autoattack_robust": ok_aa.tolist(), "square_seconds": sq_s,
            "autoattack_seconds": aa_s, "max_linf": float(max(np.abs(x_aa - x).max(), np.abs(x_sq - x).max()))}


def targeted_of(row: dict) -> int:
    """Runner-up classes the row's (or reject section's) targeted attacks aimed at (0: none), from its recorded
    attacks (the reject option's carry their penalty in the name: "targeted selection r1 (penalty 10)")."""
    return len({s["attack"].split(" (penalty")[0] for s in row.get("steps", [])
                if s["attack"].startswith("targeted selection")})


def untargeted_adaptive(row: dict) -> float | None:
    """Robust accuracy after the untargeted attacks alone: the worst case runs them first, so this is the
    accuracy recorded after the last of them."""
    steps = [s for s in row["steps"] if s["attack"] in UNTARGETED]
    return steps[-1]["accuracy"] if steps else None


OLDER_SUITE = ("measured with the older suite, before the targeted attacks joined it: every adaptive figure of a "
               "purifier here is an upper bound until it is measured again")


def suite_text(p: dict) -> str:
    """The attack suite of a report's profile, in a sentence, for the tables' headers."""
    targeted = p.get("targeted", 0)
    tail = (f", then targeted selection and targeted logit margins (through the softmin) toward each of the "
            f"{targeted} runner-up classes" if targeted else f" ({OLDER_SUITE})")
    return (f"adaptive = per-image worst case over the selection attack, full gradient, BPDA and softmin{tail} "
            f"(classifier rows: PGD on the classifier), PGD-{p['steps']} (step 2.5*eps/steps, random start, best "
            f"iterate), {p['restarts']} restart(s), seed {p['seed']}")


class Bench:
    """The protocol's measurements of a row, with the settings of ``profile``; sections are cached under ``work``
    and ``on_progress`` gets one line per finished section."""

    def __init__(self, profile: Profile, work: Path, on_progress):
        self.p, self.work, self.say = profile, work, on_progress
        test = load_dataset("fashion-mnist", "test")
        self.x_all, self.y_all = torch.from_numpy(test.x), torch.from_numpy(test.y)
        self.x, self.y = self.x_all[:profile.n], self.y_all[:profile.n]

    def load(self, row: Row, channels_last: bool = True):
        """The row's (classifier, purifier or None), frozen, in eval mode. ``channels_last`` (attacks): the
        convolutions' NHWC kernels run the classifier's forward and backward ~1.5x faster here, the same
        arithmetic up to float rounding; the speed section times the default layout users get."""
        models = [checkpoint.load(ROOT / row.classifier, expect="classifier")]
        if row.cvae is not None:
            models.append(checkpoint.load(ROOT / row.cvae, expect="cvae"))
            spec = row.purifier or models[1].meta.get("purifier")
            prior = load_prior(ROOT / row.cvae, spec, row.prior and ROOT / row.prior)
            if prior is not None:
                models.append(prior)
        for m in models:
            m.eval()
            if channels_last:
                m.to(memory_format=torch.channels_last)
            for q in m.parameters():
                q.requires_grad_(False)
        if len(models) == 1:
            return models[0], None
        pur = purifier_from_spec(models[1], spec, prior=prior)
        # analysis by synthesis: attacks differentiate through the unrolled latent steps (the same forward)
        return models[0], (pur.attack_view() if hasattr(pur, "attack_view") else pur).eval()

    def cached(self, name: str, fn):
        return cached(self.work, name, fn, self.say)

    def profile_json(self) -> dict:
        """The profile as it reads back from a results file (tuples become lists)."""
        return json.loads(json.dumps(asdict(self.p)))

    def suite(self, row: Row) -> int:
        """Runner-up classes of the row's targeted attacks: the profile's for a purifier row, none for a classifier."""
        return self.p.targeted if row.cvae else 0

    def finished_rows(self):
        """(where, row) for every finished row the results folder holds: the rows of the other benchmarks' caches
        (``results/.*-work/row-*.json``) and of the other benchmarks' published results files (``results/*.json``),
        each with the profile it was measured with (a row written before rows recorded theirs has its file's).
        This benchmark's own file is left out, so deleting a row's cache measures it again."""
        def read(path):
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError):
                return None  # removed meanwhile by another benchmark's run, or not JSON

        for path in sorted(self.work.parent.glob(".*-work/row-*.json")):
            old = read(path)
            if path.parent != self.work and isinstance(old, dict) and {"profile", "name", "checkpoints"} <= set(old):
                yield path.parent.name, old
        for path in sorted(self.work.parent.glob("*.json")):
            report = read(path)
            if self.work.name == f".{path.stem}-work" or not isinstance(report, dict) or \
                    not isinstance(report.get("rows"), dict) or "profile" not in report:
                continue
            for old in published_rows(report).values():
                if {"name", "checkpoints"} <= set(old):
                    yield path.name, old

    def measured_elsewhere(self, row: Row) -> dict | None:
        """The same row measured before: a finished row (``finished_rows``) with the same weights and purifier spec,
        the same attack settings and the same attack suite, so the same computation. ``None`` when there is none."""
        want, suite = checkpoints_of(row), self.suite(row)
        for where, old in self.finished_rows():
            if old.get("checkpoints") == want and same_attacks(old["profile"], self.profile_json()) and \
                    targeted_of(old) == suite:
                self.say(f"{row.name}: measured as {old['name']!r} in {where}")
                # a row taken from one taken from elsewhere names where it was measured
                return {**old, "name": row.name,
                        "measured_as": old.get("measured_as", {"name": old["name"], "cache": where})}
        return None

    def partial(self, name: str, checkpoints: dict) -> tuple[dict, Callable[[], None]]:
        """The finished parts of section NAME (``work/partial-NAME.json``, written as they finish, so a section
        cut off by a session's end resumes where it stopped), empty when its weights or the profile changed;
        and a function that saves them."""
        path = self.work / f"partial-{name}.json"
        parts = json.loads(path.read_text()) if path.is_file() else {}
        profile = self.profile_json()
        if parts.get("checkpoints") != checkpoints or parts.get("profile") != profile:
            parts = {"checkpoints": checkpoints, "profile": profile}
        return parts, lambda: write_json(path, parts)

    @staticmethod
    def holds(clf, pur):
        def fn(x, y):
            with torch.no_grad():
                return clf(x if pur is None else pur(x)["purified"]).argmax(1) == y
        return fn

    def attacks(self, clf, pur, eps: float, restarts: int, steps: int | None = None,
                reject: RejectOption | None = None, norm: str = "Linf"):
        """The adaptive attacks on ``clf`` behind ``pur`` (PGD on the classifier when ``pur`` is None)."""
        pgd = PGD(eps=eps, steps=steps or self.p.steps, norm=norm, seed=self.p.seed)
        if pur is None:
            return [pgd_attack("PGD", pgd, ce_objective(clf), restarts)]
        return purifier_attacks(clf, pur, pgd, restarts, reject, self.p.targeted)

    def row(self, row: Row) -> dict:
        """One row; its parts (clean + oblivious, each adaptive attack and restart, ART, sanity) are kept in
        ``work/partial-ROW.json`` as they finish, so a row cut off (a session's end) resumes where it stopped."""
        p = self.p
        clf, pur = self.load(row)
        holds = self.holds(clf, pur)
        out = {"name": row.name, "classifier": row.classifier, "cvae": row.cvae, "note": row.note,
               "checkpoints": checkpoints_of(row), "targeted": self.suite(row),
               "profile": self.profile_json()}
        parts, save = self.partial(slug(row.name), out["checkpoints"])

        def part(key, fn):
            if key not in parts:
                parts[key] = fn()
                save()
            return parts[key]

        def clean_and_oblivious():
            x_c, y_c = self.x_all[:p.clean_n], self.y_all[:p.clean_n]
            # oblivious: PGD on the target classifier (last iterate), then the purifier
            obl = chunked(lambda a, b: PGD(eps=p.eps, steps=p.steps, seed=p.seed, best_iterate=False)
                          .run(ce_objective(clf), a, b), self.x, self.y, p.batch_size)
            return {"clean": float(chunked(holds, x_c, y_c, 500).float().mean()), "clean_n": p.clean_n,
                    "oblivious": float(chunked(holds, obl, self.y, p.batch_size).float().mean())}

        out.update(part("clean_and_oblivious", clean_and_oblivious))
        attacks = self.attacks(clf, pur, p.eps, p.restarts)

        def progress(state):
            parts["adaptive_state"] = state
            save()

        res = worst_case(attacks, holds, self.x, self.y, p.batch_size, state=parts.get("adaptive_state"),
                         on_step=progress)
        out.update({"adaptive": res["accuracy"], "adaptive_robust": res["robust"].tolist(), "steps": res["steps"],
                    "broken_by": {a.name: res["broken_by"].count(a.name) for a in attacks}})
        out["art"] = part("art", lambda: self.art(clf, pur))
        m = p.n_art
        worst = res["robust"][:m].numpy() & np.array(out["art"]["square_robust"]) & \
            np.array(out["art"]["autoattack_robust"])
        out["worst_of_all"] = float(worst.mean())
        out["sanity"] = part("sanity", lambda: self.sanity(clf, pur, res["robust"], out))
        return out

    def art(self, clf, pur) -> dict:
        from purifier.art_bridge import art_classifier

        p = self.p
        return art_attacks(art_classifier(clf, pur, grad="bpda"), art_classifier(clf, pur, grad="none"),
                           self.holds(clf, pur), self.x[:p.n_art], self.y[:p.n_art], p.eps, p.square_queries,
                           p.apgd_iters, p.batch_size, p.seed)

    def sanity(self, clf, pur, robust: torch.Tensor, row: dict) -> dict:
        """``checks.defense_checks`` on the row: robust accuracy at ``sanity_eps`` against the headline's on the
        first ``n_sanity`` images, each attack at ``sanity_steps``, adaptive against oblivious, the gradients,
        determinism and the ART bridge (purifier rows)."""
        from purifier.art_bridge import art_classifier

        p = self.p
        n = p.n_sanity
        x, y = self.x[:n], self.y[:n]
        holds = self.holds(clf, pur)
        head = float(robust[:n].float().mean())
        big = worst_case(self.attacks(clf, pur, p.sanity_eps, 1), holds, x, y, p.batch_size)["accuracy"]
        return defense_checks(
            lambda eps, restarts, steps=None: self.attacks(clf, pur, eps, restarts, steps), holds, x, y, eps=p.eps,
            sanity_steps=p.sanity_steps, batch_size=p.batch_size, by_eps=[(p.eps, head, n), (p.sanity_eps, big, n)],
            oblivious={} if pur is None else {"": (row["adaptive"], row["oblivious"], p.n)},
            objectives={"PGD": ce_objective(clf)} if pur is None else purifier_objectives(clf, pur),
            x_grad=self.x[:64], y_grad=self.y[:64], purifier=pur,
            art=None if pur is None else (clf, art_classifier(clf, pur, grad="bpda")))

    def speed(self, rows: list[Row]) -> dict:
        """images/s of every row, measured together in one section and in interleaved rounds
        (``speed.time_interleaved``), so with the machine in the same state for every row."""
        fns = {r.name: self.forward(*self.load(r, channels_last=False)) for r in rows}
        x = self.x_all.numpy()
        by_batch = {b: time_interleaved(fns, x[:images], b, self.p.speed_reps)
                    for b, images in zip((1, 256), self.p.speed_images)}
        return {"threads": torch.get_num_threads(),
                **{name: {f"batch {b}": by_batch[b][name] for b in by_batch} for name in fns}}

    @staticmethod
    def forward(clf, pur):
        def fn(a):
            with torch.no_grad():
                t = torch.from_numpy(a)
                return clf(t if pur is None else pur(t)["purified"])

        return fn

    def reject_section(self, key: str, row: Row) -> dict:
        """``reject(row)`` cached under ``key``; a cached one measured with fewer targeted runner-up classes than
        the profile's is measured again, resuming from the finished attacks its partial state holds."""
        path, weights = self.work / f"{key}.json", checkpoints_of(row)
        if path.is_file():
            old = json.loads(path.read_text())
            if targeted_of(old) < self.p.targeted or old.get("checkpoints", weights) != weights:
                path.unlink()
        return self.cached(key, lambda: self.reject(row))

    def reject(self, row: Row) -> dict:
        """Defended rate (correct or rejected) at the headline eps, worst case over the adaptive attacks (the
        targeted ones included) with and without a penalty for crossing the calibrated threshold (99th percentile
        of clean validation error).
        Resumable like a row (``work/partial-reject-ROW.json``)."""
        p = self.p
        clf, pur = self.load(row)
        parts, save = self.partial(f"reject-{slug(row.name)}", checkpoints_of(row))
        calib = calibrate_threshold(pur if isinstance(pur, Purifier) else pur.cvae, "mse", 99.0)  # the row's rule
        thr = calib["threshold"]

        def best_error(x):
            with torch.no_grad():
                return chunked(lambda a, b: pur(a)["scores"].min(1).values, x, x[:, 0, 0, 0], 500)

        def defended(a, b):
            with torch.no_grad():
                out = pur(a)
                return (clf(out["purified"]).argmax(1) == b) | (out["scores"].min(1).values > thr)

        attacks = []
        for penalty in (0.0, p.reject_penalty):
            for a in self.attacks(clf, pur, p.eps, p.restarts, reject=RejectOption(thr, penalty)):
                attacks.append(replace(a, name=f"{a.name} (penalty {penalty:g})"))
        # the untargeted attacks of both penalties first, as in a row's worst case (the order changes only the cost)
        attacks.sort(key=lambda a: a.name.startswith("targeted"))

        def progress(state):
            parts["state"] = state
            save()

        res = worst_case(attacks, defended, self.x, self.y, p.batch_size, state=parts.get("state"),
                         on_step=progress)
        clean_err = best_error(self.x_all[:p.clean_n])
        # an image the attacks broke was neither classified right nor rejected; one they did not break is
        # flagged or not on its clean input (what worst_case hands back for it, resumed or not)
        flagged = res["robust"] & (best_error(res["adversarial"]) > thr)
        return {"row": row.name, "checkpoints": checkpoints_of(row), "eps": p.eps, "threshold": thr, "calibration": calib,
                "n": p.n, "restarts": p.restarts, "penalty": p.reject_penalty, "defended": res["accuracy"], "steps": res["steps"],
                "false_alarm_rate": float((clean_err > thr).float().mean()), "clean_n": p.clean_n,
                "rejected_among_adversarial": float(flagged.float().mean())}


HEADLINE = ["defense", "clean", "oblivious", "adaptive (n {n})", "Square", "AutoAttack", "worst of all (n {n_art})",
            "images/s", "sanity checks", "note"]


def headline_columns(p: dict) -> list[str]:
    """The headline table's columns; a suite with targeted attacks adds the untargeted figure before them."""
    cols = [c.format(**p) for c in HEADLINE]
    if p.get("targeted", 0):
        cols[3:4] = [f"adaptive, untargeted (n {p['n']})", f"adaptive + targeted (n {p['n']})"]
    return cols


def headline(rows: dict, speed: dict, targeted: int = 0) -> list[list]:
    """One line per row, for ``headline_columns``."""
    out = []
    for r in rows.values():
        fails = [k for k, v in r["sanity"].items() if isinstance(v, dict) and not v["pass"]]
        adaptive = adaptive_cells(r, targeted) if targeted else [f"**{r['adaptive']:.3f}**"]
        out.append([r["name"], f"{r['clean']:.4f}", f"{r['oblivious']:.3f}", *adaptive,
                    f"{r['art']['square']:.3f}", f"{r['art']['autoattack']:.3f}", f"{r['worst_of_all']:.3f}",
                    f"{speed[r['name']]['batch 256']['images_per_s']:.0f}",
                    "all pass" if not fails else "FAIL: " + "; ".join(fails), r["note"]])
    return out


def plot(report: dict, out: Path) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Points carry numbers and the legend their names and speeds: rows crowd together (the undefended designs all
    # sit near 12%), where names written beside the points overlap.
    fig, ax = plt.subplots(figsize=(11, 5.5))
    markers = "osD^v<>ph*"
    for i, r in enumerate(report["rows"].values(), 1):
        ips = report["speed"][r["name"]]["batch 256"]["images_per_s"]
        ax.scatter(r["clean"], r["adaptive"], s=45, marker=markers[(i - 1) % len(markers)],
                   color=plt.cm.tab20((i - 1) % 20),
                   label=f"{i}. {r['name']} ({ips:.0f} img/s)")
        ax.annotate(str(i), (r["clean"], r["adaptive"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), title="images/s: torch, batch 256",
              title_fontsize=7)
    p = report["profile"]
    ax.set_xlabel(f"clean accuracy (first {p['clean_n']} test images)")
    ax.set_ylabel(f"adaptive robust accuracy, eps {p['eps']} (first {p['n']})")
    ax.set_title(f"Fashion-MNIST: clean vs adaptive worst case (PGD-{p['steps']}, profile {report['profile_name']})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out.with_suffix(".png")
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path.name


def attack_seconds(row: dict) -> float:
    """Seconds the row's attacks took (every adaptive attack and restart, Square, AutoAttack), summed over the
    runs that made it: unlike the row's ``seconds``, this survives resuming."""
    return sum(s["seconds"] for s in row["steps"]) + row["art"]["square_seconds"] + row["art"]["autoattack_seconds"]


def output_paths(stem: str, profile_name: str, out: str | None, work: str | None) -> tuple[Path, Path]:
    """results/STEM.json for the standard profile (STEM-PROFILE.json otherwise) and its row cache, created."""
    name = stem if profile_name == "standard" else f"{stem}-{profile_name}"
    out = Path(out or ROOT / "results" / f"{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(work or out.parent / f".{out.stem}-work")
    work.mkdir(parents=True, exist_ok=True)
    return out, work


def has_checkpoints(row: Row) -> bool:
    """Whether the row's classifier (and CVAE, and robust prior) checkpoints are on disk."""
    if not (ROOT / f"{row.classifier}.json").is_file():
        return False
    if not row.cvae:
        return True
    cvae = ROOT / f"{row.cvae}.json"
    if not cvae.is_file():
        return False
    spec = row.purifier or json.loads(cvae.read_text())["meta"].get("purifier") or {}
    return not spec.get("prior_weight") or checkpoint.file_of(row_prior(row), ".json").is_file()


def choose_rows(all_rows: list[Row], wanted, hint: str) -> list[Row]:
    """The rows named in ``wanted`` (all when empty), each with its checkpoints on disk; ``hint`` says how to
    train what is missing."""
    if wanted:
        wanted = [w.strip() for w in wanted]
        unknown = sorted(set(wanted) - {r.name for r in all_rows})
        if unknown:
            raise click.BadParameter(f"unknown rows {unknown}; known: {[r.name for r in all_rows]}",
                                     param_hint="--row")
        all_rows = [r for r in all_rows if r.name in wanted]
    missing = [r.name for r in all_rows if not has_checkpoints(r)]
    if missing:
        raise click.UsageError(f"rows without checkpoints ({hint}): {missing}")
    return all_rows


def report_head(script: str, profile_name: str, profile: Profile | None = None, software: tuple = ()) -> dict:
    """What every results file starts with: the command, commit, profile (``PROFILES[profile_name]`` unless given),
    software (with the versions of the modules named in ``software``) and machine."""
    return {"command": shlex.join(["python", "-m", f"benchmarks.{Path(script).stem}", *sys.argv[1:]]), "commit": git_commit(ROOT),
            "version": __version__, "profile_name": profile_name,
            "profile": asdict(profile or PROFILES[profile_name]),
            "software": {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
                         **{m: __import__(m).__version__ for m in ("art", *software)}},
            "machine": {"cpu": cpu_model(), "torch_threads": torch.get_num_threads()}}


def measure_rows(bench: Bench, rows: list[Row], table: list[Row] | None = None, published: Path | None = None) -> dict:
    """Every row of ``rows`` through ``bench.row``, cached; a cached row whose weights, purifier spec or attack
    suite (targeted runner-up classes) changed is measured again. The other rows of ``table`` (the benchmark's
    whole list, in its order) enter the results from their caches, else from the results file last ``published``,
    while their weights are unchanged, as they were measured: a table shows ``older_suite`` on those measured
    before the targeted attacks. A row another benchmark measured the same way (``Bench.measured_elsewhere``) is
    taken from there, not measured twice."""
    chosen = {r.name for r in rows}
    before = published_rows(json.loads(published.read_text())) if published and published.is_file() else {}
    results = {}
    for r in table or rows:
        key = f"row-{slug(r.name)}"
        stale = bench.work / f"{key}.json"
        if r.name not in chosen:
            if not has_checkpoints(r):
                continue
            old = json.loads(stale.read_text()) if stale.is_file() else before.get(r.name)
            if old is None or old["checkpoints"] != checkpoints_of(r) or \
                    not same_attacks(old.get("profile", bench.profile_json()), bench.profile_json()):
                continue  # not measured, or its weights or the attack settings changed since: not this table's row
            results[r.name] = old
        else:
            if stale.is_file():
                old = json.loads(stale.read_text())
                if old["checkpoints"] != checkpoints_of(r) or targeted_of(old) != bench.suite(r):
                    stale.unlink()  # its weights or the attack suite changed since it was measured: measure again
            if not stale.is_file() and (same := bench.measured_elsewhere(r)):
                write_json(stale, same)  # with the seconds its measurement took
            results[r.name] = bench.cached(key, lambda r=r: bench.row(r))
            (bench.work / f"partial-{slug(r.name)}.json").unlink(missing_ok=True)  # the whole row is cached now
        # the weights are the ones measured (same sha256); record where they live now and how the table describes them
        results[r.name].update(classifier=r.classifier, cvae=r.cvae, note=r.note)
        results[r.name].pop("speed", None)  # rows cached by an earlier version timed themselves while sharing cores
    return results


def older_suite(row: dict, targeted: int) -> bool:
    """A purifier row measured before the suite's targeted attacks (fewer runner-up classes than ``targeted``)."""
    return bool(row["cvae"]) and targeted_of(row) < targeted


def adaptive_cells(row: dict, targeted: int) -> list[str]:
    """The adaptive figure without and with the targeted attacks; a row measured with an older suite shows its
    figure as untargeted and says the targeted attacks have not run on it."""
    plain = untargeted_adaptive(row)
    if older_suite(row, targeted):
        return [f"{row['adaptive']:.3f}", "not run (older suite)"]
    return [f"{plain:.3f}" if plain is not None and row["cvae"] else "-", f"**{row['adaptive']:.3f}**"]


def speed_together(bench: Bench, rows: list[Row]) -> dict:
    """images/s of every row in one section, after the rows (which may have shared the machine); timed again when
    the rows or the torch thread count differ from the cached section's (older sections did not record theirs)."""
    speed = bench.cached("speed", lambda: bench.speed(rows))
    if set(speed) - {"seconds", "threads"} != {r.name for r in rows} or speed.get("threads") != torch.get_num_threads():
        (bench.work / "speed.json").unlink()
        speed = bench.cached("speed", lambda: bench.speed(rows))
    return speed


def speed_threads(report: dict) -> int:
    """The torch threads the report's speed section was timed with (files from before it recorded them: the run's)."""
    return report["speed"].get("threads", report["machine"]["torch_threads"])


def publish(report: dict, out: Path, title: str, text: str, start: float) -> None:
    """Plot, then write the JSON and its markdown atomically, and echo the table."""
    report["seconds"] = time.perf_counter() - start
    report["plot"] = plot(report, out)
    heading = (f"# {title}, profile {report['profile_name']}\n\nGenerated by {report['command'].split()[2]}; plot "
               f"{report['plot']} (clean against adaptive, images/s as labels).")
    write_results(out, report, heading, text)
    click.echo(text)
    click.echo(f"{report['seconds']:.0f} s; -> {out}", err=True)


