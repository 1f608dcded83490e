"""PGD stays in its budget and breaks an undefended classifier; the demo runs end to end on the shipped model."""
import json
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
from serve.models import MODELS

ROOT = Path(__file__).resolve().parents[1]
MODEL = MODELS["fashion-mnist"].path
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
    r = CliRunner().invoke(main, ["demo", "--model", "fashion-mnist", "--n", "20", "--steps", "2",
                                  "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"]["model"] == "fashion-mnist"  # as asked, not this machine's resolved path
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


def test_demo_help_names_the_selection_attack_that_decides_the_result():
    r = CliRunner().invoke(main, ["demo", "--help"])
    text = " ".join(r.output.split())
    assert r.exit_code == 0
    assert "selection attack, which drives the purifier's decision rule" in text
    assert "The selection attack is the one that decides the result" in text


@pytest.mark.parametrize("present, missing", [
    (("cvae.json", "cvae.safetensors", "pipeline.onnx"),
     "has no classifier.json (the classifier it defends; purifier train writes it beside cvae.json). Pass"),
    ((), "has no cvae.json (the purifier; purifier train --out DIR writes it), no classifier.json"),
])
def test_demo_on_a_folder_without_its_parts_is_a_usage_error_naming_the_file(tmp_path, present, missing):
    import shutil

    d = tmp_path / "half-a-model"
    d.mkdir()
    for name in present:
        shutil.copy(MODEL / name, d / name)
    r = CliRunner().invoke(main, ["demo", "--model", str(d), "--n", "4", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    assert isinstance(r.exception, SystemExit) and "Traceback" not in r.output
    text = " ".join(r.output.split())
    assert "Invalid value for '--model'" in text and missing in text
    assert ("or a shipped model name (fashion-mnist, fashion-mnist-middleware, fashion-mnist-plain, "
            "fashion-mnist-joint)") in text
    assert not (tmp_path / "o").exists()


def test_demo_runs_from_another_folder_by_model_name_and_labels_the_grid_rows(tmp_path, monkeypatch, fmnist_test):
    from serve.png import image_grid

    monkeypatch.chdir(tmp_path)  # the default --model is a name, found wherever the command runs
    r = CliRunner().invoke(main, ["demo", "--n", "10", "--steps", "1"])
    assert r.exit_code == 0, r.output
    assert "rows: clean, adversarial (BPDA), purified" in r.output
    grid = np.asarray(Image.open(tmp_path / "demo-out" / "grid.png"), np.float32) / 255
    columns = len(np.unique(fmnist_test.y[:10]))  # one example per class among the first 10
    unlabelled = image_grid([np.ones((columns, 1, 28, 28), np.float32)] * 3)
    assert grid.shape[0] == unlabelled.shape[0] and grid.shape[1] > unlabelled.shape[1]
    strip = grid[:, :grid.shape[1] - unlabelled.shape[1]]
    for i in range(3):  # text in each row's band of the strip, nothing between the bands
        top = (2 + i * 30) * 3
        assert strip[top:top + 28 * 3].min() < 0.3, f"row {i} has no label"
    assert strip[:6].min() == 1.0


def test_image_grid_labels_each_row_and_names_a_count_mismatch():
    from serve.png import image_grid

    rows = [np.full((4, 1, 28, 28), 0.5, np.float32)] * 3
    plain, labelled = image_grid(rows), image_grid(rows, labels=["clean", "adversarial (BPDA)", "purified"])
    assert np.array_equal(labelled[:, -plain.shape[1]:], plain)
    strip = labelled[:, :-plain.shape[1]]
    widths = [image_grid(rows, labels=[t, "", ""])[:, :-plain.shape[1]].shape[1] for t in ("a", "adversarial")]
    assert widths[0] < widths[1]  # the strip fits the longest label
    assert (strip < 0.3).any() and strip.max() == 1.0  # black text on white
    with pytest.raises(ValueError, match="3 rows, got 2"):
        image_grid(rows, labels=["clean", "purified"])
