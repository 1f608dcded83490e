"""Can a trained purifier's decision rule be made more robust without retraining its CVAE? Three changes to the
rule, with the CVAE and the classifier frozen (the first two fitted on the run's own training split), each measured
on held-out validation images by attacks that know the changed rule:

  class offsets   score_c = MSE_c + b_c, a class log-prior fitted for robustness. Per training image and wrong
                  class t, targeted PGD on the selection margin finds the lowest MSE_t - MSE_y it reaches (random
                  start, best iterate); coordinate search over b (b_0 = 0, a grid of +-0.01 in steps of 1e-4,
                  ``--rounds`` passes) maximises the images whose every margin stays positive after the offsets,
                  without lowering the clean selection accuracy on the same images. Offsets move no gradient, so
                  the attacked margins hold with the offsets added, per target class.
  pixel weights   score_c = mean_p(w_cp (x_p - r_cp)^2), w_c = exp(a_c) / mean(exp(a_c)) (mean 1 per class), a
                  trained with Adam on the selection terms of the model's own adversarial training (selection CE
                  on the clean and the attacked batch at its weight and temperature, TRADES's smoothness KL at its
                  weight) against PGD-7 selection and targeted selection attacks on the weighted rule.
  robust prior    score_c = MSE_c - mu * log p(c | x) under ``--prior``, an adversarially trained classifier of
                  the project's (default: the converged PGD-AT of classifier A), for each mu in ``--prior-mu``
                  (``Purifier(prior=..., prior_weight=mu)``, the rule the purifier ships): a product of experts in which the purifier's rule consults a robust classifier on the raw input.
                  The attacks' gradients flow through both experts. The prior alone (PGD on its cross-entropy,
                  ``purifier.train.robust_accuracy``) is its mu -> infinity limit.

    python -m benchmarks.rule_probe --model models/middleware/cvae-alone-smooth200-tau3   # results/rule-probe.*

Each rule is measured with ``benchmarks.fit_check``'s validation check (``purifier.adversarial.pipeline_check``:
selection and full-gradient PGD, then the targeted attacks toward the best-fitting runner-up class, per-image
worst case) on the same images, the validation split past the 200 the run's own check attacked, so the unchanged
rule's row repeats the fit check's validation figure; clean accuracy on the whole validation split. Sections are
cached in ``--work`` by the model's weights. The robust prior's mu is swept on the same validation images it is
reported on: the best mu's figure is optimistic by that choice.
"""
from __future__ import annotations

import hashlib
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import click
import numpy as np
import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]

from purifier import checkpoint  # noqa: E402
from purifier.pipeline import Purifier, class_scores, select, with_alias  # noqa: E402
from purifier.provenance import cpu_model, git_commit  # noqa: E402

from benchmarks.fit_check import VAL_SKIP  # noqa: E402
from benchmarks.results import cached, markdown_table, model_weights, weights_work, write_results  # noqa: E402

GRID = np.round(np.arange(-100, 101) * 1e-4, 6)


class ProbePurifier(Purifier):
    """``Purifier`` under the MSE rule with per-class offsets ``bias`` (K), per-class pixel log-weights ``logw``
    (K x C x H x W) and the purifier's robust prior (``prior``, weight ``mu``); zeros for all three is the
    unchanged rule."""

    def __init__(self, cvae, bias=None, logw=None, prior=None, mu: float = 0.0):
        super().__init__(cvae, prior=prior, prior_weight=mu)
        k, shape = cvae.cfg.num_classes, cvae.cfg.image_shape
        self.bias = torch.nn.Parameter(torch.zeros(k) if bias is None else torch.as_tensor(bias, dtype=torch.float32))
        self.logw = torch.nn.Parameter(torch.zeros(k, *shape) if logw is None
                                       else torch.as_tensor(logw, dtype=torch.float32))

    def weights(self) -> torch.Tensor:
        w = self.logw.exp()
        return w / w.flatten(1).mean(1).view(-1, *[1] * (w.dim() - 1))

    def forward(self, x):
        out = self.cvae.reconstruct_all(x)
        scores = (self.weights() * (out["recon"] - x.unsqueeze(1)).pow(2)).flatten(2).mean(-1) + self.bias
        scores = self.with_prior(x, scores)
        purified, chosen = select(out["recon"], scores)
        return with_alias({"purified": purified, "chosen_class": chosen, "scores": scores, "recon": out["recon"]})


def load(model: Path):
    """(CVAE, classifier, the CVAE's record meta, the run's training split, its validation split), frozen."""
    from purifier.data import load_dataset
    from purifier.fitting import split

    cvae, clf = checkpoint.load(model / "cvae"), checkpoint.load(model / "classifier")
    for p in [*cvae.parameters(), *clf.parameters()]:
        p.requires_grad_(False)
    meta = checkpoint.read_record(model / "cvae")["meta"]
    x, y, xv, yv = split(load_dataset(meta["dataset"], "train"), meta["n_val"], meta["train"]["seed"])
    return cvae.eval(), clf.eval(), meta, (x, y), (xv, yv)


def margins(cvae, x, y, eps: float, steps: int, batch: int = 50) -> dict:
    """Per image: the clean score margins MSE_t - MSE_y (K, 0 at y) and the lowest a targeted PGD toward each wrong
    class t reaches over its iterates (inf at y)."""
    from purifier.attacks import PGD

    purifier = Purifier(cvae).eval()
    k = cvae.cfg.num_classes
    pgd = PGD(eps=eps, steps=steps, best_iterate=False)
    gen = torch.Generator().manual_seed(0)
    robust, clean = [], []
    for i in range(0, len(x), batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        with torch.no_grad():
            s = class_scores(xb, cvae.reconstruct_all(xb), "mse")
        clean.append(s - s.gather(1, yb[:, None]))
        xr, yr, tr = xb.repeat_interleave(k, 0), yb.repeat_interleave(k, 0), torch.arange(k).repeat(len(xb))
        keep = tr != yr
        xr, yr, tr = xr[keep], yr[keep], tr[keep]
        best = torch.full((len(xr),), float("inf"))

        def objective(adv, _, best=best, yr=yr, tr=tr):
            s = purifier(adv)["scores"]
            m = s.gather(1, tr[:, None])[:, 0] - s.gather(1, yr[:, None])[:, 0]
            torch.minimum(best, m.detach(), out=best)
            return -m.sum(), torch.zeros(len(adv), dtype=torch.bool)

        last = pgd.run(objective, xr, yr, gen)
        with torch.no_grad():
            objective(last, yr)
        full = torch.full((len(xb) * k,), float("inf"))
        full[keep] = best
        robust.append(full.view(len(xb), k))
    return {"robust": torch.cat(robust).numpy(), "clean": torch.cat(clean).numpy(), "y": y.numpy()}


def fit_offsets(m: dict, rounds: int) -> dict:
    """Coordinate search for the class offsets (see the module docstring)."""
    robust, clean, y = m["robust"], m["clean"], m["y"]
    n, k = robust.shape
    rows = np.arange(n)

    def held(b):
        def share(margin):
            adj = margin + b[None, :] - b[y][:, None]
            adj[rows, y] = np.inf
            return float((adj.min(1) > 0).mean())
        return share(robust), share(clean)

    b = np.zeros(k)
    r0, c0 = held(b)
    for _ in range(rounds):
        for c in range(1, k):
            def key(v):
                bb = b.copy()
                bb[c] = v
                r, cl = held(bb)
                return (cl >= c0, r, cl)
            b[c] = max([b[c], *GRID], key=key)
    r, c = held(b)
    return {"offsets": b.tolist(), "fit_robust": [r0, r], "fit_clean_selection": [c0, c], "n": n}


def train_weights(cvae, clf, x, y, meta: dict, steps: int, lr: float, batch: int) -> dict:
    """The pixel weights (see the module docstring), trained ``steps`` batches; their values and training log."""
    from purifier.adversarial import attack_batch
    from purifier.attacks import PGD

    probe = ProbePurifier(cvae).eval()
    probe.bias.requires_grad_(False)
    adv, loss_cfg = meta["adversarial"], meta["loss"]
    tau, sel, smooth = loss_cfg["sel_tau"], adv["sel_weight"], adv.get("smooth_weight", 0.0)
    opt = torch.optim.Adam([probe.logw], lr=lr)
    gen = torch.Generator().manual_seed(1)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    pgd = PGD(eps=adv["eps"], steps=adv["steps"], best_iterate=False)
    log = []
    for step in range(steps):
        idx = order[(step * batch) % len(x):][:batch]
        xb, yb = x[idx], y[idx]
        xa = attack_batch(clf, probe, xb, yb, pgd, ["selection", "targeted"], gen)
        sa, sc = probe(xa)["scores"], probe(xb)["scores"]
        loss = (loss_cfg["sel_weight"] * F.cross_entropy(-sc / tau, yb) + sel * F.cross_entropy(-sa / tau, yb)
                + smooth * F.kl_div(F.log_softmax(-sa / tau, 1), F.log_softmax(-sc / tau, 1), reduction="batchmean",
                                    log_target=True))
        opt.zero_grad()
        loss.backward()
        opt.step()
        log.append([float(loss.detach()), float((sa.detach().argmin(1) == yb).float().mean())])
    w = probe.weights().detach()
    return {"logw": probe.logw.detach().tolist(), "weight_range": [float(w.min()), float(w.max())],
            "log_every_10": [np.mean(log[i:i + 10], 0).tolist() for i in range(0, len(log), 10)]}


def digest(params: dict) -> str:
    """A short key for a rule's parameters."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def measure(cvae, clf, xv, yv, n: int, eps: float, steps: int, bias=None, logw=None, prior=None, mu=0.0) -> dict:
    """One rule: the adaptive check on ``n`` validation images past ``VAL_SKIP`` (per image too), clean accuracy on
    the whole validation split."""
    from purifier.adversarial import pipeline_check

    probe = ProbePurifier(cvae, bias, logw, prior, mu).eval()
    xs, ys = xv[VAL_SKIP:VAL_SKIP + n], yv[VAL_SKIP:VAL_SKIP + n]
    check = pipeline_check(probe, clf, xs, ys, eps, steps)
    return {"adaptive": check["val_adaptive"], "robust": check["robust"], "clean": accuracy(probe, clf, xv, yv),
            "clean_n": len(yv)}


def accuracy(probe: ProbePurifier, clf, x, y) -> float:
    """Clean accuracy of ``clf`` behind ``probe``."""
    from purifier.pipeline import purify
    from purifier.train import predict

    return float((predict(clf, purify(probe, x, batch_size=500)["purified"]) == y).float().mean())


def paired(rows: dict) -> dict:
    """Each changed rule against the unchanged one on the same images: images only it holds, only the unchanged
    rule holds, and the exact McNemar p."""
    from benchmarks.paired import compare

    base = "unchanged (MSE)"
    out = {}
    for name, r in rows.items():
        if name != base and "robust" in r:
            c = compare(rows, base, name, mask="robust")
            out[name] = {"gained": c["only_b"], "lost": c["only_a"], "mcnemar_p": c["mcnemar_p"]}
    return out


def test_clean(cvae, clf, dataset: str, bias=None, logw=None, prior=None, mu=0.0) -> dict:
    """One rule's clean accuracy on the whole test set (the figure the 85% line of the default is drawn on)."""
    from purifier.data import load_dataset

    probe = ProbePurifier(cvae, bias, logw, prior, mu).eval()
    te = load_dataset(dataset, "test")
    return {"test_clean": accuracy(probe, clf, torch.from_numpy(te.x), torch.from_numpy(te.y)), "test_n": len(te.y)}


def measure_prior(prior, xv, yv, n: int, eps: float, steps: int) -> dict:
    """The prior classifier alone on the same images: PGD on its cross-entropy."""
    from purifier.train import predict, robust_accuracy

    xs, ys = xv[VAL_SKIP:VAL_SKIP + n], yv[VAL_SKIP:VAL_SKIP + n]
    return {"adaptive": float(robust_accuracy(prior, xs, ys, eps, steps)),
            "clean": float((predict(prior, xv) == yv).float().mean()), "clean_n": len(yv)}


@click.command()
@click.option("--model", default="models/middleware/cvae-alone-smooth200-tau3", show_default=True,
              help="Model directory (cvae + classifier).")
@click.option("--n", default=500, show_default=True, help="Validation images attacked.")
@click.option("--fit-n", default=1000, show_default=True, help="Training images the offsets are fitted on.")
@click.option("--eps", default=0.1, show_default=True, help="L-infinity budget.")
@click.option("--steps", default=20, show_default=True, help="PGD steps of the check and of the margin search.")
@click.option("--rounds", default=4, show_default=True, help="Coordinate-search passes over the offsets.")
@click.option("--weight-steps", default=200, show_default=True, help="Training steps of the pixel weights.")
@click.option("--weight-lr", default=0.02, show_default=True, help="Adam learning rate of the pixel log-weights.")
@click.option("--prior", "prior_path", default="models/baselines/pgd-at-converged", show_default=True,
              help="Classifier checkpoint of the robust prior.")
@click.option("--prior-mu", default="0.001,0.002,0.003,0.01,0.03,0.1", show_default=True,
              help="Weights mu of the prior's negative log-probabilities, comma-separated.")
@click.option("--rules", type=click.Choice(["all", "prior"]), default="all", show_default=True,
              help="prior: the unchanged rule and the robust prior's sweep alone (no offsets, no pixel weights).")
@click.option("--out", default="results/rule-probe.json", show_default=True, type=click.Path())
@click.option("--work", help="Cache of finished sections (default: results/.rule-probe-work).")
@click.option("--threads", type=int, help="torch threads (default: torch's).")
def main(model, n, fit_n, eps, steps, rounds, weight_steps, weight_lr, prior_path, prior_mu, rules, out, work,
         threads):
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    out, model = Path(out), ROOT / model
    work = weights_work(Path(work or out.parent / f".{out.stem}-work"), model_weights(model))
    work.mkdir(parents=True, exist_ok=True)
    cvae, clf, meta, (x, y), (xv, yv) = load(model)
    if len(xv) < VAL_SKIP + n:
        raise click.BadParameter(f"the run held out {len(xv)} validation images; --n {n} needs {VAL_SKIP + n}",
                                 param_hint="--n")
    say = lambda m: click.echo(m, err=True)  # noqa: E731
    fitted = weights = None
    if rules == "all":
        fitted = cached(work, f"offsets-n{fit_n}-eps{eps}-steps{steps}-rounds{rounds}",
                        lambda: fit_offsets(margins(cvae, x[:fit_n], y[:fit_n], eps, steps), rounds), say)
        weights = cached(work, f"weights-steps{weight_steps}-lr{weight_lr}",
                         lambda: train_weights(cvae, clf, x, y, meta, weight_steps, weight_lr, 128), say)
    rules = {"unchanged (MSE)": {}, **({"class offsets": {"bias": fitted["offsets"]},
                                        "pixel weights": {"logw": weights["logw"]}} if fitted else {})}
    prior = checkpoint.load(ROOT / prior_path).eval()
    for p in prior.parameters():
        p.requires_grad_(False)
    prior_sha = checkpoint.read_record(ROOT / prior_path)["weights_sha256"]
    mus = [float(v) for v in prior_mu.split(",") if v.strip()]
    rules.update({f"robust prior, mu {mu:g}": {"prior": prior_sha, "mu": mu} for mu in mus})
    # each section is cached under the rule's own parameters (the prior by its sha256), so a refit is never read as
    # the old fit's figures
    rows = {}
    for name, kw in rules.items():
        args = {**kw, "prior": prior} if "prior" in kw else kw
        rows[name] = {**cached(work, f"check-{digest(kw)}-n{n}-eps{eps}-steps{steps}",
                               lambda: measure(cvae, clf, xv, yv, n, eps, steps, **args), say),
                      **cached(work, f"test-clean-{digest(kw)}",
                               lambda: test_clean(cvae, clf, meta["dataset"], **args), say)}
    rows["the prior alone"] = cached(work, f"prior-{prior_sha[:16]}-n{n}-eps{eps}-steps{steps}",
                                     lambda: measure_prior(prior, xv, yv, n, eps, steps), say)
    report = {"command": shlex.join(["python", "-m", "benchmarks.rule_probe", *sys.argv[1:]]),
              "commit": git_commit(ROOT), "model": model.relative_to(ROOT).as_posix(), "weights": model_weights(model),
              "software": {"torch": torch.__version__, "python": platform.python_version()},
              "machine": {"cpu": cpu_model(), "torch_threads": torch.get_num_threads()},
              "prior": {"path": prior_path, "weights_sha256": prior_sha},
              "settings": {"n": n, "fit_n": fit_n, "eps": eps, "steps": steps, "rounds": rounds,
                           "weight_steps": weight_steps, "weight_lr": weight_lr, "prior_mu": mus, "val_skip": VAL_SKIP,
                           "seed": 0},
              "offsets": fitted, "pixel_weights": weights and {k: v for k, v in weights.items() if k != "logw"},
              "paired_with_unchanged": paired(rows), "rows": rows,
              "seconds": time.perf_counter() - start}
    write_results(out, report, "# The decision rule changed without retraining the CVAE", render(report))
    click.echo(render(report))


def render(report: dict) -> str:
    s, o, w = report["settings"], report["offsets"], report["pixel_weights"]
    pairs = report["paired_with_unchanged"]

    def vs(name):
        if name not in pairs:
            return ["-", "-"]
        c = pairs[name]
        return [f"{c['gained']} / {c['lost']}", f"{c['mcnemar_p']:.2g}"]

    rows = [[name, f"{100 * r['clean']:.2f}%", f"{100 * r['test_clean']:.2f}%" if "test_clean" in r else "-",
             f"{100 * r['adaptive']:.1f}%", *vs(name)] for name, r in report["rows"].items()]
    fitted = (f"Class offsets fitted on the first {o['n']} training images (targeted PGD-{s['steps']} toward every "
              f"wrong class, {s['rounds']} passes): robust share there {100 * o['fit_robust'][0]:.1f}% -> "
              f"{100 * o['fit_robust'][1]:.1f}%, clean selection {100 * o['fit_clean_selection'][0]:.1f}% -> "
              f"{100 * o['fit_clean_selection'][1]:.1f}%; offsets (x 1e-3) "
              f"{', '.join(f'{1e3 * v:.1f}' for v in o['offsets'])}. Pixel weights: {s['weight_steps']} steps of "
              f"batch 128, lr {s['weight_lr']}; weights {w['weight_range'][0]:.2f} to {w['weight_range'][1]:.2f}. "
              if o else "The unchanged rule and the robust prior alone (`--rules prior`). ")
    return (f"Model `{report['model']}`, CVAE and classifier frozen. Check: L-infinity eps {s['eps']}, {s['steps']} "
            f"steps, selection and full-gradient PGD then the targeted attacks toward the best-fitting runner-up "
            f"class, per-image worst case, against the changed rule, on {s['n']} validation images past the first "
            f"{s['val_skip']}; clean accuracy on the {report['rows']['unchanged (MSE)']['clean_n']} validation "
            f"images. {fitted}Robust prior: `{report['prior']['path']}`; the prior alone: PGD-{s['steps']} on its "
            f"cross-entropy, random start, on the same images. Mu is swept on the images it is reported on. Against the unchanged "
            f"rule: images the changed rule holds that the unchanged one loses / the reverse, and the exact McNemar "
            f"p.\n\n"
            + markdown_table(["decision rule", "clean (validation)", "clean (test)", "adaptive check (validation)",
                              "gained / lost against unchanged", "p"], rows))


if __name__ == "__main__":
    main()
