"""Micro-batching: concurrent requests gathered into one onnxruntime batch on a single worker thread, with a bounded
queue, and the Prometheus metrics of what it did."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .protocol import ApiError
from .runtime import OnnxPurifier

if TYPE_CHECKING:
    from .server import ServerConfig


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("purifier_requests", "HTTP requests", ["endpoint", "code"], registry=r)
        self.latency = Histogram("purifier_request_seconds", "Request latency", ["endpoint"], registry=r,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch = Histogram("purifier_batch_images", "Images per onnxruntime batch", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
        self.errors = Counter("purifier_errors", "Requests answered with an error", ["kind"], registry=r)
        self.rejections = Counter("purifier_rejected_images", "Images flagged by the reject option", registry=r)
        self.images = Counter("purifier_images", "Images purified", registry=r)
        self.queue = Gauge("purifier_queue_images", "Images waiting for a batch", registry=r)


class Batcher:
    """Gathers concurrent requests into batches for one onnxruntime session on one worker thread."""

    def __init__(self, runtime: OnnxPurifier, cfg: ServerConfig, metrics: Metrics):
        self.runtime, self.cfg, self.metrics = runtime, cfg, metrics
        self.pending: list[tuple[np.ndarray, asyncio.Future]] = []
        self.queued = 0
        self.wakeup: asyncio.Event | None = None
        self.task: asyncio.Task | None = None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxruntime")
        self.batch_sizes: list[int] = []

    def start(self):
        self.wakeup = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self):
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.pool.shutdown(wait=True)

    async def submit(self, x: np.ndarray) -> dict[str, np.ndarray]:
        if self.queued + len(x) > self.cfg.max_queue and self.queued > 0:
            self.metrics.errors.labels("queue_full").inc()
            raise ApiError(503, f"server busy: {self.queued} images queued and this request's {len(x)} would pass "
                                f"the queue's limit of {self.cfg.max_queue} images; retry after 1 s",
                           {"Retry-After": "1"})
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((x, fut))
        self.queued += len(x)
        self.metrics.queue.set(self.queued)
        self.wakeup.set()
        return await fut

    async def _loop(self):
        loop = asyncio.get_running_loop()
        while True:
            await self.wakeup.wait()
            self.wakeup.clear()
            while self.pending:
                deadline = loop.time() + self.cfg.max_wait_ms / 1000
                while self.queued < self.cfg.max_batch_size and loop.time() < deadline:
                    await asyncio.sleep(min(0.0005, max(0.0, deadline - loop.time())))
                batch, n = [], 0
                while self.pending and (n == 0 or n + len(self.pending[0][0]) <= self.cfg.max_batch_size):
                    item = self.pending.pop(0)
                    batch.append(item)
                    n += len(item[0])
                self.queued -= n
                self.metrics.queue.set(self.queued)
                x = np.concatenate([b[0] for b in batch])
                self.metrics.batch.observe(n)
                self.batch_sizes.append(n)
                try:
                    out = await loop.run_in_executor(self.pool, self.runtime, x)
                except Exception as exc:  # the model failed: every request in the batch hears why
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                start = 0
                for xb, fut in batch:
                    part = {k: v[start:start + len(xb)] for k, v in out.items()}
                    start += len(xb)
                    if not fut.done():
                        fut.set_result(part)
