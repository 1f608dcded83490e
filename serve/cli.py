"""The ``serve`` command, shared by ``purifier serve`` and ``python -m serve``: a thin layer over server.py."""
from __future__ import annotations

import click


def _model(ctx, param, value):
    from .models import resolve

    try:
        return str(resolve(value))
    except FileNotFoundError as exc:
        raise click.BadParameter(str(exc)) from exc


def _names() -> str:
    from .models import known

    return known()


@click.command("serve")
@click.option("--model", required=True, callback=_model,
              help=f"A shipped model name ({_names()}), a model directory (pipeline.onnx or purifier.onnx) or an "
                   f".onnx file.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0: any free port.")
@click.option("--name", "model_name", help="Model name in the v2 URLs (default: the model directory's name).")
@click.option("--max-batch-size", default=64, show_default=True, type=click.IntRange(min=1),
              help="Most images gathered into one onnxruntime batch.")
@click.option("--max-wait-ms", default=2.0, show_default=True, type=click.FloatRange(min=0),
              help="Longest a request waits for others to fill a batch.")
@click.option("--max-queue", default=256, show_default=True, type=click.IntRange(min=1),
              help="Most images waiting; beyond it requests get 503 with Retry-After.")
@click.option("--max-body-mb", default=8.0, show_default=True, type=click.FloatRange(min=0.001),
              help="Largest request body accepted (413 beyond it).")
@click.option("--max-images-per-request", default=1024, show_default=True, type=click.IntRange(min=1),
              help="Most images in one v2 inference request (413 beyond it).")
@click.option("--access-log/--no-access-log", default=True, show_default=True,
              help="One line per request (method, path, status, ms, client) to stderr, logger 'purifier.access'.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="onnxruntime intra-op threads (default: all cores).")
@click.option("--engine", type=click.Choice(["embedded", "triton"]), default="embedded", show_default=True,
              help="embedded: this process's server; triton: Triton Inference Server (tritonserver, Python backend "
                   "running the same runtime) with its dynamic batcher, HTTP on --port and gRPC on --grpc-port.")
@click.option("--grpc-port", default=8001, show_default=True, type=click.IntRange(0, 65535),
              help="--engine triton: gRPC port (0: any free port).")
@click.option("--metrics-port", default=8002, show_default=True, type=click.IntRange(0, 65535),
              help="--engine triton: Prometheus metrics port (0: any free port).")
@click.option("--instances", default=1, show_default=True, type=click.IntRange(min=1),
              help="--engine triton: model instances, each a Python process with its own onnxruntime session.")
@click.option("--tritonserver", "triton_dir", type=click.Path(exists=True, file_okay=False),
              help="--engine triton: a Triton installation folder (bin/tritonserver, backends/); default: the "
                   "nvidia-pytriton wheel's, then /opt/tritonserver.")
@click.option("--precision", type=click.Choice(["fp32", "int8"]),
              help="fp32 (a model directory's default) or int8: its pipeline.int8.onnx (purifier export --int8). "
                   "An .onnx file runs at the precision its metadata names.")
def serve_command(model, host, port, model_name, max_batch_size, max_wait_ms, max_queue, max_body_mb,
                  max_images_per_request, access_log, device, threads, precision, engine, grpc_port, metrics_port,
                  instances, triton_dir):
    """Serve the model over HTTP: Open Inference Protocol v2, /v1/purify, /metrics.

    Example: purifier serve --model fashion-mnist --port 8000

    --engine triton runs the same model in Triton Inference Server instead (v2 over HTTP and gRPC, /metrics on
    --metrics-port; no /v1/purify).
    """
    from .server import ServerConfig, serve_forever

    cfg = ServerConfig(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue,
                       max_body_bytes=int(max_body_mb * (1 << 20)), max_images_per_request=max_images_per_request,
                       model_name=model_name, access_log=access_log)
    try:
        from .runtime import select_model

        model = str(select_model(model, precision))
        if engine == "triton":
            _serve_triton(model, host, port, grpc_port, metrics_port, model_name, max_batch_size, max_wait_ms,
                          max_queue, device, threads, instances, triton_dir)
            return
        _refuse_for_engine("embedded", ("grpc_port", "metrics_port", "instances", "triton_dir"))
        serve_forever(model, host, port, cfg, device, threads,
                      on_ready=lambda url: click.echo(f"serving on {url} (Ctrl-C stops)", err=True))
    except (FileNotFoundError, ValueError) as exc:
        raise click.UsageError(str(exc)) from exc
    except OSError as exc:
        raise click.UsageError(f"cannot listen on {host}:{port}: {exc}") from exc


def _refuse_for_engine(engine: str, names: tuple[str, ...]) -> None:
    """Options the engine does not have, given on the command line, are a usage error naming them."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    flags = {p.name: p.opts[0] for p in ctx.command.params}
    given = [flags[n] for n in names if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE]
    if given:
        raise click.UsageError(f"{', '.join(given)}: not an option of --engine {engine}")


def _serve_triton(model, host, port, grpc_port, metrics_port, model_name, max_batch_size, max_wait_ms, max_queue,
                  device, threads, instances, triton_dir):
    from .triton import find_tritonserver, serve_triton

    # Triton has its own request limits and log; the queue counts requests there, images here
    _refuse_for_engine("triton", ("max_body_mb", "max_images_per_request", "access_log"))
    install = find_tritonserver(triton_dir)

    def ready(server):
        click.echo(f"serving on {server.url} with Triton (gRPC {server.grpc_url}, metrics {server.metrics_url}; "
                   f"Ctrl-C stops)", err=True)

    try:
        code = serve_triton(model, host, port, grpc_port, metrics_port, model_name, max_batch_size, max_wait_ms,
                            max_queue, device, threads, install, on_ready=ready, instances=instances)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc
    if code:
        raise SystemExit(code)
