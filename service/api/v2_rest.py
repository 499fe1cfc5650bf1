"""KServe v2 (Open Inference Protocol) over HTTP, Triton-compatible: server and model metadata,
readiness, Triton's model-configuration, statistics and system shared-memory extensions, and infer
with JSON tensors or Triton's binary tensor extension. The health routes (/v2/health/live|ready)
live in rest.py with /healthz and /readyz.

Errors use the v2 body {"error": "message"} (a string, as tritonclient expects) with the API's
usual HTTP statuses and Retry-After.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from .. import __version__
from ..choice import AUTO
from ..core import SegmentationService
from ..errors import ServiceError
from . import v2_tensors as tensors
from .auth import api_key_from
from .http_body import read_limited
from .http_call import http_call
from .v2_params import ran_parameters, request_options
from .v2_shm import Place, SharedMemoryRegions, output_regions, place_of, regions_of

PROTOCOL = "v2_http"
SERVER_NAME = "bisenet-serve"
EXTENSIONS = ["binary_tensor_data", "model_configuration", "statistics", "logging"]
VERSIONS = ("", "1")  # one version per model; "1" is its name
HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_HEADROOM = 64 * 1024


def extensions(service: SegmentationService) -> list[str]:
    """The protocol extensions this front end answers (no shared memory behind the Ray ingress)."""
    return EXTENSIONS + (["system_shared_memory"] if getattr(service, "shared_memory", None) else [])


def v2_error(error: ServiceError) -> JSONResponse:
    headers = {"Retry-After": str(int(error.retry_after))} if error.retry_after else None
    return JSONResponse({"error": error.message}, status_code=error.http_status, headers=headers)


def body_limit(service: SegmentationService) -> int:
    """Largest infer body: a full batch of the largest images or raw frames, binary-encoded."""
    s = service.settings
    return s.max_batch * (max(s.max_image_bytes, s.max_pixels * 3) + tensors.LENGTH_PREFIX.size) + JSON_HEADROOM


def class_count(service: SegmentationService, model: str) -> int:
    """The model's class count, known once its worker has loaded it (503 before)."""
    classes = service.classes_palette(model)[0]
    if not classes:
        raise ServiceError("not_ready", f"model {model} is still loading", retry_after=1)
    return len(classes)


def v2_model(service: SegmentationService, name: str, version: str = "", allow_auto: bool = False) -> str:
    """The served model a v2 path or request names (version "" or "1"); `auto` for infer only, where
    the service picks per image. Raises not_found."""
    if version not in VERSIONS:
        raise ServiceError("not_found", f"model {name!r} has no version {version!r}; its only version is 1")
    if allow_auto and name.strip().lower() == AUTO:
        return AUTO
    return service.resolve_model(name)


def model_metadata(service: SegmentationService, name: str, version: str = "") -> dict:
    """The v2 model metadata of the model a path or call names. Raises not_found, not_ready."""
    model = v2_model(service, name, version)
    return tensors.model_metadata(model, class_count(service, model))


def model_configuration(service: SegmentationService, name: str, version: str = "") -> dict:
    """Triton's model configuration of the model a path or call names. Raises not_found, not_ready."""
    model = v2_model(service, name, version)
    return tensors.model_config(model, class_count(service, model), service.settings)


def model_statistics(service: SegmentationService, name: str, version: str = "") -> list[dict]:
    """The statistics extension's `model_stats`: the named model's, or every served model's when the
    name is empty (service/statistics.py says what each phase covers). Raises not_found."""
    if not name:
        if version:
            raise ServiceError("not_found", "a version needs a model name")
        return service.metrics.statistics.snapshot()
    return service.metrics.statistics.snapshot(v2_model(service, name, version))


def split_body(body: bytes, header_length: str | None, needs: str = "`inputs`") -> tuple[dict, bytes]:
    """(JSON header, binary section) of a body, checked; `needs` says what the object must hold."""
    if header_length is None:
        header_bytes, binary = body, b""
    else:
        if not header_length.strip().isdigit():
            raise ServiceError("bad_request", f"{HEADER_LENGTH} must be a byte count, not {header_length!r}")
        length = int(header_length)
        if length > len(body):
            raise ServiceError("bad_request", f"{HEADER_LENGTH} is {length} but the body has only {len(body)} bytes")
        header_bytes, binary = body[:length], body[length:]
    try:
        header = json.loads(header_bytes)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ServiceError("bad_request", f"the request's JSON is malformed: {exc}") from None
    if not isinstance(header, dict):
        raise ServiceError("bad_request", f"the request's JSON must be an object with {needs}")
    return header, binary


def json_list(header: dict, key: str) -> list[dict]:
    value = header.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ServiceError("bad_request", f"`{key}` must be a list of objects")
    return value


def json_parameters(obj: dict, where: str) -> dict:
    value = obj.get("parameters") or {}
    if not isinstance(value, dict):
        raise ServiceError("bad_request", f"`parameters` of {where} must be an object")
    return value


def parse_inputs(header: dict, binary: bytes, service: SegmentationService) -> list[tensors.InputTensor]:
    """InputTensors from the JSON inputs, taking binary data from the body's binary section in order,
    or from a shared-memory region."""
    inputs, offset = [], 0
    for i, item in enumerate(json_list(header, "inputs")):
        name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise ServiceError("bad_request", f"input {i} needs a `name` and a `datatype` string")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise ServiceError("bad_request", f"input {name} needs a `shape`: a list of integers")
        params = json_parameters(item, f"input {name}")
        tensor = tensors.InputTensor(name, datatype, shape, parameters=params)
        size = params.get("binary_data_size")
        place = place_of(params, f"input {name}")
        if place is not None:
            if size is not None or "data" in item:
                raise ServiceError("bad_request", f"input {name}: data in shared memory and in the request")
            tensor.raw = regions_of(service).read(place)
        elif size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ServiceError("bad_request", f"input {name}: binary_data_size must be a byte count")
            if offset + size > len(binary):
                raise ServiceError(
                    "bad_request",
                    f"input {name}: binary_data_size {size} goes beyond the body's binary data "
                    f"({len(binary) - offset} bytes left)",
                )
            tensor.raw = binary[offset : offset + size]
            offset += size
        elif "data" in item:
            tensor.values = item["data"]
        inputs.append(tensor)
    if offset != len(binary):
        raise ServiceError("bad_request", f"{len(binary) - offset} bytes of binary data belong to no input")
    return inputs


def parse_outputs(header: dict) -> tuple[list[str], dict[str, bool], dict[str, Place]]:
    """(output names, output name -> send as binary, output name -> shared-memory place to write)."""
    default_binary = bool(json_parameters(header, "the request").get("binary_data_output", False))
    names, binary, places = [], {}, {}
    for item in json_list(header, "outputs"):
        name = item.get("name")
        if not isinstance(name, str):
            raise ServiceError("bad_request", "each requested output needs a `name`")
        names.append(name)
        parameters = json_parameters(item, f"output {name}")
        binary[name] = bool(parameters.get("binary_data", default_binary))
        place = place_of(parameters, f"output {name}")
        if place is not None:
            places[name] = place
    names = tensors.requested_outputs(names)
    return names, {name: binary.get(name, default_binary) for name in names}, places


def infer_response(
    model: str,
    request_id,
    outputs: list[tensors.OutputTensor],
    binary: dict[str, bool],
    ran: dict,
    places: dict[str, Place],
    regions: SharedMemoryRegions | None,
) -> Response:
    """The response; outputs with a place are written into their shared-memory region instead."""
    body_outputs, chunks = [], []
    for out in outputs:
        entry = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        parameters = dict(out.parameters)
        if out.name in places:
            parameters.update(regions.write(places[out.name], out.array, f"output {out.name}"))
        elif binary[out.name]:
            data = out.array.tobytes()
            parameters["binary_data_size"] = len(data)
            chunks.append(data)
        else:
            entry["data"] = out.array.ravel().tolist()
        if parameters:
            entry["parameters"] = parameters
        body_outputs.append(entry)
    header = {"model_name": model, "model_version": "1", "parameters": ran, "outputs": body_outputs}
    if request_id is not None:
        header["id"] = request_id
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    if not chunks:
        return Response(header_bytes, media_type="application/json")
    return Response(
        b"".join([header_bytes, *chunks]),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header_bytes))},
    )


def add_v2_routes(app: FastAPI, service: SegmentationService) -> None:
    """The v2 routes, added to the app itself (an included router would hide them from app.routes)."""
    metrics = service.metrics
    tags = ["KServe v2"]

    def authorize(request: Request) -> None:
        service.check_api_key(api_key_from(request.headers.get("x-api-key"), request.headers.get("authorization")))

    def keyed(request: Request, answer: Callable[[], Any]):
        """`answer()` for a request with the API key; a ServiceError as its v2 error."""
        try:
            authorize(request)
            return answer()
        except ServiceError as exc:
            return v2_error(exc)

    def routes(path: str, method: str, **kwargs):
        """Register the handler for /models/{model}/PATH and /models/{model}/versions/{version}/PATH."""

        def register(handler):
            for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
                app.add_api_route(prefix + path, handler, methods=[method], tags=tags, **kwargs)
            return handler

        return register

    @app.get("/v2", summary="Server metadata: name, version, protocol extensions", tags=tags)
    async def server_metadata():
        return {"name": SERVER_NAME, "version": __version__, "extensions": extensions(service)}

    # Before /v2/models/{model}, which would take "stats" for a model name.
    @app.get("/v2/models/stats", summary="Statistics of every model (Triton's statistics extension)", tags=tags)
    async def all_statistics(request: Request):
        return keyed(request, lambda: {"model_stats": model_statistics(service, "")})

    @routes("", "GET", summary="Model metadata: inputs and outputs")
    async def metadata(request: Request, model: str, version: str = ""):
        return keyed(request, lambda: model_metadata(service, model, version))

    @routes("/ready", "GET", summary="Model readiness")
    async def model_ready(model: str, version: str = ""):
        try:
            v2_model(service, model, version)
        except ServiceError as exc:
            return v2_error(exc)
        if service.ready:
            return Response(status_code=200)
        return v2_error(ServiceError("not_ready", "the model is loading or the service is draining", retry_after=1))

    @routes("/config", "GET", summary="Triton model configuration")
    async def config(request: Request, model: str, version: str = ""):
        return keyed(request, lambda: model_configuration(service, model, version))

    @routes("/stats", "GET", summary="Model statistics: counts and cumulative time per phase")
    async def statistics(request: Request, model: str, version: str = ""):
        return keyed(request, lambda: {"model_stats": model_statistics(service, model, version)})

    if getattr(service, "shared_memory", None) is not None:
        add_shared_memory_routes(app, service.shared_memory, keyed, tags)

    @app.get("/v2/logging", summary="Log settings (Triton's logging extension)", tags=tags)
    async def log_settings(request: Request):
        return keyed(request, service.log_settings.current)

    @app.post("/v2/logging", summary="Change the log settings while the service runs", tags=tags)
    async def update_log_settings(request: Request):
        try:
            body = await read_limited(request, JSON_HEADROOM)
        except ServiceError as exc:
            return v2_error(exc)
        return keyed(request, lambda: service.log_settings.update(split_body(body, None, "log settings")[0]))

    @routes("/infer", "POST", summary="Inference with JSON or binary tensors")
    async def infer(request: Request, model: str, version: str = ""):
        route = getattr(request.scope.get("route"), "path", "/v2/models/{model}/infer")  # the template
        with http_call(metrics, request, route, PROTOCOL) as call:
            try:
                authorize(request)
                call.model = v2_model(service, model, version, allow_auto=True)
                encoding = request.headers.get("content-encoding", "identity").lower()
                if encoding != "identity":
                    raise ServiceError("unsupported_media_type", f"Content-Encoding {encoding!r} is not supported")
                body = await read_limited(request, body_limit(service))
                header, binary = split_body(body, request.headers.get(HEADER_LENGTH))
                options = request_options(json_parameters(header, "the request"))
                items = tensors.batch_items(parse_inputs(header, binary, service), service.settings)
                output_names, binary_outputs, places = parse_outputs(header)
                regions = output_regions(service, places)
                served = await service.segment_batch(call.model, PROTOCOL, items, **options)
                call.model = served[0].model  # what ran (the choice when the request said auto)
                encode_start = time.perf_counter()
                outputs = await service.run_in_pool(
                    tensors.output_tensors,
                    [s.result.labels for s in served],
                    class_count(service, call.model),
                    output_names,
                )
                response = infer_response(
                    call.model, header.get("id"), outputs, binary_outputs, ran_parameters(served), places, regions
                )
                metrics.observe_outputs("v2", served, time.perf_counter() - encode_start)
                return call.answer(response)
            except ServiceError as exc:
                service.count_rejection(exc)
                return call.answer(v2_error(exc))


def add_shared_memory_routes(app: FastAPI, regions: SharedMemoryRegions, keyed, tags: list[str]) -> None:
    """Triton's system shared-memory extension over HTTP (v2_shm.py): register, unregister, status."""
    base = "/v2/systemsharedmemory"

    def done(action: Callable[[], Any]) -> Callable[[], Response]:
        """An answer that runs `action` and says 200 with no body, as Triton does."""

        def answer() -> Response:
            action()
            return Response(status_code=200)

        return answer

    def registration(body: bytes) -> tuple:
        header, _ = split_body(body, None, "`key` and `byte_size`")
        return header.get("key"), header.get("offset", 0), header.get("byte_size")

    @app.get(base + "/status", summary="Registered shared-memory regions", tags=tags)
    async def status(request: Request):
        return keyed(request, regions.status)

    @app.get(base + "/region/{name}/status", summary="One registered shared-memory region", tags=tags)
    async def region_status(request: Request, name: str):
        return keyed(request, lambda: regions.status(name))

    @app.post(base + "/region/{name}/register", summary="Register /dev/shm/KEY under a name", tags=tags)
    async def register(request: Request, name: str):
        try:
            body = await read_limited(request, JSON_HEADROOM)
        except ServiceError as exc:
            return v2_error(exc)
        return keyed(request, done(lambda: regions.register(name, *registration(body))))

    @app.post(base + "/region/{name}/unregister", summary="Unregister a shared-memory region", tags=tags)
    async def unregister(request: Request, name: str):
        return keyed(request, done(lambda: regions.unregister(name)))

    @app.post(base + "/unregister", summary="Unregister every shared-memory region", tags=tags)
    async def unregister_all(request: Request):
        return keyed(request, done(regions.unregister))
