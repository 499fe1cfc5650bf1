"""What both clients return: a result and the error a refused request raises."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image


class SegmentationError(RuntimeError):
    """The service refused a request: HTTP status, error code, message and Retry-After (seconds)."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after

    @property
    def retryable(self) -> bool:
        return self.status in (429, 503)


@dataclass
class SegmentResult:
    model: str
    labels: np.ndarray | None = None  # HxW train ids (png, raw and json formats)
    overlay: bytes | None = None  # JPEG (overlay format)
    stats: dict | None = None  # per-class counts (json format)
    timings_ms: dict = field(default_factory=dict)  # from the Server-Timing header
    content: bytes = b""  # the response body as received
    tta: str = "none"  # the test-time augmentation that ran (the choice when `auto` was asked)

    def save_overlay(self, path: str | os.PathLike) -> None:
        Path(path).write_bytes(self.overlay or b"")


def decode_labels_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img)  # palette indices are the train ids
