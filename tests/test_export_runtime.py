"""ONNX export and the torch-free runtime: parity with torch on real images, metadata, validation."""
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.onnx_export import export_onnx
from export.outputs import upgrade_files
from purifier import checkpoint
from purifier.designs import load_purifier
from purifier.pipeline import Purifier
from serve.runtime import OnnxPurifier, choose_providers
from serve.models import MODELS

ROOT = Path(__file__).resolve().parents[1]
MODEL = MODELS["fashion-mnist"].path


@pytest.fixture(scope="module")
def default_torch():
    # the purifier the directory records (the shipped default's rule includes its robust prior)
    return load_purifier(MODEL / "cvae").eval(), checkpoint.load(MODEL / "classifier")


@pytest.fixture(scope="module")
def default_onnx():
    return OnnxPurifier(MODEL / "pipeline.onnx", device="cpu")


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_committed_pipeline_matches_torch_on_real_images(default_torch, default_onnx, fmnist_test, batch):
    purifier, clf = default_torch
    x = fmnist_test.x[100:100 + batch]
    got = default_onnx(x)
    with torch.no_grad():
        ref = purifier(torch.from_numpy(x))
        logits = clf(ref["purified"])
    assert np.array_equal(got["chosen_class"], ref["chosen_class"].numpy())
    assert np.abs(got["purified"] - ref["purified"].numpy()).max() <= 1e-4
    assert np.abs(got["scores"] - ref["scores"].numpy()).max() <= 1e-4
    assert np.abs(got["logits"] - logits.numpy()).max() <= 1e-4


def test_committed_models_describe_themselves(default_onnx):
    meta = default_onnx.metadata
    assert meta["dataset"] == "fashion-mnist" and meta["class_names"][9] == "Ankle boot"
    assert meta["input_shape"] == ["N", 1, 28, 28] and meta["value_range"] == [0.0, 1.0]
    assert meta["selection"] == "mse" and 0 < float(meta["rejection_threshold"]) < 1
    assert meta["cvae_sha256"] == checkpoint.read_record(MODEL / "cvae")["weights_sha256"]
    assert meta["classifier_sha256"] == checkpoint.read_record(MODEL / "classifier")["weights_sha256"]
    purifier_only = OnnxPurifier(MODEL / "purifier.onnx", device="cpu")
    assert "logits" not in purifier_only.outputs and purifier_only.metadata["kind"] == "purifier"


@pytest.mark.parametrize("name", ["pipeline.onnx", "purifier.int8.onnx"])
def test_committed_models_give_recon_error_as_the_alias_of_scores(fmnist_test, name):
    session = ort.InferenceSession(str(MODEL / name), providers=["CPUExecutionProvider"])
    scores, alias = session.run(["scores", "recon_error"], {"x": fmnist_test.x[:32]})
    assert np.array_equal(alias, scores) and scores.shape == (32, 10)
    props = session.get_modelmeta().custom_metadata_map
    assert json.loads(props["outputs"])[-1] == "recon_error" == [o.name for o in session.get_outputs()][-1]
    assert json.loads(props["deprecated_outputs"])["recon_error"]["alias_of"] == "scores"


def test_a_model_of_the_earlier_release_is_served_and_upgraded_with_the_same_numbers(tmp_path, fmnist_test):
    """A graph that computes recon_error and has no scores (how earlier releases exported): the runtime gives both
    names, and ``upgrade_files`` renames it to scores and adds the alias, changing no number."""
    model = onnx.load(str(MODEL / "purifier.onnx"))
    graph = model.graph
    kept = [n for n in graph.node if list(n.output) != ["recon_error"]]
    del graph.node[:], graph.output[-1]
    graph.node.extend(kept)
    for node in graph.node:
        node.input[:] = ["recon_error" if n == "scores" else n for n in node.input]
        node.output[:] = ["recon_error" if n == "scores" else n for n in node.output]
    graph.output[-1].name = "recon_error"
    onnx.save(model, str(tmp_path / "purifier.onnx"))
    x = fmnist_test.x[:16]
    legacy = OnnxPurifier(tmp_path / "purifier.onnx", device="cpu")
    assert legacy.outputs == ["purified", "chosen_class", "scores", "recon_error"]
    before = legacy(x)
    assert before["recon_error"] is before["scores"]
    (old, new), = upgrade_files([tmp_path / "purifier.onnx"]).values()
    assert old != new and (tmp_path / "purifier.onnx").read_bytes() == (MODEL / "purifier.onnx").read_bytes()
    after = OnnxPurifier(tmp_path / "purifier.onnx", device="cpu")(x)
    assert set(after) == set(before) and all(np.array_equal(after[k], before[k]) for k in before)


def test_runtime_flags_what_the_threshold_rejects(default_onnx, fmnist_test):
    clean = default_onnx(fmnist_test.x[:500])
    noise = default_onnx(np.random.default_rng(0).random((50, 1, 28, 28), dtype=np.float32))
    assert clean["rejected"].mean() < 0.05  # threshold: 99th percentile of clean validation error
    assert noise["rejected"].all()
    assert (clean["margin"] >= 0).all()


def test_runtime_accepts_uint8_and_rank_3(default_onnx, fmnist_test):
    x = fmnist_test.x[:5]
    as_uint8 = np.round(x[:, 0] * 255).astype(np.uint8)
    assert np.array_equal(default_onnx(as_uint8)["chosen_class"], default_onnx(x)["chosen_class"])


@pytest.mark.parametrize("x, match", [
    (np.zeros((2, 3, 28, 28), np.float32), r"\(2, 3, 28, 28\)"),
    (np.zeros((2, 1, 32, 32), np.float32), "32, 32"),
    (np.zeros((28, 28), np.float32), r"\(28, 28\)"),
    (np.zeros((2, 1, 28, 28), np.int32), "int32"),
    (np.full((2, 1, 28, 28), 1.5, np.float32), r"\[0, 1\].*1\.5"),
    (np.full((2, 1, 28, 28), np.inf, np.float32), r"inf at index \(0, 0, 0, 0\)"),
    (np.zeros((0, 1, 28, 28), np.float32), "no images"),
])
def test_runtime_names_bad_input(default_onnx, x, match):
    with pytest.raises(ValueError, match=match):
        default_onnx(x)


def test_export_of_a_fresh_model_carries_metadata_and_parity(tmp_path, small_cvae, small_classifier):
    result = export_onnx(tmp_path / "p.onnx", small_cvae, small_classifier,
                         metadata={"dataset": "toy", "class_names": [str(k) for k in range(10)],
                                   "input_shape": ["N", 1, 28, 28], "value_range": [0.0, 1.0],
                                   "rejection_threshold": 0.5})
    assert set(result.parity) == {1, 64} and max(result.parity[64].values()) <= 1e-4
    props = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    assert json.loads(props["outputs"]) == ["purified", "chosen_class", "scores", "logits", "recon_error"]
    assert json.loads(props["deprecated_outputs"]) == {"recon_error": {"alias_of": "scores",
                                                                       "removed_in": "the next release"}}
    graph_ops = {n.op_type for n in onnx.load(str(result.path)).graph.node}
    assert {"ArgMin", "GatherElements"} <= graph_ops and "RandomNormalLike" not in graph_ops
    rt = OnnxPurifier(result.path, device="cpu")
    x = np.random.default_rng(1).random((3, 1, 28, 28), dtype=np.float32)
    with torch.no_grad():
        ref = Purifier(small_cvae)(torch.from_numpy(x))
    assert np.array_equal(rt(x)["chosen_class"], ref["chosen_class"].numpy())
    assert not list(tmp_path.glob("**/*.tmp"))


def test_cpu_provider_when_asked_and_no_cuda_claim_without_a_gpu(default_onnx):
    assert default_onnx.providers == ["CPUExecutionProvider"]
    assert choose_providers("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="'tpu'"):
        choose_providers("tpu")


def test_runtime_never_imports_torch(fmnist_test, torch_free):
    code = (
        "import sys, numpy as np\n"
        "from serve.runtime import OnnxPurifier\n"
        f"rt = OnnxPurifier({str(MODEL)!r})\n"
        "out = rt(np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32))\n"
        "assert out['logits'].shape == (4, 10)\n"
    )
    r = torch_free(code, ("torch", "purifier", "export"))
    assert "error" not in r.stderr.lower(), r.stderr  # no noisy provider logs on a CPU machine


def test_onnx_pipeline_accuracy_equals_torch_on_the_full_test_set(default_torch, default_onnx, fmnist_test):
    purifier, clf = default_torch
    x, y = fmnist_test.x, fmnist_test.y
    onnx_pred = np.concatenate([default_onnx(x[i:i + 1000])["predicted_class"] for i in range(0, len(x), 1000)])
    with torch.no_grad():
        from purifier.pipeline import PurifiedClassifier

        model = PurifiedClassifier(clf, purifier, grad="none")
        torch_pred = torch.cat([model(torch.from_numpy(x[i:i + 1000])).argmax(1)
                                for i in range(0, len(x), 1000)]).numpy()
    onnx_acc, torch_acc = (onnx_pred == y).mean(), (torch_pred == y).mean()
    assert abs(onnx_acc - torch_acc) <= 0.0005, (onnx_acc, torch_acc)
    # the committed figure (README, card) is this model's: the pipeline is deterministic, so it reproduces to
    # within the two images that rounding in another CPU's kernels may flip
    # the same weights and the same rule: models that share a CVAE differ by their prior and its weight
    meta = checkpoint.read_record(MODEL / "cvae")["meta"]
    same = {f"{part}_sha256": checkpoint.read_record(MODEL / part)["weights_sha256"] for part in ("cvae", "classifier")}
    same.update(purifier=meta.get("purifier"), prior_sha256=(meta.get("prior") or {}).get("sha256"))
    reports = [json.loads(p.read_text()) for p in sorted((ROOT / "results").glob("eval-*.json"))]
    committed = next((r for r in reports if all(r.get(k) == v for k, v in same.items())), None)
    assert committed is not None, "no results/eval-*.json evaluates the shipped default's weights: make default-model"
    assert committed["n"] == len(y)
    figure = committed["selections"].get("design", committed["selections"]["mse"])["accuracy"]  # the model's rule
    assert abs(onnx_acc - figure) <= 2 / len(y), (onnx_acc, figure)


def test_rejection_threshold_is_the_committed_calibration_recomputed(default_onnx):
    """The shipped threshold is the 99th percentile of clean scores on the model's own validation split: rebuilding
    that split from the checkpoint's record and recalibrating gives the committed value."""
    from export.onnx_export import calibrate_threshold

    purifier = load_purifier(MODEL / "cvae").eval()
    cvae = purifier.cvae
    cvae.meta = {k: v for k, v in cvae.meta.items() if k != "rejection_calibration"}  # recompute, never reread
    again = calibrate_threshold(purifier, "mse", 99.0)
    shipped = float(default_onnx.metadata["rejection_threshold"])
    assert again["n"] == checkpoint.read_record(MODEL / "cvae")["meta"]["n_val"]
    assert abs(again["threshold"] - shipped) <= 1e-5 * shipped, (again["threshold"], shipped)


def test_the_convtranspose_rewrite_exports_the_same_pipeline(tmp_path, fmnist_test):
    """``purifier export --rewrite-convtranspose``: the decoder's upsampling as four Convs and a DepthToSpace,
    recorded in the metadata, and the runtime's outputs those of the shipped graph to fp32 rounding."""
    from click.testing import CliRunner

    from purifier.cli import main

    out = tmp_path / "rewritten"
    r = CliRunner().invoke(main, ["export", str(MODEL), "--out", str(out), "--rewrite-convtranspose"])
    assert r.exit_code == 0, r.output
    for name in ("purifier.onnx", "pipeline.onnx"):
        model = onnx.load(str(out / name))
        ops = [n.op_type for n in model.graph.node]
        assert "DepthToSpace" in ops and ops.count("ConvTranspose") == 1  # the 1-channel output layer stays
        props = {p.key: p.value for p in model.metadata_props}
        assert json.loads(props["graph_rewrites"]) == {"convtranspose_as_conv": 1}
    x = fmnist_test.x[:128]
    new = OnnxPurifier(out / "pipeline.onnx", device="cpu")(x)
    old = OnnxPurifier(MODEL / "pipeline.onnx", device="cpu")(x)
    np.testing.assert_array_equal(new["chosen_class"], old["chosen_class"])
    np.testing.assert_allclose(new["logits"], old["logits"], atol=1e-4)
    np.testing.assert_allclose(new["purified"], old["purified"], atol=1e-5)
