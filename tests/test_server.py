"""The real HTTP server on 127.0.0.1 (port 0), spoken to by tritonclient.http (a real v2 client), raw HTTP for
malformed requests, and schemathesis against its OpenAPI."""
import base64
import io
import json
import logging
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

tritonclient_http = pytest.importorskip("tritonclient.http")
from serve.runtime import OnnxPurifier  # noqa: E402
from serve.server import BackgroundServer, ServerConfig  # noqa: E402
from serve.models import MODELS

ROOT = Path(__file__).resolve().parents[1]
MODEL = MODELS["fashion-mnist"].path
NAME = "fashion-mnist"
MAX_IMAGES = 16  # the module server's cap on images per request (the default is 1024)


@pytest.fixture(scope="module")
def server():
    with BackgroundServer(MODEL, cfg=ServerConfig(max_body_bytes=1 << 20, max_images_per_request=MAX_IMAGES)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return tritonclient_http.InferenceServerClient(server.url.removeprefix("http://"))


@pytest.fixture(scope="module")
def runtime():
    return OnnxPurifier(MODEL, device="cpu")


@pytest.fixture(scope="module")
def images(fmnist_test):
    return fmnist_test.x[:16]


def request(url, method="GET", body=None, headers=None):
    """(status, headers, body bytes) without raising on 4xx/5xx."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def error_message(text) -> str:
    """The one error shape of every endpoint: ``{"error": str}`` and nothing else (no FastAPI ``detail``)."""
    doc = json.loads(text)
    assert isinstance(doc, dict) and set(doc) == {"error"} and isinstance(doc["error"], str), doc
    assert not re.search(r"at 0x[0-9a-fA-F]+|BytesIO", doc["error"]), doc  # no object reprs
    return doc["error"]


def infer_json(server, doc, name=NAME):
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return request(f"{server.url}/v2/models/{name}/infer", "POST", body, {"Content-Type": "application/json"})


def test_health_and_metadata_through_tritonclient(client, runtime):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(NAME)
    meta = client.get_model_metadata(NAME)
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    names = [o["name"] for o in meta["outputs"]]
    assert names[:4] == ["purified", "chosen_class", "scores", "logits"]
    assert names[-1] == "recon_error"  # the deprecated alias of scores, after the outputs the server adds
    assert {"predicted_class", "margin", "rejected"} <= set(names)
    assert meta["parameters"]["class_names"] == runtime.class_names


@pytest.mark.parametrize("binary", [True, False])
def test_inference_equals_the_runtime(client, runtime, images, binary):
    x = images.astype(np.float32)
    inp = tritonclient_http.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outs = [tritonclient_http.InferRequestedOutput(n, binary_data=binary)
            for n in ("purified", "scores", "recon_error", "predicted_class", "rejected")]
    r = client.infer(NAME, [inp], outputs=outs)
    direct = runtime(x)
    np.testing.assert_allclose(r.as_numpy("purified"), direct["purified"], atol=1e-6)
    np.testing.assert_allclose(r.as_numpy("scores"), direct["scores"], atol=1e-6)
    np.testing.assert_array_equal(r.as_numpy("recon_error"), r.as_numpy("scores"))
    np.testing.assert_array_equal(r.as_numpy("predicted_class"), direct["predicted_class"])
    np.testing.assert_array_equal(r.as_numpy("rejected"), direct["rejected"])
    assert r.as_numpy("logits") is None  # only the outputs asked for come back


def test_uint8_input_is_scaled_like_the_runtime(client, runtime, images):
    x8 = np.round(images * 255).astype(np.uint8)
    inp = tritonclient_http.InferInput("x", list(x8.shape), "UINT8")
    inp.set_data_from_numpy(x8)
    r = client.infer(NAME, [inp], outputs=[tritonclient_http.InferRequestedOutput("predicted_class")])
    np.testing.assert_array_equal(r.as_numpy("predicted_class"), runtime(x8)["predicted_class"])


def _doc(x, datatype="FP32", shape=None):
    return {"inputs": [{"name": "x", "shape": list(shape or x.shape), "datatype": datatype,
                        "data": np.asarray(x).ravel().tolist()}]}


@pytest.mark.parametrize("case, status, words", [
    ("wrong shape", 400, ["shape", "[1, 1, 28, 27]"]),
    ("wrong datatype", 400, ["datatype", "INT64"]),
    ("nan", 400, ["non-finite", "nan"]),
    ("out of range", 400, ["[0, 1]"]),
    ("missing inputs", 422, ["inputs"]),
    ("missing data", 400, ["no 'data'"]),
    ("wrong count", 400, ["holds 3 values"]),
    ("garbage json", 400, ["not valid JSON"]),
    ("wrong model", 404, ["'nope'"]),
    ("unknown output", 400, ["'bogus'"]),
    ("bad binary size", 400, ["binary_data_size"]),
    ("too many images", 413, [f"holds {MAX_IMAGES + 1} images", f"cap of {MAX_IMAGES} images per request"]),
    ("no images", 400, ["0 images"]),
])
def test_malformed_requests_get_a_4xx_naming_the_problem(server, images, case, status, words):
    x = images[:1]
    name, headers = NAME, {"Content-Type": "application/json"}
    if case == "wrong shape":
        doc = _doc(x[..., :27], shape=[1, 1, 28, 27])
    elif case == "wrong datatype":
        doc = _doc(x, "INT64")
    elif case == "nan":
        bad = x.copy()
        bad[0, 0, 3, 3] = np.nan
        doc = _doc(bad)
    elif case == "out of range":
        doc = _doc(x * 3)
    elif case == "missing inputs":
        doc = {"id": "a"}
    elif case == "missing data":
        doc = {"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32"}]}
    elif case == "wrong count":
        doc = {"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.1, 0.2, 0.3]}]}
    elif case == "garbage json":
        doc = b"{not json"
    elif case == "wrong model":
        doc, name = _doc(x), "nope"
    elif case == "unknown output":
        doc = {**_doc(x), "outputs": [{"name": "bogus"}]}
    elif case == "too many images":
        doc = _doc(np.concatenate([images, images[:1]]))
    elif case == "no images":
        doc = {"inputs": [{"name": "x", "shape": [0, 1, 28, 28], "datatype": "FP32", "data": []}]}
    else:
        head = json.dumps({"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                       "parameters": {"binary_data_size": 99}}]}).encode()
        doc = head + b"\0" * 99
        headers["Inference-Header-Content-Length"] = str(len(head))
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    code, _, text = request(f"{server.url}/v2/models/{name}/infer", "POST", body, headers)
    assert code == status, text
    message = error_message(text)
    for w in words:
        assert w in message, message


def test_a_request_of_exactly_the_image_cap_is_served(server, images):
    assert len(images) == MAX_IMAGES
    code, _, text = infer_json(server, {**_doc(images), "outputs": [{"name": "predicted_class"}]})
    assert code == 200, text
    assert json.loads(text)["outputs"][0]["shape"] == [MAX_IMAGES]


@pytest.mark.parametrize("path, content_type", [(f"/v2/models/{NAME}/infer", "application/json"),
                                                ("/v1/purify", "multipart/form-data; boundary=x")])
def test_oversized_body_is_refused_before_it_is_read(server, path, content_type):
    """A declared body over the limit gets 413 at once: the server never waits for the bytes."""
    import socket

    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                  f"Content-Length: {2 << 20}\r\n\r\n".encode())
        reply = b""
        while b"}" not in reply:  # headers and the JSON body may come in separate packets
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413") and "exceeds the limit" in reply, reply


def _multipart(filename, data, field="file"):
    boundary = "----purifiertest"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_purify_upload_returns_the_class_and_the_png(server, runtime, images):
    buf = io.BytesIO()
    Image.fromarray(np.round(images[3, 0] * 255).astype(np.uint8)).save(buf, format="PNG")
    body, headers = _multipart("shoe.png", buf.getvalue())
    code, _, text = request(f"{server.url}/v1/purify?png=true", "POST", body, headers)
    assert code == 200, text
    doc = json.loads(text)
    direct = runtime(np.round(images[3:4] * 255).astype(np.uint8))
    assert doc["predicted_class"] == int(direct["predicted_class"][0])
    assert doc["class_name"] == runtime.class_names[doc["predicted_class"]]
    assert doc["rejected"] == bool(direct["rejected"][0])
    assert abs(doc["score"] - float(direct["scores"][0].min())) < 1e-6 and doc["recon_error"] == doc["score"]
    png = Image.open(io.BytesIO(base64.b64decode(doc["purified_png"])))
    assert png.size == (28, 28)


def _png(size=(28, 28)) -> bytes:
    """A noise image: its pixel data is long enough that cutting the file in half truncates it."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, size[::-1], dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("case, status, words", [
    ("json body", 415, ["'application/json'", "multipart/form-data", "'file'", f"/v2/models/{NAME}/infer"]),
    ("raw png body", 415, ["'image/png'", "multipart/form-data", "'file'", "curl -F file=@"]),
    ("wrong field", 422, ["no field 'file'", "['image']"]),
    ("text field", 422, ["'file' holds text, not a file"]),
    ("png=maybe", 422, ["png='maybe'", "png=true or png=false"]),
    ("unparsable multipart", 400, ["cannot be parsed", "'file'"]),
    ("unreadable", 400, ["'notes.txt'", "(19 bytes)", "not an image", "PNG/JPEG"]),
    ("empty", 400, ["'empty.png'", "empty (0 bytes)"]),
    ("truncated", 400, ["'cut.png'", "could not be decoded", "truncated"]),
    ("wrong size", 400, ["'big.png'", "40 x 30", "28 x 28", "resize=true"]),
])
def test_purify_refuses_malformed_requests_with_one_error_shape(server, case, status, words):
    url, query = f"{server.url}/v1/purify", ""
    if case == "json body":
        body, headers = json.dumps({"file": "shoe.png"}).encode(), {"Content-Type": "application/json"}
    elif case == "raw png body":
        body, headers = _png(), {"Content-Type": "image/png"}
    elif case == "wrong field":
        body, headers = _multipart("shoe.png", _png(), field="image")
    elif case == "text field":
        body = b'--b\r\nContent-Disposition: form-data; name="file"\r\n\r\nshoe.png\r\n--b--\r\n'
        headers = {"Content-Type": "multipart/form-data; boundary=b"}
    elif case == "png=maybe":
        (body, headers), query = _multipart("shoe.png", _png()), "?png=maybe"
    elif case == "unparsable multipart":
        body, headers = b"not multipart at all", {"Content-Type": "multipart/form-data"}
    elif case == "unreadable":
        body, headers = _multipart("notes.txt", b"hello, not an image")
    elif case == "empty":
        body, headers = _multipart("empty.png", b"")
    elif case == "truncated":
        body, headers = _multipart("cut.png", _png()[:len(_png()) // 2])
    else:
        body, headers = _multipart("big.png", _png((40, 30)))
    code, _, text = request(url + query, "POST", body, headers)
    assert code == status, text
    message = error_message(text)
    for w in words:
        assert w in message, message
    assert "--resize" not in message  # a CLI flag the HTTP API does not have


def test_purify_resizes_when_asked_to(server):
    body, headers = _multipart("big.png", _png((40, 30)))
    code, _, text = request(f"{server.url}/v1/purify?resize=true", "POST", body, headers)
    assert code == 200, text
    assert json.loads(text)["filename"] == "big.png"


@pytest.mark.parametrize("method, path, status, words", [
    ("GET", "/v3/nothing", 404, ["'/v3/nothing'", "POST /v1/purify", "POST /v2/models/{model_name}/infer"]),
    ("GET", "/v1/purify", 405, ["GET", "'/v1/purify'", "use POST"]),
    ("DELETE", f"/v2/models/{NAME}/infer", 405, ["DELETE", "use POST"]),
    ("POST", "/v2/health/live", 405, ["POST", "use GET"]),
])
def test_routing_errors_share_the_error_shape(server, method, path, status, words):
    code, headers, text = request(server.url + path, method, b"" if method == "POST" else None)
    assert code == status, text
    message = error_message(text)
    for w in words:
        assert w in message, message
    if status == 405:
        assert headers.get("allow") == words[-1].removeprefix("use ")


def test_a_model_failure_is_a_500_in_the_same_error_shape(server, images):
    batcher = server.app.state.batcher

    def broken(x):
        raise RuntimeError("onnxruntime failed")

    batcher.runtime = broken
    try:
        code, _, text = infer_json(server, _doc(images[:1]))
    finally:
        batcher.runtime = server.app.state.runtime
    assert code == 500, text
    assert "RuntimeError" in error_message(text)


def test_access_log_writes_one_line_per_request(server, caplog):
    caplog.set_level(logging.INFO, logger="purifier.access")
    assert request(f"{server.url}/no-such-endpoint")[0] == 404
    body, headers = _multipart("shoe.png", _png())
    assert request(f"{server.url}/v1/purify?png=true", "POST", body, headers)[0] == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "purifier.access"]
    assert len(lines) == 2, lines
    assert re.fullmatch(r"GET /no-such-endpoint 404 \d+\.\dms 127\.0\.0\.1:\d+", lines[0]), lines
    assert re.fullmatch(r"POST /v1/purify 200 \d+\.\dms 127\.0\.0\.1:\d+", lines[1]), lines


def test_access_log_is_silent_when_switched_off(caplog):
    caplog.set_level(logging.INFO, logger="purifier.access")
    with BackgroundServer(MODEL, cfg=ServerConfig(access_log=False)) as srv:
        assert request(f"{srv.url}/v2/health/live")[0] == 200
        assert request(f"{srv.url}/no-such-endpoint")[0] == 404
    assert not [r for r in caplog.records if r.name == "purifier.access"]


def test_serve_command_passes_the_limits_and_the_access_log_switch(monkeypatch):
    from click.testing import CliRunner

    import serve.cli
    import serve.server

    seen = []
    monkeypatch.setattr(serve.server, "serve_forever", lambda model, host, port, cfg, *a, **k: seen.append(cfg))
    runner = CliRunner()
    r = runner.invoke(serve.cli.serve_command, ["--model", str(MODEL), "--no-access-log",
                                                "--max-images-per-request", "8", "--max-queue", "32"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(serve.cli.serve_command, ["--model", str(MODEL)])
    assert r.exit_code == 0, r.output
    off, default = seen
    assert (off.access_log, off.max_images_per_request, off.max_queue) == (False, 8, 32)
    assert (default.access_log, default.max_images_per_request, default.max_body_bytes) == (True, 1024, 8 << 20)


def test_metrics_count_requests_batches_and_errors(server, client, images):
    inp = tritonclient_http.InferInput("x", [4, 1, 28, 28], "FP32")
    inp.set_data_from_numpy(images[:4].astype(np.float32))
    client.infer(NAME, [inp])
    infer_json(server, {"id": "no inputs"})
    _, _, text = request(f"{server.url}/metrics")
    text = text.decode()
    assert 'purifier_requests_total{code="200",endpoint="/v2/models/{model_name}/infer"}' in text
    assert "purifier_batch_images_bucket" in text and "purifier_request_seconds_bucket" in text
    assert 'purifier_errors_total{kind="422"}' in text
    assert "purifier_images_total" in text and "purifier_rejected_images_total" in text


def test_concurrent_requests_are_batched_and_a_full_queue_answers_503(images):
    cfg = ServerConfig(max_batch_size=64, max_wait_ms=300, max_queue=4)
    x = images[:2].astype(np.float32)
    doc = json.dumps(_doc(x)).encode()
    with BackgroundServer(MODEL, cfg=cfg) as srv:
        results = []

        def send():
            results.append(request(f"{srv.url}/v2/models/{NAME}/infer", "POST", doc,
                                   {"Content-Type": "application/json"}))

        threads = [threading.Thread(target=send) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(r[0] for r in results)
        busy = [r for r in results if r[0] == 503]
        assert codes.count(200) >= 2 and busy, codes
        assert busy[0][1].get("retry-after") == "1"
        assert "busy" in error_message(busy[0][2]) and "limit of 4 images" in error_message(busy[0][2])
        sizes = srv.app.state.batcher.batch_sizes
        assert max(sizes) == 4  # two 2-image requests gathered into one batch, the rest turned away


def test_schemathesis_finds_no_server_error(server):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    failures, calls = [], []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=25, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case):
            response = case.call()
            calls.append(operation.label)
            if response.status_code >= 500:
                failures.append((operation.label, response.status_code, response.text[:200]))

        check()
    assert not failures, failures
    assert any("infer" in c for c in calls) and any("purify" in c for c in calls), sorted(set(calls))


def test_server_imports_no_torch_and_the_cli_serves(tmp_path, torch_free):
    import subprocess
    import sys

    torch_free("import serve.server, serve.cli, serve.__main__", ("torch", "purifier", "export"))
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--model", str(MODEL), "--port", "0", "--device", "cpu"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "serving on http://127.0.0.1:" in line, line
        url = line.split("serving on ")[1].split()[0]
        code, _, body = request(url + "/v2/health/ready")
        assert code == 200 and json.loads(body)["ready"] is True
        lines = []
        reader = threading.Thread(target=lambda: lines.append(proc.stderr.readline()), daemon=True)
        reader.start()
        reader.join(timeout=30)
        assert lines and "GET /v2/health/ready 200 " in lines[0], lines  # the access log, on stderr by default
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    r = subprocess.run([sys.executable, "-m", "purifier.cli", "serve", "--model", str(tmp_path / "missing")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "missing" in r.stderr


def test_python_m_serve_takes_a_shipped_model_name_from_any_folder(tmp_path):
    """``python -m serve --model fashion-mnist`` from a folder holding no models serves the shipped model; an
    unknown name is a usage error that lists the names."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--model", "fashion-mnist", "--port", "0",
                             "--no-access-log"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        url = re.search(r"serving on (http://\S+)", line).group(1)
        assert request(f"{url}/v2/models/fashion-mnist/ready")[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "serve", "--model", "no-such-model"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no-such-model" in bad.stderr and "fashion-mnist-plain" in bad.stderr
