"""A user's own classifier.onnx: converted to torch (export.onnx_classifier) and composed behind the purifier
(export.compose). Real ONNX files from torch.onnx.export, real onnxruntime, real Fashion-MNIST images."""
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from export.compose import ComposeError, compose_pipeline
from export.onnx_classifier import OnnxClassifierError, inspect_classifier, to_torch
from export.onnx_export import export_onnx
from purifier.models.cvae import CVAE, CVAEConfig
from serve.runtime import OnnxPurifier

# the TorchScript exporter (fast, and it writes the older opsets users still deploy) warns that it is deprecated
pytestmark = [pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning")]


class SmallCNN(nn.Module):
    """BatchNorm first (so the exporter cannot fold it into the conv), then conv, pool, linear: B x K logits."""

    def __init__(self, channels=1, size=28, classes=10):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, 4, 3)
        self.fc = nn.Linear(4 * ((size - 2) // 2) ** 2, classes)
        with torch.no_grad():
            self.bn.running_mean.fill_(0.3)
            self.bn.running_var.fill_(0.05)

    def forward(self, x):
        return self.fc(torch.flatten(torch.max_pool2d(torch.relu(self.conv(self.bn(x))), 2), 1))


class NHWC(nn.Module):
    """A classifier deployed on channels-last images."""

    def __init__(self, channels=1, size=28):
        super().__init__()
        self.net = SmallCNN(channels, size)

    def forward(self, x):
        return self.net(x.permute(0, 3, 1, 2))


class SpatialLogits(nn.Module):
    """A fully convolutional head that forgot to flatten: B x K x 1 x 1."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 10, 28)

    def forward(self, x):
        return self.conv(x)


def save_classifier(module, path, shape, *, dynamic=True, dynamo=False, opset=17, names=("image", "logits")):
    """torch.onnx.export: the dynamo exporter at its default opset, or the TorchScript one (fast) at ``opset``."""
    torch.manual_seed(0)
    module = module.eval()
    example = (torch.rand(2 if dynamic else 1, *shape),)
    if dynamo:
        torch.onnx.export(module, example, str(path), dynamo=True, input_names=[names[0]], output_names=[names[1]],
                          dynamic_shapes=({0: torch.export.Dim("batch")},) if dynamic else None, verbose=False)
    else:
        torch.onnx.export(module, example, str(path), dynamo=False, input_names=[names[0]],
                          output_names=[names[1]], opset_version=opset,
                          dynamic_axes={names[0]: {0: "batch"}, names[1]: {0: "batch"}} if dynamic else None)
    return path


def ort_run(path, feeds, outputs=None):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(outputs, feeds)


def rgb(x):
    """Fashion-MNIST as 3 x 32 x 32: padded, with three different channels so a per-channel mistake shows."""
    x = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)))
    return np.concatenate([x, 1 - x, x ** 2], axis=1).astype(np.float32)


PURIFIER_META = {"kind": "purifier", "class_names": [str(k) for k in range(10)], "rejection_threshold": 1.0,
                 "value_range": [0.0, 1.0]}


@pytest.fixture(scope="module")
def purifier_gray(tmp_path_factory):
    torch.manual_seed(0)
    cvae = CVAE(CVAEConfig(latent_dim=8, channels=(8, 16), hidden=32)).eval()
    path = tmp_path_factory.mktemp("gray") / "purifier.onnx"
    export_onnx(path, cvae, metadata={**PURIFIER_META, "input_shape": ["N", 1, 28, 28]})
    return path


@pytest.fixture(scope="module")
def purifier_rgb(tmp_path_factory):
    torch.manual_seed(0)
    cvae = CVAE(CVAEConfig(image_shape=(3, 32, 32), latent_dim=8, channels=(8, 16), hidden=32)).eval()
    path = tmp_path_factory.mktemp("rgb") / "purifier.onnx"
    export_onnx(path, cvae, metadata={**PURIFIER_META, "input_shape": ["N", 3, 32, 32]})
    return path


def test_nchw_cnn_converts_to_torch_matching_onnxruntime_on_real_images_with_input_gradients(tmp_path, fmnist_test):
    torch.manual_seed(0)
    original = SmallCNN().eval()
    # the dynamo exporter's default: opset 20 and Reshape(allowzero=1), neither of which onnx2torch 1.5 converts
    path = save_classifier(original, tmp_path / "classifier.onnx", (1, 28, 28), dynamo=True, names=("x", "y"))
    x = fmnist_test.x[:200]
    module = to_torch(path, x[:64])
    assert module.info["layout"] == "nchw" and module.info["opset"] == 20
    assert module.info["converted_opset"] < 20
    assert not module.training and not any(p.requires_grad for p in module.parameters())

    held_out = x[64:200]  # images the conversion check never saw
    expected = ort_run(path, {"x": held_out})[0]
    with torch.no_grad():
        got = module(torch.from_numpy(held_out)).numpy()
        direct = original(torch.from_numpy(held_out)).numpy()
    assert got.shape == (136, 10)
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(got - direct).max() <= 1e-4

    xt = torch.from_numpy(held_out[:32]).requires_grad_(True)
    labels = torch.from_numpy(fmnist_test.y[64:96]).long()
    nn.functional.cross_entropy(module(xt), labels).backward()
    assert (xt.grad.abs().flatten(1).sum(1) > 0).all()

    # a parent's .train() must not put the deployed classifier's BatchNorm on batch statistics
    module.train()
    with torch.no_grad():
        assert np.abs(module(torch.from_numpy(held_out)).numpy() - got).max() <= 1e-6


def test_nhwc_classifier_is_detected_converted_and_composed(tmp_path, purifier_gray, fmnist_test):
    torch.manual_seed(1)
    original = NHWC().eval()
    path = save_classifier(original, tmp_path / "classifier.onnx", (28, 28, 1), opset=17)
    info = inspect_classifier(path)
    assert info["layout"] == "nhwc" and info["input_shape"][1:] == [28, 28, 1] and info["opset"] == 17
    assert info["batch_dynamic"] and isinstance(info["input_shape"][0], str)

    x = fmnist_test.x[:64]
    module = to_torch(path, x)  # given NCHW, checked in NHWC
    with torch.no_grad():
        nhwc = torch.from_numpy(x).permute(0, 2, 3, 1)
        assert np.abs(module(nhwc).numpy() - original(nhwc).numpy()).max() <= 1e-4

    out = tmp_path / "pipeline.onnx"
    report = compose_pipeline(purifier_gray, path, out, layout="nhwc", metadata={"note": {"by": "test"}})
    assert report["path"] == out and set(report["parity"]) == {"purified", "chosen_class", "scores", "logits"}
    model = onnx.load(str(out))
    assert [o.name for o in model.graph.output] == ["purified", "chosen_class", "scores", "logits", "recon_error"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["outputs"]) == ["purified", "chosen_class", "scores", "logits", "recon_error"]
    assert meta["kind"] == "pipeline" and json.loads(meta["note"]) == {"by": "test"}
    assert json.loads(meta["class_names"]) == PURIFIER_META["class_names"]  # copied from purifier.onnx
    assert json.loads(meta["classifier"])["layout"] == "nhwc"

    # the oracle: purifier.onnx, then the transposed purified images through classifier.onnx
    images = fmnist_test.x[300:364]
    purified, chosen, errors = ort_run(purifier_gray, {"x": images}, ["purified", "chosen_class", "scores"])
    logits = ort_run(path, {"image": np.ascontiguousarray(purified.transpose(0, 2, 3, 1))})[0]
    got = OnnxPurifier(out, device="cpu")(images)  # the torch-free runtime serves it like a fused pipeline
    assert np.array_equal(got["chosen_class"], chosen)
    assert np.abs(got["purified"] - purified).max() <= 1e-5
    assert np.abs(got["scores"] - errors).max() <= 1e-4
    assert np.abs(got["logits"] - logits).max() <= 1e-4
    assert np.array_equal(got["predicted_class"], logits.argmax(1))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_mean_std_normalisation_composes_and_matches_the_two_graph_chain(tmp_path, purifier_rgb, fmnist_test,
                                                                         layout):
    torch.manual_seed(2)
    if layout == "nchw":
        path = save_classifier(SmallCNN(3, 32), tmp_path / "classifier.onnx", (3, 32, 32))
    else:
        path = save_classifier(NHWC(3, 32), tmp_path / "classifier.onnx", (32, 32, 3))
    mean, std = (0.5, 0.4, 0.1), (0.2, 0.25, 0.5)
    images = rgb(fmnist_test.x[:64])
    out = tmp_path / "pipeline.onnx"
    report = compose_pipeline(purifier_rgb, path, out, layout=layout, mean=mean, std=std, x_check=images)
    assert report["parity"]["logits"] <= 1e-4
    assert json.loads(report["metadata"]["classifier"])["mean"] == list(mean)

    images = rgb(fmnist_test.x[500:564])
    purified = ort_run(purifier_rgb, {"x": images}, ["purified"])[0]
    normalised = (purified - np.array(mean, np.float32)[:, None, None]) / np.array(std, np.float32)[:, None, None]
    raw = purified
    if layout == "nhwc":
        normalised, raw = normalised.transpose(0, 2, 3, 1), raw.transpose(0, 2, 3, 1)
    expected = ort_run(path, {"image": np.ascontiguousarray(normalised)})[0]
    unnormalised = ort_run(path, {"image": np.ascontiguousarray(raw)})[0]
    got = ort_run(out, {"x": images}, ["logits"])[0]
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(got - unnormalised).max() > 1e-2  # the normalisation is really in the graph


def write_hardmax_classifier(path):
    """A valid 28 x 28 classifier.onnx that onnxruntime runs and onnx2torch cannot convert (Shrink, Hardmax)."""
    weight = numpy_helper.from_array(np.random.default_rng(0).normal(size=(784, 10)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["scores"]),
         helper.make_node("Shrink", ["scores"], ["shrunk"], lambd=0.1),
         helper.make_node("Hardmax", ["shrunk"], ["logits"])],
        "hardmax_classifier", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_operator_without_an_onnx2torch_converter_is_refused_by_name(tmp_path, fmnist_test):
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY

    lacking = ("Shrink", "Hardmax")
    assert not [key for key in _CONVERTER_REGISTRY if key.operation_type in lacking]
    path = write_hardmax_classifier(tmp_path / "classifier.onnx")
    x = fmnist_test.x[:8]
    assert ort_run(path, {"image": x})[0].shape == (8, 10)  # a valid model that onnxruntime runs

    with pytest.raises(OnnxClassifierError) as err:
        to_torch(path, x)
    message = str(err.value)
    assert "operator 'Shrink' (domain '', opset 17)" in message and "'Hardmax'" in message
    assert "no onnx2torch converter" in message and "'Flatten'" not in message


def test_external_data_outside_the_models_folder_is_refused_naming_the_path(tmp_path, purifier_gray, fmnist_test):
    folder = tmp_path / "model"
    folder.mkdir()
    path = save_classifier(SmallCNN(), folder / "classifier.onnx", (1, 28, 28))
    onnx.save(onnx.load(str(path)), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    x = fmnist_test.x[:16]
    assert inspect_classifier(path)["layout"] == "nchw"
    to_torch(path, x)  # external data beside the model is fine

    shutil.move(folder / "weights.bin", tmp_path / "outside.bin")
    model = onnx.load(str(path), load_external_data=False)
    edited = 0
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../outside.bin"
                edited += 1
    assert edited > 0
    onnx.save(model, str(path))

    for call in (lambda: inspect_classifier(path), lambda: to_torch(path, x),
                 lambda: compose_pipeline(purifier_gray, path, tmp_path / "pipeline.onnx")):
        with pytest.raises(OnnxClassifierError, match=r"'\.\./outside\.bin'.*outside the model's folder"):
            call()
    assert not (tmp_path / "pipeline.onnx").exists()


def test_classifier_whose_output_is_not_batch_by_classes_is_refused(tmp_path, fmnist_test):
    path = save_classifier(SpatialLogits(), tmp_path / "classifier.onnx", (1, 28, 28))
    with pytest.raises(OnnxClassifierError, match=r"has shape \[16, 10, 1, 1\] on a batch of 16.*B x K"):
        to_torch(path, fmnist_test.x[:16])


def test_fixed_batch_size_is_refused_with_the_fix(tmp_path, purifier_gray, fmnist_test):
    path = save_classifier(SmallCNN(), tmp_path / "classifier.onnx", (1, 28, 28), dynamic=False)
    assert inspect_classifier(path, require_dynamic_batch=False)["batch_dynamic"] is False
    for call in (lambda: inspect_classifier(path), lambda: to_torch(path, fmnist_test.x[:2]),
                 lambda: compose_pipeline(purifier_gray, path, tmp_path / "pipeline.onnx")):
        with pytest.raises(OnnxClassifierError, match="fixed batch size 1.*dynamic batch axis"):
            call()


def test_compose_refuses_a_channel_mismatch_naming_both_shapes_and_writes_nothing(tmp_path, purifier_gray):
    path = save_classifier(SmallCNN(3, 28), tmp_path / "classifier.onnx", (3, 28, 28))
    out = tmp_path / "out" / "pipeline.onnx"
    with pytest.raises(ComposeError) as err:
        compose_pipeline(purifier_gray, path, out)
    assert "['batch', 3, 28, 28]" in str(err.value) and "['N', 1, 28, 28]" in str(err.value)
    with pytest.raises(ComposeError, match="layout 'chw' is not one of"):
        compose_pipeline(purifier_gray, path, out, layout="chw")
    with pytest.raises(ComposeError, match=r"one value per channel \(1\)"):
        compose_pipeline(purifier_gray, save_classifier(SmallCNN(), tmp_path / "gray.onnx", (1, 28, 28)), out,
                         mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


def test_a_converter_that_refuses_an_attribute_is_named(tmp_path, fmnist_test):
    # Reshape(allowzero=1) is only rewritten when its shape is a visible constant without zeros; here the shape
    # comes through an Identity, so onnx2torch's Reshape converter itself refuses the attribute
    shape = numpy_helper.from_array(np.array([-1, 784], np.int64), "shape")
    weight = numpy_helper.from_array(np.full((784, 10), 1 / 784, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["shape"], ["shape_again"]),
         helper.make_node("Reshape", ["image", "shape_again"], ["flat"], allowzero=1, name="flatten"),
         helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "reshape_classifier", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], [shape, weight])
    path = tmp_path / "classifier.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    with pytest.raises(OnnxClassifierError, match=r"cannot convert operator 'Reshape' \(node 'flatten'\): "
                                                  r"\"allowzero=1\" is not implemented"):
        to_torch(path, fmnist_test.x[:4])
