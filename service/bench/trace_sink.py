"""A minimal OpenTelemetry collector: an OTLP/HTTP trace receiver on 127.0.0.1 that keeps the spans
posted to it. What the tracing benchmark (tools/bench_tracing.py) and the tests send traces to."""

from __future__ import annotations

import http.server
import threading
import time

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span


class TraceSink:
    """Keeps every span posted to /v1/traces, with its resource's attributes; `url` is its base URL."""

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
        """The spans of one trace, once `count` of them have arrived (TimeoutError after `timeout`)."""
        deadline = time.monotonic() + timeout
        while len(self.of_trace(trace_id)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} spans of trace {trace_id.hex()} did not arrive in {timeout:g} s")
            time.sleep(0.05)
        time.sleep(0.3)  # and no more than that
        return self.of_trace(trace_id)

    def of_trace(self, trace_id: bytes) -> list[Span]:
        with self.lock:
            return [span for _, span in self.spans if span.trace_id == trace_id]

    def count(self) -> int:
        with self.lock:
            return len(self.spans)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def attributes(kvs) -> dict:
    """OTLP key-values as a dict of plain values."""
    out = {}
    for kv in kvs:
        kind = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, kind) if kind else None
    return out
