"""What the clients share: the result, the error a refused request raises, when to retry it, and
the caller's trace context to send along."""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from opentelemetry import propagate
from PIL import Image


class SegmentationError(RuntimeError):
    """The service refused a request: HTTP status, error code, message and Retry-After (seconds)."""

    def __init__(
        self, status: int, code: str, message: str, retry_after: float | None = None, trace_id: str | None = None
    ):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after
        self.trace_id = trace_id  # the service's trace of the request, when it traced it

    @property
    def retryable(self) -> bool:
        return self.status in (429, 503)


def trace_id_of(traceresponse: str | None) -> str | None:
    """The trace id in a W3C `traceresponse` header or trailer (00-TRACE-SPAN-FLAGS)."""
    parts = (traceresponse or "").split("-")
    return parts[1] if len(parts) == 4 else None


def trace_context() -> dict[str, str]:
    """The caller's current OpenTelemetry context as W3C headers (`traceparent`...), so the service's
    spans join the caller's trace; empty when the caller traces nothing."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


class Retrying:
    """When to retry a refused request: a 429 or 503 (the service says when, in Retry-After), at
    most `retries` times, and never past the request's own deadline."""

    BACKOFF = (0.1, 0.2, 0.5, 1.0, 2.0)  # seconds, when the service names no Retry-After

    def __init__(self, retries: int, deadline_ms: int | None):
        self.retries, self.deadline_ms = retries, deadline_ms
        self.attempt, self.started = 0, time.monotonic()

    def remaining_ms(self) -> int | None:
        """The deadline to send with this attempt: what is left of the original one."""
        if not self.deadline_ms:
            return self.deadline_ms
        return max(1, self.deadline_ms - int((time.monotonic() - self.started) * 1000))

    def wait_before_next(self, error: SegmentationError) -> float:
        """Seconds to wait before the next attempt; raises `error` when there is none."""
        delay = error.retry_after or self.BACKOFF[min(self.attempt, len(self.BACKOFF) - 1)]
        late = self.deadline_ms and (time.monotonic() - self.started + delay) * 1000 >= self.deadline_ms
        if not error.retryable or self.attempt >= self.retries or late:
            raise error
        self.attempt += 1
        return delay


@dataclass
class SegmentResult:
    model: str
    labels: np.ndarray | None = None  # HxW train ids (png, raw and json formats)
    overlay: bytes | None = None  # JPEG (overlay format)
    stats: dict | None = None  # per-class counts (json format)
    timings_ms: dict = field(default_factory=dict)  # from the Server-Timing header
    content: bytes = b""  # the response body as received
    tta: str = "none"  # the test-time augmentation that ran (the choice when `auto` was asked)
    trace_id: str | None = None  # the service's trace of the request, when it traced it (traceresponse)

    def save_overlay(self, path: str | os.PathLike) -> None:
        Path(path).write_bytes(self.overlay or b"")


def decode_labels_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img)  # palette indices are the train ids
