"""The int8 pipeline: written by `purifier export --int8`, loaded by the torch-free runtime, selected by --precision."""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from purifier.cli import main
from serve.runtime import OnnxPurifier
from serve.models import MODELS

ROOT = Path(__file__).resolve().parents[1]
MODEL = MODELS["fashion-mnist"].path


def test_export_int8_writes_a_quantised_twin_that_the_runtime_loads_without_torch(tmp_path, torch_free):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("cvae.json", "cvae.safetensors"):
        shutil.copy(ROOT / "models" / "fashion-mnist-plain" / name, run / name)
    out = tmp_path / "onnx"
    r = CliRunner().invoke(main, ["export", str(run), "--out", str(out), "--int8", "--calibration-images", "64"])
    assert r.exit_code == 0, r.output
    assert f"purifier int8: {out / 'purifier.int8.onnx'}" in r.output
    model = onnx.load(str(out / "purifier.int8.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    fp32 = {p.key: p.value for p in onnx.load(str(out / "purifier.onnx")).metadata_props}
    assert {k: props[k] for k in fp32} == fp32  # every fp32 property copied unchanged
    assert props["precision"] == "int8"
    assert props["fp32_sha256"] == hashlib.sha256((out / "purifier.onnx").read_bytes()).hexdigest()
    calibration = json.loads(props["quantization"])["calibration"]
    assert calibration["split"] == "train" and calibration["images"] == 64
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
    code = (
        "import sys, numpy as np\n"
        "from serve.runtime import OnnxPurifier\n"
        f"rt = OnnxPurifier({str(out)!r}, device='cpu', precision='int8')\n"
        "assert rt.path.name == 'purifier.int8.onnx' and rt.precision == 'int8', (rt.path, rt.precision)\n"
        "out = rt(np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32))\n"
        "assert out['scores'].shape == (4, 10) and out['purified'].shape == (4, 1, 28, 28)\n"
    )
    torch_free(code, ("torch", "purifier", "export", "onnx"))
    # an fp32 export over it without --int8 says that the int8 file is now stale
    r = CliRunner().invoke(main, ["export", str(run), "--out", str(out)])
    assert r.exit_code == 0 and "purifier.int8.onnx was quantised from the previous purifier.onnx" in r.output


def test_shipped_int8_pipeline_names_its_precision_and_agrees_with_fp32(fmnist_test):
    fp32 = OnnxPurifier(MODEL, device="cpu")
    int8 = OnnxPurifier(MODEL, device="cpu", precision="int8")
    assert fp32.precision == "fp32" and fp32.path.name == "pipeline.onnx"
    assert int8.precision == "int8" and int8.path.name == "pipeline.int8.onnx"
    assert int8.metadata["fp32_sha256"] == hashlib.sha256((MODEL / "pipeline.onnx").read_bytes()).hexdigest(), \
        "pipeline.int8.onnx was made from another pipeline.onnx: rerun purifier export --int8"
    assert int8.metadata["quantization"]["calibration"]["split"] == "train"
    assert int8.class_names == fp32.class_names and int8.threshold == fp32.threshold
    x, y = fmnist_test.x[:1000], fmnist_test.y[:1000]
    a, b = fp32(x)["predicted_class"], int8(x)["predicted_class"]
    assert (a == b).mean() >= 0.95
    assert abs((a == y).mean() - (b == y).mean()) <= 0.01


def test_precision_is_validated_and_errors_name_the_value_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match="'fp16'"):
        OnnxPurifier(MODEL, device="cpu", precision="fp16")
    shutil.copy(MODEL / "pipeline.onnx", tmp_path / "pipeline.onnx")
    with pytest.raises(FileNotFoundError, match=r"pipeline\.int8\.onnx does not exist.*purifier export .* --int8"):
        OnnxPurifier(tmp_path, device="cpu", precision="int8")
    with pytest.raises(ValueError, match="has precision fp32 .* precision int8 was asked for"):
        OnnxPurifier(tmp_path / "pipeline.onnx", device="cpu", precision="int8")
    with pytest.raises(ValueError, match="has precision int8 .* precision fp32 was asked for"):
        OnnxPurifier(MODEL / "pipeline.int8.onnx", device="cpu", precision="fp32")


@pytest.mark.parametrize("command", ["purify", "serve"])
def test_precision_option_errors_exit_2_naming_the_value(tmp_path, command):
    shutil.copy(MODEL / "pipeline.onnx", tmp_path / "pipeline.onnx")
    args = ["purify", str(tmp_path / "x.npy"), "--out", str(tmp_path / "o")] if command == "purify" else \
        ["serve", "--port", "0"]
    r = CliRunner().invoke(main, args + ["--model", str(tmp_path), "--precision", "fp16"])
    assert r.exit_code == 2 and "'fp16' is not one of 'fp32', 'int8'" in r.output, r.output
    r = CliRunner().invoke(main, args + ["--model", str(tmp_path), "--precision", "int8"])
    assert r.exit_code == 2 and f"{tmp_path / 'pipeline.int8.onnx'} does not exist" in r.output, r.output
    assert f"purifier export {tmp_path} --int8" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, args + ["--model", str(tmp_path / "pipeline.onnx"), "--precision", "int8"])
    assert r.exit_code == 2 and "has precision fp32" in r.output, r.output


def test_purify_with_int8_uses_the_int8_model(tmp_path, fmnist_test):
    np.save(tmp_path / "x.npy", fmnist_test.x[:8])
    r = CliRunner().invoke(main, ["purify", str(tmp_path / "x.npy"), "--model", "fashion-mnist", "--out",
                                  str(tmp_path / "o"), "--format", "npz", "--precision", "int8", "--quiet"])
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert Path(summary["model"]).name == "pipeline.int8.onnx"
