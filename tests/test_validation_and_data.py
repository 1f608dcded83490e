"""Bad input fails at the boundary with the offending value named; data loads as documented."""
import numpy as np
import pytest
import torch

from purifier.data import load_dataset, read_idx, train_val_split
from purifier.pipeline import Purifier
from purifier.validation import check_labels


@pytest.mark.parametrize("x, match", [
    (torch.rand(28, 28), r"rank 4.*\(28, 28\)"),
    (torch.rand(2, 3, 28, 28), "3 channels"),
    (torch.rand(2, 1, 32, 32), r"spatial size \(32, 32\)"),
    (torch.randint(0, 255, (2, 1, 28, 28)), "torch.int64"),
    (torch.full((2, 1, 28, 28), 1.5), r"\[0, 1\].*1\.5"),
    (torch.full((2, 1, 28, 28), -0.25), r"-0\.25"),
])
def test_purifier_names_bad_input(small_cvae, x, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Purifier(small_cvae)(x)


def test_purifier_names_nan_and_its_index(small_cvae):
    x = torch.rand(2, 1, 28, 28)
    x[1, 0, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"nan at index \(1, 0, 3, 4\)"):
        Purifier(small_cvae)(x)


def test_labels_out_of_range_are_named():
    with pytest.raises(ValueError, match=r"\[0, 10\).*\[0, 12\]"):
        check_labels(torch.tensor([0, 12]), 10)


def test_fashion_mnist_from_debian_files(fmnist_test):
    assert fmnist_test.x.shape == (10000, 1, 28, 28) and fmnist_test.x.dtype == np.float32
    assert 0.0 <= fmnist_test.x.min() and fmnist_test.x.max() <= 1.0
    assert np.bincount(fmnist_test.y).tolist() == [1000] * 10
    assert fmnist_test.class_names[9] == "Ankle boot"


def test_read_idx_rejects_a_truncated_file(tmp_path):
    path = tmp_path / "bad-idx"
    path.write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + bytes(5))
    with pytest.raises(ValueError, match="10 bytes.*holds 5"):
        read_idx(path)


def test_train_val_split_is_deterministic_and_disjoint():
    a_tr, a_va = train_val_split(1000, 100, seed=3)
    b_tr, b_va = train_val_split(1000, 100, seed=3)
    assert np.array_equal(a_tr, b_tr) and np.array_equal(a_va, b_va)
    assert len(a_va) == 100 and not set(a_tr) & set(a_va) and len(set(a_tr) | set(a_va)) == 1000
    with pytest.raises(ValueError, match="1000"):
        train_val_split(1000, 1000)


def test_npz_loads_uint8_and_the_test_split(tiny_npz):
    train, test = load_dataset(f"npz:{tiny_npz}", "train"), load_dataset(f"npz:{tiny_npz}", "test")
    assert train.x.shape == (600, 1, 32, 32) and test.x.shape == (100, 1, 32, 32)
    assert train.num_classes == 5 and train.class_names[4] == "band4"
    assert train.x.max() <= 1.0 and train.x.dtype == np.float32


@pytest.mark.parametrize("arrays, match", [
    ({"images": np.zeros((2, 8, 8), np.uint8), "y": np.zeros(2, int)}, r"missing key\(s\) \['x'\].*'images'"),
    ({"x": np.zeros((2, 8, 8), np.uint8), "y": np.array([0, -1])}, r"labels must be in \[0, 1\)"),
    ({"x": np.full((2, 8, 8), 2.0), "y": np.zeros(2, int)}, r"\[0, 1\].*2\.0"),
    ({"x": np.zeros((2, 8, 8), np.int32), "y": np.zeros(2, int)}, "int32"),
    ({"x": np.zeros((2, 8, 8), np.uint8), "y": np.zeros(3, int)}, "vector of 2 labels"),
    ({"x": np.zeros((2, 8, 8), np.uint8), "y": np.zeros(2, float)}, "integer labels"),
])
def test_npz_names_what_is_wrong(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=match):
        load_dataset(f"npz:{path}")


def test_unknown_dataset_spec_is_named():
    with pytest.raises(ValueError, match="'cifar'"):
        load_dataset("cifar")
