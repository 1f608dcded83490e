"""The benchmark's parts: L2 PGD, the worst case with early exit, the reject option, SSIM, the latent attack,
the ART bridge, the Defense-GAN-style baseline, adversarial training, and the benchmark itself on a tiny subset."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from purifier import checkpoint
from purifier.attacks import PGD, RejectOption, ce_objective, pipeline_objective, selection_objective
from purifier.models.defensegan import VAE, DefenseGAN, VAEConfig
from purifier.pipeline import PurifiedClassifier, Purifier
from purifier.robust import (Attack, latent_attack, latent_codes, pgd_attack, purifier_attacks, runner_up,
                             ssim, targeted_objectives, worst_case)
from purifier.train import AdversarialTraining, TrainConfig, train_classifier
from serve.models import MODELS

ROOT = Path(__file__).resolve().parents[1]
MODEL = MODELS["fashion-mnist"].path


@pytest.fixture(scope="module")
def shipped():
    return checkpoint.load(MODEL / "classifier"), Purifier(checkpoint.load(MODEL / "cvae")).eval()


@pytest.fixture(scope="module")
def images(fmnist_test):
    return torch.from_numpy(fmnist_test.x[:32]), torch.from_numpy(fmnist_test.y[:32])


def test_l2_pgd_stays_in_its_ball_and_breaks_the_bare_classifier(shipped, images):
    clf, _ = shipped
    x, y = images
    adv = PGD(eps=2.0, steps=10, norm="L2")(clf, x, y)
    norms = (adv - x).flatten(1).norm(dim=1)
    assert norms.max() <= 2.0 + 1e-4 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        assert (clf(adv).argmax(1) == y).float().mean() < 0.3 < (clf(x).argmax(1) == y).float().mean()
    with pytest.raises(ValueError, match="norm"):
        PGD(norm="L1")


def test_early_exit_returns_what_the_full_batch_returns(shipped, images):
    """Broken images leave the batch; every image's returned example must equal running it on its own."""
    clf, _ = shipped
    x, y = images[0][:6], images[1][:6]
    pgd = PGD(eps=0.05, steps=5, random_start=False)
    together = pgd(clf, x, y)
    alone = torch.cat([pgd(clf, x[i:i + 1], y[i:i + 1]) for i in range(len(x))])
    assert torch.allclose(together, alone, atol=1e-5)


def test_worst_case_is_the_per_image_minimum_and_skips_broken_images(shipped, images):
    clf, _ = shipped
    x, y = images
    holds = lambda a, b: clf(a).argmax(1) == b  # noqa: E731
    seen = []

    def noop(a, b, r):
        seen.append(len(a))
        return a

    weak = pgd_attack("weak", PGD(eps=0.01, steps=1), ce_objective(clf))
    strong = pgd_attack("strong", PGD(eps=0.03, steps=3), ce_objective(clf))
    res = worst_case([weak, strong, Attack("noop", noop, restarts=2)], holds, x, y, batch_size=8)
    with torch.no_grad():
        clean = holds(x, y)
    alone = [worst_case([a], holds, x, y)["robust"] for a in (weak, strong)]
    assert torch.equal(res["robust"], clean & alone[0] & alone[1])
    assert 0 < int(res["robust"].sum()) < int(clean.sum())
    assert sum(seen) == 2 * int(res["robust"].sum()) and max(seen) <= 8  # only survivors, in chunks
    assert [s["attack"] for s in res["steps"]] == ["weak", "strong", "noop", "noop"]
    broken = ~res["robust"] & clean
    assert all(res["broken_by"][i] in ("weak", "strong") for i in broken.nonzero().squeeze(1).tolist())
    assert not holds(res["adversarial"][broken], y[broken]).any()


def test_worst_case_resumes_from_its_saved_state_to_the_same_result(shipped, images):
    clf, _ = shipped
    x, y = images
    holds = lambda a, b: clf(a).argmax(1) == b  # noqa: E731
    attacks = [pgd_attack("weak", PGD(eps=0.01, steps=2), ce_objective(clf), restarts=2),
               pgd_attack("strong", PGD(eps=0.03, steps=3), ce_objective(clf), restarts=2)]
    states, saved = [], []
    buffer = x.clone()  # the breaking examples, kept with each state as a caller saves them
    full = worst_case(attacks, holds, x, y, batch_size=8, adversarial=buffer,
                      on_step=lambda st: states.append(json.loads(json.dumps(st))) or saved.append(buffer.clone()))
    assert len(states) == 4 and states[-1]["robust"] == full["robust"].tolist()
    assert full["adversarial"] is buffer
    calls = []
    counted = [pgd_attack(a.name, PGD(eps=e, steps=k), ce_objective(clf), restarts=2) for a, e, k in
               zip(attacks, (0.01, 0.03), (2, 3))]
    for a in counted:  # count which (attack, restart) pairs actually run after the resume
        make = a.make
        a.make = lambda xa, ya, r, make=make, name=a.name: calls.append((name, r)) or make(xa, ya, r)
    resumed = worst_case(counted, holds, x, y, batch_size=8, state=states[1],  # cut off after "weak" x 2
                         adversarial=saved[1].clone())
    assert torch.equal(resumed["robust"], full["robust"])
    assert torch.equal(resumed["adversarial"], full["adversarial"])
    assert resumed["broken_by"] == full["broken_by"] and len(resumed["steps"]) == 4
    assert sorted(set(calls)) == [("strong", 0), ("strong", 1)]


def test_reject_option_counts_only_unflagged_mistakes_and_penalises_crossing():
    r = RejectOption(threshold=0.1, penalty=5.0)
    wrong = torch.tensor([True, True, False])
    scores = torch.tensor([[0.05, 0.2], [0.3, 0.2], [0.01, 0.5]])
    assert r.broken(wrong, scores).tolist() == [True, False, False]
    assert float(r.cost(scores)) == pytest.approx(5.0 * (0.2 / 0.1 - 1))
    assert float(RejectOption(0.1).cost(scores)) == 0.0


def test_reject_aware_objective_judges_by_the_flag(shipped, images):
    """Every objective of the suite, the targeted ones included, judges by the flag when it attacks the reject
    option (at a near-zero threshold everything is flagged, so nothing counts as broken) and pays its penalty."""
    clf, pur = shipped
    x, y = images
    yt = y * pur.num_classes + runner_up(pur, x, y, 1)  # the targeted objectives take the target in the label

    def targeted(reject=None):
        return [lambda a, b, o=o: o(a, yt) for _, o in targeted_objectives(clf, pur, 1, reject).values()]

    flagged = [selection_objective(clf, pur, RejectOption(1e-9)),
               pipeline_objective(clf, pur, "full", reject=RejectOption(1e-9)), *targeted(RejectOption(1e-9))]
    for obj in flagged:
        value, broken = obj(x.clone().requires_grad_(True), y)
        assert not broken.any() and value.requires_grad
    assert any(obj(x, y)[1].any() for obj in targeted())  # without the option some images do fall
    pgd = PGD(eps=0.1, steps=1)
    assert [a.name for a in purifier_attacks(clf, pur, pgd, reject=RejectOption(0.1), targeted=1)] == \
        [a.name for a in purifier_attacks(clf, pur, pgd, targeted=1)]  # the reject option's suite is the whole suite
    for free, paying in zip(targeted(), targeted(RejectOption(1e-3, penalty=1.0))):
        assert float(paying(x, y)[0].detach()) < float(free(x, y)[0].detach())


def test_ssim_is_one_for_equal_images_and_falls_with_noise(images):
    x = images[0][:4]
    noisy = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert torch.allclose(ssim(x, x), torch.ones(4), atol=1e-5)
    s = ssim(x, noisy)
    assert (s < 0.9).all() and (s > -1).all()
    assert (ssim(x, 1 - x) < s).all()


def test_latent_attack_moves_the_codes_towards_the_target(shipped, images):
    _, pur = shipped
    x, y = images
    src, tgt = x[:4], x[4:8]
    adv = latent_attack(pur, src, tgt, steps=30)
    with torch.no_grad():
        before = (latent_codes(pur, src) - latent_codes(pur, tgt)).norm(dim=1)
        after = (latent_codes(pur, adv) - latent_codes(pur, tgt)).norm(dim=1)
    assert (after < before).all() and adv.min() >= 0 and adv.max() <= 1


def test_art_bridge_predicts_like_the_pipeline_and_passes_bpda_gradients(shipped, images):
    pytest.importorskip("art")
    from art.estimators.classification import PyTorchClassifier

    from purifier.art_bridge import PurifierPreprocessor

    clf, pur = shipped
    x, y = images
    onehot = np.eye(10, dtype=np.float32)[y.numpy()]
    grads = {}
    for mode in ("bpda", "full"):
        est = PyTorchClassifier(model=clf, loss=torch.nn.CrossEntropyLoss(), input_shape=(1, 28, 28), nb_classes=10,
                                clip_values=(0.0, 1.0), preprocessing_defences=[PurifierPreprocessor(pur, grad=mode)])
        with torch.no_grad():
            ours = PurifiedClassifier(clf, pur, "none")(x).numpy()
        assert np.abs(est.predict(x.numpy()) - ours).max() < 1e-4
        grads[mode] = est.loss_gradient(x.numpy(), onehot)
    a = x.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(PurifiedClassifier(clf, pur, "bpda")(a), y).backward()
    g = a.grad.numpy()
    assert np.dot(grads["bpda"].ravel(), g.ravel()) / (np.linalg.norm(grads["bpda"]) * np.linalg.norm(g)) > 0.999
    assert np.abs(grads["full"]).sum() > 0 and not np.allclose(grads["full"], grads["bpda"])
    with pytest.raises(ValueError, match="grad mode"):
        PurifierPreprocessor(pur, grad="magic")


def test_defensegan_projection_is_deterministic_and_fits_better_with_more_steps(images):
    torch.manual_seed(0)
    vae = VAE(VAEConfig(latent_dim=4, hidden=32)).eval()
    x = images[0][:3]
    short, long = DefenseGAN(vae, steps=0, restarts=2), DefenseGAN(vae, steps=30, restarts=2)
    a, b = long(x), long(x)
    assert torch.equal(a["purified"], b["purified"]) and a["purified"].shape == x.shape
    assert (a["scores"] < short(x)["scores"]).all()
    with torch.no_grad():  # runs its own optimisation even when the caller turns gradients off
        assert torch.equal(long(x)["purified"], a["purified"])
    with pytest.raises(ValueError, match="restarts"):
        DefenseGAN(vae, restarts=0)


@pytest.mark.parametrize("kind", ["pgd", "fgsm"])
def test_adversarial_training_records_adversarial_accuracy(fmnist_test, small_classifier, kind):
    x, y = torch.from_numpy(fmnist_test.x[:256]), torch.from_numpy(fmnist_test.y[:256])
    cfg = TrainConfig(epochs=1, batch_size=128)
    hist = train_classifier(small_classifier, x, y, x[:64], y[:64], cfg,
                            adversarial=AdversarialTraining(kind, eps=0.1, steps=2))
    assert 0 <= hist[0]["adv_acc"] <= 1 and np.isfinite(hist[0]["loss"])
    with pytest.raises(ValueError, match="kind"):
        AdversarialTraining("cw")


def test_benchmark_tiny_profile_end_to_end(tmp_path):
    """Every section of benchmarks/robust.py on a handful of images (the numbers mean nothing)."""
    out = tmp_path / "robust-tiny.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.robust", "--profile", "tiny", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in ("clean", "grids", "reject", "art", "cw", "latent", "sanity", "speed", "commit", "software"):
        assert key in report
    assert set(report["grids"]) == {"Linf-0.1", "Linf-0.3", "L2-2.0"}
    head = report["grids"]["Linf-0.1"]["defenses"]["PuVAE purifier"]
    assert {s["attack"] for s in head["steps"]} == {"selection", "full gradient", "BPDA", "softmin",
                                                   "targeted selection r1", "targeted logits r1"}
    # robust images are a subset of the correctly classified ones: counted, never more than clean holds
    clean = report["clean"]["PuVAE purifier"]
    assert abs(head["adaptive"] - sum(head["adaptive_robust"]) / head["n"]) < 1e-6
    assert clean["n"] >= head["n"]
    assert round(head["adaptive"] * head["n"]) <= round(clean["accuracy"] * clean["n"])
    bridge = "ART bridge equals the pipeline (PuVAE purifier)"
    assert bridge in report["sanity"]
    assert report["sanity"][bridge]["pass"]
    md = out.with_suffix(".md").read_text()
    assert "### Headline" in md and "Sanity checks" in md
    for name in report["plots"]:
        assert (tmp_path / name).stat().st_size > 0
