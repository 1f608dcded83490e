"""MACs counted from the ONNX graph, the ConvTranspose rewrite, and the int8 and speed-limit benchmarks' smoke runs."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from export.graph_cost import node_costs, total_macs
from export.optimize import convtranspose_as_conv
from serve.models import MODELS

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = MODELS["fashion-mnist"].path / "pipeline.onnx"


def test_macs_of_the_shipped_pipeline_are_its_layers_and_scale_with_the_batch():
    costs = {c.name: c for c in node_costs(PIPELINE, 3)}
    # classifier A's second conv: 64 -> 64 channels, 5 x 5, on a 10 x 10 output, per image
    assert costs["node_conv2d_3"].macs == 3 * 64 * 64 * 25 * 10 * 10
    assert costs["node_conv2d_3"].gemm == (3 * 100, 64 * 25, 64)
    # the decoder's first ConvTranspose runs once per image and class (B*K): 32 -> 16 channels, 4 x 4, 7 x 7 input
    assert costs["node_convolution"].macs == 3 * 10 * 7 * 7 * 32 * 16 * 16
    assert total_macs(PIPELINE, 3) == 3 * total_macs(PIPELINE, 1)
    assert total_macs(PIPELINE.with_name("pipeline.int8.onnx"), 1) == total_macs(PIPELINE, 1)


def test_convtranspose_rewrite_keeps_the_outputs_to_fp32_rounding(fmnist_test):
    model = onnx.load(str(PIPELINE))
    assert convtranspose_as_conv(model) == 1  # the 1-channel output layer is left as it is
    onnx.checker.check_model(model)
    assert "DepthToSpace" in {n.op_type for n in model.graph.node}
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    ref = ort.InferenceSession(str(PIPELINE), opts, providers=["CPUExecutionProvider"])
    new = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = fmnist_test.x[:64]
    names = [o.name for o in ref.get_outputs()]
    for name, a, b in zip(names, ref.run(names, {"x": x}), new.run(names, {"x": x})):
        if name == "chosen_class":
            assert np.array_equal(a, b)
        else:
            assert np.abs(a - b).max() <= 1e-4, name
    assert total_macs(PIPELINE, 1) == total_macs(model, 1)  # the same multiply-accumulates, run as Convs


def test_int8_benchmark_smoke(tmp_path):
    out = tmp_path / "int8.json"

    def run(*model):
        r = subprocess.run([sys.executable, "-m", "benchmarks.int8", "--n", "4", "--clean-n", "100", "--steps", "1",
                            "--targeted", "1", "--reps", "1", "--out", str(out), *model], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(out.read_text())

    report = run()
    assert report["quantization"]["calibration"]["split"] == "train"
    assert set(report["robust"]["rows"]) == {"fp32", "int8, transferred", "int8, int8 decision"}
    assert report["robust"]["steps"] == 1 and report["clean"]["n"] == 100
    assert "int8 speed-up" in out.with_suffix(".md").read_text()
    # another model into the same results file: its sections are measured, never taken from the first model's cache
    other = run("--model", str(ROOT / "models" / "adversarial" / "joint"))
    assert other["sha256"] != report["sha256"] and other["model"].endswith("joint")
    folders = sorted((tmp_path / ".int8-work").iterdir())
    assert len(folders) == 2 and all((f / "clean-100.json").is_file() for f in folders)


def test_the_int8_verdict_claims_a_difference_only_beyond_one_standard_error():
    from benchmarks.int8 import verdict

    def report(fp32, int8):
        return {"n": 200, "rows": {"fp32": {"robust_accuracy": fp32}, "int8, int8 decision": {"robust_accuracy": int8}}}

    assert verdict(report(0.70, 0.60)).startswith("The quantised defense is easier to break")  # 10 points, se 3.2
    within = verdict(report(0.70, 0.69))
    assert "within one standard error" in within and "do not tell" in within and "easier to break:" not in within
    assert "no claim that int8 is harder to break" in verdict(report(0.70, 0.71))
