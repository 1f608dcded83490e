"""Bring your own classifier: a network the project has never seen, trained here on real Fashion-MNIST, saved as
``model.py`` + safetensors and as ONNX, then the whole journey through the real CLI for each way of naming it:
fit, evaluate, export, ``purifier purify`` and ``purifier serve``. Also on RGB 32 x 32 data made from real images,
the Python API's model directory, and the errors a user gets for a classifier that does not fit."""
import hashlib
import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from purifier.classifier_io import ClassifierSource, state_digest
from purifier.cli import main
from purifier.data import load_dataset

ROOT = Path(__file__).resolve().parents[1]

# The user's own code, as they would have it in model.py: BatchNorm, a residual block, global pooling, and an
# input normalisation of its own inside forward. Nothing of it is in purifier/.
MODEL_PY = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    def __init__(self, in_channels=1, num_classes=10, width=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.block = Block(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.block(self.stem((x - 0.3) / 0.35)).mean((2, 3)))


class Features(TinyResNet):
    def forward(self, x):
        return self.block(self.stem(x))  # B x C x H x W: not logits


def build():
    return TinyResNet()


def build_rgb():
    return TinyResNet(in_channels=3)


def build_features():
    return Features()
'''


def _import(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"user_model_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _train(model, x, y, epochs=3):
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for _ in range(epochs):
        for i in range(0, len(x), 64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
    return model.eval()


def _to_rgb(x, y):
    """Real Fashion-MNIST images padded to 32 x 32 and tinted by class: a colour dataset of another shape."""
    palette = np.array([[1, .2, .2], [.2, 1, .2], [.2, .2, 1], [1, 1, .2], [1, .2, 1], [.2, 1, 1], [1, .6, .2],
                        [.6, .2, 1], [.6, 1, .4], [1, 1, 1]], np.float32)
    x = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)))
    return (x * palette[y][:, :, None, None]).astype(np.float32)


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """The user's files: model.py, weights.safetensors, model.onnx (input 'input', output 'scores'), and their data
    as .npz (1,800 train / 300 test Fashion-MNIST images), plus the same for RGB 32 x 32."""
    d = tmp_path_factory.mktemp("user")
    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    x, y = train.x[:1800], train.y[:1800]
    xt, yt = test.x[:300], test.y[:300]
    np.savez(d / "data.npz", x=x, y=y, x_test=xt, y_test=yt, class_names=np.array(train.class_names))
    np.savez(d / "rgb.npz", x=_to_rgb(x, y), y=y, x_test=_to_rgb(xt, yt), y_test=yt)
    np.savez(d / "five.npz", x=x[y < 5], y=y[y < 5])
    (d / "model.py").write_text(MODEL_PY)
    mod = _import(d / "model.py")
    torch.manual_seed(0)
    net = _train(mod.build(), torch.from_numpy(x), torch.from_numpy(y))
    save_file(net.state_dict(), str(d / "weights.safetensors"))
    torch.onnx.export(net, (torch.rand(2, 1, 28, 28),), str(d / "model.onnx"), dynamo=True,
                      input_names=["input"], output_names=["scores"],
                      dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}})
    torch.manual_seed(0)
    rgb = _train(mod.build_rgb(), torch.from_numpy(_to_rgb(x, y)), torch.from_numpy(y))
    save_file(rgb.state_dict(), str(d / "rgb.safetensors"))
    save_file(mod.build_features().state_dict(), str(d / "features.safetensors"))
    with torch.no_grad():
        acc = float((net(torch.from_numpy(xt)).argmax(1).numpy() == yt).mean())
    return {"dir": d, "net": net, "acc": acc, "x_test": xt, "y_test": yt,
            "sha": hashlib.sha256((d / "weights.safetensors").read_bytes()).hexdigest()}


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r


TRAIN = ("--epochs", 2, "--val-size", 300, "--latent-dim", 8, "--channels", "8,16", "--hidden", 24, "--quiet")


def _serve_and_infer(model_dir, x):
    """``purifier serve`` in a subprocess on port 0: its model metadata and a v2 inference on x."""
    proc = subprocess.Popen([sys.executable, "-m", "purifier.cli", "serve", "--model", str(model_dir), "--port", "0",
                             "--device", "cpu"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "serving on http://127.0.0.1:" in line, line
        url = line.split("serving on ")[1].split()[0]
        name = Path(model_dir).name
        with urllib.request.urlopen(f"{url}/v2/models/{name}", timeout=30) as r:
            meta = json.loads(r.read())
        doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
        req = urllib.request.Request(f"{url}/v2/models/{name}/infer", json.dumps(doc).encode(),
                                     {"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            outputs = {o["name"]: o for o in json.loads(r.read())["outputs"]}
        return meta, outputs
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _journey(user, tmp_path, classifier_args, data="data.npz", x_test=None, y_test=None):
    """fit -> evaluate -> export -> purify -> serve through the CLI; returns what each step gave."""
    from serve.runtime import OnnxPurifier

    d = user["dir"]
    run = tmp_path / "run"
    r = cli("train", "--data", f"npz:{d / data}", *classifier_args, "--out", run, *TRAIN)
    assert r.exit_code == 0, r.output
    config = json.loads((run / "cvae.json").read_text())["config"]
    assert (config["latent_dim"], config["channels"], config["hidden"]) == (8, [8, 16], 24)
    r = cli("evaluate", "--model", run, "--data", f"npz:{d / data}", "--out", tmp_path / "eval.json")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "eval.json").read_text())
    r = cli("export", run, "--out", run)
    assert r.exit_code == 0, r.output
    # the pipeline in onnxruntime against torch: the directory's own purifier and classifier
    from purifier.fitting import ModelDir

    x = (x_test if x_test is not None else user["x_test"])[:64]
    with torch.no_grad():
        pc = ModelDir(run).purified_classifier()
        out = pc.purifier(torch.from_numpy(x))
        logits = pc.classifier(out["purified"])
    got = OnnxPurifier(run, device="cpu")(x)
    assert np.array_equal(got["chosen_class"], out["chosen_class"].numpy())
    assert np.array_equal(got["predicted_class"], logits.argmax(1).numpy())
    assert np.abs(got["logits"] - logits.numpy()).max() <= 1e-3
    np.save(tmp_path / "batch.npy", x[:20])
    r = cli("purify", tmp_path / "batch.npy", "--model", run, "--out", tmp_path / "purified", "--format", "npz",
            "--quiet")
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "purified" / "purified.npz") as f:
        assert f["x"].shape == (20, *x.shape[1:])
    manifest = [json.loads(line) for line in (tmp_path / "purified" / "manifest.jsonl").read_text().splitlines()]
    assert [m["predicted_class"] for m in manifest] == got["predicted_class"][:20].tolist()
    meta, outputs = _serve_and_infer(run, x[:4])
    assert meta["inputs"][0]["shape"] == [-1, *x.shape[1:]]
    assert outputs["chosen_class"]["data"] == got["chosen_class"][:4].tolist()
    return run, report


def test_factory_classifier_journey_keeps_the_weights_and_matches_torch(user, tmp_path):
    d = user["dir"]
    run, report = _journey(user, tmp_path, ("--classifier-factory", f"{d / 'model.py'}:build",
                                            "--classifier-weights", d / "weights.safetensors"))
    assert report["classifier"]["accuracy"] == pytest.approx(user["acc"], abs=1e-6)
    assert report["selections"]["mse"]["argmin_acc"] > 0.3
    rec = json.loads((run / "classifier.json").read_text())
    assert rec["kind"] == "factory" and rec["weights_sha256"] == user["sha"]
    assert rec["source"]["factory"] == "classifier_factory.py:build"  # their code travels with the directory
    moved = tmp_path / "elsewhere" / "moved"
    shutil.copytree(run, moved)
    r = cli("evaluate", "--model", moved, "--data", f"npz:{d / 'data.npz'}", "--selection", "mse")
    assert r.exit_code == 0, r.output
    assert f"{user['acc']:.4f}" in r.output
    meta = json.loads((run / "cvae.json").read_text())["meta"]
    assert meta["classifier_frozen"]["state_sha256_before"] == meta["classifier_frozen"]["state_sha256_after"]
    assert meta["classifier_frozen"]["state_sha256_before"] == state_digest(user["net"])
    assert 0 < meta["rejection_calibration"]["threshold"] < 1
    assert hashlib.sha256((d / "weights.safetensors").read_bytes()).hexdigest() == user["sha"]

    # the middleware mode: the CVAE alone trained against attacks through the frozen classifier
    r = cli("train", "--data", f"npz:{d / 'data.npz'}", "--classifier-factory", f"{d / 'model.py'}:build",
            "--classifier-weights", d / "weights.safetensors", "--init", run, "--adversarial", "cvae",
            "--epochs", 0.15, "--adv-steps", 1, "--val-size", 300, "--out", tmp_path / "adv", "--quiet")
    assert r.exit_code == 0, r.output
    adv = json.loads((tmp_path / "adv" / "cvae.json").read_text())["meta"]
    assert adv["adversarial"]["mode"] == "cvae" and adv["init_sha256"] == \
        json.loads((run / "cvae.json").read_text())["weights_sha256"]
    assert adv["classifier_frozen"]["state_sha256_after"] == state_digest(user["net"])
    assert json.loads((tmp_path / "adv" / "classifier.json").read_text())["weights_sha256"] == user["sha"]


def test_onnx_classifier_journey_composes_their_graph(user, tmp_path):
    import onnx

    d = user["dir"]
    run, report = _journey(user, tmp_path, ("--classifier-onnx", d / "model.onnx"))
    assert report["classifier"]["accuracy"] == pytest.approx(user["acc"], abs=1 / 300 + 1e-6)
    # pipeline.onnx holds their graph as it is (prefixed), not a re-export of a converted module
    pipe = onnx.load(str(run / "pipeline.onnx"))
    assert [o.name for o in pipe.graph.output] == ["purified", "chosen_class", "scores", "logits", "recon_error"]
    props = {p.key: p.value for p in pipe.metadata_props}
    assert props["classifier_source"] == "onnx" and props["kind"] == "pipeline"
    assert props["classifier_sha256"] == hashlib.sha256((d / "model.onnx").read_bytes()).hexdigest()


def test_rgb_32x32_journey_adapts_the_preset_and_the_server_reports_the_shape(user, tmp_path):
    d = user["dir"]
    with np.load(d / "rgb.npz") as f:
        xt, yt = f["x_test"], f["y_test"]
    run, report = _journey(user, tmp_path, ("--classifier-factory", f"{d / 'model.py'}:build_rgb",
                                            "--classifier-weights", d / "rgb.safetensors"), "rgb.npz", xt, yt)
    cfg = json.loads((run / "cvae.json").read_text())["config"]
    assert cfg["image_shape"] == [3, 32, 32] and cfg["num_classes"] == 10


def test_python_api_directory_exports_and_matches_the_cli_run(user, tmp_path):
    import purifier
    from export.onnx_export import export_run
    from serve.runtime import OnnxPurifier

    d = user["dir"]
    src = ClassifierSource("factory", factory=f"{d / 'model.py'}:build", weights=str(d / "weights.safetensors"))
    api = purifier.fit(src, f"npz:{d / 'data.npz'}", tmp_path / "api",
                       purifier.FitConfig(epochs=2, val_size=300,
                                          model={"latent_dim": 8, "channels": (8, 16), "hidden": 24}))
    r = cli("train", "--data", f"npz:{d / 'data.npz'}", "--classifier-factory", f"{d / 'model.py'}:build",
            "--classifier-weights", d / "weights.safetensors", "--out", tmp_path / "cli", *TRAIN)
    assert r.exit_code == 0, r.output
    export_run(api.path / "cvae", api.path / "classifier", api.path)
    assert cli("export", tmp_path / "cli").exit_code == 0
    a = OnnxPurifier(api.path, device="cpu")(user["x_test"])
    c = OnnxPurifier(tmp_path / "cli", device="cpu")(user["x_test"])
    assert np.array_equal(a["chosen_class"], c["chosen_class"])
    assert np.array_equal(a["predicted_class"], c["predicted_class"])
    assert OnnxPurifier(api.path).threshold == OnnxPurifier(tmp_path / "cli").threshold


@pytest.mark.parametrize("args, words", [
    (("--classifier-factory", "no_such_package.model:build", "--classifier-weights", "{d}/weights.safetensors"),
     ["no_such_package.model:build", "does not import"]),
    (("--classifier-factory", "{d}/model.py:nope", "--classifier-weights", "{d}/weights.safetensors"),
     ["no callable 'nope'"]),
    (("--classifier-factory", "{d}/model.py:build", "--classifier-weights", "{d}/rgb.safetensors"),
     ["rgb.safetensors", "do not fit"]),
    (("--classifier-factory", "{d}/model.py:build_features", "--classifier-weights", "{d}/features.safetensors"),
     ["B x K logits", "(2, 16, 14, 14)"]),
    (("--classifier-factory", "{d}/model.py:build",), ["--classifier-weights"]),
    (("--classifier-onnx", "{d}/model.onnx", "--source", "{d}/other"), ["one way"]),
])
def test_a_classifier_that_does_not_fit_gets_a_usage_error_naming_it(user, tmp_path, args, words):
    d = user["dir"]
    r = cli("train", "--data", f"npz:{d / 'data.npz'}", *[a.format(d=d) for a in args], "--out", tmp_path / "r",
            *TRAIN)
    assert r.exit_code == 2, r.output
    for w in words:
        assert w in r.output, r.output
    assert not (tmp_path / "r" / "cvae.json").exists()


def test_an_onnx_classifier_onnx2torch_cannot_convert_is_refused_naming_the_operator(user, tmp_path):
    from test_onnx_classifier import write_hardmax_classifier

    bad = write_hardmax_classifier(tmp_path / "hardmax.onnx")
    r = cli("train", "--data", f"npz:{user['dir'] / 'data.npz'}", "--classifier-onnx", bad, "--out",
            tmp_path / "r", *TRAIN)
    assert r.exit_code == 2, r.output
    assert "operator 'Shrink'" in r.output and "'Hardmax'" in r.output and "no onnx2torch converter" in r.output


def test_a_class_count_that_differs_from_the_data_is_refused(user, tmp_path):
    d = user["dir"]
    r = cli("train", "--data", f"npz:{d / 'five.npz'}", "--classifier-onnx", d / "model.onnx", "--out",
            tmp_path / "r", *TRAIN)
    assert r.exit_code == 2 and "returns 10 logits per image, the data has 5 classes" in r.output, r.output


def test_byo_benchmark_tiny_profile_end_to_end(tmp_path):
    """benchmarks/byo.py on a handful of images (numbers mean nothing): the classifier row and the plain PuVAE
    row in front of the frozen standard classifier, with the targeted attacks in the worst case. The same row in
    benchmarks/adversarial.py (same weights, profile and suite) is then taken from this cache, not measured again."""
    out = tmp_path / "byo-tiny.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.byo", "--profile", "tiny", "--row", "A: no defense",
                        "--row", "A: plain PuVAE", "--out", str(out), "--work", str(tmp_path / ".byo-tiny-work")],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    pu = report["rows"]["A: plain PuVAE"]
    attacks = [s["attack"] for s in pu["steps"]]
    assert attacks[:4] == ["selection", "full gradient", "BPDA", "softmin"]
    k = report["profile"]["targeted"]
    assert k >= 1 and attacks[4:] == [f"targeted {kind} r{r}" for r in range(1, k + 1) for kind in ("selection", "logits")]
    assert pu["adaptive"] <= [s["accuracy"] for s in pu["steps"]][3] + 1e-9  # targeted attacks only add breaks
    assert all(v["pass"] for v in pu["sanity"].values() if isinstance(v, dict))
    assert "| A: plain PuVAE |" in out.with_suffix(".md").read_text()

    adv = tmp_path / "adv-tiny.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.adversarial", "--profile", "tiny", "--no-reject", "--row",
                        "plain PuVAE", "--out", str(adv), "--work", str(tmp_path / ".adv-tiny-work")],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    same = json.loads(adv.read_text())["rows"]["plain PuVAE"]
    assert same["measured_as"] == {"name": "A: plain PuVAE", "cache": ".byo-tiny-work"}
    assert (same["adaptive_robust"], same["steps"], same["seconds"]) == \
        (pu["adaptive_robust"], pu["steps"], pu["seconds"])
