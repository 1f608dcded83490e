"""The purifier family side by side: every design of ``purifier.designs`` beside plain PuVAE, PuVAE after
joint adversarial training and PGD-AT, attacked by the same adaptive attacks on the same images with the same settings.

    python -m benchmarks.variants --profile standard   # results/variants.{json,md,png}
    python -m benchmarks.variants --profile quick      # minutes; never quoted

Per row, the attacks of ``benchmarks/protocol.py`` (oblivious; adaptive worst case over selection, full
gradient, BPDA and softmin, then the targeted attacks toward the runner-up classes, analysis by synthesis
differentiated through its unrolled latent steps; Square and APGD-CE/DLR through BPDA; the sanity checks), then the attacks on autoencoders from the VAE-robustness
papers (Kos et al.'s latent attack: AS_ignore-target, AS_target, SSIM and L2 of the reconstructions), and the
export: parity of ONNX against torch and onnxruntime images/s, or why the design cannot be exported. Rows are
cached under ``--work`` by the sha256 of their weights and their purifier spec.

The likelihood, IWAE and analysis-by-synthesis designs only change inference: their rows wrap the plain PuVAE
model's weights (``purifier train --arch`` trains them exactly as PuVAE). The others are ``make variants``'s runs.
Then every design again after the adversarial-training mode (``make variants-adversarial``; see ``default_rows``).
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import click
import torch

ROOT = Path(__file__).resolve().parents[1]

from export.onnx_export import export_onnx, not_exportable  # noqa: E402
from purifier import checkpoint, designs  # noqa: E402
from purifier.robust import latent_attack_report  # noqa: E402

from benchmarks.protocol import (PROFILES, Bench, Row, attack_seconds, choose_rows, converged_baselines,  # noqa: E402
                      headline, headline_columns, measure_rows, output_paths, publish, report_head, slug,
                      speed_threads, speed_together, suite_text)
from benchmarks.results import markdown_table  # noqa: E402
from benchmarks.speed import time_it  # noqa: E402

LATENT = {"full": (1000, 200), "standard": (200, 200), "quick": (50, 100), "tiny": (3, 3)}  # profile -> (n, steps)


ADV_SUFFIX = " + adv. training"


def default_rows(plain: str, joint: str, baselines: str, variants: str, adversarial: str) -> list[Row]:
    """Every design as trained by ``make variants``, then each again after the adversarial-training mode
    (``make variants-adversarial``: alternating, PGD-AT as source and target, as ``adversarial``/alternating).
    Inference-only designs run on PuVAE's weights: plain ones, then the alternating run's. Analysis by synthesis
    gets no adversarially trained row: its unrolled attack alone costs hours a row here."""
    alt = f"{adversarial}/alternating"
    rows = [*converged_baselines(baselines),
            Row("plain PuVAE", f"{plain}/classifier", f"{plain}/cvae", "design puvae"),
            Row("joint adv. training", f"{joint}/classifier", f"{joint}/cvae", "puvae + joint adversarial training")]
    trained = []
    for name, d in designs.DESIGNS.items():
        if name == "puvae":
            continue
        if d.inference_only:  # runs on the plain PuVAE model's weights
            rows.append(Row(name, f"{plain}/classifier", f"{plain}/cvae", d.summary, purifier=d.purifier))
            if d.purifier.get("kind", "puvae") == "puvae":
                trained.append(Row(name + ADV_SUFFIX, f"{alt}/classifier", f"{alt}/cvae",
                                   "PuVAE's alternating run (trained against the MSE rule), this rule",
                                   purifier=d.purifier))
        else:
            rows.append(Row(name, f"{plain}/classifier", f"{variants}/{name}/cvae", d.summary))
            trained.append(Row(name + ADV_SUFFIX, f"{variants}/{name}/adversarial/classifier",
                               f"{variants}/{name}/adversarial/cvae", "alternating, 0.75 epoch from the row above"))
    longer = Row("ks-cov-coupled" + ADV_SUFFIX + ", PGD-7 + targeted",
                 f"{variants}/ks-cov-coupled/adversarial-pgd7/classifier", f"{variants}/ks-cov-coupled/adversarial-pgd7/cvae",
                 "the row above + 2 epochs against PGD-7 selection, targeted selection, full gradient and BPDA")
    smooth = Row("ks-cov-coupled" + ADV_SUFFIX + ", + smoothness term",
                 f"{variants}/ks-cov-coupled/adversarial-smooth/classifier",
                 f"{variants}/ks-cov-coupled/adversarial-smooth/cvae",
                 "'ks-cov-coupled + adv. training, PGD-7 + targeted' + 2 epochs more with TRADES's smoothness term on "
                 "the selection softmax (weight 200)")
    return rows + [Row("puvae" + ADV_SUFFIX, f"{alt}/classifier", f"{alt}/cvae",
                       "alternating, 0.75 epoch (results/adversarial.md)")] + trained + [longer, smooth]


class VariantsBench(Bench):
    def __init__(self, profile_name: str, work: Path, on_progress):
        super().__init__(PROFILES[profile_name], work, on_progress)
        self.profile_name = profile_name

    def row(self, row: Row) -> dict:
        return {**super().row(row), **self.autoencoder(row)}

    def measured_elsewhere(self, row: Row) -> dict | None:
        """A row another benchmark measured the same way, with this table's attacks on the autoencoder added
        where it has none."""
        old = super().measured_elsewhere(row)
        return old if old is None or "latent" in old else {**old, **self.autoencoder(row)}

    def autoencoder(self, row: Row) -> dict:
        """Kos et al.'s latent attack on a purifier row's CVAE, and the CVAE's design (nothing for a classifier)."""
        if row.cvae is None:
            return {}
        clf, pur = self.load(row)
        n, steps = LATENT[self.profile_name]
        return {"latent": latent_attack_report(pur, clf, self.x_all, self.y_all, n, steps, self.p.seed,
                                               self.p.batch_size),
                "design": checkpoint.read_record(ROOT / row.cvae)["meta"].get("design", "puvae")}

    def export(self, row: Row) -> dict:
        """ONNX parity against torch and onnxruntime images/s (CPU provider, batch 256), or why not."""
        clf, pur = self.load(row, channels_last=False)
        if pur is None:
            return {"exportable": None}
        reason = not_exportable(pur)
        if reason:
            return {"exportable": False, "why": reason}
        from serve.runtime import OnnxPurifier

        with tempfile.TemporaryDirectory() as tmp:
            res = export_onnx(Path(tmp) / "pipeline.onnx", pur, clf, metadata={
                "dataset": "fashion-mnist", "class_names": [str(k) for k in range(10)],
                "input_shape": ["N", 1, 28, 28], "value_range": [0.0, 1.0], "rejection_threshold": 1e9})
            rt = OnnxPurifier(res.path, device="cpu")
            speed = time_it(rt, self.x_all.numpy()[:self.p.speed_images[1]], 256, self.p.speed_reps)
        return {"exportable": True, "parity": {str(b): max(d.values()) for b, d in res.parity.items()},
                "onnx_batch_256": speed}


def render(report: dict) -> str:
    p, rows = report["profile"], report["rows"]
    n_lat, steps_lat = LATENT[report["profile_name"]]
    parts = [f"Fashion-MNIST test set; every row attacked as in results/adversarial.md (profile "
             f"{report['profile_name']}): first {p['n']} images, L-infinity eps {p['eps']}; {suite_text(p)} "
             f"(analysis by synthesis: through its unrolled latent steps); Square "
             f"({p['square_queries']} queries) and APGD-CE/DLR ({p['apgd_iters']} iterations, BPDA) on the first "
             f"{p['n_art']}. Latent attack (Kos et al.): first {n_lat} test images, each against the next test image "
             f"of another class, Adam {steps_lat} steps, lambda 1. images/s: torch eager, batch 256, "
             f"{speed_threads(report)} threads; ONNX: onnxruntime CPU provider, batch 256.", "",
             markdown_table(headline_columns(p), headline(rows, report["speed"], p.get("targeted", 0))), "",
             "### Attacks on the autoencoder, and export",
             markdown_table(["defense", "AS_ignore-target", "AS_target", "SSIM(target recon, adv recon)",
                             "L2(target recon, adv recon)", "ONNX parity (max rel. diff)", "ONNX images/s"],
                            [[name, *(_latent_cells(r.get("latent"))), *_export_cells(report["export"][name])]
                             for name, r in rows.items()]), "",
             "### Summary (the README's table)",
             markdown_table(["design", "clean", f"adaptive (n {p['n']})", f"worst of all (n {p['n_art']})",
                             "latent attack AS_ignore-target / AS_target", "ONNX parity"],
                            [_summary_cells(name, r, report["export"][name]) for name, r in rows.items()])]
    return "\n".join(parts)


def _summary_cells(name: str, row: dict, ex: dict) -> list[str]:
    latent = " / ".join(_latent_cells(row["latent"])[:2]) if row.get("latent") else "n/a (no autoencoder)"
    parity = ("n/a (no purifier)" if ex["exportable"] is None else
              "not exportable (why: the export table above)" if not ex["exportable"] else _export_cells(ex)[0])
    return [f"`{name}`" if name in designs.DESIGNS else name, f"{row['clean']:.4f}", f"**{row['adaptive']:.3f}**",
            f"{row['worst_of_all']:.3f}", latent, parity]


def _latent_cells(la: dict | None) -> list[str]:
    if not la:
        return ["-"] * 4
    return [f"{la['AS_ignore_target']:.3f}", f"{la['AS_target']:.3f}", f"{la['ssim_target_vs_adv_recon']:.3f}",
            f"{la['l2_target_vs_adv_recon']:.2f}"]


def _export_cells(ex: dict) -> list[str]:
    if ex["exportable"] is None:
        return ["-", "-"]
    if not ex["exportable"]:
        return [f"not exportable: {ex['why']}", "-"]
    return [f"{max(ex['parity'].values()):.1e}", f"{ex['onnx_batch_256']['images_per_s']:.0f}"]


@click.command()
@click.option("--profile", "profile_name", type=click.Choice(sorted(PROFILES)), default="quick", show_default=True)
@click.option("--plain", default="models/fashion-mnist-plain", show_default=True)
@click.option("--joint", default="models/adversarial/joint", show_default=True,
              help="PuVAE and its classifier adversarially trained together (a row).")
@click.option("--baselines", default="models/baselines", show_default=True)
@click.option("--variants", "variants_dir", default="models/variants", show_default=True,
              help="Directory of `make variants`'s runs (one subdirectory per design).")
@click.option("--adversarial", "adv_dir", default="models/adversarial", show_default=True,
              help="Directory of PuVAE's adversarial-training runs (its alternating run is a row).")
@click.option("--row", "rows", multiple=True,
              help="A row to measure, by name; repeat for more (default: every row). The table also holds the "
                   "other rows already measured with unchanged weights, from their caches.")
@click.option("--out", help="Results file (default results/variants.json; other profiles variants-PROFILE).")
@click.option("--work", help="Cache of finished rows (default: results/.OUT-work).")
@click.option("--threads", type=int, help="torch threads (default: torch's).")
def main(profile_name, plain, joint, baselines, variants_dir, adv_dir, rows, out, work, threads):
    if threads:
        torch.set_num_threads(threads)
    out, work = output_paths("variants", profile_name, out, work)
    table = default_rows(plain, joint, baselines, variants_dir, adv_dir)
    chosen = choose_rows(table, rows, "run `make variants variants-adversarial` first")
    start = time.perf_counter()
    bench = VariantsBench(profile_name, work, lambda m: click.echo(m, err=True))
    report = report_head("variants.py", profile_name)
    report["latent"] = dict(zip(("n", "steps"), LATENT[profile_name]))
    report["designs"] = {k: {**asdict(d), "trained_on_plain_weights": d.inference_only}
                         for k, d in designs.DESIGNS.items()}
    report["rows"] = measure_rows(bench, chosen, table, out)
    all_rows = [r for r in table if r.name in report["rows"]]
    report["attack_seconds"] = {k: attack_seconds(v) for k, v in report["rows"].items()}
    report["export"] = {r.name: bench.cached(f"export-{slug(r.name)}", lambda r=r: bench.export(r)) for r in all_rows}
    report["speed"] = speed_together(bench, all_rows)
    publish(report, out, "The purifier family side by side", render(report), start)


if __name__ == "__main__":
    main()
