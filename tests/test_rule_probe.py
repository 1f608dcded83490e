"""benchmarks/rule_probe.py: the changed decision rule reduces to PuVAE's at zero, the offsets' search, the margins."""
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.rule_probe import ProbePurifier, fit_offsets, margins
from purifier import checkpoint
from purifier.pipeline import Purifier

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def plain_cvae():
    cvae = checkpoint.load(ROOT / "models/fashion-mnist-plain/cvae").eval()
    for p in cvae.parameters():
        p.requires_grad_(False)
    return cvae


def test_zero_offsets_and_weights_are_puvaes_rule(plain_cvae, fmnist_test):
    x = torch.from_numpy(fmnist_test.x[:16])
    a, b = Purifier(plain_cvae).eval()(x), ProbePurifier(plain_cvae).eval()(x)
    assert torch.allclose(a["scores"], b["scores"], atol=1e-7)
    assert torch.equal(a["chosen_class"], b["chosen_class"])
    shifted = ProbePurifier(plain_cvae, bias=[0.0] + [1.0] * 9).eval()(x)
    assert (shifted["chosen_class"] == 0).all()  # an offset larger than any MSE decides the class


def test_a_heavy_prior_decides_the_class_and_mu_zero_ignores_it(plain_cvae, fmnist_test):
    x = torch.from_numpy(fmnist_test.x[:16])
    prior = checkpoint.load(ROOT / "models/baselines/pgd-at-converged").eval()
    with torch.no_grad():
        votes = prior(x).argmax(1)
        plain = Purifier(plain_cvae).eval()(x)
        heavy = ProbePurifier(plain_cvae, prior=prior, mu=100.0).eval()(x)
        off = ProbePurifier(plain_cvae, prior=prior, mu=0.0).eval()(x)
    assert torch.equal(heavy["chosen_class"], votes)
    assert torch.allclose(off["scores"], plain["scores"], atol=1e-7)
    assert not torch.equal(votes, plain["chosen_class"])  # the two experts disagree somewhere on these images


def test_the_search_rescues_images_an_offset_can_hold_without_losing_clean_ones():
    # class 0 images broken toward class 1 by 0.001, class 1 images held toward class 0 by 0.005:
    # raising b_1 by 0.002 holds every class-0 image and still every class-1 image
    y = np.array([0] * 6 + [1] * 4)
    robust = np.full((10, 2), np.inf)
    robust[y == 0, 1] = -0.001
    robust[y == 1, 0] = 0.005
    clean = np.zeros((10, 2))
    clean[y == 0, 1], clean[y == 1, 0] = 0.01, 0.01
    out = fit_offsets({"robust": robust, "clean": clean, "y": y}, rounds=2)
    assert out["fit_robust"] == [0.4, 1.0]
    assert out["fit_clean_selection"] == [1.0, 1.0]
    assert 0.001 < out["offsets"][1] < 0.005 and out["offsets"][0] == 0
    # class-0 images now broken by 0.002 and class-1 images chosen correctly on clean inputs by only 0.0015: the
    # offset that holds the class-0 images would cost every class-1 clean selection, and the search may not trade
    robust[y == 0, 1], clean[y == 1, 0] = -0.002, 0.0015
    out = fit_offsets({"robust": robust, "clean": clean, "y": y}, rounds=2)
    assert out["fit_clean_selection"] == [1.0, 1.0] and out["fit_robust"] == [0.4, 0.4]
    assert out["offsets"][1] < 0.0015


def test_margins_fall_under_attack_and_are_zero_at_the_true_class_on_clean(plain_cvae, fmnist_test):
    x, y = torch.from_numpy(fmnist_test.x[:4]), torch.from_numpy(fmnist_test.y[:4])
    m = margins(plain_cvae, x, y, eps=0.1, steps=3)
    rows = np.arange(4)
    assert (m["clean"][rows, m["y"]] == 0).all() and np.isinf(m["robust"][rows, m["y"]]).all()
    wrong = ~np.eye(10, dtype=bool)[m["y"]]
    assert (m["robust"][wrong] < m["clean"][wrong]).all()  # the attack lowers every margin it aims at
