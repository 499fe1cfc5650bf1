"""OpenTelemetry traces: a server span per request at each front door, a child span per phase.

A request's span is named as OpenTelemetry's HTTP and gRPC conventions name server spans
("POST /segment", "bisenet.v1.Segmentation/Segment") and continues the caller's trace when the
request carries a W3C `traceparent` header or gRPC metadata entry. Its children are the phases
the metrics already measure: decode, queue, infer (with the worker's input preparation as its
child) and encode. They are recorded after the fact from those measurements: the worker's batch
times are CLOCK_MONOTONIC readings, which every process on the host shares, so no span crosses a
process boundary and the worker does no tracing work at all.

Stream frames are traces of their own, each linked to its stream's span: one trace per stream
would grow without bound on a camera that streams for hours.

Off unless --trace-endpoint is set: spans then come from OpenTelemetry's no-op tracer. When on,
spans are exported in batches over OTLP/HTTP by a background thread, off the request path; an
unreachable collector costs log lines, never requests.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from . import __version__

log = logging.getLogger("service.tracing")
PROPAGATOR = TraceContextTextMapPropagator()  # W3C traceparent and tracestate
# gRPC statuses that are the server's failure (OpenTelemetry's gRPC conventions); the others are the caller's.
FLUSH_SECONDS = 5.0  # at exit, the longest wait for the last spans to be exported
GRPC_SERVER_ERRORS = {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}


def http_attributes(method: str, route: str) -> dict:
    return {"http.request.method": method, "http.route": route}


def grpc_attributes(service: str, method: str) -> dict:
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}


def epoch_ns(monotonic: float, now_monotonic: float, now_ns: int) -> int:
    """A time.monotonic() reading as nanoseconds since the epoch, which spans are stamped in."""
    return now_ns - round((now_monotonic - monotonic) * 1e9)


def recorded_context() -> trace.SpanContext | None:
    """The current span's context when this service records it (tracing on, request sampled)."""
    span = trace.get_current_span()
    return span.get_span_context() if span.is_recording() else None


class Tracing:
    """The service's tracer: exporting to `endpoint` (OTLP/HTTP) or, without one, doing nothing."""

    def __init__(self, endpoint: str | None = None, rate: float = 1.0):
        self.provider = None
        if not endpoint:
            self.tracer: trace.Tracer = trace.NoOpTracer()
            return
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES still apply (Resource.create reads them);
        # OTEL_EXPORTER_OTLP_HEADERS etc. configure the exporter (a collector's API key).
        resource = Resource.create(
            {"service.name": os.environ.get("OTEL_SERVICE_NAME", "bisenet-serve"), "service.version": __version__}
        )
        # A caller's sampled (or unsampled) traceparent decides; requests without one are sampled at `rate`.
        self.provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(rate)), resource=resource)
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self.tracer = self.provider.get_tracer("bisenet_serve", __version__)
        log.info("tracing: OTLP/HTTP to %s, %.3g of requests without a traceparent", endpoint, rate)

    @classmethod
    def from_settings(cls, settings) -> Tracing:
        return cls(settings.trace_endpoint, settings.trace_rate)

    @contextlib.contextmanager
    def request(
        self, name: str, carrier: Mapping[str, str] | None, attributes: dict, *, new_trace: bool = False
    ) -> Iterator[None]:
        """A request's server span, current inside the block. It continues the trace in `carrier`
        (headers or metadata with lower-case keys), or with `new_trace` starts a trace of its own
        linked to the current span (a stream frame, linked to its stream)."""
        links = ()
        if new_trace:
            current = trace.get_current_span().get_span_context()
            links = (Link(current),) if current.is_valid else ()
            parent = Context()
        else:
            parent = PROPAGATOR.extract(carrier or {})
        with self.tracer.start_as_current_span(
            name,
            context=parent,
            kind=SpanKind.SERVER,
            attributes=attributes,
            links=links,
            record_exception=False,  # failures are ServiceErrors, recorded by `rejected`
            set_status_on_exception=False,
        ):
            yield

    # -- what the observations (metrics.py) add to the current request's span ------------------------
    @staticmethod
    def outcome(code: str, model: str | None = None, protocol: str | None = None) -> None:
        """The finished request (or stream): its status (code: an HTTP status or a gRPC status name),
        and what ran."""
        span = trace.get_current_span()
        if not span.is_recording():
            return
        if model is not None:
            span.set_attributes({"bisenet.model": model, "bisenet.protocol": protocol})
        if code.isdigit():
            span.set_attribute("http.response.status_code", int(code))
            failed = int(code) >= 500
        else:
            span.set_attribute("rpc.grpc.status_code", grpc.StatusCode[code].value[0])
            failed = code in GRPC_SERVER_ERRORS
        if failed:
            span.set_status(Status(StatusCode.ERROR))

    @staticmethod
    def exemplar() -> dict[str, str] | None:
        """The current request's trace id as a Prometheus exemplar's labels, when it is being traced."""
        context = recorded_context()
        return {"trace_id": f"{context.trace_id:032x}"} if context else None

    @staticmethod
    def response_header() -> tuple[str, str] | None:
        """The W3C `traceresponse` header naming the current request's trace, when it is being
        traced, so a client that does not trace can still look its request up."""
        context = recorded_context()
        return ("traceresponse", f"00-{context.trace_id:032x}-{context.span_id:016x}-01") if context else None

    @staticmethod
    def rejected(code: str, message: str) -> None:
        """A request (or a stream frame) refused with the service's error `code`."""
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attribute("error.type", code)
            span.add_event("refused", {"bisenet.error.code": code, "bisenet.error.message": message})

    def phases(self, served: list, encode_seconds: float) -> None:
        """Child spans of the current request for each served image (core.Served): decode, queue,
        infer and its prepare; then the encoding of them all, which ended just now."""
        parent = trace.get_current_span()
        if not parent.is_recording():
            return
        now, now_ns = time.monotonic(), time.time_ns()

        def phase(name, start, seconds, attributes=None, under=parent):
            span = self.tracer.start_span(
                name,
                context=trace.set_span_in_context(under),
                start_time=epoch_ns(start, now, now_ns),
                attributes=attributes,
            )
            span.end(end_time=epoch_ns(start + max(seconds, 0.0), now, now_ns))
            return span

        for index, s in enumerate(served):
            image = {"bisenet.image": index} if len(served) > 1 else {}
            r, t = s.result, s.timings
            phase("decode", s.decode_started, t["decode"], image)
            phase("queue", r.arrival, r.started - r.arrival, image)
            infer = phase(
                "infer",
                r.started,
                t["inference"],
                {**image, "bisenet.model": r.model, "bisenet.tta": s.tta, "bisenet.batch_size": r.batch_size},
            )
            if r.prepare:
                phase("prepare", r.started, r.prepare, under=infer)
        phase("encode", now - encode_seconds, encode_seconds)

    def shutdown(self, timeout: float = FLUSH_SECONDS) -> None:
        """Export what is still buffered (at drain), waiting at most `timeout`: a collector that is
        down must not hold up the exit (the exporter retries it for longer)."""
        if self.provider is None:
            return
        flush = threading.Thread(target=self.provider.shutdown, name="trace-flush", daemon=True)
        flush.start()
        flush.join(timeout)
        if flush.is_alive():
            log.warning("tracing: spans not exported within %.0f s at exit are dropped", timeout)
