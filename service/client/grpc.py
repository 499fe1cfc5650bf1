"""gRPC client: unary `segment`, `stream(frames)` as a generator, `models`, `ready`.

    from service.client import GrpcSegmentationClient
    with GrpcSegmentationClient("localhost:50051") as client:
        result = client.segment("frame.jpg")             # same SegmentResult as the REST client
        for r in client.stream(frames, policy="latest"):  # frames: HxWx3 uint8 arrays (or encoded bytes)
            r.frame_id, r.labels, r.latency_s, r.dropped_ids

Arrays travel as raw RGB frames (no encoding on either side); paths and bytes as encoded images.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from ..errors import CODES
from ..proto import segmentation_pb2 as pb
from ..proto import segmentation_pb2_grpc as pb_grpc
from .results import SegmentationError, SegmentResult, decode_labels_png, trace_context

FORMATS = {"png": pb.LABELS_PNG, "raw": pb.LABELS_RAW, "overlay": pb.OVERLAY_JPEG, "stats": pb.STATS_ONLY}
POLICIES = {"latest": pb.DROP_POLICY_LATEST, "block": pb.DROP_POLICY_BLOCK}
HTTP_OF_STATUS = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
MAX_MESSAGE = 256 * 1024 * 1024  # the server enforces its own, smaller limit


def error_from_rpc(error: grpc.RpcError):
    """A gRPC status as the REST client's SegmentationError (same codes, HTTP-equivalent status)."""
    trailers = dict(error.trailing_metadata() or ())
    status = error.code().name if error.code() else "UNKNOWN"
    code = trailers.get("error-code") or status.lower()
    http = CODES[code][0] if code in CODES else HTTP_OF_STATUS.get(status, 500)
    retry = trailers.get("retry-after")
    exc = SegmentationError(http, code, error.details() or status, float(retry) if retry else None)
    exc.grpc_status = status
    return exc


def image_request(image, **fields) -> pb.SegmentRequest:
    """A path, bytes, HxWx3 uint8 array or PIL image -> SegmentRequest (arrays as raw frames)."""
    if isinstance(image, (str, os.PathLike)):
        return pb.SegmentRequest(encoded=Path(image).read_bytes(), **fields)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return pb.SegmentRequest(encoded=bytes(image), **fields)
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"frames must be HxWx3 uint8 RGB, not {image.shape} {image.dtype}")
        h, w = image.shape[:2]
        return pb.SegmentRequest(
            raw=pb.RawFrame(height=h, width=w, rgb=np.ascontiguousarray(image).tobytes()), **fields
        )
    raise TypeError(f"cannot send a {type(image).__name__} as an image")


def labels_of(response: pb.SegmentResponse) -> np.ndarray | None:
    if response.format == pb.LABELS_RAW and response.labels:
        return np.frombuffer(response.labels, np.uint8).reshape(response.height, response.width)
    if response.format == pb.LABELS_PNG and response.labels:
        return decode_labels_png(response.labels)
    return None


def timings_of(response: pb.SegmentResponse) -> dict:
    t = response.timings
    return {
        "decode": t.decode_ms,
        "queue": t.queue_ms,
        "inference": t.inference_ms,
        "encode": t.encode_ms,
        "total": t.total_ms,
    }


@dataclass
class StreamResult:
    frame_id: int
    response: pb.SegmentResponse
    latency_s: float  # client side: from handing the frame to gRPC to receiving its result
    labels: np.ndarray | None = None
    dropped_ids: list[int] = field(default_factory=list)  # frames the server dropped before this result
    error: tuple[str, str] | None = None  # (code, message) when this frame could not be served

    @property
    def timings_ms(self) -> dict:
        return timings_of(self.response)


class GrpcSegmentationClient:
    """Thread-safe (one grpc channel). `target` is host:port; `tls=True` or `root_certificates`
    (PEM bytes) for a TLS server."""

    def __init__(
        self,
        target: str = "localhost:50051",
        api_key: str | None = None,
        timeout: float = 120.0,
        tls: bool = False,
        root_certificates: bytes | None = None,
    ):
        options = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
        if tls or root_certificates:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.target = target
        self.timeout = timeout
        self.metadata = (("x-api-key", api_key),) if api_key else ()
        self.stub = pb_grpc.SegmentationStub(self.channel)

    def call_metadata(self) -> tuple:
        """The API key, and the caller's trace context (the stream's or the request's span joins it)."""
        return self.metadata + tuple(trace_context().items())

    def segment(
        self,
        image,
        model: str | None = None,
        format: str = "png",
        deadline_ms: int | None = None,
        tta: str | None = None,
        priority: int | None = None,
    ):
        """Like SegmentationClient.segment; `format` is png, raw, overlay or stats."""
        request = image_request(
            image,
            model=model or "",
            format=FORMATS[format],
            deadline_ms=deadline_ms or 0,
            tta=tta or "",
            priority=priority or 0,
        )
        try:
            response = self.stub.Segment(request, timeout=self.timeout, metadata=self.call_metadata())
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        result = SegmentResult(
            model=response.model,
            labels=labels_of(response),
            timings_ms=timings_of(response),
            content=response.labels,
            tta=response.tta or "none",
        )
        if format == "overlay":
            result.overlay = response.labels
        result.stats = {
            "model": response.model,
            "height": response.height,
            "width": response.width,
            "class_pixels": list(response.class_pixels),
            "batch_size": response.batch_size,
        }
        return result

    def stream(
        self,
        frames: Iterable,
        model: str | None = None,
        format: str = "raw",
        policy: str = "latest",
        max_in_flight: int | None = None,
        deadline_ms: int | None = None,
        frame_ids: Iterable[int] | None = None,
        priority: int | None = None,
    ) -> Iterator[StreamResult]:
        """Send `frames` (arrays, bytes or paths) on one StreamSegment call; yield results in frame order.

        The generator pulls frames as gRPC sends them, so a slow `frames` iterator paces the stream.
        Closing the generator early cancels the call (the server frees the stream's work at once).
        """
        sent: dict[int, float] = {}
        lock = threading.Lock()
        ids = iter(frame_ids) if frame_ids is not None else None

        def requests():
            first = True
            for n, frame in enumerate(frames):
                frame_id = next(ids) if ids is not None else n
                fields = {"frame_id": frame_id, "format": FORMATS[format], "deadline_ms": deadline_ms or 0}
                if first:
                    fields.update(
                        model=model or "",
                        drop_policy=POLICIES[policy],
                        max_in_flight=max_in_flight or 0,
                        priority=priority or 0,
                    )
                    first = False
                request = image_request(frame, **fields)
                with lock:
                    sent[frame_id] = time.perf_counter()
                yield request

        call = self.stub.StreamSegment(requests(), metadata=self.call_metadata())
        try:
            for response in call:
                now = time.perf_counter()
                with lock:
                    start = sent.pop(response.frame_id, now)
                    for dropped in response.dropped_frame_ids:
                        sent.pop(dropped, None)
                error = (response.error.code, response.error.message) if response.HasField("error") else None
                yield StreamResult(
                    response.frame_id,
                    response,
                    now - start,
                    labels_of(response),
                    list(response.dropped_frame_ids),
                    error,
                )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and call.cancelled():
                return
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()  # no-op once finished; frees the server's work when the caller stops early

    def models(self) -> dict:
        try:
            response = self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        models = [
            {
                "name": m.name,
                "arch": m.arch,
                "weights": m.weights,
                "classes": list(m.classes),
                "palette": [[c.r, c.g, c.b] for c in m.palette],
                "ready": m.ready,
                "dtype": m.dtype,
                "cuda_graphs": m.cuda_graphs,
                "published_miou": m.published_miou or None,
            }
            for m in response.models
        ]
        return {"models": models, "default": response.default_model}

    def ready(self, timeout: float = 2.0) -> bool:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            reply = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class StreamStats:
    """Running totals of a stream and a one-second window for live fps and latency."""

    def __init__(self):
        self.start = time.perf_counter()
        self.served = self.dropped = self.errors = 0
        self.latencies: list[float] = []
        self.window: list[tuple[float, float]] = []  # (arrival, latency) in the last second

    def add(self, result: StreamResult) -> None:
        now = time.perf_counter()
        self.dropped += len(result.dropped_ids)
        if result.error:
            self.errors += 1
            return
        self.served += 1
        self.latencies.append(result.latency_s)
        self.window.append((now, result.latency_s))
        self.window = [(t, lat) for t, lat in self.window if t > now - 1.0]

    def live(self) -> str:
        lats = np.asarray([lat for _, lat in self.window]) * 1000
        p50, p95 = (np.percentile(lats, 50), np.percentile(lats, 95)) if len(lats) else (float("nan"),) * 2
        return (
            f"fps {len(self.window):3d}  latency p50 {p50:6.1f} ms  p95 {p95:6.1f} ms  "
            f"served {self.served}  dropped {self.dropped}  errors {self.errors}"
        )

    def summary(self) -> dict:
        seconds = time.perf_counter() - self.start
        lats = np.asarray(self.latencies) * 1000
        pct = {f"p{q}_ms": round(float(np.percentile(lats, q)), 2) if len(lats) else None for q in (50, 90, 99)}
        return {
            "served": self.served,
            "dropped": self.dropped,
            "errors": self.errors,
            "seconds": round(seconds, 2),
            "fps": round(self.served / seconds, 2) if seconds else 0.0,
            **pct,
        }
