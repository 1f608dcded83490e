"""Load on the HTTP servers over loopback, side by side: the embedded server and Triton Inference Server.

    python -m benchmarks.serve_load --model models/middleware/cvae-alone-smooth200-tau3-prior1-mu2 --duration 60 \
        --concurrency 1,16,64

Each engine runs as its own process, as deployed: ``python -m serve`` (embedded) and ``python -m serve --engine
triton`` (tritonserver with the Python backend running the same OnnxPurifier; ``--engines triton:2`` adds a run with two
model instances, ``--instances 2``), with the same batching settings
(``--max-batch-size``, ``--max-wait-ms``: the embedded batcher's wait, Triton's max_queue_delay; ``--max-queue``:
images for the embedded server, requests for Triton, the same with one image per request) and the CPU provider. The load comes from this
process, one thread and one keep-alive connection per concurrent client, each sending one-image v2 inference
requests back to back (binary tensor extension, as tritonclient sends them; the same bytes to every engine) for
``--duration`` seconds per level. Batch sizes are read from each server's own Prometheus metrics (the embedded
batch histogram; Triton's inference and execution counts). Client and server share the machine's cores, and the
client is Python: on a small machine the figures are a floor, not the servers' ceiling.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from purifier import __version__  # noqa: E402
from purifier.data import load_dataset  # noqa: E402
from purifier.provenance import cpu_model, git_commit  # noqa: E402

from serve.models import MODELS, shipped_name  # noqa: E402
from benchmarks.results import markdown_table, write_results  # noqa: E402  (benchmarks/results.py)


def start_server(model: str, args: list[str]) -> tuple[subprocess.Popen, str, str]:
    """``python -m serve`` with ``args``; (process, base URL, metrics URL) once it says it serves."""
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--model", model, "--port", "0", *args], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        m = re.search(r"serving on (http://[^\s;]+)(?:.*metrics (http://[^\s;]+))?", line)
        if m:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
            return proc, m.group(1), m.group(2) or f"{m.group(1)}/metrics"
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {line}")
    proc.kill()
    raise RuntimeError("server did not start within 120 s")


def _metrics_text(url: str) -> str:
    host, rest = url.removeprefix("http://").split("/", 1)
    conn = http.client.HTTPConnection(*host.rsplit(":", 1), timeout=30)
    conn.request("GET", "/" + rest)
    text = conn.getresponse().read().decode()
    conn.close()
    return text


def batch_stats(url: str) -> dict[str, float]:
    """Batching so far, from the server's Prometheus text: ``count`` (onnxruntime calls), ``sum`` (images), and
    the embedded server's cumulative histogram buckets (Triton: inference and execution counts only)."""
    text = _metrics_text(url)
    out = {}
    for m in re.finditer(r'^purifier_batch_images_(bucket\{le="([^"]+)"\}|sum|count) (\S+)$', text, re.M):
        out[m.group(2) or m.group(1)] = float(m.group(3))
    for key, metric in (("sum", "nv_inference_count"), ("count", "nv_inference_exec_count"),
                        ("success", "nv_inference_request_success"), ("queue_us", "nv_inference_queue_duration_us"),
                        ("infer_us", "nv_inference_compute_infer_duration_us")):
        m = re.search(rf"^{metric}\{{[^}}]*\}} (\S+)$", text, re.M)
        if m:
            out[key] = float(m.group(1))
    return out


def request_body(image: np.ndarray) -> tuple[bytes, dict]:
    blob = image.astype(np.float32).tobytes()
    head = json.dumps({"inputs": [{"name": "x", "shape": [1, *image.shape], "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(blob)}}],
                       "outputs": [{"name": "predicted_class"}, {"name": "rejected"}]}).encode()
    return head + blob, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}


def run_level(host: str, port: int, path: str, bodies: list, concurrency: int, duration: float,
              metrics_url: str) -> dict:
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    codes: dict[int, int] = {}
    lock = threading.Lock()
    stop = time.monotonic() + duration

    def worker(i):
        conn = http.client.HTTPConnection(host, port, timeout=60)
        j = i
        while time.monotonic() < stop:
            body, headers = bodies[j % len(bodies)]
            j += concurrency
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body, headers)
                resp = conn.getresponse()
                resp.read()
                code = resp.status
            except (OSError, http.client.HTTPException):
                code = -1
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=60)
            dt = time.perf_counter() - t0
            if code == 200:
                latencies[i].append(dt)
            else:
                errors[i] += 1
            with lock:
                codes[code] = codes.get(code, 0) + 1
        conn.close()

    before = batch_stats(metrics_url)
    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = batch_stats(metrics_url)
    lat = sorted(x for per in latencies for x in per)
    batches = after.get("count", 0) - before.get("count", 0)
    images = after.get("sum", 0) - before.get("sum", 0)
    buckets = {le: after[le] - before.get(le, 0) for le in after
               if le not in ("sum", "count", "success", "queue_us", "infer_us")}
    served = after.get("success", 0) - before.get("success", 0)
    # Triton's own account of where a request's time went: waiting in its queue, or in the model's execute
    triton = ({"queue_ms_mean": (after["queue_us"] - before["queue_us"]) / served / 1000,
               "compute_infer_ms_mean": (after["infer_us"] - before["infer_us"]) / served / 1000}
              if served and "queue_us" in after else None)

    def pct(q):
        return 1000 * lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None

    return {"concurrency": concurrency, "duration_s": wall, "requests_ok": len(lat), "errors": sum(errors),
            "status_codes": {str(k): v for k, v in sorted(codes.items())}, "throughput_rps": len(lat) / wall,
            "latency_ms": {"p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99),
                           "mean": 1000 * statistics.fmean(lat) if lat else None},
            "batches": batches, "mean_batch_images": images / batches if batches else None,
            "batch_size_histogram_cumulative": buckets, "triton_request_time": triton}


ENGINE = re.compile(r"embedded|triton(?::(\d+))?")  # triton:N: N model instances (default 1, as embedded's 1 worker)


def engine_args(engine: str, max_batch_size: int, max_wait_ms: float, max_queue: int) -> list[str]:
    common = ["--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms), "--max-queue",
              str(max_queue), "--device", "cpu"]
    if engine.startswith("triton"):
        instances = ENGINE.fullmatch(engine).group(1) or "1"
        return ["--engine", "triton", "--grpc-port", "0", "--metrics-port", "0", "--instances", instances, *common]
    return [*common, "--no-access-log"]


def label(engine: str) -> str:
    if engine == "embedded":
        return "embedded"
    n = ENGINE.fullmatch(engine).group(1)
    return f"Triton x{n}" if n and n != "1" else "Triton"


def run_engines(model: str, args: dict[str, list[str]], bodies: list, levels: list[int],
                duration: float) -> dict[str, list[dict]]:
    """Every engine's server started at once, then each level run on one engine after the other (embedded, Triton,
    next level), so a change in the machine's other load falls on every engine alike."""
    servers, results = {}, {e: [] for e in args}
    try:
        for engine, server_args in args.items():
            proc, url, metrics_url = start_server(model, server_args)
            host, port = url.removeprefix("http://").rsplit(":", 1)
            servers[engine] = (proc, host, int(port), metrics_url)
            conn = http.client.HTTPConnection(host, int(port))
            conn.request("GET", "/v2/health/ready")
            assert conn.getresponse().status == 200, f"{engine} is not ready"
            conn.close()
        folder = Path(model) if Path(model).is_dir() else Path(model).parent
        name = shipped_name(folder) or folder.name  # the name the server gives it (serve.protocol.served_name)
        path = f"/v2/models/{name}/infer"
        for _, host, port, metrics_url in servers.values():
            run_level(host, port, path, bodies, 4, min(3.0, duration), metrics_url)  # warm-up, not reported
        for c in levels:
            for engine, (_, host, port, metrics_url) in servers.items():
                results[engine].append(run_level(host, port, path, bodies, c, duration, metrics_url))
    finally:
        for proc, *_ in servers.values():
            proc.terminate()
            proc.wait(timeout=60)
    return results


def side_by_side(engines: dict[str, dict]) -> str:
    """One row per concurrency level, each engine's figure beside the other's."""
    names = list(engines)
    by_level = {n: {r["concurrency"]: r for r in e["levels"]} for n, e in engines.items()}
    levels = list(by_level[names[0]])
    headers = ["concurrency"]
    for what in ("requests/s", "p50 ms", "p99 ms"):
        headers += [f"{what} {label(n)}" for n in names]
    headers += ["errors " + " / ".join(map(label, names)), "mean batch " + " / ".join(map(label, names))]
    rows = []
    for c in levels:
        r = [by_level[n][c] for n in names]
        rows.append([c, *(f"{x['throughput_rps']:.0f}" for x in r), *(f"{x['latency_ms']['p50']:.2f}" for x in r),
                     *(f"{x['latency_ms']['p99']:.2f}" for x in r), " / ".join(str(x["errors"]) for x in r),
                     " / ".join(f"{x['mean_batch_images']:.1f}" if x["batches"] else "—" for x in r)])
    return markdown_table(headers, rows)


@click.command()
@click.option("--model", default=str(MODELS["fashion-mnist"].path), show_default=True)
@click.option("--engines", default="embedded,triton", show_default=True,
              help="Comma-separated: embedded, triton, triton:N (N model instances).")
@click.option("--duration", default=60.0, show_default=True, help="Seconds per concurrency level.")
@click.option("--concurrency", default="1,16,64", show_default=True)
@click.option("--max-batch-size", default=64, show_default=True)
@click.option("--max-wait-ms", default=2.0, show_default=True)
@click.option("--max-queue", default=256, show_default=True)
@click.option("--out", default=str(ROOT / "results" / "serve.json"), show_default=True)
def main(model, engines, duration, concurrency, max_batch_size, max_wait_ms, max_queue, out):
    levels = [int(c) for c in concurrency.split(",")]
    names = [e.strip() for e in engines.split(",") if e.strip()]
    bad = [e for e in names if not ENGINE.fullmatch(e)]
    if bad or not names or len(set(names)) < len(names):
        raise click.BadParameter(f"{engines!r}: name each engine once, of embedded, triton, triton:N",
                                 param_hint="--engines")
    x = load_dataset("fashion-mnist", "test").x[:256]
    bodies = [request_body(img) for img in x]
    args = {e: engine_args(e, max_batch_size, max_wait_ms, max_queue) for e in names}
    load = os.getloadavg()
    levels_by_engine = run_engines(model, args, bodies, levels, duration)
    runs = {e: {"server_command": f"python -m serve --model MODEL --port 0 {' '.join(args[e])}",
                "levels": levels_by_engine[e]} for e in names}
    report = {"command": "python -m benchmarks.serve_load " + " ".join(sys.argv[1:]), "commit": git_commit(ROOT),
              "version": __version__, "model": model,
              "settings": {"max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms, "max_queue": max_queue,
                           "device": "cpu", "duration_s_per_level": duration, "concurrency": levels,
                           "warm_up": "3 s at concurrency 4 per engine, not reported",
                           "order": "every server up; each level on one engine after the other"},
              "request": "one image per request, FP32, binary tensor extension, outputs predicted_class + rejected",
              "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average_before": load, "load_average_after": os.getloadavg(),
                          "note": "client and servers share the machine"},
              "engines": runs}
    table = side_by_side(runs)
    write_results(out, report, "# HTTP serving under load (loopback): embedded server and Triton", table)
    click.echo(table)


if __name__ == "__main__":
    main()
