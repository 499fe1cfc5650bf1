"""The segmentation deployment: one model's engine on its replica's device, batching with @serve.batch.

A replica is already its own process with its own device, which is what the single-host worker
process exists for; so the engine runs right here, and Serve's batcher groups the calls that reach
this replica (the project's scheduler needs the worker pipe and shared memory, which Ray replaces
with actor calls and its object store). Images of different sizes in one batch run as one engine
call per size, as the project's scheduler groups them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import numpy as np
import ray
from ray import serve
from ray.util import metrics as ray_metrics

from ..config import ModelSpec, Settings
from ..metrics import BATCH_BUCKETS, BUDGET_MULTIPLES

log = logging.getLogger("service.ray")


def _histogram(name: str, doc: str, boundaries) -> ray_metrics.Histogram:
    return ray_metrics.Histogram(name, doc, boundaries=list(boundaries), tag_keys=("model",))


class SegmentationReplica:
    """Holds one model; `segment(pixels, budget_s)` returns labels, or an error the ingress raises."""

    def __init__(self, settings: Settings, spec: ModelSpec, device: str):
        import torch

        from model import Segmenter

        torch.manual_seed(0)  # 'random' weights are the same in every replica and restart
        self.name = spec.name
        self.device = device
        self.segmenter = Segmenter(
            spec.name,
            weights=spec.weights,
            device=device,
            dtype=settings.dtype,
            buckets=settings.batch_buckets,
            scale=settings.resize_scale,
        )
        self.segmenter.engine.warmup(list(settings.warm_shapes), settings.batch_buckets)
        self.batched.set_max_batch_size(settings.max_batch)
        self.batched.set_batch_wait_timeout_s(settings.max_delay_ms / 1000)
        # Exported by each node's Ray metrics agent (names get Ray's `ray_` prefix).
        budget = settings.budget_seconds
        seconds = [round(budget * m, 6) for m in BUDGET_MULTIPLES]
        self.batch_size = _histogram("seg_batch_size", "Requests per executed batch", BATCH_BUCKETS)
        self.inference = _histogram(
            "seg_inference_seconds", "Replica time for the batch that served a request", seconds
        )
        self.queue_wait = _histogram("seg_queue_wait_seconds", "Time from arrival in the replica to its batch", seconds)
        self.tags = {"model": spec.name}
        log.info("replica of %s ready on %s (pid %d)", spec.name, device, os.getpid())

    def info(self) -> dict:
        seg = self.segmenter
        return {
            "arch": seg.arch,
            "classes": list(seg.classes),
            "palette": [list(c) for c in seg.palette],
            "dtype": str(seg.engine.dtype).replace("torch.", ""),
            "cuda_graphs": seg.engine.cuda_graphs,
            **seg.engine.stats,
            "device": self.device,
            "node": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
        }

    async def segment(self, pixels, budget_s: float | None, tta: str = "none") -> dict:
        """`pixels`: HxWx3 uint8 (Ray resolves the object-store reference before the call); `tta`:
        none, flip or ms_flip (model/tta.py)."""
        if isinstance(pixels, ray.ObjectRef):
            pixels = await pixels
        arrived = time.monotonic()
        deadline = arrived + budget_s if budget_s else None  # this node's clock, not the sender's
        return await self.batched(pixels, arrived, deadline, tta)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def batched(self, images: list, arrivals: list, deadlines: list, ttas: list) -> list[dict]:
        start = time.monotonic()
        results: list[dict | None] = [None] * len(images)
        groups: dict[tuple, list[int]] = {}  # (H, W, tta) -> request indices, as the worker's scheduler groups
        for i, (image, deadline) in enumerate(zip(images, deadlines)):
            if deadline is not None and deadline < start:
                results[i] = {"error": "deadline_exceeded", "message": "the deadline passed before its batch ran"}
            else:
                groups.setdefault((*image.shape[:2], ttas[i]), []).append(i)
        for (_, _, tta), indices in groups.items():
            batch_start = time.monotonic()
            try:
                batch = np.stack([images[i] for i in indices])
                labels = await asyncio.to_thread(self.segmenter.engine.segment, batch, tta)
            except Exception as exc:  # noqa: BLE001 - one failed batch fails its requests, not the replica
                log.exception("batch of %d failed", len(indices))
                for i in indices:
                    results[i] = {"error": "internal", "message": f"{type(exc).__name__}: {exc}"}
                continue
            infer = time.monotonic() - batch_start
            self.batch_size.observe(len(indices), self.tags)
            for i, lab in zip(indices, labels):
                queue = batch_start - arrivals[i]
                self.inference.observe(infer, self.tags)
                self.queue_wait.observe(queue, self.tags)
                results[i] = {
                    "labels": lab,
                    "batch_size": len(indices),
                    "first_of_batch": i == indices[0],  # the ingress counts the batch once, with it
                    "timings": {"queue": queue, "inference": infer},
                }
        return results
