"""A REST inference call's accounting, shared by POST /segment and the v2 infer route: its trace
span, the in-flight gauge and its duration by (model, status). gRPC's counterpart is
`ServicerBase.unary_call` in grpc.py."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from fastapi import Request, Response

from ..metrics import Metrics
from ..tracing import Tracing, http_attributes


@dataclass
class HttpCall:
    model: str = "none"  # the metric label: "none" until the request names a served model, then what ran
    status: int = 500  # what the handler answered; 500 unless it says otherwise
    started: float = field(default_factory=time.perf_counter)

    def answer(self, response: Response) -> Response:
        """The handler's response, noted (its status) and named (the trace's `traceresponse` header)."""
        self.status = response.status_code
        header = Tracing.response_header()
        if header is not None:
            response.headers[header[0]] = header[1]
        return response


@contextlib.contextmanager
def http_call(metrics: Metrics, request: Request, route: str, protocol: str) -> Iterator[HttpCall]:
    """Wraps a POST handler's body; the handler sets `call.model` and returns `call.answer(response)`.
    `route` is the path template (low cardinality: the span's name)."""
    call = HttpCall()
    metrics.in_flight.inc()
    with metrics.tracing.request(f"POST {route}", request.headers, http_attributes("POST", route)):
        try:
            yield call
        finally:
            metrics.in_flight.dec()
            metrics.observe_request(call.model, protocol, str(call.status), time.perf_counter() - call.started)
