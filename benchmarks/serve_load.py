"""Load on the HTTP server over loopback: throughput, latency percentiles, errors and the batches it formed.

    python benchmarks/serve_load.py --model models/fashion-mnist --duration 60 --concurrency 1,16,64

The server runs as its own process (``python -m serve``, as deployed); the load comes from this process,
one thread and one keep-alive connection per concurrent client, each sending one-image v2 inference requests
back to back (binary tensor extension, as tritonclient sends them) for ``--duration`` seconds per level. Batch
sizes are read from the server's own Prometheus histogram. Client and server share the machine's cores, and the
client is Python: on a small machine the figures are a floor, not the server's ceiling.
"""
from __future__ import annotations

import http.client
import json
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
sys.path.insert(0, str(ROOT))

from purifier import __version__  # noqa: E402
from purifier.data import load_dataset  # noqa: E402
from purifier.provenance import cpu_model, git_commit  # noqa: E402

from results import markdown_table, write_results  # noqa: E402  (benchmarks/results.py)


def start_server(model: str, args: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--model", model, "--port", "0", *args], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        m = re.search(r"serving on (http://\S+)", line)
        if m:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
            return proc, m.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {line}")
    proc.kill()
    raise RuntimeError("server did not start within 60 s")


def batch_histogram(host: str, port: int) -> dict[str, float]:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    out = {}
    for m in re.finditer(r'^purifier_batch_images_(bucket\{le="([^"]+)"\}|sum|count) (\S+)$', text, re.M):
        out[m.group(2) or m.group(1)] = float(m.group(3))
    return out


def request_body(image: np.ndarray) -> tuple[bytes, dict]:
    blob = image.astype(np.float32).tobytes()
    head = json.dumps({"inputs": [{"name": "x", "shape": [1, *image.shape], "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(blob)}}],
                       "outputs": [{"name": "predicted_class"}, {"name": "rejected"}]}).encode()
    return head + blob, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}


def run_level(host: str, port: int, path: str, bodies: list, concurrency: int, duration: float) -> dict:
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

    before = batch_histogram(host, port)
    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = batch_histogram(host, port)
    lat = sorted(x for per in latencies for x in per)
    batches = after.get("count", 0) - before.get("count", 0)
    images = after.get("sum", 0) - before.get("sum", 0)
    buckets = {le: after[le] - before.get(le, 0) for le in after if le not in ("sum", "count")}

    def pct(q):
        return 1000 * lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None

    return {"concurrency": concurrency, "duration_s": wall, "requests_ok": len(lat), "errors": sum(errors),
            "status_codes": {str(k): v for k, v in sorted(codes.items())}, "throughput_rps": len(lat) / wall,
            "latency_ms": {"p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99),
                           "mean": 1000 * statistics.fmean(lat) if lat else None},
            "batches": batches, "mean_batch_images": images / batches if batches else None,
            "batch_size_histogram_cumulative": buckets}


@click.command()
@click.option("--model", default=str(ROOT / "models" / "fashion-mnist"), show_default=True)
@click.option("--duration", default=60.0, show_default=True, help="Seconds per concurrency level.")
@click.option("--concurrency", default="1,16,64", show_default=True)
@click.option("--max-batch-size", default=64, show_default=True)
@click.option("--max-wait-ms", default=2.0, show_default=True)
@click.option("--max-queue", default=256, show_default=True)
@click.option("--out", default=str(ROOT / "results" / "serve.json"), show_default=True)
def main(model, duration, concurrency, max_batch_size, max_wait_ms, max_queue, out):
    levels = [int(c) for c in concurrency.split(",")]
    x = load_dataset("fashion-mnist", "test").x[:256]
    bodies = [request_body(img) for img in x]
    server_args = ["--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms),
                   "--max-queue", str(max_queue), "--device", "cpu", "--no-access-log"]  # as results/serve.json ran
    proc, url = start_server(model, server_args)
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        conn = http.client.HTTPConnection(host, int(port))
        conn.request("GET", "/v2/models")
        conn.getresponse().read()
        conn.request("GET", "/v2/health/ready")
        assert conn.getresponse().status == 200
        conn.close()
        name = Path(model).name if Path(model).is_dir() else Path(model).parent.name
        path = f"/v2/models/{name}/infer"
        run_level(host, int(port), path, bodies, 4, min(3.0, duration))  # warm-up, not reported
        results = [run_level(host, int(port), path, bodies, c, duration) for c in levels]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    report = {"command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]), "commit": git_commit(ROOT),
              "version": __version__, "model": model, "server_args": server_args, "request": "one image per request, "
              "FP32, binary tensor extension, outputs predicted_class + rejected", "duration_s": duration,
              "machine": {"cpu": cpu_model(), "note": "client and server share the machine"}, "levels": results}
    rows = [[r["concurrency"], f"{r['throughput_rps']:.0f}", f"{r['latency_ms']['p50']:.2f}",
             f"{r['latency_ms']['p99']:.2f}", r["errors"], f"{r['mean_batch_images']:.1f}" if r["batches"] else "—",
             r["requests_ok"]] for r in results]
    table = markdown_table(["concurrency", "requests/s", "p50 ms", "p99 ms", "errors", "mean batch (images)",
                            "requests"], rows)
    write_results(out, report, "# HTTP serving under load (loopback)", table)
    click.echo(table)


if __name__ == "__main__":
    main()
