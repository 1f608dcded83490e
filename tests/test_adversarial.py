"""Adversarial training through the whole pipeline: the training attacks, which parts each mode trains, the
CLI that writes a complete model directory, and benchmarks/adversarial.py on a handful of images."""
import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from purifier import checkpoint
from purifier.adversarial import PipelineAdversarial, attack_batch, cvae_adversarial_terms, train_pipeline_adversarial
from purifier.attacks import PGD, _selection_margin
from purifier.losses import PuVAELoss
from purifier.pipeline import Purifier
from purifier.train import TrainConfig
from serve.models import MODELS

ROOT = Path(__file__).resolve().parents[1]
MODEL = MODELS["fashion-mnist"].path


@pytest.fixture(scope="module")
def data(fmnist_test):
    x, y = torch.from_numpy(fmnist_test.x[:96]), torch.from_numpy(fmnist_test.y[:96])
    return x[:64], y[:64], x[64:], y[64:]


def _params(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()]).clone()


@pytest.mark.parametrize("bad, match", [({"mode": "both"}, "mode"), ({"attacks": ("cw",)}, "attacks"),
                                        ({"attacks": ()}, "attacks"), ({"eps": 0}, "eps"), ({"steps": 0}, "steps"),
                                        ({"clf_mix": 2}, "clf_mix"), ({"smooth_weight": -1}, "smooth_weight"),
                                        ({"val_eps": 0}, "validation eps")])
def test_bad_settings_name_the_value(bad, match):
    with pytest.raises(ValueError, match=match):
        PipelineAdversarial(**bad)


def test_training_attacks_stay_in_the_ball_and_each_slice_gets_its_attack(data):
    x, y = data[0][:16], data[1][:16]
    clf = checkpoint.load(MODEL / "classifier").eval()
    pur = Purifier(checkpoint.load(MODEL / "cvae")).eval()
    pgd = PGD(eps=0.1, steps=5, best_iterate=False)
    xa = attack_batch(clf, pur, x, y, pgd, ("selection", "full"), torch.Generator().manual_seed(0))
    assert (xa - x).abs().max() <= 0.1 + 1e-6 and xa.min() >= 0 and xa.max() <= 1
    assert not torch.equal(xa, x)
    with torch.no_grad():
        before = _selection_margin(pur(x[:8])["scores"], y[:8])
        after = _selection_margin(pur(xa[:8])["scores"], y[:8])
    # the first half was attacked on the selection margin: it must have risen on average
    assert after.mean() > before.mean()


def test_the_targeted_training_attack_closes_on_the_runner_up_class(data):
    """``targeted``: the selection margin toward the wrong class whose reconstruction fits the clean input best,
    so that class's score gap to the true class shrinks on every image of its slice."""
    from purifier.robust import runner_up

    x, y = data[0][:8], data[1][:8]
    clf = checkpoint.load(MODEL / "classifier").eval()
    pur = Purifier(checkpoint.load(MODEL / "cvae")).eval()
    pgd = PGD(eps=0.1, steps=5, best_iterate=False)
    xa = attack_batch(clf, pur, x, y, pgd, ("targeted",), torch.Generator().manual_seed(0))
    assert (xa - x).abs().max() <= 0.1 + 1e-6 and xa.min() >= 0 and xa.max() <= 1
    t = runner_up(pur, x, y, 1)
    with torch.no_grad():
        gap = [(s.gather(1, t[:, None]) - s.gather(1, y[:, None])).squeeze(1)
               for s in (pur(x)["scores"], pur(xa)["scores"])]
    assert (gap[1] < gap[0]).all(), gap


def test_the_smoothness_term_is_the_kl_between_clean_and_attacked_selection_softmax(data):
    """``adv_smooth``: zero when the attack left the input as it was, the KL divergence of the two selection
    softmaxes (computed here from the scores) otherwise, with gradients into the CVAE's weights."""
    x, y = data[0][:8], data[1][:8]
    clf = checkpoint.load(MODEL / "classifier").eval()
    cvae = checkpoint.load(MODEL / "cvae").eval()
    pur = Purifier(cvae).eval()
    tau = PuVAELoss().sel_tau
    assert "adv_smooth" not in cvae_adversarial_terms(cvae, clf, x, y, tau)
    assert cvae_adversarial_terms(cvae, clf, x, y, tau, clean=x)["adv_smooth"].abs() <= 1e-6
    xa = attack_batch(clf, pur, x, y, PGD(eps=0.1, steps=5, best_iterate=False), ("selection",),
                      torch.Generator().manual_seed(0))
    smooth = cvae_adversarial_terms(cvae, clf, xa, y, tau, clean=x)["adv_smooth"]
    with torch.no_grad():
        p, q = (torch.softmax(-pur(v)["scores"] / tau, 1) for v in (x, xa))
    expected = (p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log())).sum(1).mean()
    assert smooth > 0.01 and torch.allclose(smooth.detach(), expected, rtol=1e-3, atol=1e-5), (smooth, expected)
    smooth.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in [*cvae.enc_trunk.parameters(), *cvae.dec_trunk.parameters()])


@pytest.mark.parametrize("mode", ["cvae", "classifier", "alternating", "joint"])
def test_each_mode_trains_its_parts_and_never_the_source(mode, data, small_cvae, small_classifier):
    x, y, xv, yv = data
    cvae, target = small_cvae, small_classifier
    source = copy.deepcopy(small_classifier)
    before = {"cvae": _params(cvae), "target": _params(target), "source": _params(source)}
    adv = PipelineAdversarial(mode=mode, steps=1, val_n=8, val_steps=1, val_every=1.0)
    hist = train_pipeline_adversarial(cvae, target, source, x, y, xv, yv, TrainConfig(batch_size=32),
                                      PuVAELoss(ce_weight=1.0, sel_weight=1.0), adv, epochs=1.0)
    changed = {k: not torch.equal(before[k], _params(m)) for k, m in
               (("cvae", cvae), ("target", target), ("source", source))}
    assert changed == {"cvae": mode != "classifier", "target": mode != "cvae", "source": False}
    assert len(hist) == 1 and hist[0]["epoch"] == 1.0
    assert 0 <= hist[0]["val_purified_acc"] <= 1 and 0 <= hist[0]["val_adaptive"] <= 1
    assert all(p.requires_grad for p in [*cvae.parameters(), *target.parameters()])


def test_the_validation_check_attacks_at_its_own_budget(data):
    """val_eps sets the check's budget apart from the training attacks' eps: the last record (taken with the final
    weights) is the check at val_eps, and the settings name val_eps only when it is set. On the committed plain
    model, so that the two budgets give different accuracies."""
    from purifier.adversarial import adaptive_check

    x, y, xv, yv = data
    cvae = checkpoint.load(ROOT / "models" / "fashion-mnist-plain" / "cvae")
    clf = checkpoint.load(ROOT / "models" / "fashion-mnist-plain" / "classifier")
    adv = PipelineAdversarial(mode="cvae", eps=0.02, steps=1, val_n=32, val_steps=3, val_every=1.0, val_eps=0.3)
    hist = train_pipeline_adversarial(cvae, clf, copy.deepcopy(clf), x, y, xv, yv, TrainConfig(batch_size=32),
                                      PuVAELoss(ce_weight=1.0, sel_weight=1.0), adv, epochs=1.0)
    at = {e: adaptive_check(cvae, clf, xv[:32], yv[:32], e, 3)["val_adaptive"] for e in (0.02, 0.3)}
    assert hist[-1]["val_adaptive"] == at[0.3] < at[0.02]
    assert adv.to_dict()["val_eps"] == 0.3 and "val_eps" not in PipelineAdversarial().to_dict()


def test_source_must_not_be_the_trained_target(data, small_cvae, small_classifier):
    x, y, xv, yv = data
    with pytest.raises(ValueError, match="copy"):
        train_pipeline_adversarial(small_cvae, small_classifier, small_classifier, x, y, xv, yv, TrainConfig(),
                                   PuVAELoss(), PipelineAdversarial(mode="joint"), epochs=0.1)


def test_cli_writes_a_complete_model_directory(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "purifier.cli", "train", "--source", str(ROOT / "models/baselines/pgd-at"),
           "--init", str(MODEL), "--adversarial", "joint", "--epochs", "0.005", "--val-size", "100",
           "--adv-steps", "1", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "adversarial joint" in r.stdout
    # stderr is a pipe here, as in a background run's log: progress comes as lines, the last one at 100%
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("adversarial joint: step ")]
    assert lines and "(100%)" in lines[-1], r.stderr[-2000:]
    cvae, clf = checkpoint.read_record(out / "cvae"), checkpoint.read_record(out / "classifier")
    assert cvae["meta"]["adversarial"]["mode"] == "joint" and cvae["meta"]["adversarial"]["steps"] == 1
    assert cvae["meta"]["init_sha256"] == checkpoint.read_record(MODEL / "cvae")["weights_sha256"]
    assert clf["meta"]["trained"] is True
    assert clf["weights_sha256"] != checkpoint.read_record(ROOT / "models/baselines/pgd-at")["weights_sha256"]
    # the run directory is a model directory: both checkpoints load and purify
    pur = Purifier(checkpoint.load(out / "cvae")).eval()
    with torch.no_grad():
        logits = checkpoint.load(out / "classifier").eval()(pur(torch.rand(2, 1, 28, 28))["purified"])
    assert logits.shape == (2, 10)
    bad = subprocess.run(cmd[:-2] + ["--epochs", "0.5", "--adversarial", "none", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "0.5" in bad.stderr


def _plant_partial(work: Path, section: str, row_name: str, parts: dict) -> None:
    """Write work/partial-SECTION.json as a tiny-profile run of ROW_NAME cut off after PARTS would leave it."""
    from benchmarks.adversarial import default_rows
    from benchmarks.protocol import PROFILES, checkpoints_of

    row = next(r for r in default_rows("models/fashion-mnist-plain", "models/baselines", "models/adversarial")
               if r.name == row_name)
    planted = {"checkpoints": checkpoints_of(row), "profile": dataclasses.asdict(PROFILES["tiny"]), **parts}
    (work / f"partial-{section}.json").write_text(json.dumps(planted))


def test_benchmark_tiny_profile_end_to_end(tmp_path):
    """benchmarks/adversarial.py on a handful of images, classifier and plain purifier rows (numbers mean nothing).
    The reject-option section resumes from a partial file cut off after its first attack: five of the six images
    broken there, the sixth still attacked."""
    work = tmp_path / "work"
    work.mkdir()
    cut = {"attack": "selection (penalty 0)", "restart": 0, "attacked": 6, "accuracy": 1 / 6, "seconds": 123.0}
    _plant_partial(work, "reject-plain-puvae---pgd-at", "plain PuVAE + PGD-AT",
                   {"state": {"robust": [False] * 5 + [True], "broken_by": ["selection (penalty 0)"] * 5 + [None],
                              "steps": [cut]}})
    out = tmp_path / "adv-tiny.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.adversarial", "--profile", "tiny", "--row",
                        "PGD-AT (converged)", "--row", "plain PuVAE + PGD-AT", "--out", str(out), "--work", str(work)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert set(rows) == {"PGD-AT (converged)", "plain PuVAE + PGD-AT"}
    pu = rows["plain PuVAE + PGD-AT"]
    # the tiny profile's suite: the untargeted attacks, then the targeted ones toward 1 runner-up class
    assert [s["attack"] for s in pu["steps"]] == ["selection", "full gradient", "BPDA", "softmin",
                                                  "targeted selection r1", "targeted logits r1"]
    assert pu["targeted"] == 1 and report["profile"]["targeted"] == 1
    n_art = pu["art"]["n"]
    assert pu["worst_of_all"] <= sum(pu["adaptive_robust"][:n_art]) / n_art + 1e-9
    assert "gradient not zero: selection" in pu["sanity"]
    failed = [k for k, v in pu["sanity"].items() if not v["pass"]]
    assert not failed, f"sanity checks failed: {failed}"
    rj = report["reject"]
    assert rj["row"] == "plain PuVAE + PGD-AT"
    # resumed: the planted step, then the 11 others; the whole suite with and without the penalty, the targeted
    # attacks (1 runner-up class in the tiny profile) after the untargeted ones of both penalties
    assert rj["steps"][0] == cut and len(rj["steps"]) == 2 * 6
    assert [s["attack"].split(" (")[0] for s in rj["steps"][8:]] == ["targeted selection r1", "targeted logits r1"] * 2
    assert rj["steps"][1]["attacked"] == 1  # only the image the cut-off run left standing
    assert rj["defended"] <= 1 / 6 + 1e-6 and rj["rejected_among_adversarial"] <= rj["defended"]
    # its partial state is kept: a suite that grows later resumes from the attacks already run
    assert json.loads((work / "partial-reject-plain-puvae---pgd-at.json").read_text())["state"]["steps"] == rj["steps"]
    assert (tmp_path / report["plot"]).stat().st_size > 0
    assert "| defense | clean |" in out.with_suffix(".md").read_text()
    # a row measured with an older suite (no targeted attacks) stays in the table from its cache, marked, while
    # another row is measured; a row not asked for and never measured stays out
    cache = work / "row-plain-puvae---pgd-at.json"
    older = json.loads(cache.read_text())
    older["steps"] = [s for s in older["steps"] if not s["attack"].startswith("targeted")]
    cache.write_text(json.dumps(older))
    again = subprocess.run([sys.executable, "-m", "benchmarks.adversarial", "--profile", "tiny", "--no-reject",
                            "--row", "PGD-AT (converged)", "--out", str(out), "--work", str(work)],
                           capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert list(json.loads(out.read_text())["rows"]) == ["PGD-AT (converged)", "plain PuVAE + PGD-AT"]
    table = out.with_suffix(".md").read_text()
    assert [line for line in table.splitlines() if line.startswith("| plain PuVAE + PGD-AT |")][0].count(
        "not run (older suite)") == 1
    bad = subprocess.run([sys.executable, "-m", "benchmarks.adversarial", "--profile", "tiny",
                          "--row", "nonsense", "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode != 0 and "nonsense" in bad.stderr


def test_benchmark_row_resumes_from_its_partial_file(tmp_path):
    """A row cut off mid-way (a session's end) resumes: parts in work/partial-ROW.json are not measured again."""
    work = tmp_path / "work"
    work.mkdir()
    _plant_partial(work, "pgd-at--converged", "PGD-AT (converged)",
                   {"clean_and_oblivious": {"clean": 0.123, "clean_n": 50, "oblivious": 0.456}})
    out = tmp_path / "adv-tiny.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.adversarial", "--profile", "tiny", "--row",
                        "PGD-AT (converged)", "--out", str(out), "--work", str(work)], capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(out.read_text())["rows"]["PGD-AT (converged)"]
    assert (got["clean"], got["oblivious"]) == (0.123, 0.456)  # taken from the partial file, not measured
    assert not (work / "partial-pgd-at--converged.json").exists() and (work / "row-pgd-at--converged.json").is_file()



def test_the_validation_check_adds_the_targeted_attacks_to_the_worst_case(fmnist_test):
    """The training log's adaptive check with the targeted attacks is a worst case over more attacks: never above
    the untargeted check on the same images (same seeds), on the committed plain model."""
    from purifier.adversarial import adaptive_check

    cvae = checkpoint.load(ROOT / "models" / "fashion-mnist-plain" / "cvae")
    clf = checkpoint.load(ROOT / "models" / "fashion-mnist-plain" / "classifier")
    x, y = torch.from_numpy(fmnist_test.x[:40]), torch.from_numpy(fmnist_test.y[:40])
    plain = adaptive_check(cvae, clf, x, y, eps=0.1, steps=5, targeted=0)
    targeted = adaptive_check(cvae, clf, x, y, eps=0.1, steps=5, targeted=2)
    assert targeted["val_adaptive_targeted"] == 2 and plain["val_adaptive_targeted"] == 0
    assert targeted["val_adaptive"] <= plain["val_adaptive"]
    assert 0 < plain["val_adaptive"] < 1


def test_the_worst_combination_keeps_each_images_worst_attack(data):
    """combine="worst": every image under every training attack, and per image the candidate that breaks the
    pipeline, else the one with the largest selection margin; the same attacks rerun with the same generator give
    the candidates to compare."""
    from purifier.adversarial import _objective, worst_of
    from purifier.robust import runner_up

    x, y = data[0][:24], data[1][:24]
    cvae = checkpoint.load(ROOT / "models" / "fashion-mnist-plain" / "cvae")
    clf = checkpoint.load(ROOT / "models" / "fashion-mnist-plain" / "classifier")
    pur = Purifier(cvae).eval()
    pgd = PGD(eps=0.1, steps=2, best_iterate=False)
    attacks = ("selection", "targeted", "full")
    worst = attack_batch(clf, pur, x, y, pgd, attacks, torch.Generator().manual_seed(3), combine="worst")
    assert (worst - x).abs().max() <= 0.1 + 1e-6 and worst.min() >= 0 and worst.max() <= 1
    g = torch.Generator().manual_seed(3)
    cands = [pgd.run(_objective(a, clf, pur), x,
                     y * 10 + runner_up(pur, x, y, 1) if a == "targeted" else y, g) for a in attacks]
    assert torch.equal(worst, worst_of(clf, pur, cands, y))
    with torch.no_grad():
        broken = [clf(pur(c)["purified"]).argmax(1) != y for c in cands]
        worst_broken = clf(pur(worst)["purified"]).argmax(1) != y
    assert torch.equal(worst_broken, torch.stack(broken).any(0))  # an image any attack breaks stays broken
    assert worst_broken.float().mean() >= max(b.float().mean() for b in broken)
    with pytest.raises(ValueError, match="combine"):
        PipelineAdversarial(combine="max")
