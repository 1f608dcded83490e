"""The candidate mode: reconstruct only the k classes a ranking classifier scores highest on the raw input."""
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from purifier.attacks import PGD, candidate_exclusion_objective
from purifier.cli import main
from purifier.pipeline import PurifiedClassifier, Purifier, purify
from purifier.robust import purifier_objectives
from serve.models import MODELS

ROOT = Path(__file__).resolve().parents[1]
MODEL = MODELS["fashion-mnist"].path


def test_k_equal_to_the_number_of_classes_is_the_full_purifier_exactly(small_cvae, small_classifier, batch):
    full = Purifier(small_cvae).eval()(batch)
    cand = Purifier(small_cvae, candidates=10, ranker=small_classifier).eval()(batch)
    for key in ("purified", "chosen_class", "scores", "recon_error", "recon"):
        assert torch.equal(full[key], cand[key]), key
    assert torch.equal(cand["candidates"], torch.arange(10).expand(len(batch), 10))


def test_k_1_purifies_to_the_ranking_classifiers_top_class(small_cvae, small_classifier, batch):
    out = Purifier(small_cvae, candidates=1, ranker=small_classifier).eval()(batch)
    top = small_classifier(batch).argmax(1)
    assert torch.equal(out["chosen_class"], top)
    full = small_cvae.reconstruct_all(batch)["recon"]
    assert torch.allclose(out["purified"], full[torch.arange(len(batch)), top], atol=1e-6)
    assert torch.isinf(out["scores"]).sum(1).eq(9).all()  # the other classes are never reconstructed


def test_k_3_chooses_the_best_fitting_of_the_ranked_three(small_cvae, small_classifier, batch):
    out = Purifier(small_cvae, candidates=3, ranker=small_classifier).eval()(batch)
    ranked = small_classifier(batch).topk(3, dim=1).indices
    assert all(int(c) in r.tolist() for c, r in zip(out["chosen_class"], ranked))
    full = Purifier(small_cvae).eval()(batch)["scores"]
    best = full.gather(1, ranked).argmin(1)
    assert torch.equal(out["chosen_class"], ranked.gather(1, best[:, None]).squeeze(1))


@pytest.mark.parametrize("k", [0, 11, -1, 2.5, True])
def test_invalid_k_is_named(small_cvae, small_classifier, k):
    with pytest.raises(ValueError, match=rf"1 <= k <= 10 .*got {k!r}"):
        Purifier(small_cvae, candidates=k, ranker=small_classifier)


def test_candidates_need_a_ranker(small_cvae):
    with pytest.raises(ValueError, match="candidates=3 needs a ranker"):
        Purifier(small_cvae, candidates=3)


def test_candidate_exclusion_has_a_nonzero_gradient_and_is_in_the_worst_case(small_cvae, small_classifier, batch):
    purifier = Purifier(small_cvae, candidates=3, ranker=small_classifier).eval()
    objective = candidate_exclusion_objective(small_classifier, purifier)
    adv = batch.clone().requires_grad_(True)
    y = small_classifier(batch).argmax(1)  # the top class: inside the candidates on the clean input
    value, wrong = objective(adv, y)
    grad, = torch.autograd.grad(value, adv)
    assert grad.abs().sum() > 0 and wrong.shape == y.shape
    assert float(value.detach()) < 0  # y outranks the 3rd other class on the clean input: not yet excluded
    assert list(purifier_objectives(small_classifier, purifier))[0] == "candidate exclusion"
    assert "candidate exclusion" not in purifier_objectives(small_classifier, Purifier(small_cvae))
    with pytest.raises(ValueError, match="candidates k < 10"):
        candidate_exclusion_objective(small_classifier, Purifier(small_cvae))


def test_candidate_exclusion_pushes_the_true_class_out(small_cvae, small_classifier, batch):
    purifier = Purifier(small_cvae, candidates=2, ranker=small_classifier).eval()
    y = small_classifier(batch).argmax(1)
    adv = PGD(eps=0.3, steps=10, best_iterate=False).run(candidate_exclusion_objective(small_classifier, purifier),
                                                         batch, y)
    before = (purifier(batch)["candidates"] == y[:, None]).any(1).float().mean()
    after = (purifier(adv)["candidates"] == y[:, None]).any(1).float().mean()
    assert after < before


def test_attacks_through_the_candidate_purifier_are_differentiable(small_cvae, small_classifier, batch):
    purifier = Purifier(small_cvae, candidates=3, ranker=small_classifier).eval()
    for grad in ("full", "softmin"):
        x = batch.clone().requires_grad_(True)
        PurifiedClassifier(small_classifier, purifier, grad=grad)(x).sum().backward()
        assert x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all(), grad


def test_purify_restores_the_rankers_mode(small_cvae, small_classifier, batch):
    small_classifier.train()
    purify(Purifier(small_cvae, candidates=2, ranker=small_classifier), batch)
    assert small_classifier.training


def test_evaluate_cli_takes_candidates_and_names_a_bad_value(tmp_path):
    run = CliRunner()
    r = run.invoke(main, ["evaluate", "--model", str(MODEL), "--n", "11", "--candidates", "11"])
    assert r.exit_code == 2 and "--candidates" in r.output and "got 11" in r.output and "1 <= k <= 10" in r.output
    out = tmp_path / "eval.json"
    r = run.invoke(main, ["evaluate", "--model", str(MODEL), "--n", "40", "--selection", "mse", "--candidates", "3",
                          "--out", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["candidates"] == 3 and report["selections"]["mse"]["accuracy"] > 0.6


def test_scaling_benchmark_smoke(tmp_path):
    from benchmarks import scaling

    out = tmp_path / "scaling.json"
    r = CliRunner().invoke(scaling.main, ["--grid", "28x28x1=12", "--batches", "4", "--reps", "1",
                                          "--out", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert [row["num_classes"] for row in report["rows"]] == [12]
    assert set(report["rows"][0]["parts"]) == {"purifier", "pipeline"}
    machine = report["machine"]
    assert machine["provider"] == ["CPUExecutionProvider"] and len(machine["load_average_at_end"]) == 3
    assert out.with_suffix(".md").is_file() and out.with_suffix(".png").is_file()
    r = CliRunner().invoke(scaling.main, ["--grid", "28x28x2=10", "--out", str(out)])
    assert r.exit_code == 2 and "28x28x2" in r.output


def test_candidates_benchmark_robust_section_smoke(tmp_path):
    from benchmarks import candidates

    r = CliRunner().invoke(candidates.main, ["--ks", "2,10", "--n", "4", "--steps", "1", "--targeted", "1",
                                             "--section", "robust", "--work", str(tmp_path)])
    assert r.exit_code == 0, r.output
    robust = json.loads(next(tmp_path.glob("weights-*/robust-*.json")).read_text())  # a folder per set of weights
    assert robust["k"]["2"]["attacks"][0] == "candidate exclusion"
    assert "candidate exclusion" not in robust["k"]["10"]["attacks"]
    r = CliRunner().invoke(candidates.main, ["--ks", "2,11", "--section", "clean", "--work", str(tmp_path)])
    assert r.exit_code == 2 and "got 11" in r.output


def test_candidates_benchmark_measures_the_model_directorys_own_rule(fmnist_test, tmp_path):
    """The default's rule has a robust prior: the benchmark's full purifier is that purifier, its candidate
    purifiers keep the rule and add only the ranking, by the target classifier or (``--ranker prior``) the prior."""
    from benchmarks import candidates
    from purifier import checkpoint
    from purifier.designs import load_prior, load_purifier

    cvae = checkpoint.load(MODEL / "cvae", expect="cvae").eval()
    spec = cvae.meta["purifier"]
    assert spec.get("prior_weight")
    prior = load_prior(MODEL / "cvae", spec)
    classifier = checkpoint.load(MODEL / "classifier", expect="classifier").eval()
    x = torch.from_numpy(fmnist_test.x[:32])
    full = candidates.purifier_for(candidates.Model(cvae, spec, prior, classifier), 10)
    with torch.no_grad():
        assert torch.equal(full(x)["scores"], load_purifier(MODEL / "cvae")(x)["scores"])
    three = candidates.purifier_for(candidates.Model(cvae, spec, prior, prior), 3)
    assert three.prior_weight == spec["prior_weight"] and three.candidates == 3
    with torch.no_grad():
        ranked = three(x)
        assert torch.equal(ranked["candidates"], prior(x).topk(3, dim=1).indices.sort(dim=1).values)
    # each ranker's section is cached apart and reports its own top-k
    y = torch.from_numpy(fmnist_test.y[:500])
    for name, ranker in (("classifier", classifier), ("prior", prior)):
        r = CliRunner().invoke(candidates.main, ["--ranker", name, "--ks", "2,10", "--clean-n", "500", "--section",
                                                 "clean", "--work", str(tmp_path / "work")])
        assert r.exit_code == 0, r.output
        with torch.no_grad():
            top2 = (ranker(torch.from_numpy(fmnist_test.x[:500])).topk(2, dim=1).indices == y[:, None]).any(1)
        found = [json.loads(f.read_text())["k"]["2"]["label_in_candidates"]
                 for f in (tmp_path / "work").glob("weights-*/clean-2-10-500.json")]
        assert float(top2.float().mean()) in found
    assert len(list((tmp_path / "work").glob("weights-*"))) == 2
    plain = ROOT / "models/middleware/cvae-alone-smooth200-tau3"  # no prior
    r = CliRunner().invoke(candidates.main, ["--model", str(plain), "--ranker", "prior", "--section", "clean",
                                             "--work", str(tmp_path)])
    assert r.exit_code == 2 and "has no robust prior" in r.output
