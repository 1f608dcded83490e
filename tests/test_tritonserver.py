"""The real Triton Inference Server (the nvidia-pytriton wheel's tritonserver and its Python backend) on 127.0.0.1,
loading the repository ``purifier export --triton`` writes and serving ``python -m serve --engine triton``, spoken to
by tritonclient over HTTP and gRPC; every answer is checked against ``OnnxPurifier`` on the same Fashion-MNIST test
images. Skipped only where no tritonserver is installed (``make setup`` installs it)."""
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

http = pytest.importorskip("tritonclient.http")
grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from export.triton import write_triton_repos  # noqa: E402
from serve.protocol import _outputs_meta  # noqa: E402
from serve.runtime import OnnxPurifier  # noqa: E402
from serve.triton import TritonServer, find_tritonserver  # noqa: E402
from serve.models import MODELS

ROOT = Path(__file__).resolve().parents[1]
MODEL = MODELS["fashion-mnist"].path
NAME = "fashion-mnist-python"  # the Python-backend model of `purifier export --triton REPO --triton-name fashion-mnist`
FLOATS = ("purified", "scores", "logits", "margin", "recon_error")


@pytest.fixture(scope="module")
def install():
    try:
        return find_tritonserver()
    except FileNotFoundError as exc:
        pytest.skip(f"tritonserver is not installed: {exc}")


@pytest.fixture(scope="module")
def server(install, tmp_path_factory):
    repo = tmp_path_factory.mktemp("triton-repo")
    # both backends, as the export command writes them by default; this binary has the Python backend only, so
    # the ONNX-backend model stays unloaded. A 20 ms queue delay lets concurrent requests meet in one batch.
    write_triton_repos(MODEL / "pipeline.onnx", repo, "fashion-mnist", "both", max_batch_size=64,
                       max_queue_delay_us=20000)
    with TritonServer(repo, models=[NAME], install=install, log_file=repo.parent / "tritonserver.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    c = http.InferenceServerClient(server.url.removeprefix("http://"), concurrency=16)
    yield c
    c.close()


@pytest.fixture(scope="module")
def runtime():
    return OnnxPurifier(MODEL, device="cpu")


@pytest.fixture(scope="module")
def images(fmnist_test):
    return fmnist_test.x[:32], fmnist_test.y[:32]


def http_input(x):
    inp = http.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return inp


def assert_same(result, direct, names):
    """Triton's answer equals the runtime's; per-image scalars come back as [N, 1] (dims [1] with batching)."""
    for n in names:
        got = result.as_numpy(n)
        assert got is not None, f"output {n!r} missing"
        got = got.reshape(direct[n].shape)
        if n in FLOATS:
            np.testing.assert_allclose(got, direct[n], atol=1e-5, err_msg=n)
        else:
            assert got.dtype == direct[n].dtype, n
            np.testing.assert_array_equal(got, direct[n], err_msg=n)


def test_the_repository_loads_with_every_output_the_embedded_server_gives(client, runtime):
    assert client.is_server_ready() and client.is_model_ready(NAME)
    index = {m["name"]: m.get("state") for m in client.get_model_repository_index()}
    assert set(index) == {"fashion-mnist", NAME} and index[NAME] == "READY"
    meta = client.get_model_metadata(NAME)
    assert meta["platform"] == "python"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    embedded = _outputs_meta(runtime)
    assert [o["name"] for o in meta["outputs"]] == [o["name"] for o in embedded]
    assert [o["datatype"] for o in meta["outputs"]] == [o["datatype"] for o in embedded]
    cfg = client.get_model_config(NAME)
    assert cfg["backend"] == "python" and cfg["max_batch_size"] == 64
    assert cfg["dynamic_batching"]["max_queue_delay_microseconds"] == 20000


def test_http_answers_equal_onnxruntime_on_test_images(client, runtime, images):
    x, y = images
    r = client.infer(NAME, [http_input(x)])
    direct = runtime(x)
    assert_same(r, direct, list(direct))
    assert (r.as_numpy("predicted_class").ravel() == y).mean() > 0.75  # real images, a real classifier


def test_grpc_answers_the_requested_outputs_only(server, runtime, images):
    x = images[0][:8]
    c = grpc.InferenceServerClient(server.grpc_url)
    try:
        inp = grpc.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        wanted = ["predicted_class", "margin", "rejected"]
        r = c.infer(NAME, [inp], outputs=[grpc.InferRequestedOutput(n) for n in wanted])
        assert [o.name for o in r.get_response().outputs] == wanted
        assert r.as_numpy("logits") is None
        assert_same(r, runtime(x), wanted)
    finally:
        c.close()


def test_concurrent_requests_meet_in_one_batch_and_each_gets_its_own_answer(client, runtime, images):
    x = images[0][:16]

    def counts():
        s = client.get_inference_statistics(NAME)["model_stats"][0]
        return int(s["inference_count"]), int(s["execution_count"])

    before = counts()
    pending = [client.async_infer(NAME, [http_input(x[i:i + 1])]) for i in range(16)]
    results = [p.get_result() for p in pending]
    # Triton records an execution's statistics after it has sent the responses: wait (up to 10 s) for the count
    # to reach the 16 requests, so the check below reads settled figures
    deadline = time.monotonic() + 10
    while (after := counts())[0] - before[0] < 16 and time.monotonic() < deadline:
        time.sleep(0.05)
    direct = runtime(x)
    for i, r in enumerate(results):
        assert_same(r, {k: v[i:i + 1] for k, v in direct.items()}, ["chosen_class", "margin", "predicted_class"])
    assert after[0] - before[0] == 16
    assert after[1] - before[1] < 16  # fewer onnxruntime calls than requests: the dynamic batcher gathered them


@pytest.mark.parametrize("value, named", [(1.5, "[0.0, 1.5]"), (np.nan, "non-finite value nan")])
def test_a_bad_value_is_invalid_argument_naming_it(client, images, value, named):
    x = images[0][:2].copy()
    x[1, 0, 3, 4] = value
    with pytest.raises(InferenceServerException) as err:
        client.infer(NAME, [http_input(x)])
    assert err.value.status() == "400"
    assert named in err.value.message() and "input 'x'" in err.value.message()


def test_engine_triton_serves_the_shipped_model(install, runtime, images):
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--engine", "triton", "--model", "fashion-mnist",
                             "--port", "0", "--grpc-port", "0", "--metrics-port", "0", "--device", "cpu",
                             "--max-batch-size", "8"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline, line = time.monotonic() + 120, ""
        while time.monotonic() < deadline and "serving on" not in line:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, f"python -m serve --engine triton exited with {proc.returncode}"
        m = re.search(r"serving on (http://\S+) with Triton \(gRPC (\S+), metrics (\S+);", line)
        assert m, line
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
        url, grpc_url, metrics_url = m.groups()
        x = images[0][:8]
        c = grpc.InferenceServerClient(grpc_url)
        try:
            assert c.get_model_config("fashion-mnist").config.max_batch_size == 8
            inp = grpc.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            assert_same(c.infer("fashion-mnist", [inp]), runtime(x), ["predicted_class", "rejected", "scores"])
        finally:
            c.close()
        with urllib.request.urlopen(metrics_url, timeout=10) as r:
            assert re.search(r'nv_inference_count\{model="fashion-mnist",version="1"\} 8', r.read().decode())
    finally:
        proc.terminate()
        code = proc.wait(timeout=60)
    assert code == 128 + 15  # SIGTERM, handled: tritonserver was stopped first
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/v2/health/live", timeout=2)


def test_engine_options_of_the_other_engine_are_refused():
    from click.testing import CliRunner

    from serve.cli import serve_command

    r = CliRunner().invoke(serve_command, ["--model", str(MODEL), "--engine", "triton", "--max-body-mb", "2"])
    assert r.exit_code == 2 and "--max-body-mb: not an option of --engine triton" in r.output
    r = CliRunner().invoke(serve_command, ["--model", str(MODEL), "--grpc-port", "9001"])
    assert r.exit_code == 2 and "--grpc-port: not an option of --engine embedded" in r.output


def test_serve_load_measures_both_engines_side_by_side(install, tmp_path):
    out = tmp_path / "serve.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.serve_load", "--duration", "0.3", "--concurrency", "2",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    report = json.loads(out.read_text())
    assert set(report["engines"]) == {"embedded", "triton"} and report["settings"]["max_batch_size"] == 64
    for engine in report["engines"].values():
        (level,) = engine["levels"]
        assert level["concurrency"] == 2 and level["requests_ok"] > 0 and level["errors"] == 0
        assert level["batches"] > 0 and 1 <= level["mean_batch_images"] <= 2
    assert "--engine triton" in report["engines"]["triton"]["server_command"]
    assert "requests/s Triton" in out.with_suffix(".md").read_text()


def test_a_stub_that_cannot_load_its_libraries_is_refused_naming_them(install, tmp_path):
    if install.libs is None:
        pytest.skip("this Triton installation keeps its libraries where the stub finds them by itself")
    srv = TritonServer(tmp_path, install=install)
    backends = srv._backends(tmp_path)  # the stub copied out of the wheel no longer finds the wheel's libraries
    env = {k: v for k, v in srv.environment().items() if k != "LD_LIBRARY_PATH"}
    with pytest.raises(RuntimeError, match=r"cannot load \['libcudart"):
        srv.check_stub(backends, env)
    srv.check_stub(backends, srv.environment())  # with them on LD_LIBRARY_PATH it loads
