"""The CLI through click's runner on real files, and the torch-free import path in a clean subprocess."""
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from purifier.cli import main
from serve.models import MODELS

ROOT = Path(__file__).resolve().parents[1]


def test_train_and_evaluate_on_an_npz_of_another_size_and_class_count(tmp_path, tiny_npz):
    run = CliRunner()
    data = f"npz:{tiny_npz}"
    r = run.invoke(main, ["train-classifier", "--data", data, "--out", str(tmp_path / "run" / "classifier"),
                          "--epochs", "2", "--val-size", "100", "--quiet"])
    assert r.exit_code == 0, r.output
    r = run.invoke(main, ["train", "--data", data, "--source", str(tmp_path / "run" / "classifier.json"),
                          "--out", str(tmp_path / "run"), "--epochs", "3", "--val-size", "100",
                          "--latent-dim", "4", "--sel-weight", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "run" / "cvae.json").read_text())
    assert cfg["config"]["image_shape"] == [1, 32, 32] and cfg["config"]["num_classes"] == 5
    assert cfg["meta"]["class_names"][0] == "band0"
    out = tmp_path / "eval.json"
    r = run.invoke(main, ["evaluate", "--model", str(tmp_path / "run"), "--data", data, "--out", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["n"] == 100 and report["split"] == "test"
    assert report["classifier"]["accuracy"] > 0.9
    assert report["selections"]["mse"]["argmin_acc"] > 0.6
    assert set(report["selections"]["mse"]["per_class"]) == {f"band{k}" for k in range(5)}
    assert "purified, mse selection" in r.output

    # export to ONNX and run it on the torch-free runtime, metadata read from the file alone
    r = run.invoke(main, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "onnx")])
    assert r.exit_code == 0, r.output
    from serve.runtime import OnnxPurifier

    rt = OnnxPurifier(tmp_path / "onnx")
    assert rt.image_shape == (1, 32, 32) and rt.class_names == [f"band{k}" for k in range(5)]
    test = np.load(tiny_npz)
    out = rt(test["x_test"])
    assert out["scores"].shape == (100, 5)
    assert (out["predicted_class"] == test["y_test"]).mean() == pytest.approx(
        report["selections"]["mse"]["accuracy"], abs=0.011)


def test_cli_usage_errors_name_the_problem(tmp_path, tiny_npz):
    run = CliRunner()
    r = run.invoke(main, ["train", "--data", f"npz:{tiny_npz}", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "--source" in r.output
    r = run.invoke(main, ["evaluate"])
    assert r.exit_code == 2 and "--model" in r.output
    r = run.invoke(main, ["train-classifier", "--data", "npz:/no/such.npz", "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "/no/such.npz" in r.output
    r = run.invoke(main, ["train", "--data", f"npz:{tiny_npz}", "--source", str(tmp_path / "nope"),
                          "--out", str(tmp_path)])
    assert r.exit_code == 2 and "nope.json" in r.output
    r = run.invoke(main, ["train", "--data", f"npz:{tiny_npz}", "--ce-weight", "0", "--channels", "16,x",
                          "--out", str(tmp_path)])
    assert r.exit_code == 2 and "16,x" in r.output


def test_package_import_and_cli_help_do_not_import_torch(torch_free):
    torch_free("import purifier, purifier.cli, purifier.data; "
               "from click.testing import CliRunner; r = CliRunner().invoke(purifier.cli.main, ['--help']); "
               "assert r.exit_code == 0, r.output")


def test_shipped_model_names_resolve_from_any_folder_without_torch(tmp_path, torch_free):
    r = torch_free("from purifier.registry import resolve; print(resolve('fashion-mnist')); "
                   "print(resolve('fashion-mnist-plain'))", cwd=tmp_path)
    assert r.stdout.split() == [str(ROOT / "models" / "middleware" / "cvae-alone-smooth200-tau3-prior1-mu2"),
                                str(ROOT / "models" / "fashion-mnist-plain")]


def test_a_bad_model_name_lists_the_known_names_and_a_path_still_works(tmp_path, monkeypatch):
    from purifier.registry import MODELS, resolve

    assert set(MODELS) == {"fashion-mnist", "fashion-mnist-plain", "fashion-mnist-middleware", "fashion-mnist-joint"}
    with pytest.raises(FileNotFoundError, match=r"no model 'fashion': not a shipped model name \(fashion-mnist, "
                                                r"fashion-mnist-middleware, fashion-mnist-plain, fashion-mnist-joint\)"):
        resolve("fashion")
    with pytest.raises(FileNotFoundError, match=r"model 'no/such/dir' does not exist .*fashion-mnist-plain"):
        resolve("no/such/dir")
    assert resolve(ROOT / "models" / "fashion-mnist-plain") == ROOT / "models" / "fashion-mnist-plain"
    (tmp_path / "fashion-mnist").mkdir()  # a folder of a shipped name: reached as ./fashion-mnist
    monkeypatch.chdir(tmp_path)
    assert resolve("./fashion-mnist") == Path("fashion-mnist")
    default = ROOT / "models" / "middleware" / "cvae-alone-smooth200-tau3-prior1-mu2"
    assert resolve("fashion-mnist") == default
    assert resolve("fashion-mnist-joint") == ROOT / "models" / "adversarial" / "joint"


def test_a_shipped_model_that_is_not_there_says_where_it_was_looked_for(tmp_path, monkeypatch):
    from purifier import registry
    from serve import models

    monkeypatch.setattr(models, "MODELS_ROOT", tmp_path / "models")
    with pytest.raises(FileNotFoundError) as err:
        registry.resolve("fashion-mnist")
    expected = tmp_path / "models" / "middleware" / "cvae-alone-smooth200-tau3-prior1-mu2"
    assert f"looked for {expected}" in str(err.value)
    r = CliRunner().invoke(main, ["purify", str(tmp_path), "--model", "fashion-mnist", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "is not installed here" in r.output


def test_purifier_load_gives_the_torch_modules_of_a_shipped_model(fmnist_test, tmp_path):
    import shutil

    import torch

    import purifier

    pur, clf = purifier.load("fashion-mnist-plain")
    x = torch.from_numpy(fmnist_test.x[:8])
    with torch.no_grad():
        out = pur(x)
        logits = clf(out["purified"])
    assert out["purified"].shape == x.shape and logits.shape == (8, 10)
    assert (logits.argmax(1) == torch.from_numpy(fmnist_test.y[:8])).float().mean() >= 0.5
    (tmp_path / "half").mkdir()
    shutil.copy(MODELS["fashion-mnist"].path / "cvae.json", tmp_path / "half")
    with pytest.raises(FileNotFoundError, match="half/classifier.json does not exist"):
        purifier.load(tmp_path / "half")


def test_setup_states_torch_ranges_and_the_pins_live_in_constraints_txt():
    import configparser

    from packaging.requirements import Requirement

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    train = {r.name: r.specifier for r in (Requirement(line) for line in
                                           cfg["options.extras_require"]["train"].split("\n")
                                           if line.strip() and not line.strip().startswith("#"))}
    pins = {r.name: r.specifier for r in (Requirement(line) for line in
                                          (ROOT / "constraints.txt").read_text().splitlines()
                                          if line.strip() and not line.startswith("#"))}
    assert {"torch", "torchvision"} <= set(pins)
    for name, spec in pins.items():  # every pin exact (tritonserver's wheel and Ray besides torch's pair)
        assert len(spec) == 1 and next(iter(spec)).operator == "==", f"constraints.txt: {name}{spec} is not a pin"
    for name in ("torch", "torchvision"):
        assert not any(s.operator == "==" for s in train[name]), f"setup.cfg pins {name} exactly"
        (pin,) = pins[name]
        assert pin.operator == "==" and pin.version in train[name], f"{name} {pin} outside setup.cfg's {train[name]}"

    def minor(spec, op):  # the minor version a bound names
        return int(next(s.version for s in spec if s.operator == op).split(".")[1])

    # a torchvision goes with one torch: 0.(m + 15) with 2.m, for the pins and for both ends of the ranges
    assert minor(pins["torchvision"], "==") == minor(pins["torch"], "==") + 15
    assert minor(train["torchvision"], ">=") == minor(train["torch"], ">=") + 15
    assert minor(train["torchvision"], "<") == minor(train["torch"], "<") + 15
    setup = (ROOT / "Makefile").read_text().split("\nsetup:")[1].split("\n\n")[0]
    pip = next(line for line in setup.splitlines() if "pip install" in line)
    assert "-c constraints.txt" in pip and " -q" not in pip


def test_export_of_a_folder_without_a_classifier_writes_the_purifier_alone(tmp_path):
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    for name in ("cvae.json", "cvae.safetensors"):
        shutil.copy(ROOT / "models" / "fashion-mnist-plain" / name, run / name)
    r = CliRunner().invoke(main, ["export", str(run), "--out", str(tmp_path / "onnx")])
    assert r.exit_code == 0, r.output
    assert "wrote purifier.onnx only" in r.output
    assert (tmp_path / "onnx" / "purifier.onnx").is_file() and not (tmp_path / "onnx" / "pipeline.onnx").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    r = CliRunner().invoke(main, ["export", str(empty)])
    assert r.exit_code == 2 and "cvae.json does not exist" in r.output and "Traceback" not in r.output
