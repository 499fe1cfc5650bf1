"""gRPC front door (grpc.aio, on the same event loop as FastAPI): Segment, StreamSegment and ListModels;
the server around them (health, reflection, TLS, limits) is grpc_server.py.

Shares everything with REST through SegmentationService: admission, limits, the worker link and
metrics. Metrics use protocol="grpc" for unary calls and "grpc_stream" for stream frames; the
request-duration `code` label is the gRPC status name (OK, INVALID_ARGUMENT, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from ..choice import RequestOptions, StreamState
from ..config import Settings
from ..core import SegmentationService, Served
from ..errors import ServiceError
from ..proto import segmentation_pb2 as pb
from ..proto import segmentation_pb2_grpc as pb_grpc
from ..tracing import Tracing, grpc_attributes
from ..worker.link import WorkerLink
from . import imaging
from .auth import api_key_from
from .streaming import DEFAULT_MAX_IN_FLIGHT, MAX_IN_FLIGHT_LIMIT, OrderedStream, StreamIdle

log = logging.getLogger("service.grpc")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Segmentation"].full_name
MESSAGE_HEADROOM = 64 * 1024  # the fields around the image bytes
FORMAT_LABEL = {pb.LABELS_PNG: "png", pb.LABELS_RAW: "raw", pb.OVERLAY_JPEG: "overlay", pb.STATS_ONLY: "stats"}
POLICY_NAME = {pb.DROP_POLICY_LATEST: "latest", pb.DROP_POLICY_BLOCK: "block"}


def message_limit(settings: Settings) -> int:
    """Largest message either way: an encoded image up to the REST limit, or a raw frame of max_pixels."""
    return max(settings.max_image_bytes, settings.max_pixels * 3) + MESSAGE_HEADROOM


def status_of(error: ServiceError) -> grpc.StatusCode:
    return grpc.StatusCode[error.grpc_status]


def trailers_of(error: ServiceError) -> tuple:
    trailers = [("error-code", error.code)]
    if error.retry_after:
        trailers.append(("retry-after", str(math.ceil(error.retry_after))))
    return tuple(trailers)


def trace_trailer() -> tuple:
    """The `traceresponse` trailer naming the call's trace, when it is being traced (as REST's header)."""
    header = Tracing.response_header()
    return (header,) if header else ()


@dataclass(frozen=True)
class UndecodableMessage:
    """Stands in for a request whose bytes are not a valid protobuf message (see tolerant_parser)."""

    type_name: str
    reason: str


def tolerant_parser(message_class):
    """A request deserializer that hands bad bytes to the servicer as UndecodableMessage, so the
    call ends INVALID_ARGUMENT with a message (a raising deserializer ends it as UNKNOWN)."""

    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return UndecodableMessage(message_class.DESCRIPTOR.full_name, str(exc) or "malformed")

    return parse


def check_decoded(request):
    if isinstance(request, UndecodableMessage):
        raise ServiceError(
            "bad_request", f"the request is not a valid {request.type_name} protobuf message ({request.reason})"
        )
    return request


async def checked_messages(requests: AsyncIterator) -> AsyncIterator:
    async for request in requests:
        yield check_decoded(request)


def add_to_server(servicer: SegmentationServicer, server: grpc.aio.Server) -> None:
    """Registers the servicer as the generated add_SegmentationServicer_to_server does, with
    tolerant_parser for the requests."""
    handlers = {
        "Segment": grpc.unary_unary_rpc_method_handler(
            servicer.Segment,
            request_deserializer=tolerant_parser(pb.SegmentRequest),
            response_serializer=pb.SegmentResponse.SerializeToString,
        ),
        "StreamSegment": grpc.stream_stream_rpc_method_handler(
            servicer.StreamSegment,
            request_deserializer=tolerant_parser(pb.SegmentRequest),
            response_serializer=pb.SegmentResponse.SerializeToString,
        ),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels,
            request_deserializer=tolerant_parser(pb.ListModelsRequest),
            response_serializer=pb.ListModelsResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def image_input(request: pb.SegmentRequest, settings: Settings) -> dict:
    """The request's image as keyword arguments for SegmentationService.segment (data= or rgb=)."""
    kind = request.WhichOneof("image")
    if kind == "encoded":
        if len(request.encoded) > settings.max_image_bytes:
            raise ServiceError(
                "too_large",
                f"image of {len(request.encoded)} bytes exceeds the limit of {settings.max_image_bytes} bytes",
            )
        return {"data": request.encoded}
    if kind == "raw":
        h, w, rgb = request.raw.height, request.raw.width, request.raw.rgb
        if h == 0 or w == 0:
            raise ServiceError("invalid_image", f"raw frame has zero size ({h}x{w})")
        if h * w > settings.max_pixels:
            raise ServiceError(
                "too_large", f"raw frame is {h}x{w} = {h * w} pixels; the limit is {settings.max_pixels} pixels"
            )
        if len(rgb) != h * w * 3:
            raise ServiceError("invalid_image", f"raw frame carries {len(rgb)} bytes; {h}x{w}x3 needs {h * w * 3}")
        return {"rgb": np.frombuffer(rgb, np.uint8).reshape(h, w, 3)}
    raise ServiceError("invalid_image", "the request carries no image: set `encoded` or `raw`")


def effective_deadline_ms(request_ms: int, remaining_s: float | None) -> int | None:
    """The tighter of the request's deadline_ms and the call's gRPC deadline."""
    limits = [request_ms] if request_ms else []
    if remaining_s is not None and remaining_s < 1e6:
        limits.append(max(1, int(remaining_s * 1000)))
    return min(limits) if limits else None


def encode_result(fmt: int, labels: np.ndarray, image, palette, n_classes: int):
    """(labels field bytes, per-class pixel counts); runs in the codec pool. `image()` gives the RGB
    image, decoding it only when an overlay needs it and the worker did the decoding."""
    if fmt == pb.LABELS_PNG:
        body = imaging.encode_png(labels, palette)
    elif fmt == pb.LABELS_RAW:
        body = imaging.label_bytes(labels)
    elif fmt == pb.OVERLAY_JPEG:
        body = imaging.encode_overlay(image(), labels, palette)
    else:
        body = b""
    counts = np.bincount(labels.ravel(), minlength=n_classes)[:n_classes]
    return body, counts.tolist()


@dataclass
class Frame:
    request: pb.SegmentRequest
    received: float  # time.perf_counter() when the server read it


@dataclass
class UnaryCall:
    model: str  # the metric label: "none" until the request names a served model, then what ran
    started: float


def metadata_of(context: grpc.aio.ServicerContext) -> dict:
    """The call's text metadata, keys in lower case."""
    return {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


class ServicerBase:
    """What both gRPC services (Segmentation and v2 inference) share: the request path, the API key
    check, errors as status codes with their trailers, and trace spans."""

    service_name = SERVICE_NAME  # the full gRPC service name, for trace spans

    def __init__(self, service: SegmentationService, settings: Settings):
        self.service = service
        self.settings = settings
        self.metrics = service.metrics

    # -- shared pieces ---------------------------------------------------------------------------
    def authorize(self, context: grpc.aio.ServicerContext) -> dict:
        metadata = metadata_of(context)
        self.service.check_api_key(api_key_from(metadata.get("x-api-key"), metadata.get("authorization")))
        return metadata

    def call_span(self, context: grpc.aio.ServicerContext, method: str):
        """The server span of a call (a unary request, or a whole stream), continuing the caller's trace."""
        attributes = grpc_attributes(self.service_name, method)
        return self.metrics.tracing.request(f"{self.service_name}/{method}", metadata_of(context), attributes)

    async def in_frame_span(self, method: str, work: Awaitable):
        """Await a stream frame's `work` in a trace of its own, linked to the stream's span."""
        attributes = grpc_attributes(self.service_name, method)
        with self.metrics.tracing.request(f"{self.service_name}/{method} frame", None, attributes, new_trace=True):
            return await work

    async def fail(self, context: grpc.aio.ServicerContext, error: ServiceError) -> None:
        self.service.count_rejection(error)
        await context.abort(status_of(error), error.message, trailing_metadata=trailers_of(error) + trace_trailer())

    async def keyed(self, context: grpc.aio.ServicerContext, answer: Callable):
        """`answer()` for a call with the API key; a ServiceError ends the call with its status."""
        try:
            self.authorize(context)
            return answer()
        except ServiceError as exc:
            await self.fail(context, exc)

    @contextlib.asynccontextmanager
    async def unary_call(self, context: grpc.aio.ServicerContext, protocol: str, method: str):
        """A unary call's accounting, shared by Segment and ModelInfer: its trace span, the in-flight
        gauge, its duration by (model, status), and a ServiceError answered as its status. The label
        stays "none" until the body sets `call.model` to a resolved name (a client's own name never
        becomes a label), then to what ran."""
        call = UnaryCall("none", time.perf_counter())
        code = "INTERNAL"
        self.metrics.in_flight.inc()
        with self.call_span(context, method):
            try:
                yield call
                code = "OK"
                context.set_trailing_metadata(trace_trailer())
            except ServiceError as exc:
                code = exc.grpc_status
                await self.fail(context, exc)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            finally:
                self.metrics.in_flight.dec()
                self.observe(call.model, protocol, code, call.started)

    def observe(self, model: str, protocol: str, code: str, started: float) -> float:
        """Count a finished call in the request metrics; returns its seconds."""
        elapsed = time.perf_counter() - started
        self.metrics.observe_request(model, protocol, code, elapsed)
        return elapsed

    async def serve_stream(self, request_iterator, context: grpc.aio.ServicerContext, method: str) -> None:
        """A bidirectional stream run by the subclass's `_stream`: its span, the active-stream gauge,
        and the errors that end a stream (a refusal, or no message for --stream-idle-seconds) as statuses."""
        self.metrics.streams_active.inc()
        code = "OK"
        with self.call_span(context, method):
            try:
                await self._stream(request_iterator, context)
            except ServiceError as exc:
                code = exc.grpc_status
                await self.fail(context, exc)
            except StreamIdle as exc:
                code = "DEADLINE_EXCEEDED"
                self.metrics.rejected.labels("stream_idle").inc()
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"{exc} (--stream-idle-seconds)")
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            finally:
                self.metrics.streams_active.dec()
                self.metrics.tracing.outcome(code)


class SegmentationServicer(ServicerBase, pb_grpc.SegmentationServicer):
    async def serve(
        self,
        request: pb.SegmentRequest,
        options: RequestOptions,
        protocol: str,
        deadline_ms: int | None,
        link: WorkerLink | None = None,
        stream: StreamState | None = None,
    ) -> pb.SegmentResponse:
        served: Served = await self.service.segment(
            options, protocol, deadline_ms=deadline_ms, link=link, stream=stream, **image_input(request, self.settings)
        )
        model = served.model
        classes, palette = self.service.classes_palette(model)
        labels = served.result.labels
        start = time.perf_counter()
        body, counts = await self.service.run_in_pool(
            encode_result, request.format, labels, served.decoded_image, palette, len(classes)
        )
        encode_s = time.perf_counter() - start
        self.metrics.observe_outputs(FORMAT_LABEL.get(request.format, "png"), [served], encode_s)
        t = served.timings
        return pb.SegmentResponse(
            frame_id=request.frame_id,
            model=model,
            tta=served.tta,
            height=labels.shape[0],
            width=labels.shape[1],
            format=request.format,
            labels=body,
            class_pixels=counts,
            batch_size=served.result.batch_size,
            timings=pb.Timings(
                decode_ms=t.get("decode", 0) * 1000,
                queue_ms=t.get("queue", 0) * 1000,
                inference_ms=t.get("inference", 0) * 1000,
                encode_ms=encode_s * 1000,
            ),
        )

    # -- unary -----------------------------------------------------------------------------------
    async def Segment(self, request: pb.SegmentRequest, context: grpc.aio.ServicerContext) -> pb.SegmentResponse:
        async with self.unary_call(context, "grpc", "Segment") as call:
            self.authorize(context)
            check_decoded(request)
            options = self.service.options(request.model, request.tta, priority=request.priority)
            call.model = options.model
            deadline_ms = effective_deadline_ms(request.deadline_ms, context.time_remaining())
            response = await self.serve(request, options, "grpc", deadline_ms)
            call.model = response.model
            response.timings.total_ms = (time.perf_counter() - call.started) * 1000
            return response

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext):
        await self.keyed(context, lambda: check_decoded(request))
        models = []
        for info in self.service.models_info():
            models.append(
                pb.ModelInfo(
                    name=info["name"],
                    arch=info["arch"],
                    weights=str(info["weights"] or ""),
                    classes=info["classes"],
                    palette=[pb.Colour(r=c[0], g=c[1], b=c[2]) for c in info["palette"]],
                    ready=info["ready"],
                    dtype=info["dtype"] or "",
                    cuda_graphs=bool(info["cuda_graphs"]),
                    published_miou=info["published_miou"] or 0.0,
                )
            )
        return pb.ListModelsResponse(
            models=models, default_model=self.service.default_model, auto_menu=self.service.auto_info()["menu"]
        )

    # -- streaming -------------------------------------------------------------------------------
    async def StreamSegment(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        await self.serve_stream(request_iterator, context, "StreamSegment")

    async def _stream(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        metadata = self.authorize(context)
        policy, limit = stream_options(metadata)
        idle = self.settings.stream_idle_seconds or None
        requests = aiter(checked_messages(request_iterator))
        try:
            first = await asyncio.wait_for(anext(requests), idle)
        except StopAsyncIteration:
            return  # the client closed without sending a frame
        except TimeoutError:
            raise StreamIdle(f"no frame for {idle:g} s") from None
        options = self.service.options(first.model, first.tta, priority=first.priority)
        model = options.model
        policy, limit = first_message_options(first, policy, limit)
        if not self.service.ready:
            raise ServiceError("not_ready", "the service is not ready or is draining", retry_after=1)
        link = self.service.dispatcher.pick_link()  # the stream sticks to this worker: one queue, one order
        log.debug("stream: model %s, policy %s, %d in flight, worker %s", model, policy, limit, link.device)

        choice = StreamState()  # model=auto / tta=auto: the stream's mode, kept with hysteresis
        frames = OrderedStream(
            self._frames(first, requests, model),
            lambda f: self.in_frame_span("StreamSegment", self._serve_frame(f, options, link, choice)),
            policy=policy,
            max_in_flight=limit,
            idle_timeout=idle,
            on_drop=lambda _: self.metrics.frames_dropped.labels(model).inc(),
        )
        async with contextlib.aclosing(aiter(frames)) as outcomes:
            async for outcome in outcomes:
                if outcome.error is not None:
                    raise outcome.error  # only fatal errors leave _serve_frame
                response = outcome.result
                if outcome.dropped:
                    response.frames_dropped = len(outcome.dropped)
                    response.dropped_frame_ids.extend(f.request.frame_id for f in outcome.dropped)
                await context.write(response)

    async def _frames(self, first: pb.SegmentRequest, requests: AsyncIterator, model: str) -> AsyncIterator[Frame]:
        yield Frame(first, time.perf_counter())
        async for request in requests:
            if request.model and request.model != model and self.service.resolve_model(request.model) != model:
                raise ServiceError(
                    "bad_request",
                    f"this stream serves {model}; frame {request.frame_id} asks for "
                    f"{request.model!r} (open another stream)",
                )
            yield Frame(request, time.perf_counter())

    async def _serve_frame(
        self, frame: Frame, options: RequestOptions, link: WorkerLink, choice: StreamState
    ) -> pb.SegmentResponse:
        """One frame's response; a frame's own problem becomes its `error`, the stream goes on.
        Raises only what must end the stream (the service is draining)."""
        request = frame.request
        model = options.model
        code = "INTERNAL"
        self.metrics.in_flight.inc()
        try:
            if request.tta or request.priority:  # a frame's own tta and priority; otherwise the first message's
                options = self.service.options(
                    options.model, request.tta or options.tta, priority=request.priority or options.priority
                )
            response = await self.serve(request, options, "grpc_stream", request.deadline_ms or None, link, choice)
            model = response.model
            code = "OK"
        except ServiceError as exc:
            code = exc.grpc_status
            self.service.count_rejection(exc)
            if exc.code == "not_ready" and self.service.dispatcher.draining:
                raise
            response = pb.SegmentResponse(
                frame_id=request.frame_id, model=model, format=request.format, error=frame_error(exc)
            )
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as exc:  # noqa: BLE001 - one frame's bug must not end a video stream
            log.exception("stream frame %d failed", request.frame_id)
            error = ServiceError("internal", f"{type(exc).__name__}: {exc}")
            self.service.count_rejection(error)
            response = pb.SegmentResponse(frame_id=request.frame_id, model=model, error=frame_error(error))
        finally:
            self.metrics.in_flight.dec()
            elapsed = self.observe(model, "grpc_stream", code, frame.received)
        response.timings.total_ms = elapsed * 1000
        return response


def frame_error(error: ServiceError) -> pb.FrameError:
    return pb.FrameError(
        code=error.code,
        message=error.message,
        status=status_of(error).value[0],
        retry_after_ms=int((error.retry_after or 0) * 1000),
    )


def stream_options(metadata: dict) -> tuple[str | None, int | None]:
    """Drop policy and in-flight bound from the call metadata (None: not given)."""
    policy = metadata.get("drop-policy")
    if policy is not None and policy.strip().lower() not in ("latest", "block"):
        raise ServiceError("bad_request", f"metadata drop-policy must be 'latest' or 'block', not {policy!r}")
    limit = metadata.get("max-in-flight")
    if limit is not None:
        if not limit.strip().isdigit() or not 1 <= int(limit) <= MAX_IN_FLIGHT_LIMIT:
            raise ServiceError("bad_request", f"metadata max-in-flight must be 1..{MAX_IN_FLIGHT_LIMIT}, not {limit!r}")
        limit = int(limit)
    return (policy.strip().lower() if policy else None), limit


def first_message_options(first: pb.SegmentRequest, policy: str | None, limit: int | None) -> tuple[str, int]:
    """Merge the first message's drop_policy / max_in_flight with the metadata; a conflict is an error."""
    if first.drop_policy not in (pb.DROP_POLICY_UNSPECIFIED, *POLICY_NAME):
        raise ServiceError("bad_request", f"unknown drop_policy {first.drop_policy}")
    field_policy = POLICY_NAME.get(first.drop_policy)
    if field_policy and policy and field_policy != policy:
        raise ServiceError(
            "bad_request",
            f"metadata drop-policy {policy!r} contradicts the first message's drop_policy {field_policy!r}",
        )
    if first.max_in_flight > MAX_IN_FLIGHT_LIMIT:
        raise ServiceError("bad_request", f"max_in_flight must be 1..{MAX_IN_FLIGHT_LIMIT}, not {first.max_in_flight}")
    if first.max_in_flight and limit and first.max_in_flight != limit:
        raise ServiceError(
            "bad_request",
            f"metadata max-in-flight {limit} contradicts the first message's max_in_flight {first.max_in_flight}",
        )
    return field_policy or policy or "latest", first.max_in_flight or limit or DEFAULT_MAX_IN_FLIGHT
