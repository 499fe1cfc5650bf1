"""REST clients for the segmentation service, blocking and asyncio.

from service.client import SegmentationClient
with SegmentationClient("http://localhost:8000") as client:
    result = client.segment("frame.jpg")          # path, bytes, HxWx3 uint8 array or PIL image
    result.labels                                  # HxW uint8 train ids

async with AsyncSegmentationClient("http://localhost:8000") as client:
    results = await asyncio.gather(*(client.segment(f) for f in frames))
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from .results import Retrying, SegmentationError, SegmentResult, decode_labels_png, trace_context, trace_id_of

MEDIA_BY_SUFFIX = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
}


def encode_image(image) -> tuple[bytes, str]:
    """A path, bytes, ndarray or PIL image -> (body, content type). Arrays are sent as lossless PNG."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        return path.read_bytes(), MEDIA_BY_SUFFIX.get(path.suffix.lower(), "application/octet-stream")
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image), "application/octet-stream"
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=1)
        return buf.getvalue(), "image/png"
    raise TypeError(f"cannot send a {type(image).__name__} as an image")


def parse_server_timing(header: str) -> dict:
    out = {}
    for part in filter(None, (p.strip() for p in header.split(","))):
        name, _, dur = part.partition(";dur=")
        if dur:
            out[name] = float(dur)
    return out


def error_from(response: httpx.Response) -> SegmentationError:
    try:
        err = response.json()["error"]
        code, message = err.get("code", "error"), err.get("message", response.text)
    except (ValueError, KeyError, TypeError):
        code, message = "error", response.text
    retry = response.headers.get("retry-after")
    trace_id = trace_id_of(response.headers.get("traceresponse"))
    return SegmentationError(response.status_code, code, message, float(retry) if retry else None, trace_id)


def result_from(response: httpx.Response, fmt: str) -> SegmentResult:
    result = SegmentResult(
        model=response.headers.get("x-model", ""),
        tta=response.headers.get("x-tta", "none"),
        content=response.content,
        timings_ms=parse_server_timing(response.headers.get("server-timing", "")),
        trace_id=trace_id_of(response.headers.get("traceresponse")),
    )
    if fmt == "png":
        result.labels = decode_labels_png(response.content)
    elif fmt == "raw":
        h, w = int(response.headers["x-height"]), int(response.headers["x-width"])
        result.labels = np.frombuffer(response.content, np.uint8).reshape(h, w)
    elif fmt == "overlay":
        result.overlay = response.content
    else:
        result.stats = response.json()
        result.labels = decode_labels_png(base64.b64decode(result.stats["labels_png"]))
    return result


def http_options(url: str, api_key: str | None, timeout: float) -> dict:
    return {"base_url": url, "headers": {"X-API-Key": api_key} if api_key else {}, "timeout": timeout}


def segment_params(model, format, deadline_ms, tta, priority) -> dict:
    """POST /segment's query parameters for the request's options."""
    return {
        "format": format,
        **({"model": model} if model else {}),
        **({"tta": tta} if tta else {}),
        **({"deadline_ms": deadline_ms} if deadline_ms else {}),
        **({"priority": priority} if priority else {}),
    }


class SegmentationClient:
    """REST client; one keep-alive connection pool. Thread-safe (httpx.Client is). `retries`: how
    many times a request refused with 429 or 503 is sent again, after the service's Retry-After."""

    def __init__(
        self, url: str = "http://localhost:8000", api_key: str | None = None, timeout: float = 120.0, retries: int = 0
    ):
        self.url, self.retries = url.rstrip("/"), retries
        self.http = httpx.Client(**http_options(self.url, api_key, timeout))

    def segment(
        self,
        image,
        model: str | None = None,
        format: str = "png",
        deadline_ms: int | None = None,
        tta: str | None = None,
        priority: int | None = None,
    ) -> SegmentResult:
        """`model` may be 'auto' and `tta` none, flip, ms_flip or 'auto'; the result says what ran.
        `priority`: 1 (the default) runs first, then 2, ... up to the service's --priority-levels.
        A retried request keeps its deadline: each attempt is sent with what is left of it."""
        body, content_type = encode_image(image)
        retry = Retrying(self.retries, deadline_ms)
        while True:
            params = segment_params(model, format, retry.remaining_ms(), tta, priority)
            headers = {"Content-Type": content_type, **trace_context()}
            response = self.http.post("/segment", content=body, params=params, headers=headers)
            if response.status_code == 200:
                return result_from(response, format)
            time.sleep(retry.wait_before_next(error_from(response)))

    def models(self) -> dict:
        return checked(self.http.get("/models")).json()

    def ready(self) -> bool:
        try:
            return self.http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncSegmentationClient:
    """The REST client for asyncio programs: the same methods as SegmentationClient, awaited. One
    keep-alive connection pool; many requests may be in flight at once (they batch on the service)."""

    def __init__(
        self, url: str = "http://localhost:8000", api_key: str | None = None, timeout: float = 120.0, retries: int = 0
    ):
        self.url, self.retries = url.rstrip("/"), retries
        self.http = httpx.AsyncClient(**http_options(self.url, api_key, timeout))

    async def segment(
        self,
        image,
        model: str | None = None,
        format: str = "png",
        deadline_ms: int | None = None,
        tta: str | None = None,
        priority: int | None = None,
    ) -> SegmentResult:
        """As SegmentationClient.segment. Encoding an array image (PNG) runs in this thread: pass
        bytes or a path when the event loop must not wait for it."""
        body, content_type = encode_image(image)
        retry = Retrying(self.retries, deadline_ms)
        while True:
            params = segment_params(model, format, retry.remaining_ms(), tta, priority)
            headers = {"Content-Type": content_type, **trace_context()}
            response = await self.http.post("/segment", content=body, params=params, headers=headers)
            if response.status_code == 200:
                return result_from(response, format)
            await asyncio.sleep(retry.wait_before_next(error_from(response)))

    async def models(self) -> dict:
        return checked(await self.http.get("/models")).json()

    async def ready(self) -> bool:
        try:
            return (await self.http.get("/readyz")).status_code == 200
        except httpx.HTTPError:
            return False

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()


def checked(response: httpx.Response) -> httpx.Response:
    if response.status_code != 200:
        raise error_from(response)
    return response
