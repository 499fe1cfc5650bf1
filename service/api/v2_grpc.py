"""KServe v2 (Open Inference Protocol) over gRPC: the `inference.GRPCInferenceService` servicer,
Triton-compatible, on the same server as the Segmentation service.

ModelInfer carries tensors in raw_input_contents (or typed contents) and answers in
raw_output_contents, as Triton does. ModelStreamInfer answers every request in request order;
the stream's drop policy is StreamSegment's (metadata `drop-policy: latest|block`,
`max-in-flight`): a request dropped by `latest` gets a response whose error_message says so, so a
client still sees one response per request. Metrics use protocol="v2_grpc" and "v2_grpc_stream".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from google.protobuf import json_format

from .. import __version__
from ..errors import ServiceError
from ..proto import inference_pb2 as pb
from ..proto import inference_pb2_grpc as pb_grpc
from ..worker.link import WorkerLink
from . import v2_tensors as tensors
from .grpc import ServicerBase, effective_deadline_ms, status_of, stream_options
from .streaming import DEFAULT_MAX_IN_FLIGHT, OrderedStream
from .v2_params import ran_parameters, request_options
from .v2_rest import (
    SERVER_NAME,
    class_count,
    extensions,
    model_configuration,
    model_metadata,
    model_statistics,
    v2_model,
)
from .v2_shm import Place, SharedMemoryRegions, output_regions, place_of, regions_of

log = logging.getLogger("service.grpc")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# The InferTensorContents field that carries each datatype's typed values.
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameters_of(parameters) -> dict:
    """A protobuf map of `parameter_choice` oneofs (InferParameter, a log setting's value) as plain
    Python values (None where none is set)."""
    out = {}
    for name, parameter in parameters.items():
        kind = parameter.WhichOneof("parameter_choice")
        out[name] = getattr(parameter, kind) if kind else None
    return out


def request_inputs(request: pb.ModelInferRequest, service) -> list[tensors.InputTensor]:
    """InputTensors from raw_input_contents (one entry per input not in shared memory, in order),
    typed contents, or a shared-memory region."""
    parameters = [parameters_of(item.parameters) for item in request.inputs]
    places = [place_of(p, f"input {item.name}") for p, item in zip(parameters, request.inputs)]
    raw = list(request.raw_input_contents)
    plain = sum(place is None for place in places)
    if raw and len(raw) != plain:
        raise ServiceError(
            "bad_request", f"raw_input_contents has {len(raw)} entries for {plain} inputs not in shared memory"
        )
    raw_entries = iter(raw)
    inputs = []
    for item, params, place in zip(request.inputs, parameters, places):
        tensor = tensors.InputTensor(item.name, item.datatype, list(item.shape), parameters=params)
        if place is not None:
            tensor.raw = regions_of(service).read(place)
        elif raw:
            tensor.raw = next(raw_entries)
        elif item.HasField("contents") and item.datatype in CONTENTS_FIELD:
            tensor.values = list(getattr(item.contents, CONTENTS_FIELD[item.datatype]))
        inputs.append(tensor)
    return inputs


def set_parameter(parameter, value, int_field: str = "int64_param") -> None:
    """Set a `parameter_choice` oneof (an InferParameter, or a log setting's value with
    `int_field="uint32_param"`) to a Python bool, int or str."""
    if isinstance(value, bool):
        parameter.bool_param = value
    elif isinstance(value, int):
        setattr(parameter, int_field, value)
    else:
        parameter.string_param = value


def infer_response(
    model: str,
    request_id: str,
    outputs: list[tensors.OutputTensor],
    parameters: dict,
    places: dict[str, Place],
    regions: SharedMemoryRegions | None,
) -> pb.ModelInferResponse:
    """The response; outputs with a place are written into their shared-memory region, and keep an
    empty raw_output_contents entry (clients find each output's bytes by its position)."""
    response = pb.ModelInferResponse(model_name=model, model_version="1", id=request_id)
    for key, value in parameters.items():
        set_parameter(response.parameters[key], value)
    for out in outputs:
        tensor = response.outputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
        out_parameters = dict(out.parameters)
        if out.name in places:
            out_parameters.update(regions.write(places[out.name], out.array, f"output {out.name}"))
        for key, value in out_parameters.items():
            set_parameter(tensor.parameters[key], value)
        response.raw_output_contents.append(b"" if out.name in places else out.array.tobytes())
    return response


def config_message(config: dict) -> pb.ModelConfig:
    batching = config["dynamic_batching"]
    return pb.ModelConfig(
        name=config["name"],
        platform=config["platform"],
        backend=config["backend"],
        max_batch_size=config["max_batch_size"],
        input=[
            pb.ModelInput(name=i["name"], data_type=pb.DataType.Value(i["data_type"]), dims=i["dims"], optional=True)
            for i in config["input"]
        ],
        output=[
            pb.ModelOutput(name=o["name"], data_type=pb.DataType.Value(o["data_type"]), dims=o["dims"])
            for o in config["output"]
        ],
        dynamic_batching=pb.ModelDynamicBatching(
            preferred_batch_size=batching["preferred_batch_size"],
            max_queue_delay_microseconds=batching["max_queue_delay_microseconds"],
            preserve_ordering=batching["preserve_ordering"],
        ),
    )


@dataclass
class StreamRequest:
    request: pb.ModelInferRequest
    received: float  # time.perf_counter() when the server read it
    seq: int  # arrival order on the stream


class InferenceServicer(ServicerBase, pb_grpc.GRPCInferenceServiceServicer):
    service_name = SERVICE_NAME

    def model_of(self, name: str, version: str, allow_auto: bool = False) -> str:
        return v2_model(self.service, name, version, allow_auto)

    async def run(
        self,
        request: pb.ModelInferRequest,
        model: str,
        protocol: str,
        remaining_s: float | None,
        link: WorkerLink | None = None,
    ) -> pb.ModelInferResponse:
        """One infer request for `model` (resolved by model_of, or auto) through the shared request
        path. Raises ServiceError."""
        options = request_options(parameters_of(request.parameters))
        options["deadline_ms"] = effective_deadline_ms(options.get("deadline_ms", 0), remaining_s)
        items = tensors.batch_items(request_inputs(request, self.service), self.settings)
        names = tensors.requested_outputs([o.name for o in request.outputs])
        places = {o.name: place_of(parameters_of(o.parameters), f"output {o.name}") for o in request.outputs}
        places = {name: place for name, place in places.items() if place is not None}
        regions = output_regions(self.service, places)
        served = await self.service.segment_batch(model, protocol, items, link=link, **options)
        model = served[0].model  # what ran (the choice when the request said auto)
        start = time.perf_counter()
        outputs = await self.service.run_in_pool(
            tensors.output_tensors, [s.result.labels for s in served], class_count(self.service, model), names
        )
        response = infer_response(model, request.id, outputs, ran_parameters(served), places, regions)
        self.metrics.observe_outputs("v2", served, time.perf_counter() - start)
        return response

    # -- health and metadata ---------------------------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.service.ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context):
        try:
            self.model_of(request.name, request.version)
        except ServiceError as exc:
            await self.fail(context, exc)
        return pb.ModelReadyResponse(ready=self.service.ready)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=extensions(self.service))

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context):
        meta = await self.keyed(context, lambda: model_metadata(self.service, request.name, request.version))
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(**t) for t in meta["inputs"]],
            outputs=[tensor(**t) for t in meta["outputs"]],
        )

    async def ModelConfig(self, request: pb.ModelConfigRequest, context):
        config = await self.keyed(context, lambda: model_configuration(self.service, request.name, request.version))
        return pb.ModelConfigResponse(config=config_message(config))

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context):
        stats = await self.keyed(context, lambda: model_statistics(self.service, request.name, request.version))
        return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse())

    # -- system shared memory ----------------------------------------------------------------------
    async def SystemSharedMemoryStatus(self, request: pb.SystemSharedMemoryStatusRequest, context):
        statuses = await self.keyed(context, lambda: regions_of(self.service).status(request.name))
        response = pb.SystemSharedMemoryStatusResponse()
        for status in statuses:
            response.regions[status["name"]].CopyFrom(pb.SystemSharedMemoryStatusResponse.RegionStatus(**status))
        return response

    async def SystemSharedMemoryRegister(self, request: pb.SystemSharedMemoryRegisterRequest, context):
        r = request
        await self.keyed(context, lambda: regions_of(self.service).register(r.name, r.key, r.offset, r.byte_size))
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(self, request: pb.SystemSharedMemoryUnregisterRequest, context):
        await self.keyed(context, lambda: regions_of(self.service).unregister(request.name))
        return pb.SystemSharedMemoryUnregisterResponse()

    # -- logging ---------------------------------------------------------------------------------
    async def LogSettings(self, request: pb.LogSettingsRequest, context: grpc.aio.ServicerContext):
        """Triton's logging extension: an empty request reads the settings, others change them."""
        changes = parameters_of(request.settings)  # the same parameter_choice oneof as InferParameter
        settings = self.service.log_settings
        current = await self.keyed(context, lambda: settings.update(changes) if changes else settings.current())
        response = pb.LogSettingsResponse()
        for key, value in current.items():
            set_parameter(response.settings[key], value, int_field="uint32_param")
        return response

    # -- inference -------------------------------------------------------------------------------
    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext):
        async with self.unary_call(context, "v2_grpc", "ModelInfer") as call:
            self.authorize(context)
            call.model = self.model_of(request.model_name, request.model_version, allow_auto=True)
            response = await self.run(request, call.model, "v2_grpc", context.time_remaining())
            call.model = response.model_name  # what ran
            return response

    async def ModelStreamInfer(self, request_iterator, context: grpc.aio.ServicerContext):
        await self.serve_stream(request_iterator, context, "ModelStreamInfer")

    async def _stream(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        policy, limit = stream_options(self.authorize(context))
        if not self.service.ready:
            raise ServiceError("not_ready", "the service is not ready or is draining", retry_after=1)
        link = self.service.dispatcher.pick_link()  # one worker per stream: one queue, one order
        requests = OrderedStream(
            self._requests(request_iterator),
            lambda r: self.in_frame_span("ModelStreamInfer", self._serve(r, link)),
            policy=policy or "latest",
            max_in_flight=limit or DEFAULT_MAX_IN_FLIGHT,
            idle_timeout=self.settings.stream_idle_seconds or None,
            on_drop=self._count_drop,
        )
        # A dropped request is answered when every request before it has been: responses keep
        # request order (OrderedStream reports drops with the next outcome, which may be older).
        dropped: list[StreamRequest] = []
        async with contextlib.aclosing(aiter(requests)) as outcomes:
            async for outcome in outcomes:
                dropped += outcome.dropped
                if outcome.error is not None:
                    raise outcome.error  # only fatal errors leave _serve
                for item in sorted((d for d in dropped if d.seq < outcome.frame.seq), key=lambda d: d.seq):
                    await context.write(dropped_response(item.request, policy or "latest"))
                dropped = [d for d in dropped if d.seq > outcome.frame.seq]
                await context.write(outcome.result)
        for item in sorted(dropped, key=lambda d: d.seq):
            await context.write(dropped_response(item.request, policy or "latest"))

    def _count_drop(self, item: StreamRequest) -> None:
        with contextlib.suppress(ServiceError):
            self.metrics.frames_dropped.labels(self.service.resolve_model(item.request.model_name)).inc()

    async def _requests(self, request_iterator) -> AsyncIterator[StreamRequest]:
        seq = 0
        async for request in request_iterator:
            yield StreamRequest(request, time.perf_counter(), seq)
            seq += 1

    async def _serve(self, item: StreamRequest, link: WorkerLink) -> pb.ModelStreamInferResponse:
        """One request's response; its own problem goes into error_message and the stream goes on.
        Raises only what must end the stream (the service is draining)."""
        request = item.request
        model, code = "none", "INTERNAL"
        self.metrics.in_flight.inc()
        try:
            model = self.model_of(request.model_name, request.model_version, allow_auto=True)
            response = await self.run(request, model, "v2_grpc_stream", None, link)
            response = pb.ModelStreamInferResponse(infer_response=response)
            model = response.infer_response.model_name  # what ran
            code = "OK"
        except ServiceError as exc:
            code = exc.grpc_status
            self.service.count_rejection(exc)
            if exc.code == "not_ready" and self.service.dispatcher.draining:
                raise
            response = error_response(request, f"[{status_of(exc).name}] {exc.message}")
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as exc:  # noqa: BLE001 - one request's bug must not end the stream
            log.exception("v2 stream request %r failed", request.id)
            error = ServiceError("internal", f"{type(exc).__name__}: {exc}")
            self.service.count_rejection(error)
            response = error_response(request, f"[INTERNAL] {error.message}")
        finally:
            self.metrics.in_flight.dec()
            self.observe(model, "v2_grpc_stream", code, item.received)
        if request.parameters.get("triton_enable_empty_final_response") is not None:
            response.infer_response.parameters["triton_final_response"].bool_param = True
        return response


def error_response(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    """A failed stream request: the message, and the request's model and id so clients can match it."""
    return pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id),
    )


def dropped_response(request: pb.ModelInferRequest, policy: str) -> pb.ModelStreamInferResponse:
    return error_response(
        request,
        f"[RESOURCE_EXHAUSTED] request {request.id or '(no id)'} dropped by the stream's {policy!r} policy: "
        "a newer request arrived while the stream was full (metadata drop-policy: block waits instead)",
    )
