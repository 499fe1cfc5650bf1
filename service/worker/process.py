"""The worker process: owns the device, holds the models, batches and runs requests.

Messages (small tuples over a multiprocessing Pipe; pixels stay in shared memory):
  front -> worker  ("submit", Job) | ("cancel", id) | ("forget", slot_name) | ("stop",)
  worker -> front  ("ready", info) | ("fatal", message) | ("running", [ids])
                   ("done", [ids], batch_info) | ("expired", [ids]) | ("failed", [ids], message)
                   ("cancelled", id) | ("stats", stats) | ("dying", reason, message)
                   ("invalid", [(id, message)])   images that failed to decode here (--decode worker)

The device loop keeps up to PIPELINE_DEPTH batches in flight: batch N+1 is submitted (its pixels
copied in from the slots) while batch N computes, and a batch is answered once its labels are
in its slots. Between batches, when nothing is queued or in flight, the engines capture CUDA
graphs for shapes their policy queued. A CUDA error that poisons the context ends the process
(exit code DEVICE_ERROR_EXIT) after a ("dying", ...) message, so the supervisor restarts it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from model.device_errors import fatal_device_error

from ..logs import Step
from ..logs import configure as configure_logging
from .decode import FrameDecoder
from .scheduler import BatchScheduler, Job
from .shm import SlotMaps

log = logging.getLogger("service.worker")
STATS_INTERVAL = 1.0
PIPELINE_DEPTH = 2  # batches in flight: one computing, the next one copying in
DEVICE_ERROR_EXIT = 70


@dataclass(frozen=True)
class WorkerConfig:
    device: str
    models: tuple[tuple[str, str], ...]  # (name, local weights path or 'random')
    dtype: str
    buckets: tuple[int, ...]
    max_batch: int
    max_delay: float
    budget: float
    warm_shapes: tuple[tuple[int, int], ...]
    resize_scale: tuple[int, int] = (2048, 1024)
    log_level: str = "info"
    log_format: str = "text"
    lazy_capture_shapes: int = 4
    lazy_capture_pixels: int = 1024 * 2048
    batching: str = "wait"  # scheduler policy: wait | adaptive | greedy
    priority_batches: str = "separate"  # may requests of different priorities share a batch (scheduler.py)
    max_pixels: int = 4096 * 4096  # for images decoded here (--decode worker)
    cpu_threads: int = 0  # 0: torch's default


def warm_buckets(buckets: tuple[int, ...], cuda_graphs: bool) -> tuple[int, ...]:
    """Batch sizes to warm: each bucket needs its own CUDA graph; on the CPU one batch size warms
    the kernels and allocator as well as all of them would, in a fraction of the time."""
    return tuple(buckets) if cuda_graphs else tuple(buckets[:1])


@dataclass
class _Running:
    """A batch submitted to the device and not yet answered."""

    jobs: list[Job]
    handle: object  # pipeline.InFlight
    start: float
    prepared: float  # seconds of it preparing the inputs (slot views, decoding here)
    replayed: bool
    images: list  # the inputs, kept alive until the batch is answered (decoded frames are not in slots)


class PinnedSlotMaps(SlotMaps):
    """Slot maps page-locked for the GPU (cudaHostRegister) when first mapped, so the copies in
    and out are DMA straight from and to shared memory.

    With pinning, `forget` (called by the receive thread) only notes the name: unregistering is a
    CUDA call, which must not run while the run thread captures a graph, so the run thread does
    it in `release_forgotten()` between batches.
    """

    def __init__(self, pin: bool):
        super().__init__()
        self.pin = pin
        self._pinned: dict[str, np.ndarray] = {}
        self._forgotten: list[str] = []
        self._lock = threading.Lock()

    def view(self, name: str, nbytes: int) -> np.ndarray:
        new = name not in self._maps
        arr = super().view(name, nbytes)
        if new and self.pin:
            from model.pipeline import register_host

            whole = np.frombuffer(self._maps[name], np.uint8)
            if register_host(whole):
                self._pinned[name] = whole
        return arr

    def forget(self, name: str) -> None:
        if not self.pin:
            super().forget(name)
            return
        with self._lock:
            self._forgotten.append(name)

    def release_forgotten(self) -> None:
        if not self.pin:
            return
        with self._lock:
            names, self._forgotten = self._forgotten, []
        for name in names:
            whole = self._pinned.pop(name, None)
            if whole is not None:
                from model.pipeline import unregister_host

                unregister_host(whole)
                del whole
            super().forget(name)


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: the kernel kills this process if the front end dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


class Worker:
    def __init__(self, conn, config: WorkerConfig):
        self.conn = conn
        self.config = config
        self.send_lock = threading.Lock()
        self.cond = threading.Condition()
        self.scheduler = BatchScheduler(
            config.max_batch, config.max_delay, config.budget, config.batching, config.priority_batches
        )
        self.decoder = FrameDecoder(config.device, config.max_pixels)
        self.maps = PinnedSlotMaps(pin=config.device.startswith("cuda"))
        self.running: deque[_Running] = deque()
        self.stopping = False
        self.models: dict = {}
        self.last_stats = 0.0

    def send(self, *msg) -> None:
        with self.send_lock:
            self.conn.send(msg)

    # -- start-up ------------------------------------------------------------------------------
    def load(self) -> dict:
        import torch

        from model import Segmenter
        from model.graph_policy import CaptureLimits

        limits = CaptureLimits(
            max_lazy_shapes=self.config.lazy_capture_shapes, max_lazy_pixels=self.config.lazy_capture_pixels
        )
        if not self.config.device.startswith("cuda"):
            if self.config.cpu_threads:
                torch.set_num_threads(self.config.cpu_threads)  # OMP_NUM_THREADS says so too (link.py)
            log.info("CPU worker computing with %d threads", torch.get_num_threads())
        info = {"device": self.config.device, "models": {}}
        for name, weights in self.config.models:
            torch.manual_seed(0)  # 'random' weights are the same in every worker and restart
            with Step(log, "load", "model %s (%s) on %s", name, weights, self.config.device):
                seg = Segmenter(
                    name,
                    weights=weights,
                    device=self.config.device,
                    dtype=self.config.dtype,
                    buckets=self.config.buckets,
                    scale=self.config.resize_scale,
                    capture_limits=limits,
                    capture_inline=False,  # this loop captures between batches, when nothing waits
                )
            start = time.perf_counter()
            shapes = list(self.config.warm_shapes)
            buckets = warm_buckets(self.config.buckets, seg.engine.cuda_graphs)
            if shapes:
                step = "capture" if seg.engine.cuda_graphs else "warm"
                with Step(log, step, "model %s, shapes %s, batch sizes %s", name, self.config.warm_shapes, buckets):
                    seg.engine.warmup(shapes, buckets)
            else:
                log.info("warm: model %s skipped (--warm-shapes none)", name)
            warmup_seconds = time.perf_counter() - start
            self.models[name] = seg
            info["models"][name] = {
                "arch": seg.arch,
                "classes": list(seg.classes),
                "palette": [list(c) for c in seg.palette],
                "dtype": str(seg.engine.dtype).replace("torch.", ""),
                "cuda_graphs": seg.engine.cuda_graphs,
                "warmup_seconds": round(warmup_seconds, 3),
                "timings": measure(seg.engine, shapes),
                **seg.engine.stats,
            }
        return info

    # -- the two threads -------------------------------------------------------------------------
    def receive_loop(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                msg = ("stop",)
            kind = msg[0]
            with self.cond:
                if kind == "submit":
                    self.scheduler.add(msg[1])
                elif kind == "cancel":
                    if self.scheduler.cancel(msg[1]) is not None:
                        self.send("cancelled", msg[1])
                elif kind == "forget":
                    self.maps.forget(msg[1])
                elif kind == "log_level":  # changed at run time (/v2/logging)
                    logging.getLogger().setLevel(msg[1].upper())
                elif kind == "stop":
                    self.stopping = True
                self.cond.notify()
            if kind == "stop":
                return

    def run_loop(self) -> None:
        while True:
            idle = False
            with self.cond:
                now = time.monotonic()
                expired = self.scheduler.expire(now)
                batch, wait = self.scheduler.next_batch(now) if not expired else (None, 0.0)
                if batch is None and not expired and not self.running:
                    if self.stopping and not len(self.scheduler):
                        return
                    if len(self.scheduler):  # requests wait for their batch to fill
                        self.cond.wait(timeout=wait)
                        continue
                    idle = True
            if idle:
                # Nothing queued or in flight: capture a queued shape, outside the lock so that
                # arriving requests are queued (and stop the capture between buckets).
                if not self.capture_when_idle():
                    with self.cond:
                        if not len(self.scheduler) and not self.stopping:
                            self.cond.wait()
                continue
            if expired:
                self.send("expired", [j.id for j in expired])
            if batch:
                self.start_batch(batch)
            if self.running and (not batch or len(self.running) >= PIPELINE_DEPTH):
                self.finish_batch(self.running.popleft())  # waits for it
            # Answer what is already done without waiting for the next batch: on the CPU a batch is
            # done when submit returns, and holding it for the pipeline would add a batch to its latency.
            while self.running and self.running[0].handle.ready():
                self.finish_batch(self.running.popleft())
            self.maybe_send_stats()

    def capture_when_idle(self) -> bool:
        """Capture one queued shape of one model; stops between buckets if a request arrives."""

        def request_waiting() -> bool:
            return bool(len(self.scheduler)) or self.stopping

        self.maps.release_forgotten()
        for seg in self.models.values():
            try:
                if seg.engine.capture_pending(should_stop=request_waiting):
                    return True
            except Exception as exc:  # noqa: BLE001 - only context-poisoning errors get here
                self.die(exc)
        return False

    def batch_outputs(self, batch: list[Job]) -> list[np.ndarray]:
        """Per-job (H, W) views where the labels go: the start of each job's own slot."""
        h, w = batch[0].height, batch[0].width
        return [self.maps.view(j.slot, h * w).reshape(h, w) for j in batch]

    def start_batch(self, batch: list[Job]) -> None:
        ids = [j.id for j in batch]
        self.send("running", ids)
        self.maps.release_forgotten()  # the front end forgets only slots that hold no request
        start = time.monotonic()
        try:
            engine = self.models[batch[0].model].engine
            pixels = self.decoder.load(batch, self.maps)  # slot views, or images decoded here (--decode worker)
            if pixels.invalid:
                self.send("invalid", [(j.id, message) for j, message in pixels.invalid])
            batch, ids = pixels.jobs, [j.id for j in pixels.jobs]
            if not batch:
                return
            prepared = time.monotonic() - start
            replays = engine.replays
            handle = engine.submit(pixels.images, self.batch_outputs(batch), batch[0].tta)
        except Exception as exc:  # noqa: BLE001 - one failed batch must not end the worker
            self.batch_failed(ids, exc)
            return
        self.running.append(_Running(batch, handle, start, prepared, engine.replays > replays, pixels.images))

    def finish_batch(self, run: _Running) -> None:
        ids = [j.id for j in run.jobs]
        try:
            run.handle.wait()
        except Exception as exc:  # noqa: BLE001 - asynchronous CUDA errors surface here
            self.batch_failed(ids, exc)
            return
        info = {
            "start": run.start,
            "infer": time.monotonic() - run.start,
            "prepare": run.prepared,
            "size": len(ids),
            "replayed": run.replayed,
        }
        self.send("done", ids, info)
        if log.isEnabledFor(logging.DEBUG):
            job = run.jobs[0]
            log.debug(
                "batch of %d: %s, tta %s, %dx%d, %.1f ms (%.1f preparing)%s",
                len(ids),
                job.model,
                job.tta,
                job.height,
                job.width,
                info["infer"] * 1000,
                run.prepared * 1000,
                ", graph replay" if run.replayed else "",
            )

    def batch_failed(self, ids: list[int], exc: Exception) -> None:
        if fatal_device_error(exc):
            self.die(exc)
        log.exception("batch of %d failed", len(ids))
        self.send("failed", ids, f"{type(exc).__name__}: {exc}")

    def die(self, exc: BaseException) -> None:
        """The CUDA context is unusable: say why and exit; the supervisor starts a fresh process."""
        reason = fatal_device_error(exc) or "device_error"
        log.critical("device error (%s), the worker exits to be restarted: %s", reason, exc)
        try:
            self.send("dying", reason, f"{type(exc).__name__}: {exc}")
        except OSError:
            pass
        sys.stderr.flush()
        os._exit(DEVICE_ERROR_EXIT)

    def maybe_send_stats(self) -> None:
        now = time.monotonic()
        if now - self.last_stats < STATS_INTERVAL:
            return
        self.last_stats = now
        self.send("stats", self.stats())

    def stats(self) -> dict:
        stats = {
            "models": {
                n: {
                    "graph_replays": s.engine.replays,
                    "graph_misses": s.engine.misses,
                    "graphs": s.engine.stats["graphs"],
                    "capture_failures": s.engine.capture_failures,
                }
                for n, s in self.models.items()
            }
        }
        if self.config.device.startswith("cuda"):
            import torch

            stats["memory"] = {
                "allocated": torch.cuda.memory_allocated(self.config.device),
                "reserved": torch.cuda.memory_reserved(self.config.device),
            }
        return stats


def measure(engine, shapes: list[tuple[int, int]], runs: int = 3, seconds: float = 1.0) -> list[tuple]:
    """Timed plain passes per warm shape after warm-up, the fastest of up to `runs` within about
    `seconds` (one stall on a busy machine must not make a mode look slow): (tta, height, width,
    batch, seconds), the seeds of the front end's latency estimates."""
    timings = []
    for height, width in shapes:
        frame = np.zeros((1, height, width, 3), np.uint8)
        times: list[float] = []
        begin = time.monotonic()
        while len(times) < runs and (not times or time.monotonic() - begin < seconds):
            start = time.monotonic()
            engine.segment(frame)
            times.append(time.monotonic() - start)
        timings.append(("none", height, width, 1, min(times)))
    return timings


def run_worker(conn, config: WorkerConfig) -> None:
    """Entry point of the spawned worker process."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front end decides when we stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(config.log_level, config.log_format)
    worker = Worker(conn, config)
    try:
        info = worker.load()
    except Exception as exc:  # noqa: BLE001 - reported to the front end, which exits with it
        log.exception("worker start-up failed")
        worker.send("fatal", f"{type(exc).__name__}: {exc}")
        return
    worker.send("ready", info)
    worker.send("stats", worker.stats())
    threading.Thread(target=worker.receive_loop, name="receive", daemon=True).start()
    worker.run_loop()
