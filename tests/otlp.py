"""A real OTLP/HTTP trace receiver on 127.0.0.1 and checks of the spans the service sends it
(tests/test_tracing.py; tests/test_ray_cluster.py for the Ray ingress)."""

from __future__ import annotations

import http.server
import secrets
import threading
import time

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.servicekit import wait_for

EXPORT_ENV = {"OTEL_BSP_SCHEDULE_DELAY": "100"}  # the service exports every 0.1 s, not 5 s
SLACK_NS = 3_000_000  # phases are placed from measured durations; their edges may differ by this much


class Receiver:
    """An OTLP/HTTP trace receiver: keeps every span posted to /v1/traces, with its resource."""

    def __init__(self):
        self.spans: list[tuple[dict, Span]] = []  # (resource attributes, span)
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                export = ExportTraceServiceRequest.FromString(body)
                with receiver.lock:
                    for resource_spans in export.resource_spans:
                        resource = attributes(resource_spans.resource.attributes)
                        for scope_spans in resource_spans.scope_spans:
                            receiver.spans += [(resource, span) for span in scope_spans.spans]
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def trace(self, trace_id: bytes, count: int, timeout: float = 20.0) -> list[Span]:
        """The spans of one trace, once `count` of them have arrived."""
        wait_for(lambda: len(self._of(trace_id)) >= count, f"{count} spans of trace {trace_id.hex()}", timeout)
        time.sleep(0.3)  # and no more than that
        return self._of(trace_id)

    def _of(self, trace_id: bytes) -> list[Span]:
        with self.lock:
            return [span for _, span in self.spans if span.trace_id == trace_id]


def attributes(kvs) -> dict:
    out = {}
    for kv in kvs:
        kind = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, kind) if kind else None
    return out


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
