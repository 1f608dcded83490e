"""Triton Inference Server with its Python backend running ``OnnxPurifier``: the model repository and a launcher.

    # config.pbtxt, 1/model.py, 1/model.onnx:
    write_python_repo("models/middleware/cvae-alone-smooth200-tau3-prior1-mu2", "triton-repo", "fashion-mnist")
    with TritonServer("triton-repo") as srv:                                      # the tritonserver binary
        srv.url, srv.grpc_url
    # both in one (purifier serve --engine triton):
    serve_triton("models/middleware/cvae-alone-smooth200-tau3-prior1-mu2", http_port=8000)

The Python-backend model (``serve.triton_model``) answers with every output ``purifier serve`` gives: the graph's
(``purified``, ``chosen_class``, ``scores``, ``logits``) and ``predicted_class``, ``margin``, ``rejected``, then
``recon_error`` (the deprecated alias of ``scores``, the same values), all computed by ``OnnxPurifier`` itself.
Triton's dynamic batcher gathers requests into one onnxruntime call.

The binary is the one the ``nvidia-pytriton`` wheel ships (``pytriton/tritonserver``: ``bin/tritonserver``, the
Python backend, one backend stub per Python version; CPU only), or any Triton installation given as a folder with
``bin/`` and ``backends/`` (``/opt/tritonserver`` in NVIDIA's container). The stub embeds ``libpython``; it is
started with this interpreter's library folder first on ``LD_LIBRARY_PATH`` and this interpreter's ``sys.path`` as
``PYTHONPATH``, so it runs the same Python with the same packages (numpy, onnxruntime, serve).
Imports neither torch nor onnx.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .files import atomic_write_bytes
from .protocol import _outputs_meta, served_name
from .runtime import OnnxPurifier

V2_TO_TRITON = {"FP32": "TYPE_FP32", "FP64": "TYPE_FP64", "FP16": "TYPE_FP16", "INT64": "TYPE_INT64",
                "INT32": "TYPE_INT32", "UINT8": "TYPE_UINT8", "BOOL": "TYPE_BOOL"}

# The model.py of a Python-backend repository: the model is serve's, so its outputs are serve's to the digit.
MODEL_PY = '''"""Triton Python-backend model: serve.runtime.OnnxPurifier on onnxruntime (written by purifier export).

The Python that runs Triton's python backend stub needs the purifier base install (numpy, onnxruntime; no torch).
"""
from serve.triton_model import TritonPythonModel  # noqa: F401
'''


def check_model_name(name: str) -> str:
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"model name {name!r} cannot be a directory name in a Triton repository")
    return name


def config_text(name: str, header: str, io: dict, max_batch_size: int, max_queue_delay_us: int,
                extra: str = "") -> str:
    """A config.pbtxt. ``io``: ``{"input": rows, "output": rows}``, rows of (name, Triton type, dims without the
    batch dimension); ``header``: the ``platform``/``backend`` line."""
    def entry(n, t, d):
        # a per-image scalar (shape [N]) is dims [1] reshaped to [], Triton's convention with batching on
        dims = f"dims: [ {', '.join(map(str, d))} ]" if d else "dims: [ 1 ]\n    reshape: { shape: [ ] }"
        return f'  {{\n    name: "{n}"\n    data_type: {t}\n    {dims}\n  }}'

    def block(kind, rows):
        return f"{kind} [\n" + ",\n".join(entry(*r) for r in rows) + "\n]\n"

    return (f'name: "{name}"\n{header}\nmax_batch_size: {max_batch_size}\n'
            + block("input", io["input"]) + block("output", io["output"])
            + f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n{extra}}}\n")


def python_model_config(runtime: OnnxPurifier, name: str, max_batch_size: int = 256, max_queue_delay_us: int = 2000,
                        max_queue: int | None = None, device: str = "auto", threads: int | None = None,
                        onnx_file: str = "model.onnx", instances: int = 1) -> str:
    """config.pbtxt of the Python-backend model: input ``x`` FP32, the outputs ``purifier serve`` gives,
    ``instances`` CPU instances (each a Python process with its own onnxruntime session, which picks the device:
    ``device``), dynamic batching; ``max_queue`` counts requests."""
    io = {"input": [("x", "TYPE_FP32", list(runtime.image_shape))],
          "output": [(o["name"], V2_TO_TRITON[o["datatype"]], o["shape"][1:]) for o in _outputs_meta(runtime)]}
    queue = (f"  default_queue_policy {{\n    max_queue_size: {max_queue}\n  }}\n" if max_queue else "")
    params = {"onnx_file": onnx_file, "device": device, "threads": str(threads or 0)}
    tail = "".join(f'parameters {{\n  key: "{k}"\n  value: {{ string_value: "{v}" }}\n}}\n' for k, v in params.items())
    return (config_text(name, 'backend: "python"', io, max_batch_size, max_queue_delay_us, queue)
            + f"instance_group [\n  {{\n    kind: KIND_CPU\n    count: {instances}\n  }}\n]\n" + tail)


def write_python_repo(model: str | os.PathLike, repo: str | os.PathLike, name: str = "purifier",
                      max_batch_size: int = 256, max_queue_delay_us: int = 2000, max_queue: int | None = None,
                      device: str = "auto", threads: int | None = None, instances: int = 1) -> Path:
    """Write (or replace) ``repo/name``: ``config.pbtxt``, ``1/model.py`` and ``1/model.onnx`` (a copy of the model,
    a directory or an .onnx file as ``OnnxPurifier`` takes it). Returns the model's directory."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    if max_queue_delay_us < 0:
        raise ValueError(f"max_queue_delay_us must be >= 0, got {max_queue_delay_us}")
    if max_queue is not None and max_queue < 1:
        raise ValueError(f"max_queue must be at least 1 (or None: unbounded), got {max_queue}")
    if instances < 1:
        raise ValueError(f"instances must be at least 1, got {instances}")
    check_model_name(name)
    runtime = OnnxPurifier(model, device="cpu")
    model_dir = Path(repo) / name
    version = model_dir / "1"
    version.mkdir(parents=True, exist_ok=True)
    tmp = version / ".model.onnx.tmp"
    shutil.copyfile(runtime.path, tmp)
    os.replace(tmp, version / "model.onnx")
    atomic_write_bytes(version / "model.py", MODEL_PY.encode())
    text = python_model_config(runtime, name, max_batch_size, max_queue_delay_us, max_queue, device, threads,
                               instances=instances)
    atomic_write_bytes(model_dir / "config.pbtxt", text.encode())
    return model_dir


# ---- the tritonserver binary ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TritonInstall:
    """Where a Triton installation keeps what the launcher needs."""
    binary: Path            # bin/tritonserver
    backends: Path          # backends/, holding python/libtriton_python.so
    stubs: Path | None      # python_backend_stubs/<major.minor>/ (the wheel's), None where backends/python has one
    libs: Path | None       # the wheel's bundled shared libraries (nvidia_pytriton.libs)


def _wheel_dir() -> Path | None:
    spec = importlib.util.find_spec("pytriton")  # the location only: pytriton's own Python API is not imported
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "tritonserver"


def find_tritonserver(path: str | os.PathLike | None = None) -> TritonInstall:
    """A Triton installation folder (``bin/tritonserver`` + ``backends/``) -> ``TritonInstall``. Without ``path``:
    the nvidia-pytriton wheel's, then ``/opt/tritonserver``. ``FileNotFoundError`` says where it looked."""
    candidates = [Path(path)] if path is not None else [p for p in (_wheel_dir(), Path("/opt/tritonserver")) if p]
    for root in candidates:
        binary, backends = root / "bin" / "tritonserver", root / "backends"
        if binary.is_file() and (backends / "python" / "libtriton_python.so").is_file():
            stubs = root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}"
            libs = root.parent.parent / "nvidia_pytriton.libs"
            return TritonInstall(binary, backends, stubs if stubs.is_dir() else None, libs if libs.is_dir() else None)
    looked = ", ".join(str(c) for c in candidates) or "nowhere (nvidia-pytriton is not installed)"
    raise FileNotFoundError(f"no tritonserver with the Python backend (bin/tritonserver and "
                            f"backends/python/libtriton_python.so) in {looked}; install it with "
                            f"`pip install --no-deps nvidia-pytriton==0.7.0` or name a Triton installation folder")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _python_library_dir() -> str | None:
    """This interpreter's libpython folder, where it has a shared libpython (else the stub finds the system one)."""
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    return libdir if libdir and soname and (Path(libdir) / soname).is_file() else None


class TritonServer:
    """``tritonserver`` on a model repository as a child process, on ``host`` (127.0.0.1 by default)::

        with TritonServer("triton-repo", models=["fashion-mnist-python"]) as srv:
            tritonclient.http.InferenceServerClient(srv.url.removeprefix("http://"))

    Ports 0 are chosen free. ``models``: load only these (explicit model control; the others in the repository,
    e.g. an ONNX-backend model this installation has no backend for, stay unloaded). ``log_file``: where the
    server's log goes (None: this process's stderr). Start-up fails with the log's last lines.
    """

    def __init__(self, repo: str | os.PathLike, host: str = "127.0.0.1", http_port: int = 0, grpc_port: int = 0,
                 metrics_port: int = 0, models: list[str] | None = None, install: TritonInstall | None = None,
                 log_file: str | os.PathLike | None = None, startup_timeout: float = 120.0,
                 args: tuple[str, ...] = ()):
        self.repo, self.host, self.models = Path(repo), host, list(models or [])
        if not self.repo.is_dir():
            raise FileNotFoundError(f"model repository {self.repo} does not exist")
        self.install = install or find_tritonserver()
        self.ports = [p or free_port(host) for p in (http_port, grpc_port, metrics_port)]
        self.log_file, self.startup_timeout, self.args = log_file, startup_timeout, tuple(args)
        self.proc: subprocess.Popen | None = None
        self.url = f"http://{host}:{self.ports[0]}"
        self.grpc_url = f"{host}:{self.ports[1]}"
        self.metrics_url = f"http://{host}:{self.ports[2]}/metrics"

    def _backends(self, work: Path) -> Path:
        """The backend folder, with the stub for this Python beside the Python backend (a copy, so the
        installation is left as it is)."""
        if self.install.stubs is None:
            return self.install.backends
        stub = self.install.stubs / "triton_python_backend_stub"
        dst = work / "backends" / "python"
        shutil.copytree(self.install.backends / "python", dst, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, dst / stub.name)
        return dst.parent

    def check_stub(self, backends: Path, env: dict[str, str]) -> None:
        """The backend stub's shared libraries resolve (libpython above all); else a ``RuntimeError`` naming them,
        instead of a model that never loads."""
        stub = backends / "python" / "triton_python_backend_stub"
        if not (stub.is_file() and shutil.which("ldd")):
            return
        r = subprocess.run(["ldd", str(stub)], env=env, capture_output=True, text=True)
        missing = [line.split()[0] for line in r.stdout.splitlines() if "not found" in line]
        if missing:
            raise RuntimeError(f"Triton's python backend stub {stub} cannot load {missing}; install the shared "
                               f"libpython of this Python (Debian: apt-get install libpython"
                               f"{sys.version_info.major}.{sys.version_info.minor})")

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        libs = [d for d in (_python_library_dir(), self.install.libs and str(self.install.libs)) if d]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, *filter(None, [env.get("LD_LIBRARY_PATH")])])
        serve_root = str(Path(__file__).resolve().parents[1])
        paths = dict.fromkeys([serve_root, *(p for p in sys.path if p and Path(p).is_dir())])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        return env

    def command(self, backends: Path) -> list[str]:
        http, grpc, metrics = self.ports
        cmd = [str(self.install.binary), f"--model-repository={self.repo}", f"--backend-directory={backends}",
               f"--http-address={self.host}", f"--http-port={http}", f"--grpc-address={self.host}",
               f"--grpc-port={grpc}", f"--metrics-address={self.host}", f"--metrics-port={metrics}",
               "--allow-gpu-metrics=false", "--exit-timeout-secs=5", "--log-verbose=0"]
        if self.models:
            cmd += ["--model-control-mode=explicit", *(f"--load-model={m}" for m in self.models)]
        return cmd + list(self.args)

    def start(self) -> "TritonServer":
        self._work = tempfile.TemporaryDirectory(prefix="purifier-triton-")
        work = Path(self._work.name)
        log_path = Path(self.log_file) if self.log_file else None
        self._log = open(log_path, "ab") if log_path else None
        backends, env = self._backends(work), self.environment()
        try:
            self.check_stub(backends, env)
        except RuntimeError:
            self.stop()
            raise
        self.proc = subprocess.Popen(self.command(backends), env=env,
                                     stdout=self._log or sys.stderr, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"tritonserver exited with code {self.proc.returncode} while starting on "
                                   f"{self.repo}{self._log_tail(log_path)}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"tritonserver on {self.repo} was not ready within {self.startup_timeout:.0f} s"
                           f"{self._log_tail(log_path)}")

    @staticmethod
    def _log_tail(path: Path | None) -> str:
        if path is None or not path.is_file():
            return " (its log is on stderr)"
        lines = path.read_text(errors="replace").splitlines()
        return ":\n" + "\n".join(lines[-15:])

    def wait(self) -> int:
        return self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None
        if getattr(self, "_work", None):
            self._work.cleanup()
            self._work = None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def serve_triton(model: str | os.PathLike, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, name: str | None = None, max_batch_size: int = 64, max_wait_ms: float = 2.0,
                 max_queue: int | None = 256, device: str = "auto", threads: int | None = None,
                 install: TritonInstall | None = None, on_ready=None, instances: int = 1) -> int:
    """``purifier serve --engine triton``: ``model``'s Python-backend repository in a temporary folder, served by
    tritonserver until it exits (its exit code) or this process is interrupted or terminated (the server is
    stopped first). The model keeps the name ``purifier serve`` gives it; ``max_wait_ms`` is the dynamic
    batcher's queue delay, ``max_queue`` its queue in requests. ``on_ready(server)`` once it answers."""
    import signal
    import threading

    runtime = OnnxPurifier(model, device="cpu")
    name = served_name(runtime, name)
    if threading.current_thread() is threading.main_thread():  # SIGTERM must stop the child server too
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    with tempfile.TemporaryDirectory(prefix="purifier-triton-repo-") as repo:
        write_python_repo(runtime.path, repo, name, max_batch_size, round(max_wait_ms * 1000), max_queue, device,
                          threads, instances)
        with TritonServer(repo, host, http_port, grpc_port, metrics_port, install=install) as server:
            if on_ready is not None:
                on_ready(server)
            try:
                return server.wait()
            except KeyboardInterrupt:
                return 128 + signal.SIGINT
