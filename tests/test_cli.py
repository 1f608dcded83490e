"""The CLI through click's runner on real files, and the torch-free import path in a clean subprocess."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from purifier.cli import main

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
    assert out["recon_error"].shape == (100, 5)
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


def test_package_import_and_cli_help_do_not_import_torch():
    code = ("import sys, purifier, purifier.cli, purifier.data; "
            "from click.testing import CliRunner; r = CliRunner().invoke(purifier.cli.main, ['--help']); "
            "assert r.exit_code == 0, r.output; assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
