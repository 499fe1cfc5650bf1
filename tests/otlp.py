"""Checks of the spans the service sends a real OTLP/HTTP receiver (service/bench/trace_sink.py), for
tests/test_tracing.py and tests/test_ray_cluster.py (the Ray ingress)."""

from __future__ import annotations

import secrets

from opentelemetry.proto.trace.v1.trace_pb2 import Span

from service.bench.trace_sink import attributes

EXPORT_ENV = {"OTEL_BSP_SCHEDULE_DELAY": "100"}  # the service exports every 0.1 s, not 5 s
SLACK_NS = 3_000_000  # phases are placed from measured durations; their edges may differ by this much


def traceparent(sampled: bool = True) -> tuple[bytes, bytes, str]:
    """A caller's (trace id, span id, W3C traceparent header)."""
    trace_id, span_id = secrets.token_bytes(16), secrets.token_bytes(8)
    return trace_id, span_id, f"00-{trace_id.hex()}-{span_id.hex()}-{'01' if sampled else '00'}"


def by_name(spans: list[Span]) -> dict[str, list[Span]]:
    out: dict[str, list[Span]] = {}
    for span in spans:
        out.setdefault(span.name, []).append(span)
    return out


def check_phases(spans: list[Span], server: Span, model: str, images: int = 1) -> None:
    """decode, queue, infer (+ prepare) per image and one encode: children of `server`, in order, inside it."""
    named = by_name(spans)
    for name in ("decode", "queue", "infer"):
        assert len(named[name]) == images, (name, [s.name for s in spans])
    assert len(named["encode"]) == 1
    for span in (*named["decode"], *named["queue"], *named["infer"], *named["encode"]):
        assert span.parent_span_id == server.span_id, span.name
        assert span.start_time_unix_nano <= span.end_time_unix_nano
        assert server.start_time_unix_nano - SLACK_NS <= span.start_time_unix_nano, span.name
        assert span.end_time_unix_nano <= server.end_time_unix_nano + SLACK_NS, span.name
    for index in range(images):
        decode, queue, infer = (image_span(named[name], index) for name in ("decode", "queue", "infer"))
        assert decode.end_time_unix_nano <= queue.start_time_unix_nano + SLACK_NS
        assert abs(queue.end_time_unix_nano - infer.start_time_unix_nano) <= SLACK_NS
        assert infer.end_time_unix_nano <= named["encode"][0].start_time_unix_nano + SLACK_NS
        infer_attrs = attributes(infer.attributes)
        assert infer_attrs["bisenet.model"] == model and infer_attrs["bisenet.batch_size"] >= 1
        assert infer_attrs["bisenet.tta"] == "none"
    for prepare in named.get("prepare", []):  # the worker's input preparation, inside its infer span
        parent = next(s for s in named["infer"] if s.span_id == prepare.parent_span_id)
        assert parent.start_time_unix_nano <= prepare.end_time_unix_nano <= parent.end_time_unix_nano + SLACK_NS


def image_span(spans: list[Span], index: int) -> Span:
    """The span of the request's image `index` (a request of one image does not number it)."""
    return next(s for s in spans if attributes(s.attributes).get("bisenet.image", 0) == index)
