"""``purifier purify`` on Ray Data: the same batch job spread over the actors of a Ray cluster.

The driver plans the job with serve.batch's own code (discovery, output names, resume, the failures found while
planning); ``Dataset.map_batches`` hands the items to a fixed pool of actors, each holding one onnxruntime
session (``serve.runtime.OnnxPurifier``) and loading, purifying and writing its batches with serve.batch's
``purify_batch``; the driver alone appends the manifest and error lines, as batches come back.

What holds, and where:

* every input once: the driver records an input only the first time it comes back, whatever Ray retried, and
  counts the inputs that never came back as ``remaining`` (a rerun resumes them), so the manifest plus the
  error log hold each input exactly once, across kills and reruns;
* failures (unreadable file, wrong shape, NaN, ...) are recorded with their reason, and the rest go on;
* atomic outputs per shard: each PNG, or each npz shard (one per batch, ``npz-parts/``), is written under a
  temporary name and renamed before its manifest lines are written, so a manifest line always names a whole
  file. The job as a whole is not atomic: a killed job leaves the shards finished so far, and with
  ``fmt="npz"`` the shards are not merged into one ``purified.npz`` (the driver would have to hold them all);
* order per shard only: the manifest follows input order within a batch, batches in the order they finish.

Inputs, model and ``out_dir`` must be at the same path on every node (a shared file system). Ray is imported
lazily: the base install does not need it (``pip install 'purifier[cluster]'``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .batch import Item, Job, Loader, Stats, check_options, purify_batch, write_summary
from .runtime import OnnxPurifier, resolve_model

DEVICES = ("auto", "cpu", "cuda")


def import_ray():
    """Ray with Ray Data, or an ``ImportError`` saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data configures its loggers on import)
    except ImportError as exc:
        raise ImportError(f"the Ray engine needs Ray Data ({exc}); install it with "
                          f"pip install 'purifier[cluster]'") from exc
    return ray


class PurifyActor:
    """One actor of the pool: one onnxruntime session, serve.batch's loader, outputs written into ``out_dir``.

    ``__call__`` takes a batch of items (columns ``source``, ``index`` (-1: a whole file), ``output``,
    ``position`` in the job) and returns one row per item: ``record`` (its manifest line or failure as JSON),
    ``failed``, the actor's name and providers, and the batch's stage times shared out over its rows.
    """

    def __init__(self, model: str, device: str, threads: int | None, resize: bool, out_dir: str, fmt: str,
                 run: str, cwd: str):
        import socket

        self.name = f"{socket.gethostname()}:{os.getpid()}"
        if not os.path.isdir(cwd):
            raise FileNotFoundError(f"the driver's working directory {cwd} does not exist on {self.name}; inputs, "
                                    f"model and output folder must be on a file system shared by every node")
        os.chdir(cwd)  # relative input paths name the same files as on the driver
        self.runtime = OnnxPurifier(model, device=device, threads=threads)
        self.load = Loader(self.runtime, resize)
        self.out_dir, self.fmt, self.run = Path(out_dir), fmt, run
        self.providers = json.dumps(self.runtime.providers)

    def __call__(self, batch: dict) -> dict:
        items = [Item(str(s), None if int(i) < 0 else int(i), str(o))
                 for s, i, o in zip(batch["source"], batch["index"], batch["output"])]
        part = f"{self.run}-{int(batch['position'][0]):09d}"  # the same name if Ray retries this batch
        records, failed, _, seconds = purify_batch(self.runtime, self.load, items, self.out_dir, self.fmt, part)
        n = len(records) + len(failed)
        rows = {"record": np.array([json.dumps(r, ensure_ascii=False) for r in records + failed], dtype=object),
                "failed": np.array([False] * len(records) + [True] * len(failed)),
                "actor": np.array([self.name] * n, dtype=object),
                "providers": np.array([self.providers] * n, dtype=object)}
        for key, v in seconds.items():
            rows[f"{key}_s"] = np.full(n, v / max(n, 1))
        return rows


@contextlib.contextmanager
def ray_session(address: str | None = None):
    """Connected to Ray for the block: an existing connection in this process is used as is; otherwise ``address``
    (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``) or, when None, a local cluster started here on this machine's
    CPUs and shut down afterwards. Ray's own log lines are held back to errors; the signal handlers found are put back
    (``ray.init`` replaces SIGTERM's). Yields the ``ray`` module."""
    import signal
    import threading

    ray = import_ray()
    started = False
    levels = {name: logging.getLogger(name).level for name in ("ray", "ray.data")}
    for name in levels:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        if not ray.is_initialized():
            main = threading.current_thread() is threading.main_thread()
            handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
            _probe(address)
            try:
                ray.init(address=address, include_dashboard=False,
                         logging_level=logging.ERROR, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ConnectionError(f"cannot reach the Ray cluster at {address!r}: {exc}") from exc
            finally:
                for sig, handler in handlers.items():
                    if handler is not None:
                        signal.signal(sig, handler)
            started = True
        yield ray
    finally:
        if started:
            ray.shutdown()
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _probe(address: str | None, timeout: float = 10.0) -> None:
    """A HOST:PORT (or ray://HOST:PORT) address must answer on TCP: ``ray.init`` would retry a dead one for
    minutes. ``auto`` and None are Ray's to resolve (it fails at once when no cluster runs here)."""
    import socket

    if address is None or address == "auto":
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"Ray address {address!r} is not auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(f"cannot reach the Ray cluster at {address!r}: {exc}") from exc


def plan_resources(ray, device: str, actors: int | None, cpus_per_actor: float) -> tuple[int, float]:
    """(actors, GPUs per actor) for this cluster; ``ValueError`` naming what the cluster lacks."""
    cluster = ray.cluster_resources()
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    if device == "cuda" and gpus == 0:
        raise ValueError("device 'cuda' asked for, but the Ray cluster has no GPUs "
                         f"(resources: {cpus:g} CPUs, 0 GPUs)")
    if actors is None:
        actors = max(1, int(cpus // cpus_per_actor))
        if device == "cuda":
            actors = min(actors, int(gpus)) or 1
    if actors * cpus_per_actor > cpus:
        raise ValueError(f"{actors} actors x {cpus_per_actor:g} CPU each need {actors * cpus_per_actor:g} CPUs; "
                         f"the Ray cluster has {cpus:g}")
    gpus_per_actor = 0.0 if device == "cpu" or gpus == 0 else min(1.0, gpus / actors)
    return actors, gpus_per_actor


def purify_files_ray(inputs: list[str], model: str | os.PathLike, out_dir: str | os.PathLike, batch_size: int = 256,
                     resize: bool = False, fmt: str = "png", resume: bool | None = None, device: str = "auto",
                     actors: int | None = None, address: str | None = None, cpus_per_actor: float = 1.0,
                     on_batch: Callable[[int, int], None] | None = None,
                     should_stop: Callable[[], bool] | None = None) -> Stats:
    """``serve.batch.purify_files`` on a Ray cluster: the same inputs, outputs, manifest fields and resume.

    ``actors``: the pool's size (default: as many as the cluster's CPUs allow at ``cpus_per_actor`` each; with
    ``device`` cuda, one per GPU). Each actor runs onnxruntime with ``ceil(cpus_per_actor)`` threads; under
    ``device`` auto or cuda on a cluster with GPUs, the GPUs are shared out among the actors. ``address``: see
    ``ray_session``. ``on_batch(done_items, total_items)`` after each batch recorded; ``should_stop()`` is asked
    after each, and once it says yes the job stops, records what came back and writes summary.json with
    ``interrupted`` set. With ``fmt="npz"`` the npz shards stay apart (no ``purified.npz``).

    summary.json adds ``engine``, ``ray`` (actors, CPUs and GPUs each, nodes, the seconds Ray took to start)
    and ``actors`` (per actor: its providers and items); ``seconds`` load/onnxruntime/write are summed over the
    actors, ``total`` is wall-clock.
    """
    check_options(fmt, batch_size)
    if device not in DEVICES:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if actors is not None and actors < 1:
        raise ValueError(f"actors must be at least 1, got {actors}")
    if cpus_per_actor <= 0:
        raise ValueError(f"cpus_per_actor must be above 0, got {cpus_per_actor}")
    stop = should_stop or (lambda: False)
    start = time.perf_counter()
    model_path = resolve_model(model)
    OnnxPurifier(model_path, device="cpu", threads=1)  # a bad model fails here, not inside every actor
    connecting = time.perf_counter()
    with ray_session(address) as ray:
        ray_start = time.perf_counter() - connecting
        actors, gpus_per_actor = plan_resources(ray, device, actors, cpus_per_actor)
        job = Job(inputs, out_dir, resume, start)
        stats, todo = job.stats, job.todo
        seen: set = set()
        by_actor: dict[str, dict] = {}
        try:
            if todo:
                rows = [{"source": it.source, "index": -1 if it.index is None else it.index, "output": it.output,
                         "position": k} for k, it in enumerate(todo)]
                ds = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / batch_size)).map_batches(
                    PurifyActor, batch_size=batch_size, batch_format="numpy",
                    compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor,
                    num_gpus=gpus_per_actor or None,
                    fn_constructor_kwargs={"model": str(model_path.resolve()), "device": device,
                                           "threads": math.ceil(cpus_per_actor), "resize": resize,
                                           "out_dir": str(job.out_dir.resolve()), "fmt": fmt, "run": job.run,
                                           "cwd": os.getcwd()})
                with _quiet_data_context(ray), _joined_threads():
                    blocks = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
                    try:
                        for block in blocks:
                            _record_block(job, block, seen, by_actor)
                            if on_batch is not None:
                                on_batch(len(seen), len(todo))
                            if stop():
                                break
                    finally:
                        blocks.close()  # shuts the streaming executor down now, not at garbage collection
        except BaseException:  # the logs hold what was recorded; summary.json says what was not
            job.close()
            stats.interrupted, stats.remaining = True, len(todo) - len(seen)
            extra = _extra(ray, by_actor, actors, cpus_per_actor, gpus_per_actor, ray_start)
            write_summary(job.out_dir, stats, job.start, model_path, extra.pop("providers"), **extra)
            raise
        extra = _extra(ray, by_actor, actors, cpus_per_actor, gpus_per_actor, ray_start)
        return job.finish(len(seen), model_path, extra.pop("providers"), fmt, merge=False, **extra)


@contextlib.contextmanager
def _joined_threads(timeout: float = 30.0):
    """The threads started inside the block are waited for (up to ``timeout`` seconds in all) when it ends. Ray
    Data's iterator leaves worker threads that may still be fetching a block after the loop stops early; one that
    reaches Ray after ``ray.shutdown`` makes the core worker end the whole process with exit status 1. Its block
    prefetcher's thread (named ``Prefetcher``) is not waited for: it lives as long as the iterator and, with no
    blocks handed to it, sleeps on a condition without touching Ray."""
    import threading

    before = set(threading.enumerate())
    try:
        yield
    finally:
        deadline = time.monotonic() + timeout
        for thread in set(threading.enumerate()) - before:
            if thread.name != "Prefetcher":
                thread.join(max(0.0, deadline - time.monotonic()))


def _record_block(job: Job, block: dict, seen: set, by_actor: dict) -> None:
    """Append one returned block's lines to the logs; an input already recorded (a retried batch) is skipped."""
    records, failed = [], []
    for k, line in enumerate(block["record"]):
        rec = json.loads(line)
        key = (rec["source"], rec["index"])
        if key in seen:
            continue
        seen.add(key)
        (failed if block["failed"][k] else records).append(rec)
        actor = by_actor.setdefault(str(block["actor"][k]), {"providers": json.loads(block["providers"][k]),
                                                             "items": 0})
        actor["items"] += 1
        for stage in ("load", "onnxruntime", "write"):
            job.stats.seconds[stage] += float(block[f"{stage}_s"][k])
    job.record(records, failed)


def _extra(ray, by_actor: dict, actors: int, cpus: float, gpus: float, ray_start: float) -> dict:
    """summary.json's fields beyond serve.batch's; ``providers``: the actors' when they all agree, else each
    distinct list."""
    distinct = [json.loads(p) for p in sorted({json.dumps(a["providers"]) for a in by_actor.values()})]
    return {"providers": distinct[0] if len(distinct) == 1 else distinct, "engine": "ray",
            "ray": {"actors": actors, "cpus_per_actor": cpus, "gpus_per_actor": gpus,
                    "nodes": sum(bool(n["Alive"]) for n in ray.nodes()), "start_seconds": ray_start},
            "actors": [{"actor": name, **a} for name, a in sorted(by_actor.items())]}


@contextlib.contextmanager
def _quiet_data_context(ray):
    """No progress bars or execution banners from Ray Data during the job; the settings found are put back."""
    ctx = ray.data.DataContext.get_current()
    names = ("enable_progress_bars", "print_on_execution_start", "enable_auto_log_stats")
    old = {name: getattr(ctx, name) for name in names}
    for name in names:
        setattr(ctx, name, False)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(ctx, name, value)
