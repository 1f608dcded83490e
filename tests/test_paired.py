"""benchmarks/paired.py: the paired count of two rows on the same images, and the exact McNemar test."""
import json
from pathlib import Path

import pytest

from benchmarks.paired import compare, mcnemar_p

ROOT = Path(__file__).resolve().parents[1]


def test_the_exact_mcnemar_test_matches_the_binomial_tail():
    assert mcnemar_p(0, 5) == pytest.approx(2 / 32)          # 5 of 5 one way: 2 * (1/2)^5
    assert mcnemar_p(1, 9) == pytest.approx(2 * 11 / 1024)   # 2 * P(X <= 1), X ~ Bin(10, 1/2)
    assert mcnemar_p(4, 4) == 1.0 and mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(12, 45) == mcnemar_p(45, 12) < 1e-4


def test_the_counts_of_two_committed_rows_add_up_to_their_figures():
    rows = json.loads((ROOT / "results/byo.json").read_text())["rows"]
    a, b = "A: plain PuVAE", "A: PuVAE + adv. training of the CVAE alone"
    c = compare(rows, a, b)
    assert c["held_by_both"] + c["only_a"] + c["only_b"] + c["neither"] == c["n"] == len(rows[a]["adaptive_robust"])
    assert (c["held_by_both"] + c["only_a"]) / c["n"] == c["accuracy_a"]
    assert c["accuracy_a"] == pytest.approx(rows[a]["adaptive"])
    assert c["accuracy_b"] == pytest.approx(rows[b]["adaptive"])
    assert c["only_b"] > c["only_a"] and c["mcnemar_p"] < 1e-6  # adversarial training: hundreds of images gained


def test_rows_that_do_not_line_up_are_named():
    rows = {"x": {"adaptive_robust": [True, False]}, "y": {"adaptive_robust": [True]}, "z": {}}
    with pytest.raises(ValueError, match="row 'x' has 2 images .* row 'y' has 1"):
        compare(rows, "x", "y")
    with pytest.raises(ValueError, match="no row 'w'"):
        compare(rows, "x", "w")
    with pytest.raises(ValueError, match="row 'z' has no per-image 'adaptive_robust' list"):
        compare(rows, "x", "z")
    rows["x"]["targeted"], rows["y"] = 3, {"adaptive_robust": [False, True], "targeted": 1}
    with pytest.raises(ValueError, match="different targeted .3 against 1.: not the same attacks"):
        compare(rows, "x", "y")


def test_a_classifier_row_pairs_with_a_purifier_row_and_splits_by_class(fmnist_test):
    from benchmarks.paired import per_class

    rows = json.loads((ROOT / "results/byo.json").read_text())["rows"]
    a, b = "A: plain PuVAE", "A: PGD-AT (converged)"   # targeted 3 against 0: a classifier has no selection to target
    c = compare(rows, a, b)
    classes = per_class(c, rows, fmnist_test.y, fmnist_test.class_names)
    assert sum(r["n"] for r in classes) == c["n"] and len(classes) == 10
    for key, row in (("accuracy_a", a), ("accuracy_b", b)):
        assert sum(r[key] * r["n"] for r in classes) / c["n"] == pytest.approx(rows[row]["adaptive"])
    with pytest.raises(ValueError, match="5 labels for 1000 images"):
        per_class(c, rows, fmnist_test.y[:5], fmnist_test.class_names)
