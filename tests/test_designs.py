"""The purifier family: regularisers against known distributions, every design's loss and purifier on real
modules, ONNX parity for the designs that export, gradient masking of analysis by synthesis when not unrolled,
and ``purifier train --arch`` end to end on a small dataset."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from export.onnx_export import ExportError, export_onnx
from purifier import designs
from purifier import regularisers as reg
from purifier.abs import LatentOptPurifier
from purifier.cli import main
from purifier.losses import PuVAELoss
from purifier.models.hcvae import HCVAE, HCVAEConfig
from purifier.pipeline import Purifier
from serve.runtime import OnnxPurifier

ROOT = Path(__file__).resolve().parents[1]


def _codes(n=256, d=8, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_ks_and_cov_losses_are_small_on_the_prior_and_grow_away_from_it():
    z = _codes()
    assert reg.ks_loss(z) < 0.01 < reg.ks_loss(z + 1.0)
    assert reg.cov_loss(z) < 0.02 < reg.cov_loss(2.0 * z)
    assert reg.prior_weight(reg.ks_loss, 256, 8) > 1.0


def test_coupled_losses_prefer_codes_correlated_by_alpha():
    z, other = _codes(seed=0), _codes(seed=1)
    alpha = 0.95
    coupled = alpha * z + (1 - alpha ** 2) ** 0.5 * other  # corr(z, coupled) = alpha, both N(0, 1)
    assert reg.coupled_cov_loss(z, coupled, alpha) < reg.coupled_cov_loss(z, other, alpha)
    assert reg.coupled_ks_loss(z, coupled) < reg.coupled_ks_loss(z, other)


def test_total_correlation_is_higher_for_dependent_codes():
    lv = torch.full((256, 4), -2.0)
    mu_ind = _codes(256, 4, 2)
    mu_dep = _codes(256, 1, 3).repeat(1, 4)
    noise = _codes(256, 4, 4) * torch.exp(0.5 * lv)
    assert reg.total_correlation(mu_dep + noise, mu_dep, lv, 60000) > reg.total_correlation(mu_ind + noise, mu_ind,
                                                                                            lv, 60000)


@pytest.mark.parametrize("name", sorted(designs.DESIGNS))
def test_every_design_trains_a_step_and_purifies(name, small_classifier):
    design = designs.get(name)
    torch.manual_seed(0)
    model = designs.build_model(design, "fashion-mnist", (1, 28, 28), 10, channels=(8, 16), hidden=32)
    loss = PuVAELoss(**{**design.loss, "tc_dataset_size": 1000})
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.arange(16) % 10
    model.train()
    terms = loss(model, small_classifier, x, y)
    terms["loss"].backward()
    assert torch.isfinite(terms["loss"])
    expected = {"tc"} if loss.tc_weight else set()
    expected |= {"ks", "cv"} if loss.ks_weight else set()
    expected |= {"recon_adv"} if loss.couple_alpha else set()
    assert expected <= set(terms)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    no_grad = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"design {name}: the loss leaves these parameters without a gradient: {no_grad}"
    purifier = designs.purifier_from_spec(model.eval(), design.purifier).eval()
    with torch.no_grad():
        out = purifier(x[:4])
        again = purifier(x[:4])
    assert out["scores"].shape == (4, 10) and out["purified"].shape == (4, 1, 28, 28)
    assert torch.equal(out["purified"], again["purified"])  # deterministic: no EOT needed
    assert torch.equal(out["chosen_class"], out["scores"].argmin(1))


def test_iwae_bound_is_below_its_single_sample_bounds(small_cvae, batch):
    iwae = Purifier(small_cvae, "iwae", samples=6).eval()
    with torch.no_grad():
        together = iwae(batch)["scores"]
        singles = []
        for s in range(6):
            one = Purifier(small_cvae, "iwae", samples=1).eval()
            one.noise = iwae.noise[s:s + 1]
            singles.append(one(batch)["scores"])
    assert (together <= torch.stack(singles).mean(0) + 1e-4).all()
    assert not (together == torch.stack(singles).mean(0)).all()


def test_iwae_and_hierarchical_designs_export_with_parity(tmp_path, small_cvae, small_classifier, fmnist_test):
    torch.manual_seed(0)
    hier = HCVAE(HCVAEConfig(latent_dims=(4, 4), channels=(8, 16), hidden=32, skip=True, k=1)).eval()
    for name, purifier in (("iwae", Purifier(small_cvae, "iwae", samples=3)), ("hcvae", Purifier(hier, "likelihood"))):
        result = export_onnx(tmp_path / f"{name}.onnx", purifier, small_classifier, metadata={
            "dataset": "toy", "class_names": [str(k) for k in range(10)], "input_shape": ["N", 1, 28, 28],
            "value_range": [0.0, 1.0], "rejection_threshold": 1e9})
        assert max(max(d.values()) for d in result.parity.values()) <= 1e-4
        # real images too: their log weights are far below zero, where a naive logsumexp underflows to inf
        x = np.concatenate([np.random.default_rng(2).random((5, 1, 28, 28), dtype=np.float32), fmnist_test.x[:64]])
        with torch.no_grad():
            ref = purifier.eval()(torch.from_numpy(x))
        got = OnnxPurifier(result.path, device="cpu")(x)
        assert np.array_equal(got["chosen_class"], ref["chosen_class"].numpy())
        assert np.isfinite(got["scores"]).all()
        assert np.allclose(got["scores"], ref["scores"].numpy(), rtol=1e-4)


@pytest.mark.parametrize("rule", ["likelihood", "iwae"])
def test_likelihood_rules_on_the_plain_model_match_onnxruntime_on_real_images(tmp_path, fmnist_test, rule):
    # trained weights on real images: saturated pixel logits, where the exported form of torch's BCE with logits
    # takes log(0), and log weights hundreds of nats below zero, where a logsumexp that does not subtract its
    # max (onnxruntime's ReduceLogSumExp) underflows: either makes scores inf or nan
    from purifier import checkpoint

    model = checkpoint.load(ROOT / "models" / "fashion-mnist-plain" / "cvae", expect="cvae")
    purifier = Purifier(model, rule, samples=4).eval()
    result = export_onnx(tmp_path / f"{rule}.onnx", purifier, metadata={
        "dataset": "fashion-mnist", "class_names": [str(k) for k in range(10)], "input_shape": ["N", 1, 28, 28],
        "value_range": [0.0, 1.0], "rejection_threshold": 1e9})
    x = fmnist_test.x[:64]
    with torch.no_grad():
        ref = purifier(torch.from_numpy(x))["scores"].numpy()
    got = OnnxPurifier(result.path, device="cpu")(x)["scores"]
    assert np.isfinite(got).all() and np.allclose(got, ref, rtol=1e-4)


def test_hierarchical_ce_term_trains_the_reconstruction_the_purifier_hands_on(small_classifier):
    # PuVAE's cross-entropy term must see what the purifier outputs: for k < blocks that is the first k
    # posteriors plus the conditional priors, not the all-posterior reconstruction the recon term uses
    torch.manual_seed(0)
    model = HCVAE(HCVAEConfig(latent_dims=(4, 4, 4), channels=(8, 16), hidden=32, k=1)).eval()
    x, y = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.arange(6) % 10
    with torch.no_grad():
        out = model(x, y)
        inference = model.reconstruct_all(x, deterministic=True)["recon"][torch.arange(6), y]
    assert torch.allclose(out["purify_recon"], inference, atol=1e-6)
    assert not torch.allclose(out["purify_recon"], out["recon"], atol=1e-3)
    # the conditional prior of a later block only shapes the purifier's reconstruction: the CE term reaches it
    terms = PuVAELoss(sel_weight=0.0)(model, small_classifier, x, y)
    grad, = torch.autograd.grad(terms["ce"], model.blocks[2].prior.weight, allow_unused=True)
    assert grad is not None and float(grad.abs().sum()) > 0


def test_analysis_by_synthesis_masks_gradients_unless_unrolled(small_cvae, batch, tmp_path):
    plain = Purifier(small_cvae).eval()
    zero_steps = LatentOptPurifier(small_cvae, steps=0).eval()
    with torch.no_grad():
        assert torch.allclose(zero_steps(batch)["purified"], plain(batch)["purified"], atol=1e-6)
    abs_ = LatentOptPurifier(small_cvae, steps=3, lr=0.01).eval()
    with torch.no_grad():
        moved = abs_(batch)["scores"].min(1).values
        assert (moved <= plain(batch)["scores"].min(1).values + 1e-6).float().mean() > 0.5
    x = batch.clone().requires_grad_(True)
    masked, = torch.autograd.grad(abs_(x)["purified"].sum(), x, allow_unused=True)
    assert masked is None or float(masked.abs().sum()) == 0.0
    x = batch.clone().requires_grad_(True)
    unrolled, = torch.autograd.grad(abs_.attack_view()(x)["purified"].sum(), x)
    assert float(unrolled.abs().sum()) > 0
    with pytest.raises(ExportError, match="autodiff"):
        export_onnx(tmp_path / "abs.onnx", abs_)


def test_train_arch_records_the_design_and_export_rebuilds_it(tmp_path, tiny_npz):
    run = CliRunner()
    data = f"npz:{tiny_npz}"
    r = run.invoke(main, ["train-classifier", "--data", data, "--out", str(tmp_path / "run" / "classifier"),
                          "--epochs", "1", "--val-size", "100", "--quiet"])
    assert r.exit_code == 0, r.output
    r = run.invoke(main, ["train", "--data", data, "--arch", "seatbelt", "--source",
                          str(tmp_path / "run" / "classifier"), "--out", str(tmp_path / "run"), "--epochs", "1",
                          "--val-size", "100", "--latent-dim", "4", "--quiet"])
    assert r.exit_code == 0, r.output
    record = json.loads((tmp_path / "run" / "cvae.json").read_text())
    assert record["kind"] == "hcvae" and record["meta"]["design"] == "seatbelt"
    assert record["config"]["skip"] is True and record["config"]["latent_dims"] == [4, 4, 4]
    assert record["meta"]["loss"]["tc_weight"] == 9.0
    r = run.invoke(main, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "onnx")])
    assert r.exit_code == 0, r.output
    rt = OnnxPurifier(tmp_path / "onnx")
    assert rt.metadata["design"] == "seatbelt" and rt.image_shape == (1, 32, 32)
    r = run.invoke(main, ["train", "--data", data, "--arch", "hcvae", "--conditioning", "onehot", "--source",
                          str(tmp_path / "run" / "classifier"), "--out", str(tmp_path / "h"), "--quiet"])
    assert r.exit_code == 2 and "onehot" in r.output
    r = run.invoke(main, ["train", "--data", data, "--arch", "ks-cov", "--couple-alpha", "1.5", "--source",
                          str(tmp_path / "run" / "classifier"), "--out", str(tmp_path / "k"), "--quiet"])
    assert r.exit_code == 2 and "1.5" in r.output


def test_adversarial_training_mode_applies_to_the_hierarchical_designs(small_classifier):
    import copy

    from purifier.adversarial import PipelineAdversarial, train_pipeline_adversarial
    from purifier.train import TrainConfig

    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 1, 28, 28, generator=gen), torch.arange(64) % 10
    design = designs.get("seatbelt")
    torch.manual_seed(0)
    model = designs.build_model(design, "fashion-mnist", (1, 28, 28), 10, latent_dim=4, channels=(8, 16), hidden=32)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    hist = train_pipeline_adversarial(
        model, small_classifier, copy.deepcopy(small_classifier), x, y, x[:16], y[:16], TrainConfig(batch_size=32),
        PuVAELoss(**{**design.loss, "ce_weight": 1.0, "sel_weight": 1.0, "tc_dataset_size": 64}),
        PipelineAdversarial(mode="alternating", steps=1, val_n=8, val_steps=1, val_every=1.0), epochs=1.0)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert not torch.equal(before, after) and 0 <= hist[-1]["val_adaptive"] <= 1


def test_variants_benchmark_tiny_profile_end_to_end(tmp_path):
    """benchmarks/variants.py on a handful of images: an exportable and a non-exportable design (numbers mean
    nothing), the latent attack per row, the export column."""
    import subprocess
    import sys

    out = tmp_path / "variants-tiny.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.variants", "--profile", "tiny", "--row", "iwae",
                        "--row", "abs", "--out", str(out)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["rows"]) == {"iwae", "abs"}
    assert report["rows"]["abs"]["checkpoints"]["purifier"]["kind"] == "abs"
    assert report["export"]["iwae"]["exportable"] is True and report["export"]["iwae"]["parity"]["64"] <= 1e-4
    assert report["export"]["abs"]["exportable"] is False and "autodiff" in report["export"]["abs"]["why"]
    assert {"AS_target", "ssim_target_vs_adv_recon"} <= set(report["rows"]["iwae"]["latent"])
    assert report["rows"]["abs"]["sanity"]["gradient not zero: full gradient"]["pass"]  # unrolled, not masked
    summary = out.with_suffix(".md").read_text().split("### Summary")[1]  # the table README quotes
    assert "| `abs` |" in summary and "not exportable" in summary and "| `iwae` |" in summary

