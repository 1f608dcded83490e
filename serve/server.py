"""The HTTP server: the Open Inference Protocol (KServe v2) over one onnxruntime session, with micro-batching.

    purifier serve --model fashion-mnist --port 8000      (or: python -m serve --model ...)

Endpoints: ``GET /v2/health/live``, ``/v2/health/ready``, ``/v2``, ``/v2/models/{name}``,
``/v2/models/{name}/ready``, ``POST /v2/models/{name}/infer`` (JSON tensors, or the binary tensor extension
that tritonclient uses), ``POST /v1/purify`` (an image upload, JSON back), ``GET /metrics`` (Prometheus).

Concurrent requests are gathered into one batch (up to ``max_batch_size`` images, waiting at most
``max_wait_ms`` for more) and run on a single worker thread; the queue is bounded, and a full queue answers
503 with Retry-After. Bad input is a 4xx whose message names the offending value, never a 500. Every error, on
every endpoint (FastAPI's own request validation and routing's 404/405 included), is ``{"error": "<message>"}``.
Each request writes one line to the ``purifier.access`` logger (``ServerConfig.access_log``).
Here: the application, its routes and error handling; the v2 encoding and decoding is ``protocol``, the batching
``batcher``. Imports neither torch nor purifier nor export.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batch import decode_image
from .png import encode_png
from .runtime import OnnxPurifier
from .batcher import Batcher, Metrics
from .protocol import (INPUT_DTYPES, NP_TO_V2, ApiError, InferRequest, RequestedOutput, _outputs_meta, parse_infer,
                       read_body, served_name, tensor_from)

IMAGE_FORMATS = "PNG/JPEG/BMP/GIF/TIFF/WebP"
ACCESS_LOGGER = "purifier.access"
access_log = logging.getLogger(ACCESS_LOGGER)


@dataclass
class ServerConfig:
    max_batch_size: int = 64
    max_wait_ms: float = 2.0
    max_queue: int = 256        # images waiting; beyond it requests get 503
    max_body_bytes: int = 8 << 20
    max_images_per_request: int = 1024
    model_name: str | None = None
    access_log: bool = True     # one line per request to the "purifier.access" logger

    def __post_init__(self):
        for k in ("max_batch_size", "max_queue", "max_body_bytes", "max_images_per_request"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be at least 1, got {getattr(self, k)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")


def _without_reprs(text: str) -> str:
    """Pillow's messages name the file object (``<_io.BytesIO object at 0x7f...>``): say 'the upload' instead."""
    return re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the upload", text)


def decode_upload(data: bytes, filename: str | None, image_shape: tuple[int, int, int],
                  resize: bool) -> np.ndarray:
    """An uploaded image file -> float32 1 x C x H x W in [0, 1]; an ``ApiError`` naming the upload (its filename
    and size) and what to send instead."""
    from PIL import Image, UnidentifiedImageError

    what = f"upload {filename!r} ({len(data)} bytes)"
    if not data:
        raise ApiError(400, f"upload {filename!r} is empty (0 bytes); send a {IMAGE_FORMATS} image")
    try:
        with Image.open(io.BytesIO(data)) as img:  # the header only: the size is known before decoding
            size = img.size
    except UnidentifiedImageError:
        raise ApiError(400, f"{what} is not an image: it is not a {IMAGE_FORMATS} file that Pillow can read; "
                            f"send an image file") from None
    except Image.DecompressionBombError as exc:
        raise ApiError(413, f"{what}: {_without_reprs(str(exc))}") from None
    except Exception as exc:  # a corrupt header raises many types
        raise ApiError(400, f"{what} is not a readable image ({type(exc).__name__}: {_without_reprs(str(exc))}); "
                            f"send a {IMAGE_FORMATS} file") from None
    _, h, w = image_shape
    if size != (w, h) and not resize:
        raise ApiError(400, f"{what} is {size[0]} x {size[1]} (W x H), the model expects {w} x {h}; resize it "
                            f"before uploading, or add the query parameter resize=true (POST /v1/purify?resize=true)")
    try:
        return decode_image(data, image_shape, resize)[None]
    except ValueError as exc:  # e.g. a truncated file: the header reads, the pixels do not
        reason = _without_reprs(str(exc)).removeprefix("unreadable image ")
        raise ApiError(400, f"{what} could not be decoded {reason}; send a complete {IMAGE_FORMATS} file") from None


def _purify_how(request: Request) -> str:
    return (f"POST /v1/purify takes multipart/form-data with the image in the form field 'file' "
            f"(curl -F file=@image.png {request.base_url}v1/purify)")


def _form_fields(request: Request) -> list[str] | None:
    """The field names of the form FastAPI already parsed for this request (None if it parsed none)."""
    form = getattr(request, "_form", None)  # Starlette caches the parsed form on the request
    return None if form is None else list(form.keys())


def validation_error(request: Request, errors: list[dict], model_name: str) -> tuple[int, str]:
    """FastAPI's request-validation errors -> (status, one message naming each offending value and the fix).

    Only ``/v1/purify`` has FastAPI-validated parameters (the v2 endpoints validate by hand), so the body is a
    form upload: a body of another Content-Type is 415, a form without a file, or a bad query value, 422.
    """
    ctype = request.headers.get("content-type", "")
    multipart = ctype.split(";")[0].strip().lower() == "multipart/form-data"
    parts, status = [], 422
    for e in errors:
        loc = [str(p) for p in e.get("loc") or ()]
        where, field = (loc[0], ".".join(loc[1:])) if loc else ("body", "")
        kind, value = e.get("type", ""), e.get("input")
        if where == "body" and not multipart:
            status = 415
            hint = (f"; for JSON tensors use POST /v2/models/{model_name}/infer"
                    if "json" in ctype.lower() else "")
            parts.append(f"the request body is {ctype or 'of no Content-Type'!r}, not multipart/form-data; "
                         f"{_purify_how(request)}{hint}")
        elif where == "body" and kind == "missing":
            fields = _form_fields(request)
            has = f" (the form has {fields})" if fields else " (the form is empty)" if fields is not None else ""
            parts.append(f"the form has no field {field!r}{has}; {_purify_how(request)}")
        elif where == "body":
            parts.append(f"form field {field!r} holds text, not a file; {_purify_how(request)}")
        elif kind == "bool_parsing":
            parts.append(f"query parameter {field}={value!r} is not a boolean; use {field}=true or {field}=false")
        else:
            parts.append(f"{where} parameter {field}={value!r}: {e.get('msg', kind)}")
    return status, "; ".join(dict.fromkeys(parts)) or "invalid request"


def routing_error(request: Request, exc: StarletteHTTPException, routes: list[str]) -> str:
    """Starlette's own HTTPExceptions (routing's 404/405, a body it cannot parse) -> a message with the fix."""
    method, path = request.method, request.url.path
    if exc.status_code == 404:
        return f"no endpoint at {path!r}; the endpoints are {', '.join(routes)} (GET /docs describes them)"
    if exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        return f"method {method} is not allowed on {path!r}; use {allow or 'another method'}"
    message = str(exc.detail).rstrip(".")
    if path == "/v1/purify" and exc.status_code == 400:  # the multipart body did not parse
        return f"the multipart/form-data body cannot be parsed ({message}); {_purify_how(request)}"
    return f"{message} ({method} {path})"


def _log_access_to_stderr() -> None:
    """Give the access logger a stderr handler at INFO, unless the application configured logging itself."""
    if not access_log.hasHandlers():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        access_log.addHandler(handler)
    if access_log.level == logging.NOTSET:
        access_log.setLevel(logging.INFO)


def create_app(model: str | os.PathLike, cfg: ServerConfig | None = None, device: str = "auto",
               threads: int | None = None) -> FastAPI:
    cfg = cfg or ServerConfig()
    runtime = OnnxPurifier(model, device=device, threads=threads)
    name = served_name(runtime, cfg.model_name)
    metrics = Metrics()
    batcher = Batcher(runtime, cfg, metrics)
    outputs_meta = _outputs_meta(runtime)
    output_names = [o["name"] for o in outputs_meta]

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="purifier", version=str(runtime.metadata.get("purifier_version", "unknown")), lifespan=lifespan,
                  description="PuVAE purification over the Open Inference Protocol (KServe v2).")
    app.state.runtime, app.state.batcher, app.state.metrics, app.state.model_name = runtime, batcher, metrics, name

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        metrics.errors.labels(str(status)).inc()
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        return error(*validation_error(request, list(exc.errors()), name))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        routes = [f"{m} {r.path}" for r in app.routes if getattr(r, "include_in_schema", False)
                  for m in sorted(getattr(r, "methods", ()))]
        return error(exc.status_code, routing_error(request, exc, routes), exc.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):  # still logged with its traceback by uvicorn
        return error(500, f"internal server error ({type(exc).__name__}) on {request.method} {request.url.path}; "
                          f"the server's log has the traceback")

    @app.middleware("http")
    async def measure(request: Request, call_next):
        start, status = time.perf_counter(), 500
        try:
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > cfg.max_body_bytes:  # refuse before any body is read
                response = error(413, f"request body of {declared} bytes exceeds the limit of "
                                      f"{cfg.max_body_bytes} bytes")
            else:
                response = await call_next(request)
            status = response.status_code
            return response
        finally:
            seconds = time.perf_counter() - start
            endpoint = getattr(request.scope.get("route"), "path", "unmatched")
            metrics.requests.labels(endpoint, str(status)).inc()
            metrics.latency.labels(endpoint).observe(seconds)
            if cfg.access_log:
                client = f"{request.client.host}:{request.client.port}" if request.client else "-"
                access_log.info("%s %s %d %.1fms %s", request.method, request.url.path, status, seconds * 1000,
                                client, extra={"http_method": request.method, "http_path": request.url.path,
                                               "http_status": status, "duration_ms": seconds * 1000,
                                               "client": client})

    def check_model(model_name: str, version: str | None = None):
        if model_name != name:
            raise ApiError(404, f"unknown model {model_name!r}; this server serves {name!r}")
        if version is not None and version != "1":
            raise ApiError(404, f"unknown version {version!r} of model {name!r}; it has version '1'")

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        return {"ready": batcher.task is not None and not batcher.task.done()}

    @app.get("/v2")
    async def server_metadata():
        return {"name": "purifier", "version": str(runtime.metadata.get("purifier_version", "unknown")),
                "extensions": ["binary_tensor_data"]}

    def model_metadata():
        return {"name": name, "versions": ["1"], "platform": "onnxruntime_onnx",
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, *runtime.image_shape]}],
                "outputs": outputs_meta,
                "parameters": {"class_names": runtime.class_names, "rejection_threshold": runtime.threshold,
                               "accepted_input_datatypes": list(INPUT_DTYPES)}}

    @app.get("/v2/models/{model_name}")
    async def metadata(model_name: str):
        check_model(model_name)
        return model_metadata()

    @app.get("/v2/models/{model_name}/versions/{version}")
    async def metadata_version(model_name: str, version: str):
        check_model(model_name, version)
        return model_metadata()

    @app.get("/v2/models/{model_name}/ready")
    async def model_ready(model_name: str):
        check_model(model_name)
        return {"name": name, "ready": True}

    infer_body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": InferRequest.model_json_schema(ref_template="#/components/schemas/{model}")}}}}

    @app.post("/v2/models/{model_name}/infer", openapi_extra=infer_body)
    async def infer(model_name: str, request: Request):
        check_model(model_name)
        return await _infer(request)

    @app.post("/v2/models/{model_name}/versions/{version}/infer", openapi_extra=infer_body)
    async def infer_version(model_name: str, version: str, request: Request):
        check_model(model_name, version)
        return await _infer(request)

    async def _infer(request: Request):
        body = await read_body(request, cfg.max_body_bytes)
        req, tail = parse_infer(body, request.headers.get("inference-header-content-length"))
        if len(req.inputs) != 1:
            raise ApiError(400, f"the model takes one input 'x', got {len(req.inputs)}: "
                                f"{[i.name for i in req.inputs]}")
        x = tensor_from(req.inputs[0], tail, runtime, cfg.max_images_per_request)
        wanted = req.outputs or [RequestedOutput(name=n) for n in output_names]
        unknown = [o.name for o in wanted if o.name not in output_names]
        if unknown:
            raise ApiError(400, f"unknown output(s) {unknown}; the model has {output_names}")
        out = await batcher.submit(x)
        metrics.images.inc(len(x))
        metrics.rejections.inc(int(out["rejected"].sum()))
        default_binary = bool((req.parameters or {}).get("binary_data_output", False))
        head, blobs = [], []
        for o in wanted:
            arr = np.ascontiguousarray(out[o.name])
            entry = {"name": o.name, "datatype": NP_TO_V2[arr.dtype], "shape": list(arr.shape)}
            if (o.parameters or {}).get("binary_data", default_binary):
                blob = arr.tobytes()
                entry["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                entry["data"] = arr.ravel().tolist()
            head.append(entry)
        doc = {"model_name": name, "model_version": "1", "outputs": head}
        if req.id is not None:
            doc["id"] = req.id
        text = json.dumps(doc).encode()
        if not blobs:
            return Response(text, media_type="application/json")
        return Response(text + b"".join(blobs), media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(len(text))})

    @app.post("/v1/purify")
    async def purify(request: Request, file: UploadFile = File(..., description="An image file (PNG, JPEG, ...)"),
                     png: bool = Query(False, description="Also return the purified image as base64 PNG"),
                     resize: bool = Query(False, description="Resize an image of another size")):
        data = await file.read(cfg.max_body_bytes + 1)  # a declared Content-Length over it never got here
        if len(data) > cfg.max_body_bytes:
            raise ApiError(413, f"upload {file.filename!r} exceeds the limit of {cfg.max_body_bytes} bytes")
        x = decode_upload(bytes(data), file.filename, runtime.image_shape, resize)
        out = await batcher.submit(x)
        metrics.images.inc(1)
        metrics.rejections.inc(int(out["rejected"].sum()))
        best = float(out["scores"][0].min())
        doc = {"filename": file.filename, "chosen_class": int(out["chosen_class"][0]),
               "chosen_class_name": runtime.class_names[int(out["chosen_class"][0])],
               "score": best, "margin": float(out["margin"][0]), "rejected": bool(out["rejected"][0]),
               "rejection_threshold": runtime.threshold, "recon_error": best}  # recon_error: deprecated alias of score
        if "predicted_class" in out:
            k = int(out["predicted_class"][0])
            doc.update({"predicted_class": k, "class_name": runtime.class_names[k]})
        if png:
            p = out["purified"][0]
            p = p[0] if p.shape[0] == 1 else p.transpose(1, 2, 0)
            doc["purified_png"] = base64.b64encode(encode_png(p)).decode()
        return doc

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _server(model, host, port, cfg, device, threads, log_level):
    import socket

    import uvicorn

    app = create_app(model, cfg, device, threads)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # accepted connections inherit it: without it, a response's header and body writes meet the client's
    # delayed ACK and every request costs about 40 ms on loopback
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    url = f"http://{host}:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False, timeout_keep_alive=30))
    return server, sock, url, app


def _when_listening(server, on_ready, url):
    """Call ``on_ready(url)`` from a helper thread once uvicorn has started listening."""
    import threading

    def watch():
        while not server.started:
            if server.should_exit:
                return
            time.sleep(0.01)
        on_ready(url)

    threading.Thread(target=watch, daemon=True).start()


def serve_forever(model, host: str = "127.0.0.1", port: int = 8000, cfg: ServerConfig | None = None,
                  device: str = "auto", threads: int | None = None, on_ready=None, log_level: str = "warning"):
    """Run the server (blocking). Port 0 picks a free port; ``on_ready(url)`` is called once it listens.

    With ``cfg.access_log`` (the default), the access lines go to stderr unless logging is configured already.
    """
    cfg = cfg or ServerConfig()
    if cfg.access_log:
        _log_access_to_stderr()
    server, sock, url, _ = _server(model, host, port, cfg, device, threads, log_level)
    if on_ready is not None:
        _when_listening(server, on_ready, url)
    server.run(sockets=[sock])


class BackgroundServer:
    """The real server on a thread of this process, for tests and load benchmarks::

        with BackgroundServer("fashion-mnist") as srv:
            requests.get(srv.url + "/v2/health/ready")
    """

    def __init__(self, model, host: str = "127.0.0.1", port: int = 0, cfg: ServerConfig | None = None,
                 device: str = "cpu", threads: int | None = None):
        self.args = (model, host, port, cfg, device, threads)

    def __enter__(self) -> "BackgroundServer":
        import threading

        self.server, self.sock, self.url, self.app = _server(*self.args, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server at {self.url} did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
