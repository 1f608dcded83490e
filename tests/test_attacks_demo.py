"""PGD stays in its budget and breaks an undefended classifier; the demo runs end to end on the shipped model."""
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from purifier import checkpoint
from purifier.attacks import PGD
from purifier.cli import main
from purifier.train import augment

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "fashion-mnist"
PLAIN = ROOT / "models" / "fashion-mnist-plain"  # its classifier is undefended


def test_pgd_stays_in_the_ball_and_breaks_the_bare_classifier(fmnist_test):
    clf = checkpoint.load(PLAIN / "classifier").train()  # PGD must switch it to eval and back
    x, y = torch.from_numpy(fmnist_test.x[:64]), torch.from_numpy(fmnist_test.y[:64])
    adv = PGD(eps=0.1, steps=10)(clf, x, y)
    assert clf.training
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    clf.eval()
    with torch.no_grad():
        clean, attacked = (clf(x).argmax(1) == y).float().mean(), (clf(adv).argmax(1) == y).float().mean()
    assert clean > 0.8 and attacked < 0.2
    assert torch.equal(PGD(eps=0.1, steps=10)(clf, x, y), adv)  # seeded random start


@pytest.mark.parametrize("kwargs, match", [({"eps": 1.5}, "eps"), ({"steps": 0}, "steps")])
def test_pgd_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PGD(**kwargs)


def test_augment_flips_and_shifts_within_the_image(batch):
    a = augment(batch, torch.Generator().manual_seed(0))
    b = augment(batch, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == batch.shape and not torch.equal(a, batch)
    assert a.min() >= 0 and a.max() <= batch.max()


def test_demo_prints_its_settings_and_writes_the_grid(tmp_path):
    r = CliRunner().invoke(main, ["demo", "--model", str(MODEL), "--n", "20", "--steps", "2",
                                  "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "PGD-Linf eps 0.1, 2 steps" in r.output and "onnxruntime" in r.output
    for row in ("clean", "oblivious", "bpda", "full-gradient", "selection", "adaptive worst"):
        assert row in r.output
    img = Image.open(tmp_path / "grid.png")
    img.load()
    assert img.size[0] > img.size[1] > 0
    assert np.asarray(img).std() > 0


def test_selection_attack_moves_the_argmin_to_a_wrong_class(fmnist_test):
    from purifier.attacks import selection_loss
    from purifier.pipeline import PurifiedClassifier, Purifier

    cvae, clf = checkpoint.load(PLAIN / "cvae"), checkpoint.load(PLAIN / "classifier")
    purifier = Purifier(cvae)
    x, y = torch.from_numpy(fmnist_test.x[:32]), torch.from_numpy(fmnist_test.y[:32])
    adv = PGD(eps=0.2, steps=10)(PurifiedClassifier(clf, purifier, grad="none"), x, y, selection_loss(purifier))
    with torch.no_grad():
        before = (purifier(x)["chosen_class"] == y).float().mean()
        after = (purifier(adv)["chosen_class"] == y).float().mean()
    assert (adv - x).abs().max() <= 0.2 + 1e-6
    assert after < before - 0.3
