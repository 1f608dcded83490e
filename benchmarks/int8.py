"""The int8 pipeline (``pipeline.int8.onnx``, ``purifier export --int8``) against its fp32 model, in one run.

    python -m benchmarks.int8 --model models/middleware/cvae-alone-smooth200-tau3-prior1-mu2 --out results/int8.json

Clean: accuracy of both on all 10,000 Fashion-MNIST test images, the fraction where int8 predicts the class fp32
predicts and chooses the reconstruction fp32 chooses, and the clean rejection rate. Speed: fp32 and int8 sessions
timed in interleaved rounds (median of ``--reps``) at batch 1, 64 and 256 on the CPU provider.

Robust, on the first ``--n`` test images, L-infinity ``--eps``, the adaptive attacks of the benchmark protocol on
the fp32 pipeline in torch (selection, full gradient, BPDA, softmin, then the targeted selection and logit attacks
toward the ``--targeted`` runner-up classes), per-example worst case with early exit:
  fp32                 the attacks judged by the fp32 pipeline (its adaptive robust accuracy);
  int8, transferred    the same attacks (best iterate chosen by fp32, as PGD returns them) judged by int8;
  int8, int8 decision  the fp32 gradient, but every PGD step's success and the worst case judged by int8 on
                       onnxruntime: an attack on the int8 decision that only lacks int8's own gradient.
The int8 rows are lower bounds on int8's weakness, never a claim that it is robust beyond them.
"""
from __future__ import annotations

import platform
import sys
from pathlib import Path

import click
import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]

from purifier import __version__, checkpoint  # noqa: E402
from purifier.attacks import PGD  # noqa: E402
from purifier.data import load_dataset  # noqa: E402
from purifier.designs import load_purifier  # noqa: E402
from purifier.provenance import cpu_model, git_commit  # noqa: E402
from purifier.robust import (Attack, chunked, pgd_attack, purifier_attacks, purifier_objectives,  # noqa: E402
                             runner_up, targeted_objectives, worst_case)
from serve.models import MODELS  # noqa: E402
from serve.runtime import OnnxPurifier  # noqa: E402

from benchmarks.results import cached, markdown_table, model_weights, weights_work, write_results  # noqa: E402
from benchmarks.speed import BATCHES, time_interleaved  # noqa: E402  (benchmarks/speed.py)


def predictions(rt: OnnxPurifier, x: np.ndarray, batch: int = 500) -> dict[str, np.ndarray]:
    outs = [rt(x[i:i + batch]) for i in range(0, len(x), batch)]
    return {k: np.concatenate([o[k] for o in outs]) for k in ("predicted_class", "chosen_class", "rejected")}


def clean(fp32: OnnxPurifier, int8: OnnxPurifier, x: np.ndarray, y: np.ndarray) -> dict:
    a, b = predictions(fp32, x), predictions(int8, x)
    return {"n": len(y), "fp32_accuracy": float((a["predicted_class"] == y).mean()),
            "int8_accuracy": float((b["predicted_class"] == y).mean()),
            "same_predicted_class": float((a["predicted_class"] == b["predicted_class"]).mean()),
            "same_chosen_class": float((a["chosen_class"] == b["chosen_class"]).mean()),
            "fp32_rejected": float(a["rejected"].mean()), "int8_rejected": float(b["rejected"].mean())}


def speed(fp32: OnnxPurifier, int8: OnnxPurifier, x: np.ndarray, reps: int) -> dict:
    fns = {"fp32": lambda a: fp32.session.run(["logits"], {"x": a}),
           "int8": lambda a: int8.session.run(["logits"], {"x": a})}
    out = {}
    for b, n in BATCHES.items():
        t = time_interleaved(fns, x[:n], b, reps)
        out[str(b)] = {**t, "int8_speedup": t["fp32"]["median_s"] / t["int8"]["median_s"]}
    return out


def judged_by(objective, wrong, num_classes: int = 0):
    """``objective`` with its success flag replaced by ``wrong(adv, y)``; ``num_classes`` > 0: labels arrive packed
    as y * K + t (the targeted objectives) and are unpacked first."""
    def judged(adv, y):
        value, _ = objective(adv, y)
        return value, wrong(adv.detach(), y // num_classes if num_classes else y)

    return judged


def int8_decision_attacks(classifier, purifier, pgd: PGD, wrong, restarts: int, targeted: int) -> list[Attack]:
    """``purifier_attacks`` with every step's success judged by ``wrong`` (the int8 pipeline)."""
    attacks = [pgd_attack(name, pgd, judged_by(o, wrong), restarts)
               for name, o in purifier_objectives(classifier, purifier).items()]
    for name, (rank, objective) in targeted_objectives(classifier, purifier, targeted).items():
        judged = judged_by(objective, wrong, purifier.num_classes)

        def make(x, y, restart, rank=rank, judged=judged):
            t = runner_up(purifier, x, y, rank)
            return pgd.run(judged, x, y * purifier.num_classes + t, torch.Generator().manual_seed(pgd.seed + restart))

        attacks.append(Attack(name, make, restarts))
    return attacks


def robust(model_dir: Path, int8: OnnxPurifier, x: np.ndarray, y: np.ndarray, eps: float, steps: int,
           restarts: int, targeted: int, seed: int, batch_size: int) -> dict:
    classifier = checkpoint.load(model_dir / "classifier", expect="classifier").eval()
    purifier = load_purifier(model_dir / "cvae")
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def fp32_holds(a, b):
        with torch.no_grad():
            return classifier(purifier(a)["purified"]).argmax(1) == b

    def int8_wrong(a, b):
        return torch.from_numpy(int8(a.numpy())["predicted_class"] != b.numpy())

    pgd = PGD(eps=eps, steps=steps, seed=seed)
    attacks = purifier_attacks(classifier, purifier, pgd, restarts, targeted=targeted)
    rows = {
        "fp32": worst_case(attacks, fp32_holds, xt, yt, batch_size),
        "int8, transferred": worst_case(attacks, lambda a, b: ~int8_wrong(a, b), xt, yt, batch_size),
        "int8, int8 decision": worst_case(int8_decision_attacks(classifier, purifier, pgd, int8_wrong, restarts,
                                                                targeted), lambda a, b: ~int8_wrong(a, b), xt, yt,
                                          batch_size),
    }
    clean_fp32 = chunked(fp32_holds, xt, yt, batch_size)
    return {"n": len(y), "eps": eps, "norm": "Linf", "steps": steps, "alpha": pgd.step_size, "restarts": restarts,
            "targeted_runner_ups": targeted, "seed": seed, "random_start": True,
            "attacks": [a.name for a in attacks], "clean_fp32_torch": float(clean_fp32.float().mean()),
            "rows": {name: {"robust_accuracy": r["accuracy"], "steps": r["steps"],
                            "broken_by": {a.name: r["broken_by"].count(a.name) for a in attacks}}
                     for name, r in rows.items()}}


def verdict(r: dict) -> str:
    """One sentence on whether int8 is easier to break than fp32, with the binomial standard error."""
    a, b, n = r["rows"]["fp32"]["robust_accuracy"], r["rows"]["int8, int8 decision"]["robust_accuracy"], r["n"]
    se = 100 * (a * (1 - a) / n) ** 0.5
    if 100 * (a - b) > se:
        return (f"The quantised defense is easier to break: judged by int8, the attacks leave {100 * b:.1f}% against "
                f"fp32's {100 * a:.1f}% ({100 * (a - b):.1f} points lower on these {n} images; one standard error of "
                f"either figure is about {se:.1f} points).")
    if b < a:
        return (f"Judged by int8, the attacks leave {100 * b:.1f}% against fp32's {100 * a:.1f}%: {100 * (a - b):.1f} "
                f"points lower on these {n} images, within one standard error of either figure (about {se:.1f} "
                f"points), so these images do not tell whether the quantised defense is easier to break.")
    return (f"Judged by int8, the attacks leave {100 * b:.1f}% against fp32's {100 * a:.1f}% on these {n} images (one "
            f"standard error about {se:.1f} points); with no int8 gradient used, this is no claim that int8 is "
            f"harder to break.")


@click.command()
@click.option("--model", "model_dir", default=str(MODELS["fashion-mnist"].path), show_default=True)
@click.option("--n", default=200, show_default=True, help="Robust accuracy on the first N test images.")
@click.option("--clean-n", default=10_000, show_default=True, help="Clean accuracy on the first N test images.")
@click.option("--eps", default=0.1, show_default=True)
@click.option("--steps", default=40, show_default=True, help="PGD steps per attack (step 2.5 * eps / steps).")
@click.option("--restarts", default=1, show_default=True)
@click.option("--targeted", default=3, show_default=True, help="Runner-up classes of the targeted attacks.")
@click.option("--seed", default=0, show_default=True)
@click.option("--reps", default=7, show_default=True)
@click.option("--batch-size", default=100, show_default=True, help="Attack batch size.")
@click.option("--work", type=click.Path(file_okay=False),
              help="Cache each section here (default: results/.int8-work next to --out), in a folder per set of "
                   "weights (the two ONNX files and the checkpoints the attacks run on).")
@click.option("--out", default=str(ROOT / "results" / "int8.json"), show_default=True)
def main(model_dir, n, clean_n, eps, steps, restarts, targeted, seed, reps, batch_size, work, out):
    model_dir = Path(model_dir)
    fp32 = OnnxPurifier(model_dir, device="cpu", precision="fp32")
    int8 = OnnxPurifier(model_dir, device="cpu", precision="int8")
    test = load_dataset("fashion-mnist", "test")
    weights = {**{p.path.name: checkpoint.sha256_file(p.path) for p in (fp32, int8)}, **model_weights(model_dir)}
    work = weights_work(work or Path(out).parent / f".{Path(out).stem}-work", weights)
    say = lambda msg: click.echo(msg, err=True)  # noqa: E731
    report = {
        "command": " ".join(["python", "-m", "benchmarks.int8", *sys.argv[1:]]), "commit": git_commit(ROOT),
        "model": str(model_dir), "fp32_model": fp32.path.name, "int8_model": int8.path.name, "sha256": weights,
        "quantization": int8.metadata["quantization"],
        "machine": {"cpu": cpu_model(), "cores": __import__("os").cpu_count(), "provider": int8.providers,
                    "onnxruntime_threads": "default (intra-op = physical cores)"},
        "versions": {"purifier": __version__, "torch": torch.__version__, "onnxruntime": ort.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "clean": cached(work, f"clean-{clean_n}", lambda: clean(fp32, int8, test.x[:clean_n], test.y[:clean_n]), say),
        "robust": cached(work, f"robust-{n}-{eps}-{steps}-{restarts}-{targeted}-{seed}",
                         lambda: robust(model_dir, int8, test.x[:n], test.y[:n], eps, steps, restarts, targeted,
                                        seed, batch_size), say),
        "speed": cached(work, f"speed-{reps}", lambda: speed(fp32, int8, test.x, reps), say),
    }
    c, r = report["clean"], report["robust"]
    tables = [markdown_table(["", "fp32", "int8"], [
        [f"clean accuracy ({c['n']:,} test images)", f"{100 * c['fp32_accuracy']:.2f}%",
         f"{100 * c['int8_accuracy']:.2f}%"],
        ["clean rejection rate", f"{100 * c['fp32_rejected']:.2f}%", f"{100 * c['int8_rejected']:.2f}%"],
        ["same predicted class as fp32", "", f"{100 * c['same_predicted_class']:.2f}%"],
        ["same chosen reconstruction as fp32", "", f"{100 * c['same_chosen_class']:.2f}%"]])]
    tables.append(markdown_table(["batch", "fp32 ms/image", "int8 ms/image", "int8 speed-up"], [
        [b, f"{v['fp32']['ms_per_image']:.3f}", f"{v['int8']['ms_per_image']:.3f}", f"{v['int8_speedup']:.2f}x"]
        for b, v in report["speed"].items() if b != "seconds"]))  # cached() adds the section's seconds
    tables.append(f"Robust accuracy, first {r['n']} test images, L-inf eps {r['eps']}, PGD-{r['steps']} (step "
                  f"{r['alpha']:.4f}, random start, {r['restarts']} restart, seed {r['seed']}), attacks: "
                  f"{', '.join(r['attacks'])}; per-example worst case\n\n" + markdown_table(
                      ["judged by", "robust accuracy", "broken by (first attack to break it)"],
                      [[name, f"{100 * v['robust_accuracy']:.1f}%",
                        ", ".join(f"{a} {k}" for a, k in v["broken_by"].items() if k)]
                       for name, v in r["rows"].items()]))
    tables.append(verdict(r))
    write_results(out, report, f"int8 against fp32 ({report['machine']['cpu']}, {report['machine']['cores']} cores, "
                               f"onnxruntime CPU provider)", "\n\n".join(tables))
    click.echo("\n\n".join(tables))


if __name__ == "__main__":
    main()
