"""What the REST front door needs from a service, answered by Ray deployments instead of a worker.

`service.api.rest.create_app` takes a SegmentationService; this class offers the same attributes
(metrics, settings, resolve_model, segment, models_info, ready...) so the ingress serves the very
same routes, decoders, encoders, errors and metrics as `python -m service`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ray
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError

from ..api import imaging
from ..api.auth import key_matches
from ..choice import AUTO, DEFAULT_PRIORITY, RequestOptions, as_options, parse_options
from ..config import ALIASES, Settings
from ..core import DEFAULT_TIMEOUT, Served
from ..errors import CODES, ServiceError
from ..log_settings import LogSettings
from ..metrics import Metrics
from ..tracing import Tracing
from ..worker.link import Result

log = logging.getLogger("service.ray")
POLL_SECONDS = 1.0  # how often readiness and model info are refreshed from the replicas
INFO_TIMEOUT = 5.0
RETRY_AFTER = 1.0


class _NotDraining:
    """rest.py asks `dispatcher.draining` for its 503 reason; Serve drains replicas itself."""

    draining = False


class RayBackedService:
    def __init__(self, settings: Settings, handles: dict, replica_max_ongoing: int):
        self.settings = settings
        self.handles = handles  # model name -> DeploymentHandle of its segmentation deployment
        self.replica_max_ongoing = replica_max_ongoing  # requests each segmentation replica takes at once
        self.metrics = Metrics(settings.budget_seconds, tracing=Tracing.from_settings(settings))
        self.metrics.start_series(list(handles), [], sorted({reason for _, _, reason in CODES.values()}))
        self.dispatcher = _NotDraining()
        self.log_settings = LogSettings(settings.log_format)  # this ingress's own; replicas keep theirs
        self.pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="codec")
        self.default_model = settings.models[0].name
        self.info: dict[str, dict] = {}  # model -> what a replica reported; absent until one answers
        self.replica_counts: dict[str, int] = {}  # model -> running replicas, at the last poll
        self.in_flight: dict[str, int] = dict.fromkeys(handles, 0)  # this ingress's requests per model
        self._poller: asyncio.Task | None = None

    # -- readiness: a background poll, since rest.py reads `ready` and `models_info()` synchronously --
    def start_polling(self) -> None:
        if self._poller is None or self._poller.done():
            with contextlib.suppress(RuntimeError):  # outside a running loop: the next request starts it
                self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(POLL_SECONDS)

    async def refresh(self) -> None:
        """Which models have a running replica (asked of Serve's controller, which costs the replicas
        nothing), and each model's classes and palette (asked of a replica once: they never change)."""
        try:
            status = await asyncio.wait_for(asyncio.to_thread(serve.status), INFO_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - no answer means no replica we can vouch for
            log.info("Serve status unavailable: %s", exc)
            self.replica_counts = {}
            return
        counts = {}
        for name, handle in self.handles.items():
            app = status.applications.get(handle.app_name)
            deployment = app.deployments.get(handle.deployment_name) if app else None
            counts[name] = deployment.replica_states.get("RUNNING", 0) if deployment else 0
            if name not in self.info and counts[name] > 0:
                try:
                    self.info[name] = await asyncio.wait_for(handle.info.remote(), INFO_TIMEOUT)
                except Exception as exc:  # noqa: BLE001 - asked again at the next poll
                    log.info("model %s did not describe itself yet: %s", name, exc)
        self.replica_counts = counts

    @property
    def running(self) -> set[str]:
        """Models with at least one running replica, at the last poll."""
        return {name for name, count in self.replica_counts.items() if count > 0}

    @property
    def ready(self) -> bool:
        self.start_polling()
        ready = all(name in self.info and name in self.running for name in self.handles)
        self.metrics.ready.set(1 if ready else 0)
        return ready

    # -- what rest.py calls ---------------------------------------------------------------------
    def resolve_model(self, name: str | None) -> str:
        name = name or self.default_model
        name = ALIASES.get(name, name) if name not in self.handles else name
        if name not in self.handles:
            raise ServiceError("not_found", f"unknown model {name!r}; served: {', '.join(self.handles)}")
        return name

    def options(self, model: str | None, tta: str | None = None, deadline_ms=None, priority=None) -> RequestOptions:
        """The request's (model, tta, deadline_ms, priority), checked as on one host. `auto` needs the
        worker's latency estimates, which replicas behind Serve's router do not share, and Serve's
        batches have no priorities: both refused here."""
        options = parse_options(model, tta, deadline_ms, self.resolve_model, priority, self.settings.priority_levels)
        if AUTO in (options.model, options.tta):
            raise ServiceError("bad_request", "model=auto and tta=auto need the single-host service; name them on Ray")
        if options.priority != DEFAULT_PRIORITY:
            raise ServiceError(
                "bad_request", "priorities need the single-host service; Ray Serve runs requests in order"
            )
        return options

    def auto_info(self) -> dict:
        return {"menu": [], "upgrade_frames": None, "note": "model=auto is served by `python -m service` only"}

    def check_api_key(self, key: str | None) -> None:
        if self.settings.api_key and not key_matches(self.settings.api_key, key):
            raise ServiceError("unauthorized", "missing or wrong API key")

    def count_rejection(self, error: ServiceError) -> None:
        self.metrics.observe_rejection(error)

    async def run_in_pool(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def _decode(self, data: bytes) -> tuple[np.ndarray, ray.ObjectRef, float]:
        start = time.monotonic()
        rgb = imaging.decode_image(data, self.settings.max_pixels)
        decoded = time.monotonic() - start
        return rgb, ray.put(rgb), decoded  # the pixels travel through the object store, as they are

    async def segment(
        self,
        model: str | RequestOptions,
        protocol: str,
        *,
        data: bytes | None = None,
        rgb: np.ndarray | None = None,
        deadline_ms: int | None = None,
    ) -> Served:
        options = as_options(model, deadline_ms)
        model, deadline_ms = options.model, options.deadline_ms
        if model not in self.info or model not in self.running:
            await self.refresh()  # the first request may come before the first poll
        if model not in self.info or model not in self.running:
            raise ServiceError("not_ready", f"model {model} has no running replica yet", retry_after=RETRY_AFTER)
        self._admit(model)
        admitted = time.monotonic()
        deadline = admitted + deadline_ms / 1000 if deadline_ms else None
        self.metrics.queue_depth.labels(model).inc()
        try:
            decode_started = time.monotonic()
            if rgb is None:
                image, ref, decode_s = await self.run_in_pool(self._decode, data)
            else:  # raw pixels (v2 RGB tensors), checked by the front door
                image, ref, decode_s = rgb, ray.put(rgb), 0.0
            self.metrics.decode.labels(protocol).observe(decode_s)
            remaining = (deadline - time.monotonic()) if deadline else None
            if remaining is not None and remaining <= 0:
                raise ServiceError("deadline_exceeded", "the deadline passed while the image was decoded")
            reply = await self._call(model, ref, remaining, options.tta)
        finally:
            self.metrics.queue_depth.labels(model).dec()
            self.in_flight[model] -= 1
        if "error" in reply:
            raise ServiceError(reply["error"], reply["message"])
        timings = reply["timings"]
        self.metrics.queue_wait.labels(model).observe(timings["queue"])
        self.metrics.inference.labels(model).observe(timings["inference"])
        if reply.get("first_of_batch"):
            self.metrics.observe_batch(model, reply["batch_size"], 0.0, timings["inference"], 0.0)
        # The replica's clock is another host's: its batch is placed by its durations, ending now.
        started = time.monotonic() - timings["inference"]
        labels = np.asarray(reply["labels"])
        result = Result(labels, model, timings, reply["batch_size"], 0.0, started - timings["queue"], started)
        return Served(result, image, {"decode": decode_s, **timings}, options.tta, None, decode_started)

    def _admit(self, model: str) -> None:
        """Count the request in, or refuse it when this ingress already has every running replica's
        `--max-ongoing` plus `--max-queue` requests out for the model. Serve's own `max_queued_requests`
        stops counting a request once its router sends it to a replica, and a replica that hangs (a
        stuck device, a stopped process) never answers the send: without this bound such a replica
        would soak up every request that arrives."""
        capacity = self.replica_counts.get(model, 1) * self.replica_max_ongoing + self.settings.max_queue
        if self.in_flight[model] >= capacity:
            raise ServiceError("queue_full", f"every {model} replica's queue is full", retry_after=RETRY_AFTER)
        self.in_flight[model] += 1

    async def segment_batch(
        self, model: str, protocol: str, items: list[dict], *, deadline_ms=None, tta=None, priority=None, link=None
    ) -> list[Served]:
        """The v2 endpoints' batches: each item through `segment`, results in order."""
        options = self.options(model, tta, deadline_ms, priority)
        return list(await asyncio.gather(*(self.segment(options, protocol, **item) for item in items)))

    async def _call(self, model: str, ref: ray.ObjectRef, remaining: float | None, tta: str) -> dict:
        """One call to the model's deployment, its failures as the service's errors."""
        try:
            response = self.handles[model].segment.remote(ref, remaining, tta)
        except BackPressureError:
            raise ServiceError(
                "queue_full", f"every {model} replica's queue is full", retry_after=RETRY_AFTER
            ) from None
        try:
            return await asyncio.wait_for(response, remaining if remaining is not None else DEFAULT_TIMEOUT)
        except TimeoutError:
            response.cancel()
            raise ServiceError("deadline_exceeded", "the deadline passed before the result was ready") from None
        except asyncio.CancelledError:
            response.cancel()  # the client went away
            raise
        except BackPressureError:
            raise ServiceError(
                "queue_full", f"every {model} replica's queue is full", retry_after=RETRY_AFTER
            ) from None
        except (ActorDiedError, ActorUnavailableError, RayActorError) as exc:
            # The replica died with this request on it: Serve replaces it; the client may retry.
            log.warning("a %s replica failed mid-request: %s", model, exc)
            raise ServiceError(
                "worker_restarting", f"the {model} replica serving this request stopped; retry", retry_after=RETRY_AFTER
            ) from None
        except RayTaskError as exc:
            raise ServiceError("internal", f"the {model} replica failed: {exc}") from None

    def models_info(self) -> list[dict]:
        from model.zoo import ZOO, default_entry

        out = []
        for spec in self.settings.models:
            info = self.info.get(spec.name, {})
            entry = ZOO.get(spec.weights) if spec.weights else default_entry(spec.name)
            out.append(
                {
                    "name": spec.name,
                    "arch": info.get("arch"),
                    "weights": spec.weights or (entry.url if entry else None),
                    "published_miou": entry.miou if entry else None,
                    "published_miou_ms_flip": entry.miou_ms_flip if entry else None,
                    "ready": bool(info) and spec.name in self.running,
                    "classes": info.get("classes", []),
                    "palette": info.get("palette", []),
                    "dtype": info.get("dtype"),
                    "cuda_graphs": info.get("cuda_graphs", False),
                    "captured_graphs": info.get("graphs", []),
                }
            )
        return out

    def classes_palette(self, model: str) -> tuple[list, list]:
        info = self.info.get(model, {})
        return info.get("classes", []), info.get("palette", [])
