"""The worker process: owns the device, holds the models, batches and runs requests.

Messages (small tuples over a multiprocessing Pipe; pixels stay in shared memory):
  front -> worker  ("submit", Job) | ("cancel", id) | ("forget", slot_name) | ("stop",)
  worker -> front  ("ready", info) | ("fatal", message) | ("running", [ids])
                   ("done", [ids], batch_info) | ("expired", [ids]) | ("failed", [ids], message)
                   ("cancelled", id) | ("stats", stats)
                   ("invalid", [(id, message)])   images that failed to decode in the worker
"""

from __future__ import annotations

import ctypes
import logging
import signal
import threading
import time
from dataclasses import dataclass

from .decode import FrameDecoder
from .scheduler import BatchScheduler, Job
from .shm import SlotMaps

log = logging.getLogger("service.worker")
STATS_INTERVAL = 1.0


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
    batching: str = "wait"  # scheduler policy: wait | greedy
    max_pixels: int = 4096 * 4096  # for images decoded here (--decode worker)


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
        self.scheduler = BatchScheduler(config.max_batch, config.max_delay, config.budget, config.batching)
        self.decoder = FrameDecoder(config.device, config.max_pixels)
        self.maps = SlotMaps()
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

        info = {"device": self.config.device, "models": {}}
        for name, weights in self.config.models:
            torch.manual_seed(0)  # 'random' weights are the same in every worker and restart
            seg = Segmenter(
                name,
                weights=weights,
                device=self.config.device,
                dtype=self.config.dtype,
                buckets=self.config.buckets,
                scale=self.config.resize_scale,
            )
            start = time.perf_counter()
            seg.engine.warmup(list(self.config.warm_shapes) or [(64, 64)], self.config.buckets)
            self.models[name] = seg
            info["models"][name] = {
                "arch": seg.arch,
                "classes": list(seg.classes),
                "palette": [list(c) for c in seg.palette],
                "dtype": str(seg.engine.dtype).replace("torch.", ""),
                "cuda_graphs": seg.engine.cuda_graphs,
                "warmup_seconds": round(time.perf_counter() - start, 3),
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
                elif kind == "stop":
                    self.stopping = True
                self.cond.notify()
            if kind == "stop":
                return

    def run_loop(self) -> None:
        while True:
            with self.cond:
                now = time.monotonic()
                expired = self.scheduler.expire(now)
                batch, wait = self.scheduler.next_batch(now) if not expired else (None, 0.0)
                if batch is None and not expired:
                    if self.stopping and not len(self.scheduler):
                        return
                    self.cond.wait(timeout=wait)
                    continue
            if expired:
                self.send("expired", [j.id for j in expired])
            if batch:
                self.run_batch(batch)
            self.maybe_send_stats()

    def run_batch(self, batch: list[Job]) -> None:
        ids = [j.id for j in batch]
        self.send("running", ids)
        start = time.monotonic()
        try:
            seg = self.models[batch[0].model]
            h, w = batch[0].height, batch[0].width
            pixels = self.decoder.load(batch, self.maps)  # decode hook: compressed slots -> pixels
            if pixels.invalid:
                self.send("invalid", [(j.id, message) for j, message in pixels.invalid])
            batch, ids, images = pixels.jobs, [j.id for j in pixels.jobs], pixels.images
            if not batch:
                return
            replays = seg.engine.replays
            labels = seg.engine.segment(images)
            replayed = seg.engine.replays > replays
            for job, lab in zip(batch, labels):
                self.maps.view(job.slot, h * w)[:] = lab.ravel()
        except Exception as exc:  # noqa: BLE001 - one failed batch must not end the worker
            log.exception("batch of %d failed", len(batch))
            self.send("failed", ids, f"{type(exc).__name__}: {exc}")
            return
        self.send(
            "done", ids, {"start": start, "infer": time.monotonic() - start, "size": len(batch), "replayed": replayed}
        )

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


def run_worker(conn, config: WorkerConfig) -> None:
    """Entry point of the spawned worker process."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front end decides when we stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s worker[%(process)d] %(message)s")
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
