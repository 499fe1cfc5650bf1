"""Front-end side of the worker link: admission, futures, and worker supervision.

One `WorkerLink` per device owns a spawned worker process. The `Dispatcher` admits requests
(bounded queue per model -> 429), puts pixels into shared-memory slots, routes each request to a
worker, and resolves its future when the worker answers. If a worker dies, requests it was
running fail with a retryable 503, requests still queued are re-sent to its replacement.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import multiprocessing as mp
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import ServiceError
from ..estimates import Estimates
from ..metrics import Metrics
from .process import WorkerConfig, run_worker
from .scheduler import Job
from .shm import Slot, SlotPool

log = logging.getLogger("service.worker.link")
READY_TIMEOUT = 900.0  # model download + cuDNN autotune + graph capture on a cold GPU
RESTART_BACKOFF = (0.5, 1, 2, 5, 10, 30)


@dataclass
class Result:
    labels: np.ndarray
    model: str
    timings: dict  # seconds: queue, inference
    batch_size: int
    prepare: float = 0.0  # seconds of `inference` the worker spent preparing the batch's inputs
    arrival: float = 0.0  # time.monotonic() when the request was sent to the worker
    started: float = 0.0  # ... when its batch started (the worker's clock is the same clock)


@dataclass
class Pending:
    job: Job
    slot: Slot
    future: asyncio.Future
    link: "WorkerLink"
    running: bool = False
    admitted: float = field(default_factory=time.monotonic)
    running_since: float | None = None


class WorkerLink:
    """One worker process on one device, restarted when it dies."""

    def __init__(self, device: str, config: WorkerConfig, dispatcher: "Dispatcher"):
        self.device = device
        self.config = config
        self.dispatcher = dispatcher
        self.ready = False
        self.info: dict = {}
        self.stats: dict = {}
        self.process = None
        self.conn = None
        self.pending: dict[int, Pending] = {}
        self.restarts = 0
        self.failures_in_a_row = 0
        self.stopping = False
        self._send_lock = threading.Lock()  # slots are forgotten from decode threads too
        self._ready_event = asyncio.Event()
        self._fatal: str | None = None
        self._exit_reason: str | None = None  # from a ("dying", reason, message) before the exit

    @property
    def outstanding(self) -> int:
        return len(self.pending)

    def queued_seconds(self) -> float:
        """Predicted worker time still owed to the requests sent here (running ones: what is left)."""
        now = time.monotonic()
        total = 0.0
        for p in self.pending.values():
            spent = now - p.running_since if p.running_since is not None else 0.0
            total += max(p.job.cost - spent, 0.0)
        return total

    async def start(self) -> None:
        if not self.device.startswith("cuda"):
            # OpenMP threads of a CPU worker sleep between parallel regions instead of spinning, so
            # they leave the cores to the front end's codec threads (BENCHMARKS.md, the peers section:
            # spinning made the engine several times slower on a busy 2-core machine).
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            if self.config.cpu_threads:
                # read by OpenMP and MKL when torch loads in the new process: every thread that
                # runs the engine starts from it, not only the one torch.set_num_threads is called in
                for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                    os.environ[name] = str(self.config.cpu_threads)
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self.process = ctx.Process(
            target=run_worker, args=(child, self.config), name=f"worker-{self.device}", daemon=True
        )
        self.process.start()
        child.close()
        self.conn = parent
        self._ready_event.clear()
        self._fatal = None
        loop = asyncio.get_running_loop()
        loop.add_reader(parent.fileno(), self._on_readable)
        loop.add_reader(self.process.sentinel, self._on_exit)

    async def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        await asyncio.wait_for(self._ready_event.wait(), timeout)
        if self._fatal:
            raise RuntimeError(f"worker on {self.device} failed to start: {self._fatal}")

    def send(self, *msg) -> None:
        try:
            with self._send_lock:
                self.conn.send(msg)
        except (BrokenPipeError, OSError, AttributeError):
            pass  # the worker is gone; _on_exit handles its requests

    # -- messages from the worker ----------------------------------------------------------------
    def _on_readable(self) -> None:
        try:
            while self.conn.poll():
                self._handle(self.conn.recv())
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(self.conn.fileno())

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "running":
            for job_id in msg[1]:
                if job_id in self.pending:
                    self.pending[job_id].running = True
                    self.pending[job_id].running_since = time.monotonic()
        elif kind == "done":
            info = msg[2]
            first = self.pending.get(msg[1][0])
            start = time.perf_counter()
            for job_id in msg[1]:
                p = self.pending.pop(job_id, None)
                if p is not None:
                    self.dispatcher.complete(p, info)
            if first is not None:
                j = first.job
                self.dispatcher.metrics.observe_batch(
                    j.model, info["size"], info["prepare"], info["infer"], time.perf_counter() - start
                )
                self.dispatcher.estimates.observe(j.model, j.tta, j.height, j.width, info["size"], info["infer"])
        elif kind == "expired":
            for job_id in msg[1]:
                self._fail(job_id, ServiceError("deadline_exceeded", "the deadline passed before the request ran"))
        elif kind == "invalid":  # decoded in the worker, and the image was broken
            for job_id, message in msg[1]:
                self._fail(job_id, ServiceError("invalid_image", message))
        elif kind == "failed":
            for job_id in msg[1]:
                self._fail(job_id, ServiceError("internal", f"inference failed: {msg[2]}"))
        elif kind == "cancelled":
            self._fail(msg[1], ServiceError("cancelled", "cancelled by the client"))
        elif kind == "stats":
            self.dispatcher.record_stats(self, msg[1])
        elif kind == "ready":
            self.info = msg[1]
            for name, model in self.info.get("models", {}).items():
                for tta, height, width, batch, seconds in model.get("timings", ()):
                    self.dispatcher.estimates.observe(name, tta, height, width, batch, seconds, seed=True)
            self.ready = True
            self.failures_in_a_row = 0
            self._ready_event.set()
            self._resend_queued()
        elif kind == "dying":  # a device error poisoned its CUDA context; it exits next
            self._exit_reason = msg[1]
            log.error("worker on %s exits after a device error (%s): %s", self.device, msg[1], msg[2])
        elif kind == "fatal":
            self._fatal = msg[1]
            log.error("worker on %s failed to start: %s", self.device, msg[1])
            self._ready_event.set()

    def _fail(self, job_id: int, error: ServiceError) -> None:
        p = self.pending.pop(job_id, None)
        if p is not None:
            self.dispatcher.finish(p, error=error)

    def _resend_queued(self) -> None:
        for p in list(self.pending.values()):
            self.send("submit", p.job)

    # -- supervision -----------------------------------------------------------------------------
    def _on_exit(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.process.sentinel)
        try:
            self._on_readable()  # deliver what the worker said before dying
            loop.remove_reader(self.conn.fileno())
        except (OSError, ValueError):
            pass
        self.conn.close()
        self.ready = False
        code = self.process.exitcode
        if self.stopping:
            return
        if self._fatal and not self.info:  # the first start failed: start-up fails with its message
            self._ready_event.set()
            return
        reason, self._exit_reason = self._exit_reason or "crashed", None
        log.error("worker on %s died (exit code %s, reason %s); restarting", self.device, code, reason)
        self.dispatcher.metrics.worker_restarts.labels(self.device, reason).inc()
        for job_id, p in list(self.pending.items()):
            if p.running:  # its slot may hold half-written labels: fail it, the client retries
                self._fail(
                    job_id,
                    ServiceError(
                        "worker_restarting", "the worker restarted while running this request; retry", retry_after=1
                    ),
                )
        self.restarts += 1
        self.failures_in_a_row += 1
        delay = RESTART_BACKOFF[min(self.failures_in_a_row - 1, len(RESTART_BACKOFF) - 1)]
        loop.call_later(delay, lambda: asyncio.ensure_future(self.start()))

    async def stop(self, timeout: float = 10.0) -> None:
        self.stopping = True
        self.ready = False
        if self.process is None or not self.process.is_alive():
            return
        self.send("stop")
        deadline = time.monotonic() + timeout
        while self.process.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.process.is_alive():
            self.process.kill()
        self.process.join(1)


class Dispatcher:
    def __init__(self, settings, model_weights: dict[str, str], metrics: Metrics, shm_bytes: int):
        self.settings = settings
        self.metrics = metrics
        self.model_names = list(model_weights)
        self.slots = SlotPool(shm_bytes, on_forget=self._forget_everywhere)
        self.links: list[WorkerLink] = []
        self.depth = dict.fromkeys(self.model_names, 0)
        self.decoding = 0  # admitted requests not yet sent to a worker (told to it: --batching adaptive)
        self.draining = False
        self._ids = itertools.count(1)
        self._last_replays: dict[tuple[str, str], tuple[int, int]] = {}
        self.devices = resolve_devices(settings.devices)
        self._model_weights = model_weights
        self.estimates = Estimates(settings.resize_scale)

    # -- life cycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        for device in self.devices:
            config = WorkerConfig(
                device=device,
                models=tuple(self._model_weights.items()),
                dtype=s.dtype,
                buckets=s.batch_buckets,
                max_batch=s.max_batch,
                max_delay=s.max_delay_ms / 1000,
                budget=s.budget_seconds,
                warm_shapes=s.warm_shapes,
                resize_scale=s.resize_scale,
                log_level=s.log_level,
                log_format=s.log_format,
                lazy_capture_shapes=s.lazy_capture_shapes,
                lazy_capture_pixels=s.lazy_capture_pixels,
                batching=s.batching,
                priority_batches=s.priority_batches,
                max_pixels=s.max_pixels,
                cpu_threads=s.cpu_threads,
            )
            link = WorkerLink(device, config, self)
            self.links.append(link)
            await link.start()
        await asyncio.gather(*(link.wait_ready() for link in self.links))

    @property
    def ready(self) -> bool:
        return bool(self.links) and not self.draining and all(link.ready for link in self.links)

    @property
    def in_flight(self) -> int:
        return sum(link.outstanding for link in self.links)

    async def drain(self, timeout: float) -> None:
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        await asyncio.gather(*(link.stop() for link in self.links))
        self.slots.close()

    def set_log_level(self, level: str) -> None:
        """A log level set at run time: to every worker now, and to the ones restarted later."""
        for link in self.links:
            link.config = dataclasses.replace(link.config, log_level=level)
            link.send("log_level", level)

    def model_info(self, name: str) -> dict:
        for link in self.links:
            if name in link.info.get("models", {}):
                return link.info["models"][name]
        return {}

    # -- requests ------------------------------------------------------------------------------
    def queue_limit(self, priority: int) -> int:
        """Queue places a request of `priority` may fill: all of --max-queue for priority 1, and a
        share that shrinks with each lower level (half of it for priority 2 of 2), so a flood of
        background work always leaves room for live frames."""
        levels = self.settings.priority_levels
        return max(1, math.ceil(self.settings.max_queue * (levels - priority + 1) / levels))

    def admit(self, model: str, priority: int = 1) -> None:
        """Reserve a queue place for `model` or raise (not ready 503, unknown 404, full 429)."""
        if model not in self.depth:
            raise ServiceError("not_found", f"unknown model {model!r}; served: {', '.join(self.model_names)}")
        if self.draining:
            raise ServiceError("not_ready", "the service is draining", retry_after=1)
        if not any(link.ready for link in self.links):
            raise ServiceError(
                "not_ready", "the service is not ready: models are loading or a worker restarts", retry_after=1
            )
        limit = self.queue_limit(priority)
        if self.depth[model] >= limit:
            if limit == self.settings.max_queue:
                message = f"queue for {model} is full ({limit} requests)"
            else:
                message = (
                    f"queue for {model} is full for priority {priority}: it may fill {limit} of the "
                    f"{self.settings.max_queue} places, the others are kept for higher priorities"
                )
            raise ServiceError("queue_full", message, retry_after=self.retry_after(model))
        self.depth[model] += 1
        self.metrics.queue_depth.labels(model).set(self.depth[model])

    def release(self, model: str) -> None:
        self.depth[model] -= 1
        self.metrics.queue_depth.labels(model).set(self.depth[model])

    def retry_after(self, model: str) -> int:
        # Time to serve what is queued, at the budget per batch, rounded up to whole seconds.
        batches = self.depth[model] / max(self.settings.max_batch, 1)
        return max(1, math.ceil(batches * self.settings.budget_seconds))

    @contextlib.contextmanager
    def on_the_way(self):
        """A request is being decoded: jobs sent meanwhile tell the worker it may join their batch."""
        self.decoding += 1
        try:
            yield
        finally:
            self.decoding -= 1

    def place(self, image: np.ndarray) -> Slot:
        """Copy a decoded image into a shared-memory slot (thread-safe; runs in the decode pool)."""
        slot = self.slots.acquire(image.nbytes)
        slot.write_image(image)
        return slot

    def place_encoded(self, data: bytes, height: int, width: int) -> Slot:
        """Copy a compressed image into a slot that can also take its HxW labels (--decode worker)."""
        slot = self.slots.acquire(max(len(data), height * width))
        slot.shm.buf[: len(data)] = data
        return slot

    def pick_link(self) -> WorkerLink:
        """The ready worker with the fewest requests outstanding (streams keep the one they got)."""
        ready = [link for link in self.links if link.ready]
        if not ready:
            raise ServiceError("worker_restarting", "no worker is ready; retry", retry_after=1)
        return min(ready, key=lambda link: link.outstanding)

    def submit(
        self,
        model: str,
        slot: Slot,
        shape: tuple[int, int],
        deadline: float | None,
        link: WorkerLink | None = None,
        tta: str = "none",
        cost: float = 0.0,
        encoded: int = 0,
        priority: int = 1,
    ) -> asyncio.Future:
        """Send an admitted request in `slot` to a worker; the future resolves to a Result.
        `encoded` > 0: the slot holds that many bytes of a compressed image for the worker to decode."""
        link = link or self.pick_link()
        job = Job(
            next(self._ids),
            model,
            slot.name,
            shape[0],
            shape[1],
            deadline,
            time.monotonic(),
            tta,
            cost,
            encoded=encoded,
            incoming=self.decoding,
            priority=priority,
        )
        future = asyncio.get_running_loop().create_future()
        link.pending[job.id] = Pending(job, slot, future, link)
        self.metrics.shm_slots.set(self.slots.in_use)
        self.metrics.shm_bytes.set(self.slots.bytes_mapped)
        link.send("submit", job)
        return future

    def cancel(self, future: asyncio.Future) -> None:
        """Ask the worker to drop a request still queued (client went away)."""
        for link in self.links:
            for job_id, p in link.pending.items():
                if p.future is future and not p.running:
                    link.send("cancel", job_id)
                    return

    def complete(self, p: Pending, info: dict) -> None:
        labels = p.slot.read_labels(p.job.height, p.job.width)
        timings = {"queue": max(info["start"] - p.job.arrival, 0.0), "inference": info["infer"]}
        self.metrics.queue_wait.labels(p.job.model).observe(timings["queue"])
        self.metrics.inference.labels(p.job.model).observe(info["infer"])
        result = Result(labels, p.job.model, timings, info["size"], info["prepare"], p.job.arrival, info["start"])
        self.finish(p, result)

    def release_slot(self, slot: Slot) -> None:
        """Give a slot back to the pool and keep the gauge in step."""
        self.slots.release(slot)
        self.metrics.shm_slots.set(self.slots.in_use)

    def finish(self, p: Pending, result: Result | None = None, error: ServiceError | None = None) -> None:
        self.release_slot(p.slot)
        if not p.future.done():
            if error is not None:
                p.future.set_exception(error)
            else:
                p.future.set_result(result)

    def record_stats(self, link: WorkerLink, stats: dict) -> None:
        for name, s in stats.get("models", {}).items():
            before = self._last_replays.get((link.device, name), (0, 0))
            replays, misses = s["graph_replays"], s["graph_misses"]
            if replays < before[0] or misses < before[1]:  # a restarted worker counts from zero
                before = (0, 0)
            self.metrics.graph_replays.labels(name).inc(replays - before[0])
            self.metrics.graph_misses.labels(name).inc(misses - before[1])
            self._last_replays[(link.device, name)] = (replays, misses)
            if name in link.info.get("models", {}):
                link.info["models"][name]["graphs"] = s["graphs"]
        for kind, value in stats.get("memory", {}).items():
            self.metrics.device_memory.labels(link.device, kind).set(value)

    def _forget_everywhere(self, name: str) -> None:
        for link in self.links:
            link.send("forget", name)


def resolve_devices(devices: tuple[str, ...]) -> list[str]:
    """Expand auto/cuda to concrete devices; refuse CUDA devices that do not exist."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if devices == ("auto",):
        return [f"cuda:{i}" for i in range(count)] or ["cpu"]
    resolved = []
    for d in devices:
        if d == "cuda":
            d = "cuda:0"
        if d.startswith("cuda") and int(d.split(":")[1]) >= count:
            raise ServiceError(
                "not_ready",
                f"--device {d} asked for, but this machine has {count} CUDA device(s); use --device cpu or auto",
            )
        resolved.append(d)
    return resolved
