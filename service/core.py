"""The request path shared by REST and gRPC: admit, decode, run on a worker, encode, measure."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.checkpoint import CheckpointError, download
from model.predictor import resolve_weights

from .api import imaging
from .api.auth import key_matches
from .api.v2_shm import SharedMemoryRegions
from .choice import (
    Chooser,
    Mode,
    RequestOptions,
    StreamState,
    as_options,
    build_menu,
    parse_options,
    published_entry,
)
from .config import ALIASES, Settings
from .errors import CODES, ServiceError
from .log_settings import LogSettings
from .logs import Step
from .metrics import Metrics
from .tracing import Tracing
from .worker.link import Dispatcher, Result, WorkerLink
from .worker.shm import Slot

log = logging.getLogger("service")
DEFAULT_TIMEOUT = 120.0  # seconds a request without a deadline may wait before 504


@dataclass
class Served:
    result: Result
    image: np.ndarray | None  # the decoded RGB image (for overlays); None when the worker decoded it
    timings: dict  # seconds: decode, queue, inference (encode added by the caller)
    tta: str = "none"  # the test-time augmentation that ran (chosen when the request said auto)
    data: bytes | None = None  # the encoded image, kept while `image` is None
    decode_started: float = 0.0  # time.monotonic() when its decoding started (trace spans)

    @property
    def model(self) -> str:
        return self.result.model

    def decoded_image(self) -> np.ndarray:
        """The RGB image, decoded here on first use when the worker did the decoding (overlays)."""
        if self.image is None:
            self.image = imaging.decode_image(self.data, self.result.labels.size)
        return self.image


@dataclass
class Placed:
    """An image in its shared-memory slot, ready to submit."""

    image: np.ndarray | None  # None: the slot holds the compressed bytes (--decode worker)
    slot: Slot
    shape: tuple[int, int]
    encoded: int  # bytes of compressed image in the slot, 0 for pixels
    seconds: float  # decoding (or header reading) and copying
    started: float  # time.monotonic() when that began


def fetch_weights(settings: Settings) -> dict[str, str]:
    """Model name -> local weights path (or 'random'), downloading official files once, up front,
    so that a failed download stops start-up with a message naming the file and the mirror."""
    weights = {}
    for spec in settings.models:
        source = resolve_weights(spec.name, spec.weights)
        if source is None:
            weights[spec.name] = "random"
            log.info("fetch: model %s uses random weights", spec.name)
        elif source.startswith(("http://", "https://")):
            with Step(log, "fetch", "weights for %s from %s", spec.name, source):
                weights[spec.name] = str(download(source))
        elif not Path(source).is_file():
            raise CheckpointError(f"weights for model {spec.name!r}: file {source} does not exist")
        else:
            weights[spec.name] = source
            log.info("fetch: weights for %s are the local file %s", spec.name, source)
    return weights


def _retrieve(future: asyncio.Future) -> None:
    """Nobody awaits an abandoned request's future: read its outcome so asyncio does not log
    'Future exception was never retrieved' for every cancelled frame."""
    if not future.cancelled():
        future.exception()


class SegmentationService:
    def __init__(self, settings: Settings, model_weights: dict[str, str], shm_bytes: int = 1 << 30):
        self.settings = settings
        self.metrics = Metrics(settings.budget_seconds, tracing=Tracing.from_settings(settings))
        self.dispatcher = Dispatcher(settings, model_weights, self.metrics, shm_bytes)
        self.metrics.start_series(
            self.dispatcher.model_names, self.dispatcher.devices, sorted({reason for _, _, reason in CODES.values()})
        )
        self.pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="codec")
        self.default_model = settings.models[0].name
        # auto: decode where it is cheapest, on the GPU with nvJPEG; on a CPU the front end's
        # threads decode in parallel with the worker instead of in its one run thread.
        on_cuda = all(d.startswith("cuda") for d in self.dispatcher.devices)
        self.decode_in_worker = settings.decode == "worker" or (settings.decode == "auto" and on_cuda)
        self.started = time.time()
        self.shared_memory = SharedMemoryRegions()  # clients' regions (Triton's system shared memory)
        self.log_settings = LogSettings(settings.log_format, self.dispatcher.set_log_level)  # /v2/logging
        menu = build_menu([(m.name, m.weights) for m in settings.models], settings.auto_order)
        self.chooser = Chooser(menu, self._predict, settings.auto_upgrade_frames, self._probe)

    async def start(self) -> None:
        await self.dispatcher.start()
        self.metrics.ready.set(1)
        log.info(
            "ready: %s on %s, %.1fs after start",
            ", ".join(self.dispatcher.model_names),
            ", ".join(link.device for link in self.dispatcher.links),
            time.time() - self.started,
        )

    @property
    def ready(self) -> bool:
        ready = self.dispatcher.ready
        self.metrics.ready.set(1 if ready else 0)
        return ready

    def resolve_model(self, name: str | None) -> str:
        name = name or self.default_model
        name = ALIASES.get(name, name) if name not in self.dispatcher.depth else name
        if name not in self.dispatcher.depth:
            raise ServiceError(
                "not_found",
                f"unknown model {name!r}; served: {', '.join(self.dispatcher.model_names)}, "
                f"the aliases {', '.join(ALIASES)}, or auto",
            )
        return name

    def options(self, model: str | None, tta: str | None = None, deadline_ms=None, priority=None) -> RequestOptions:
        """A request's (model, tta, deadline_ms, priority) as any front door received them, checked (404/422)."""
        return parse_options(model, tta, deadline_ms, self.resolve_model, priority, self.settings.priority_levels)

    def _predict(self, mode: Mode, height: int, width: int) -> float | None:
        return self.dispatcher.estimates.predict(mode.model, mode.tta, height, width)

    def _probe(self, mode: Mode, height: int, width: int) -> bool:
        return self.dispatcher.estimates.probe(mode.model, mode.tta, height, width)

    def check_api_key(self, key: str | None) -> None:
        if self.settings.api_key and not key_matches(self.settings.api_key, key):
            raise ServiceError("unauthorized", "missing or wrong API key")

    async def run_in_pool(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def _decode_and_place(self, data: bytes | None, rgb: np.ndarray | None) -> Placed:
        start = time.monotonic()
        if rgb is None and self.decode_in_worker:
            header = imaging.read_header(data, self.settings.max_pixels)
            slot = self.dispatcher.place_encoded(data, header.height, header.width)
            return Placed(None, slot, (header.height, header.width), len(data), time.monotonic() - start, start)
        if rgb is None:
            rgb = imaging.decode_image(data, self.settings.max_pixels)
        elif rgb.shape[0] * rgb.shape[1] > self.settings.max_pixels:
            raise ServiceError(
                "too_large", f"frame has {rgb.shape[0] * rgb.shape[1]} pixels; the limit is {self.settings.max_pixels}"
            )
        decoded = time.monotonic() - start
        return Placed(rgb, self.dispatcher.place(rgb), rgb.shape[:2], 0, decoded, start)

    async def _decode_and_place_async(self, data, rgb):
        task = asyncio.get_running_loop().run_in_executor(self.pool, self._decode_and_place, data, rgb)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._release_abandoned)
            raise

    def _release_abandoned(self, task: asyncio.Future) -> None:
        """The caller went away mid-decode: give the slot back once the thread is done with it, and
        refresh the gauge (no later submit may come to do it). A cancelled task (pool shut down) holds none."""
        if not task.cancelled() and task.exception() is None:
            self.dispatcher.release_slot(task.result().slot)

    async def segment(
        self,
        model: str | RequestOptions,
        protocol: str,
        *,
        data: bytes | None = None,
        rgb: np.ndarray | None = None,
        deadline_ms: int | None = None,
        link: WorkerLink | None = None,
        stream: StreamState | None = None,
    ) -> Served:
        """Run one image (encoded bytes or an RGB array) through a worker. Raises ServiceError.

        `model` is a served name or the RequestOptions of `options()` (model and tta possibly
        'auto'); the mode is chosen once the image size is known, and a request whose explicit
        deadline cannot be met is refused (504) before it is computed. `stream` carries a
        stream's choice from frame to frame."""
        options = as_options(model, deadline_ms)
        deadline_ms = options.deadline_ms
        admitted = time.monotonic()
        deadline = admitted + deadline_ms / 1000 if deadline_ms else None
        model = self.chooser.placeholder(options)  # admitted under it until the choice is made
        self.dispatcher.admit(model, options.priority)
        try:
            with self.dispatcher.on_the_way():
                placed = await self._decode_and_place_async(data, rgb)
            self.metrics.decode.labels(protocol).observe(placed.seconds)
            try:
                link = link or self.dispatcher.pick_link()
                time_left = (deadline or admitted + self.settings.budget_seconds) - time.monotonic()
                queued = link.queued_seconds()
                choice = self.chooser.choose(options, *placed.shape, time_left, queued, stream)
                if choice.mode.model != model:
                    self.dispatcher.release(model)
                    model = None
                    self.dispatcher.admit(choice.mode.model, options.priority)
                    model = choice.mode.model
                self.metrics.mode_choices.labels(options.requested, str(choice.mode)).inc()
                future = self.dispatcher.submit(
                    model,
                    placed.slot,
                    placed.shape,
                    deadline,
                    link,
                    choice.mode.tta,
                    choice.predicted,
                    placed.encoded,
                    options.priority,
                )
            except ServiceError:
                self.dispatcher.release_slot(placed.slot)
                raise
            # Without a deadline: a generous wait, longer for work predicted to be long (ms_flip on a CPU).
            timeout = (deadline - time.monotonic()) if deadline else DEFAULT_TIMEOUT + 2 * (choice.predicted + queued)
            try:
                result = await asyncio.wait_for(asyncio.shield(future), max(timeout, 0.001))
            except TimeoutError:
                self.dispatcher.cancel(future)
                future.add_done_callback(_retrieve)
                raise ServiceError("deadline_exceeded", "the deadline passed before the result was ready") from None
            except asyncio.CancelledError:
                self.dispatcher.cancel(future)  # the client went away: drop it if still queued
                future.add_done_callback(_retrieve)
                raise
        finally:
            if model is not None:
                self.dispatcher.release(model)
        timings = {"decode": placed.seconds, **result.timings}
        return Served(result, placed.image, timings, choice.mode.tta, data, placed.started)

    async def segment_batch(
        self,
        model: str,
        protocol: str,
        items: list[dict],
        *,
        deadline_ms: int | None = None,
        tta: str | None = None,
        priority: int | None = None,
        link: WorkerLink | None = None,
    ) -> list[Served]:
        """Several images of one request (each `data=` or `rgb=`), each admitted and batched by the
        worker like a single one, results in order. The first error cancels the others and is raised.
        `model` and `tta` may be 'auto' (the choice is made per image)."""
        options = self.options(model, tta, deadline_ms, priority)
        tasks = [asyncio.ensure_future(self.segment(options, protocol, link=link, **item)) for item in items]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # their slots and queue places are freed
            raise

    def count_rejection(self, error: ServiceError) -> None:
        self.metrics.observe_rejection(error)

    def models_info(self) -> list[dict]:
        out = []
        for spec in self.settings.models:
            info = self.dispatcher.model_info(spec.name)
            entry = published_entry(spec.name, spec.weights)
            out.append(
                {
                    "name": spec.name,
                    "arch": info.get("arch"),
                    "weights": spec.weights or (entry.url if entry else None),
                    "published_miou": entry.miou if entry else None,
                    "published_miou_ms_flip": entry.miou_ms_flip if entry else None,
                    "ready": bool(info) and self.ready,
                    "classes": info.get("classes", []),
                    "palette": info.get("palette", []),
                    "dtype": info.get("dtype"),
                    "cuda_graphs": info.get("cuda_graphs", False),
                    "captured_graphs": info.get("graphs", []),
                    "latency_estimates": self.latency_estimates(spec.name),
                }
            )
        return out

    def latency_estimates(self, model: str) -> dict:
        """What model=auto goes by: measured times, and predictions at the warm shapes per tta."""
        shapes = self.settings.warm_shapes or ((1024, 2048),)
        predicted = []
        for height, width in shapes:
            for tta in ("none", "flip", "ms_flip"):
                seconds = self.dispatcher.estimates.predict(model, tta, height, width)
                if seconds is not None:
                    predicted.append({"tta": tta, "height": height, "width": width, "ms": round(seconds * 1000, 3)})
        return {"measured": self.dispatcher.estimates.measured(model), "predicted": predicted}

    def auto_info(self) -> dict:
        return {"menu": [str(mode) for mode in self.chooser.menu], "upgrade_frames": self.chooser.upgrade_frames}

    def classes_palette(self, model: str) -> tuple[list, list]:
        info = self.dispatcher.model_info(model)
        return info.get("classes", []), info.get("palette", [])

    async def drain_and_stop(self) -> None:
        self.metrics.ready.set(0)
        await self.dispatcher.drain(self.settings.drain_seconds)
        await self.dispatcher.stop()
        self.shared_memory.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.metrics.tracing.shutdown()
