"""gRPC clients, blocking and asyncio: unary `segment`, `stream(frames)`, `models`, `ready`.

    from service.client import GrpcSegmentationClient
    with GrpcSegmentationClient("localhost:50051") as client:
        result = client.segment("frame.jpg")             # same SegmentResult as the REST client
        for r in client.stream(frames, policy="latest"):  # frames: HxWx3 uint8 arrays (or encoded bytes)
            r.frame_id, r.labels, r.latency_s, r.dropped_ids

    async with AsyncGrpcSegmentationClient("localhost:50051") as client:
        async for r in client.stream(camera_frames()):    # an iterable or an async iterable
            ...

Arrays travel as raw RGB frames (no encoding on either side); paths and bytes as encoded images.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from ..errors import CODES
from ..proto import segmentation_pb2 as pb
from ..proto import segmentation_pb2_grpc as pb_grpc
from .results import SegmentationError, SegmentResult, decode_labels_png, trace_context, trace_id_of

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
    trace_id = trace_id_of(trailers.get("traceresponse"))
    exc = SegmentationError(http, code, error.details() or status, float(retry) if retry else None, trace_id)
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


def channel_of(aio, target: str, tls: bool, root_certificates: bytes | None):
    """A channel to `target` (grpc, or grpc.aio as `aio`), TLS when asked, with large messages."""
    options = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
    if tls or root_certificates:
        creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
        return aio.secure_channel(target, creds, options=options)
    return aio.insecure_channel(target, options=options)


def segment_request(image, model, format, deadline_ms, tta, priority) -> pb.SegmentRequest:
    fields = {"model": model or "", "format": FORMATS[format], "deadline_ms": deadline_ms or 0}
    return image_request(image, **fields, tta=tta or "", priority=priority or 0)


def segment_result(response: pb.SegmentResponse, format: str, trailers) -> SegmentResult:
    result = SegmentResult(
        model=response.model,
        labels=labels_of(response),
        timings_ms=timings_of(response),
        content=response.labels,
        tta=response.tta or "none",
        trace_id=trace_id_of(dict(trailers or ()).get("traceresponse")),
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


def models_of(response: pb.ListModelsResponse) -> dict:
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


class StreamFrames:
    """A stream's side of the bookkeeping, for both clients: each frame as a request (the first one
    carrying the stream's options), the time it was handed to gRPC, and each response as a result
    with its latency."""

    def __init__(self, model, format, policy, max_in_flight, deadline_ms, frame_ids, priority):
        self.first = {
            "model": model or "",
            "drop_policy": POLICIES[policy],
            "max_in_flight": max_in_flight or 0,
            "priority": priority or 0,
        }
        self.format, self.deadline_ms = FORMATS[format], deadline_ms or 0
        self.ids = iter(frame_ids) if frame_ids is not None else None
        self.count = 0
        self.sent: dict[int, float] = {}
        self.lock = threading.Lock()  # the sync client's requests are pulled on gRPC's thread

    def request(self, frame) -> pb.SegmentRequest:
        frame_id = next(self.ids) if self.ids is not None else self.count
        fields = {"frame_id": frame_id, "format": self.format, "deadline_ms": self.deadline_ms}
        if self.count == 0:
            fields.update(self.first)
        self.count += 1
        request = image_request(frame, **fields)
        with self.lock:
            self.sent[frame_id] = time.perf_counter()
        return request

    def result(self, response: pb.SegmentResponse) -> StreamResult:
        now = time.perf_counter()
        with self.lock:
            start = self.sent.pop(response.frame_id, now)
            for dropped in response.dropped_frame_ids:
                self.sent.pop(dropped, None)
        error = (response.error.code, response.error.message) if response.HasField("error") else None
        return StreamResult(
            response.frame_id, response, now - start, labels_of(response), list(response.dropped_frame_ids), error
        )


def health_request():
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    return health_pb2_grpc.HealthStub, health_pb2.HealthCheckRequest(), health_pb2.HealthCheckResponse.SERVING


class ClientChannel:
    """What both gRPC clients hold: the channel (grpc's or grpc.aio's), the stub and the metadata.
    `target` is host:port; `tls=True` or `root_certificates` (PEM bytes) for a TLS server."""

    aio = grpc  # the module whose channel this client uses

    def __init__(
        self,
        target: str = "localhost:50051",
        api_key: str | None = None,
        timeout: float = 120.0,
        tls: bool = False,
        root_certificates: bytes | None = None,
    ):
        self.channel = channel_of(self.aio, target, tls, root_certificates)
        self.target = target
        self.timeout = timeout
        self.metadata = (("x-api-key", api_key),) if api_key else ()
        self.stub = pb_grpc.SegmentationStub(self.channel)

    def call_metadata(self) -> tuple:
        """The API key, and the caller's trace context (the stream's or the request's span joins it)."""
        return self.metadata + tuple(trace_context().items())


class GrpcSegmentationClient(ClientChannel):
    """The blocking gRPC client. Thread-safe (one grpc channel)."""

    def segment(
        self,
        image,
        model: str | None = None,
        format: str = "png",
        deadline_ms: int | None = None,
        tta: str | None = None,
        priority: int | None = None,
    ) -> SegmentResult:
        """Like SegmentationClient.segment; `format` is png, raw, overlay or stats."""
        request = segment_request(image, model, format, deadline_ms, tta, priority)
        try:
            response, call = self.stub.Segment.with_call(request, timeout=self.timeout, metadata=self.call_metadata())
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return segment_result(response, format, call.trailing_metadata())

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
        book = StreamFrames(model, format, policy, max_in_flight, deadline_ms, frame_ids, priority)
        call = self.stub.StreamSegment((book.request(frame) for frame in frames), metadata=self.call_metadata())
        try:
            for response in call:
                yield book.result(response)
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
        return models_of(response)

    def ready(self, timeout: float = 2.0) -> bool:
        stub, request, serving = health_request()
        try:
            return stub(self.channel).Check(request, timeout=timeout).status == serving
        except grpc.RpcError:
            return False

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncGrpcSegmentationClient(ClientChannel):
    """GrpcSegmentationClient for asyncio programs (grpc.aio): the same methods, awaited; `stream`
    takes frames from an iterable or an async iterable (a camera task's queue, say) and is an async
    iterator of results. Create it inside the event loop that uses it."""

    aio = grpc.aio

    async def segment(
        self,
        image,
        model: str | None = None,
        format: str = "png",
        deadline_ms: int | None = None,
        tta: str | None = None,
        priority: int | None = None,
    ) -> SegmentResult:
        request = segment_request(image, model, format, deadline_ms, tta, priority)
        call = self.stub.Segment(request, timeout=self.timeout, metadata=self.call_metadata())
        try:
            response = await call
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return segment_result(response, format, await call.trailing_metadata())

    async def stream(
        self,
        frames: Iterable | AsyncIterable,
        model: str | None = None,
        format: str = "raw",
        policy: str = "latest",
        max_in_flight: int | None = None,
        deadline_ms: int | None = None,
        frame_ids: Iterable[int] | None = None,
        priority: int | None = None,
    ) -> AsyncIterator[StreamResult]:
        """As GrpcSegmentationClient.stream. Leaving the `async for` early cancels the call."""
        book = StreamFrames(model, format, policy, max_in_flight, deadline_ms, frame_ids, priority)

        async def requests():
            if isinstance(frames, AsyncIterable):
                async for frame in frames:
                    yield book.request(frame)
            else:
                for frame in frames:
                    yield book.request(frame)

        call = self.stub.StreamSegment(requests(), metadata=self.call_metadata())
        try:
            async for response in call:
                yield book.result(response)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and call.cancelled():
                return
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()

    async def models(self) -> dict:
        try:
            response = await self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return models_of(response)

    async def ready(self, timeout: float = 2.0) -> bool:
        stub, request, serving = health_request()
        try:
            return (await stub(self.channel).Check(request, timeout=timeout)).status == serving
        except grpc.RpcError:
            return False

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


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
