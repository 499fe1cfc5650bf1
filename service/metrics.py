"""Every Prometheus metric of the service, defined once, in the front end's single registry;
Triton's statistics (service/statistics.py) and the request's trace spans (service/tracing.py) are
fed by the same observations.

Units are seconds; histogram buckets are multiples of the frame budget (1 / target fps) so that
one bucket edge is exactly the budget. Labels carry no per-request or per-stream values.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder

from .errors import ServiceError
from .statistics import Statistics
from .tracing import Tracing

BUDGET_MULTIPLES = (0.03, 0.075, 0.15, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 7.5, 15.0, 30.0, 75.0, 150.0, 300.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
PROTOCOLS = ("http", "grpc", "grpc_stream", "v2_http", "v2_grpc", "v2_grpc_stream")  # v2_*: KServe v2 doors


class Metrics:
    def __init__(
        self, budget_seconds: float, registry: CollectorRegistry | None = None, tracing: Tracing | None = None
    ):
        self.registry = registry or CollectorRegistry()
        if registry is None:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        r = self.registry
        buckets = tuple(round(budget_seconds * m, 6) for m in BUDGET_MULTIPLES)
        self.budget_seconds = budget_seconds
        self.statistics = Statistics()
        self.tracing = tracing or Tracing()

        def hist(name, doc, labels):
            return Histogram(name, doc, labels, buckets=buckets, registry=r)

        self.request_duration = hist(
            "seg_request_duration_seconds",
            "End-to-end request time in the front end (decode to encoded reply)",
            ["model", "protocol", "code"],
        )
        self.decode = hist("seg_decode_seconds", "Image decode and validation time", ["protocol"])
        self.queue_wait = hist("seg_queue_wait_seconds", "Time from admission to the start of its batch", ["model"])
        self.inference = hist("seg_inference_seconds", "Worker time for the batch that served a request", ["model"])
        self.encode = hist("seg_encode_seconds", "Result encoding time", ["format"])
        self.batch_size = Histogram(
            "seg_batch_size", "Requests per executed batch", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("seg_queue_depth", "Requests admitted and not yet answered", ["model"], registry=r)
        self.in_flight = Gauge("seg_requests_in_flight", "Requests being handled by the front end", registry=r)
        self.target = Gauge("seg_realtime_target_seconds", "Frame budget: 1 / target fps", registry=r)
        self.target.set(budget_seconds)
        self.over_budget = Counter(
            "seg_requests_over_budget",
            "Successful requests slower than the frame budget",
            ["model", "protocol"],
            registry=r,
        )
        self.rejected = Counter("seg_requests_rejected", "Requests refused, by reason", ["reason"], registry=r)
        self.graph_replays = Counter(
            "seg_cuda_graph_replays", "Batches run by CUDA-graph replay", ["model"], registry=r
        )
        self.graph_misses = Counter(
            "seg_cuda_graph_misses", "Batches run eagerly although graphs are enabled", ["model"], registry=r
        )
        self.worker_restarts = Counter(
            "seg_worker_restarts",
            "Worker processes restarted after dying, by reason: crashed, or the device error that ended it",
            ["device", "reason"],
            registry=r,
        )
        self.device_memory = Gauge(
            "seg_device_memory_bytes", "Device memory held by the worker", ["device", "kind"], registry=r
        )
        self.ready = Gauge("seg_ready", "1 when every model is loaded and warm and the service takes work", registry=r)
        self.frames_dropped = Counter(
            "seg_stream_frames_dropped", "Stream frames dropped to keep latency bounded", ["model"], registry=r
        )
        self.streams_active = Gauge("seg_streams_active", "Open streaming calls", registry=r)
        self.shm_slots = Gauge("seg_shm_slots_in_use", "Shared-memory frame slots holding a request", registry=r)
        self.shm_bytes = Gauge("seg_shm_bytes", "Shared memory mapped for frame slots", registry=r)
        self.mode_choices = Counter(
            "seg_mode_choices",
            "Requests by the mode asked for and the mode run, each as MODEL:TTA (model=auto / tta=auto choose)",
            ["requested", "chosen"],
            registry=r,
        )

    def start_series(self, models: list[str], devices: list[str], reasons: list[str]) -> None:
        """Create every label child at zero, so an alert's increase() sees the first event too."""
        self.statistics.add_models(models)
        for model in models:
            for counter in (self.frames_dropped, self.graph_replays, self.graph_misses):
                counter.labels(model)
            for protocol in PROTOCOLS:
                self.over_budget.labels(model, protocol)
            self.queue_depth.labels(model).set(0)
        for device in devices:
            self.worker_restarts.labels(device, "crashed")
        for reason in reasons:
            self.rejected.labels(reason)

    def observe_request(self, model: str, protocol: str, code: str, seconds: float) -> None:
        """A finished request (code: the HTTP status or gRPC status name): its duration, the budget
        counter when it succeeded, and the statistics' success or fail."""
        ok = code in ("200", "OK")
        # A traced request's trace id rides on its bucket as an exemplar (OpenMetrics scrapes only):
        # a slow bucket in Grafana links to a trace that landed in it.
        self.request_duration.labels(model, protocol, code).observe(seconds, self.tracing.exemplar())
        if ok and seconds > self.budget_seconds:
            self.over_budget.labels(model, protocol).inc()
        self.statistics.request(model, ok, seconds)
        self.tracing.outcome(code, model, protocol)

    def observe_rejection(self, error: ServiceError) -> None:
        """A request (or stream frame) refused: counted by reason, and its span says why."""
        self.rejected.labels(error.reason).inc()
        self.tracing.rejected(error.code, error.message)

    def observe_outputs(self, fmt: str, served: list, seconds: float) -> None:
        """Responses encoded in `seconds` for these served images (core.Served): the encode time,
        each image's phases in the statistics (the worker's preparation counts as input), and the
        phases as spans of the current request's trace."""
        self.encode.labels(fmt).observe(seconds)
        self.tracing.phases(served, seconds)
        for s in served:
            t, prepare = s.timings, s.result.prepare
            self.statistics.image(
                s.model, t["queue"], t["decode"] + prepare, t["inference"] - prepare, seconds / len(served)
            )

    def observe_batch(self, model: str, size: int, prepare: float, infer: float, output: float) -> None:
        """A batch the worker ran in `infer` seconds, `prepare` of them preparing its inputs, and
        whose labels the front end read out in `output`."""
        self.batch_size.labels(model).observe(size)
        self.statistics.batch(model, size, prepare, infer - prepare, output)

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The registry in the format the scraper asks for: OpenMetrics (with exemplars) when its
        Accept header names it, as Prometheus's does, else the classic text format."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type
