"""The robust prior in the purifier's rule: score_c - mu * log p_prior(c | x), from ``Purifier`` through a model
directory (``attach_prior``), the benchmarks' rows and the ONNX export to onnxruntime."""
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.nn import functional as F

from benchmarks.protocol import Bench, Row, checkpoints_of, PROFILES
from purifier import checkpoint
from purifier.cli import main
from purifier.designs import load_purifier
from purifier.fitting import ModelDir, attach_prior
from purifier.pipeline import Purifier, PurifiedClassifier
from serve.models import MODELS

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models/middleware/cvae-alone-smooth200-tau3"  # the purifier the default was trained from, no prior
THROUGH = ROOT / "models/middleware/cvae-alone-smooth200-tau3-prior1"  # MODEL 1 epoch more through PRIOR at mu 0.001
PRIOR = ROOT / "models/baselines/pgd-at-converged"


@pytest.fixture(scope="module")
def with_prior(tmp_path_factory):
    """``MODEL`` with the converged PGD-AT attached at mu 0.001, exported."""
    from export.onnx_export import export_run

    out = tmp_path_factory.mktemp("prior") / "model"
    run = attach_prior(MODEL, PRIOR, 0.001, out)
    export_run(out / "cvae", str(out / "classifier"), out)
    return run


def test_the_rule_adds_mu_times_the_priors_negative_log_posterior(small_cvae, small_classifier, batch):
    plain = Purifier(small_cvae).eval()(batch)
    mixed = Purifier(small_cvae, prior=small_classifier, prior_weight=0.5).eval()(batch)
    expected = plain["scores"] - 0.5 * F.log_softmax(small_classifier(batch), 1)
    assert torch.allclose(mixed["scores"], expected, atol=1e-6)
    assert torch.equal(mixed["chosen_class"], expected.argmin(1))
    assert mixed["recon"].equal(plain["recon"])
    assert Purifier(small_cvae, prior=small_classifier, prior_weight=0.5).spec == {"selection": "mse",
                                                                                    "prior_weight": 0.5}
    off = Purifier(small_cvae, prior=small_classifier, prior_weight=0.0)
    assert off.prior is None and "prior_weight" not in off.spec
    assert off.eval()(batch)["scores"].equal(plain["scores"])


def test_a_heavy_prior_decides_the_class(small_cvae, small_classifier, batch):
    heavy = Purifier(small_cvae, prior=small_classifier, prior_weight=1e4).eval()(batch)
    assert torch.equal(heavy["chosen_class"], small_classifier(batch).argmax(1))


def test_candidates_score_their_classes_with_the_prior(small_cvae, small_classifier, batch):
    """k = 3 < K: each candidate class's score is the full purifier's score of that class, prior term included."""
    ranker = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)).eval()  # another ranking than the prior's
    full = Purifier(small_cvae, prior=small_classifier, prior_weight=0.5).eval()(batch)
    cand = Purifier(small_cvae, candidates=3, ranker=ranker, prior=small_classifier, prior_weight=0.5).eval()(batch)
    kept = torch.isfinite(cand["scores"])
    assert kept.sum(1).eq(3).all()
    assert torch.allclose(cand["scores"][kept], full["scores"][kept], atol=1e-6)


@pytest.mark.parametrize("weight, match", [(-1.0, "finite number >= 0, got -1.0"), (float("inf"), "got inf"),
                                           (True, "got True"), ("0.1", "got '0.1'")])
def test_a_bad_weight_is_named(small_cvae, small_classifier, weight, match):
    with pytest.raises(ValueError, match=match):
        Purifier(small_cvae, prior=small_classifier, prior_weight=weight)


def test_a_weight_without_a_prior_says_what_is_missing(small_cvae):
    with pytest.raises(ValueError, match="prior_weight=0.1 needs a prior"):
        Purifier(small_cvae, prior_weight=0.1)


def test_attacks_differentiate_through_the_frozen_prior(small_cvae, small_classifier, batch):
    """The input gradient of the scores (what the selection, targeted and softmin attacks follow) is the MSE's plus
    mu times the prior's negative log-posterior's, with the prior's own parameters frozen as the loaders leave them."""
    for p in small_classifier.parameters():
        p.requires_grad_(False)
    pick = torch.randn(len(batch), 10, generator=torch.Generator().manual_seed(2))

    def grad(fn):
        x = batch.clone().requires_grad_(True)
        (fn(x) * pick).sum().backward()
        return x.grad

    with_prior = grad(lambda x: Purifier(small_cvae, prior=small_classifier, prior_weight=0.5).eval()(x)["scores"])
    mse = grad(lambda x: Purifier(small_cvae).eval()(x)["scores"])
    prior = grad(lambda x: -0.5 * F.log_softmax(small_classifier(x), 1))
    assert prior.abs().sum() > 0
    assert torch.allclose(with_prior, mse + prior, atol=1e-5)


def test_attach_prior_writes_a_model_directory_the_loaders_rebuild(with_prior, fmnist_test):
    meta = with_prior.record["meta"]
    assert meta["purifier"] == {"selection": "mse", "prior_weight": 0.001}
    assert meta["prior"]["sha256"] == checkpoint.read_record(PRIOR)["weights_sha256"]
    assert with_prior.record["weights_sha256"] == checkpoint.read_record(MODEL / "cvae")["weights_sha256"]
    old = checkpoint.read_record(MODEL / "cvae")["meta"]["rejection_calibration"]["threshold"]
    assert with_prior.threshold > old  # -mu log p >= 0 raises every chosen score
    pur = ModelDir(with_prior.path).purifier()
    assert pur.prior_weight == 0.001 and pur.prior is not None
    x = torch.from_numpy(fmnist_test.x[:64])
    by_hand = Purifier(checkpoint.load(MODEL / "cvae").eval(), prior=checkpoint.load(PRIOR).eval(),
                       prior_weight=0.001).eval()
    with torch.no_grad():
        assert torch.allclose(pur(x)["scores"], by_hand(x)["scores"], atol=1e-7)


def test_attach_prior_refuses_an_existing_directory_a_bad_weight_and_a_prior_that_is_no_classifier(with_prior,
                                                                                                    tmp_path):
    from purifier.fitting import FitError

    with pytest.raises(FileExistsError, match="exists"):
        attach_prior(MODEL, PRIOR, 0.001, with_prior.path)
    with pytest.raises(ValueError, match="finite number > 0, got 0"):
        attach_prior(MODEL, PRIOR, 0, tmp_path / "zero")
    with pytest.raises(FitError, match="must be a project classifier checkpoint .* got a 'cvae'"):
        attach_prior(MODEL, MODEL / "cvae", 0.001, tmp_path / "cvae-prior")


def test_attach_prior_leaves_nothing_when_it_fails_midway(tmp_path, monkeypatch):
    """A failure after the classifier and the prior were copied (here: writing the CVAE) leaves neither the new
    directory nor its temporary folder."""
    import purifier.fitting as fitting

    def broken_save(module, path, meta=None):
        raise OSError(f"disk full writing {path}")

    monkeypatch.setattr(fitting.checkpoint, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        attach_prior(MODEL, PRIOR, 0.001, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


def test_a_missing_prior_checkpoint_is_named(with_prior, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in with_prior.path.glob("cvae.*"):
        (broken / f.name).write_bytes(f.read_bytes())
    with pytest.raises(FileNotFoundError, match=r"prior_weight=0.001 needs a prior classifier: no checkpoint at "
                                                r".*broken/prior.json"):
        load_purifier(broken / "cvae")
    r = CliRunner().invoke(main, ["evaluate", "--cvae", str(broken / "cvae"), "--classifier", str(MODEL / "classifier"),
                                  "--selection", "design", "--n", "10"])
    assert r.exit_code == 2 and "broken/prior.json" in r.output


def test_the_exported_graph_holds_the_prior(with_prior, fmnist_test):
    from serve.runtime import OnnxPurifier

    onnx = OnnxPurifier(with_prior.path / "pipeline.onnx", device="cpu")
    assert onnx.metadata["prior_sha256"] == checkpoint.read_record(PRIOR)["weights_sha256"]
    x = fmnist_test.x[:128]
    got = onnx(x)
    with torch.no_grad():
        ref = ModelDir(with_prior.path).purifier()(torch.from_numpy(x))
    np.testing.assert_allclose(got["scores"], ref["scores"].numpy(), atol=1e-5)
    assert (got["chosen_class"] == ref["chosen_class"].numpy()).all()


def test_a_benchmark_row_loads_its_prior_and_keys_its_cache_by_it(tmp_path):
    row = Row("r", f"{MODEL}/classifier", f"{MODEL}/cvae", purifier={"selection": "mse", "prior_weight": 0.001},
              prior=str(PRIOR))
    _, pur = Bench(PROFILES["quick"], tmp_path, lambda m: None).load(row)
    assert pur.prior_weight == 0.001 and not any(p.requires_grad for p in pur.parameters())
    keys = checkpoints_of(row)
    assert keys["prior"] == checkpoint.read_record(PRIOR)["weights_sha256"]
    other = checkpoints_of(Row("r", row.classifier, row.cvae, purifier=row.purifier,
                               prior=str(ROOT / "models/baselines/trades-converged")))
    assert other["prior"] != keys["prior"]
    assert "prior" not in checkpoints_of(Row("r", row.classifier, row.cvae))


def test_the_cli_attaches_a_prior(tmp_path):
    out = tmp_path / "cli"
    r = CliRunner().invoke(main, ["attach-prior", str(MODEL), "--prior", str(PRIOR), "--weight", "0.002",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "'prior_weight': 0.002" in r.output and (out / "prior.safetensors").is_file()
    r = CliRunner().invoke(main, ["attach-prior", str(MODEL), "--prior", str(tmp_path / "nope"), "--weight", "1",
                                  "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "nope.json does not exist" in r.output


def test_a_prior_whose_name_has_dots_is_attached_whole(tmp_path):
    """A prior whose files are ``pgd-at-v1.2.json`` and ``.safetensors`` is found and copied as itself."""
    import shutil

    dotted = tmp_path / "pgd-at-v1.2"
    for suffix in (".json", ".safetensors"):
        shutil.copyfile(f"{PRIOR}{suffix}", f"{dotted}{suffix}")
    out = tmp_path / "model"
    r = CliRunner().invoke(main, ["attach-prior", str(MODEL), "--prior", str(dotted), "--weight", "0.002",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert checkpoint.sha256_file(out / "prior.safetensors") == checkpoint.read_record(PRIOR)["weights_sha256"]
    assert ModelDir(out).purifier().prior_weight == 0.002


def test_the_selection_terms_score_with_the_prior(small_cvae, small_classifier, batch):
    from purifier.adversarial import cvae_adversarial_terms
    from purifier.pipeline import class_scores

    y = torch.arange(len(batch)) % 10
    pur = Purifier(small_cvae, prior=small_classifier, prior_weight=0.5).eval()
    with torch.no_grad():
        got = cvae_adversarial_terms(small_cvae, small_classifier, batch, y, 0.1, clean=batch, purifier=pur)
        mse = class_scores(batch, small_cvae.reconstruct_all(batch, deterministic=True))
        plain = cvae_adversarial_terms(small_cvae, small_classifier, batch, y, 0.1)
    expected = F.cross_entropy(-(mse - 0.5 * F.log_softmax(small_classifier(batch), 1)) / 0.1, y)
    assert torch.allclose(got["adv_sel"], expected, atol=1e-5)
    assert torch.allclose(plain["adv_sel"], F.cross_entropy(-mse / 0.1, y), atol=1e-5)
    assert got["adv_smooth"].abs() < 1e-6  # the same batch clean and attacked


def test_fit_trains_through_the_prior_and_writes_it(tmp_path, fmnist_test):
    import purifier
    from purifier.config import PipelineAdversarial
    from purifier.fitting import FitError

    data = (fmnist_test.x[:160], fmnist_test.y[:160])
    adv = PipelineAdversarial(mode="cvae", steps=1, val_n=8, val_steps=1, val_every=1.0, prior_weight=0.001)
    config = purifier.FitConfig(epochs=0, batch_size=64, val_size=32, adversarial=adv, adversarial_epochs=1.0)
    run = purifier.fit(str(MODEL / "classifier"), data, tmp_path / "run", config, init=MODEL, prior=str(PRIOR))
    meta = run.record["meta"]
    assert meta["purifier"] == {"selection": "mse", "prior_weight": 0.001} and meta["adversarial"]["prior_weight"]
    assert meta["prior"]["sha256"] == checkpoint.read_record(tmp_path / "run/prior")["weights_sha256"]
    assert run.record["weights_sha256"] != checkpoint.read_record(MODEL / "cvae")["weights_sha256"]
    assert run.purifier().prior_weight == 0.001
    for kwargs, match in [({"prior": None}, "needs both the prior classifier"),
                          ({"prior": str(tmp_path / "none")}, r"none.json does not exist"),
                          ({"prior": str(MODEL / "cvae")}, "must be a project classifier checkpoint")]:
        with pytest.raises(FitError, match=match):
            purifier.fit(str(MODEL / "classifier"), data, tmp_path / "bad", config, init=MODEL, **kwargs)
    plain = purifier.FitConfig(epochs=0, batch_size=64, val_size=32, adversarial_epochs=1.0,
                               adversarial=PipelineAdversarial(mode="cvae", steps=1, val_n=8, val_steps=1))
    with pytest.raises(FitError, match="prior_weight=0.0"):
        purifier.fit(str(MODEL / "classifier"), data, tmp_path / "bad", plain, init=MODEL, prior=str(PRIOR))


def test_evaluate_reports_the_rule_with_the_prior_by_default(with_prior, tmp_path):
    import json

    r = CliRunner().invoke(main, ["evaluate", "--model", str(with_prior.path), "--n", "50",
                                  "--out", str(tmp_path / "eval.json")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "eval.json").read_text())
    assert list(report["selections"]) == ["design", "mse", "likelihood"]
    assert report["purifier"]["prior_weight"] == 0.001
    assert report["prior_sha256"] == checkpoint.read_record(PRIOR)["weights_sha256"]


def test_attaching_over_a_prior_keeps_the_record_of_the_one_it_replaces(with_prior, tmp_path):
    again = attach_prior(with_prior.path, ROOT / "models/baselines/trades-converged", 0.002, tmp_path / "again")
    prior = again.record["meta"]["prior"]
    assert prior["weight"] == 0.002 and prior["from_model"] == str(with_prior.path)
    assert prior["replaces"] == with_prior.record["meta"]["prior"]  # PGD-AT at 0.001, itself attached to MODEL
    assert "replaces" not in prior["replaces"]


def test_the_shipped_default_is_the_model_trained_through_the_prior_with_its_weight_raised():
    """``fashion-mnist`` is ``THROUGH``'s CVAE and classifier, byte for byte, with ``PRIOR`` in its rule at mu 0.002;
    its CVAE is ``MODEL``'s trained 1 epoch more through ``PRIOR`` at mu 0.001, recorded under ``replaces``."""
    shipped = ModelDir(MODELS["fashion-mnist"].path)
    for part in ("cvae", "classifier"):
        assert (checkpoint.read_record(shipped.path / part)["weights_sha256"]
                == checkpoint.read_record(THROUGH / part)["weights_sha256"])
    meta = shipped.record["meta"]
    assert meta["purifier"] == {"selection": "mse", "prior_weight": 0.002}
    prior_sha = checkpoint.read_record(PRIOR)["weights_sha256"]
    assert meta["prior"]["sha256"] == prior_sha and shipped.purifier().prior_weight == 0.002
    assert meta["adversarial"]["prior_weight"] == 0.001 and meta["prior"]["replaces"]["sha256"] == prior_sha
    assert meta["init_sha256"] == checkpoint.read_record(MODEL / "cvae")["weights_sha256"]
