"""REST front door (FastAPI): /segment, /models, health, readiness and /metrics."""

from __future__ import annotations

import time
from typing import Literal

from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..core import SegmentationService, Served
from ..errors import CODES, DESCRIPTIONS, ServiceError
from . import imaging
from .auth import api_key_from
from .http_body import discard_body, read_limited
from .http_call import http_call
from .v2_rest import add_v2_routes
from .web import add_web_page

MULTIPART_OVERHEAD = 64 * 1024
# Starlette's own errors (unknown path, wrong method) under the service's codes
HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}
OUTPUT_MEDIA = {
    "png": "image/png",
    "overlay": "image/jpeg",
    "json": "application/json",
    "raw": "application/octet-stream",
}


def error_responses() -> dict:
    """OpenAPI responses for every error code, grouped by HTTP status (503 has two codes)."""
    responses: dict[int, dict] = {}
    for code, (status, _, _) in CODES.items():
        entry = responses.setdefault(status, {"description": "", "content": {"application/json": {"examples": {}}}})
        text = DESCRIPTIONS.get(code, code)
        entry["description"] = f"{entry['description']}; {text}" if entry["description"] else text
        example = {"error": {"code": code, "message": "..."}}
        entry["content"]["application/json"]["examples"][code] = {"summary": text, "value": example}
    return dict(sorted(responses.items()))


ERROR_RESPONSES = error_responses()
SEGMENT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {"image": {"type": "string", "format": "binary"}},
                }
            },
            **{t: {"schema": {"type": "string", "format": "binary"}} for t in sorted(imaging.CONTENT_TYPES)},
        },
    }
}


def error_response(error: ServiceError) -> JSONResponse:
    headers = {"Retry-After": str(int(error.retry_after))} if error.retry_after else None
    return JSONResponse(error.body(), status_code=error.http_status, headers=headers)


async def image_bytes(request: Request, limit: int) -> bytes:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        request._body = await read_limited(request, limit + MULTIPART_OVERHEAD)  # lets form() parse it
        try:
            form = await request.form(max_files=1, max_fields=8)
        except StarletteHTTPException as exc:  # starlette's multipart parser refuses the body
            raise ServiceError("bad_request", f"malformed multipart body: {exc.detail}") from None
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ServiceError("bad_request", "multipart body has no file field named 'image'")
        data = await upload.read()
        if len(data) > limit:
            raise ServiceError("too_large", f"image of {len(data)} bytes exceeds the limit of {limit} bytes")
        return data
    if content_type in imaging.CONTENT_TYPES:
        return await read_limited(request, limit)
    raise ServiceError(
        "unsupported_media_type",
        f"content type {content_type or '(none)'!r} is not supported; send multipart/form-data with "
        f"an 'image' field, or a raw body of type {', '.join(sorted(imaging.CONTENT_TYPES))}",
    )


def timing_headers(served: Served, model: str) -> dict:
    t = served.timings
    return {
        "X-Model": model,
        "X-TTA": served.tta,
        "X-Batch-Size": str(served.result.batch_size),
        "Server-Timing": ", ".join(f"{k};dur={v * 1000:.2f}" for k, v in t.items()),
    }


def create_app(service: SegmentationService) -> FastAPI:
    app = FastAPI(
        title="bisenet-serve",
        version=__version__,
        description="Real-time semantic segmentation (BiSeNetV1, Cityscapes train ids 0-18).",
    )
    metrics = service.metrics

    @app.exception_handler(ServiceError)
    async def on_service_error(request: Request, exc: ServiceError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        service.count_rejection(ServiceError("bad_request", detail))
        await discard_body(request, service.settings.max_image_bytes + MULTIPART_OVERHEAD)
        return JSONResponse({"error": {"code": "bad_request", "message": detail}}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        code = HTTP_CODES.get(exc.status_code, "bad_request" if exc.status_code < 500 else "internal")
        await discard_body(request, service.settings.max_image_bytes + MULTIPART_OVERHEAD)
        headers = getattr(exc, "headers", None)
        body = {"error": {"code": code, "message": str(exc.detail)}}
        return JSONResponse(body, status_code=exc.status_code, headers=headers)

    @app.post(
        "/segment",
        summary="Segment one image",
        openapi_extra=SEGMENT_BODY,
        responses={
            200: {
                "content": {m: {} for m in OUTPUT_MEDIA.values()},
                "description": "Labels as a palette PNG (default), overlay JPEG, JSON or raw bytes",
            },
            **ERROR_RESPONSES,
        },
    )
    async def segment(
        request: Request,
        model: str | None = Query(
            None, description="model name, the aliases 'fast' / 'accurate', or 'auto' (the most accurate that fits)"
        ),
        format: Literal["png", "overlay", "json", "raw"] = Query("png", description="output format"),
        deadline_ms: int | None = Query(None, ge=1, le=3_600_000, description="answer 504 if not done by then"),
        tta: str | None = Query(None, description="test-time augmentation: none, flip, ms_flip or auto"),
        priority: int | None = Query(
            None, description="1 (the default) runs first, then 2, ... up to --priority-levels; 0: the default"
        ),
        x_api_key: str | None = Header(None),
        authorization: str | None = Header(None),
    ):
        with http_call(metrics, request, "/segment", "http") as call:
            try:
                service.check_api_key(api_key_from(x_api_key, authorization))
                options = service.options(model, tta, deadline_ms, priority)
                call.model = options.model
                data = await image_bytes(request, service.settings.max_image_bytes)
                served = await service.segment(options, "http", data=data)
                call.model = served.model
                return call.answer(await encode_response(service, served, call.model, format))
            except ServiceError as exc:
                service.count_rejection(exc)
                if exc.code != "too_large":  # a body over the limit is not read on
                    await discard_body(request, service.settings.max_image_bytes + MULTIPART_OVERHEAD)
                return call.answer(error_response(exc))

    @app.get("/models", summary="Served models, classes, palette, weights and captured graphs")
    async def models(x_api_key: str | None = Header(None), authorization: str | None = Header(None)):
        service.check_api_key(api_key_from(x_api_key, authorization))
        return {"models": service.models_info(), "default": service.default_model, "auto": service.auto_info()}

    @app.get("/healthz", summary="Liveness")
    @app.get("/v2/health/live", include_in_schema=False)
    async def live():
        return {"live": True}

    @app.get("/readyz", summary="Readiness: every model loaded and warm, not draining")
    @app.get("/v2/health/ready", include_in_schema=False)
    async def ready():
        if service.ready:
            return {"ready": True}
        reason = "draining" if service.dispatcher.draining else "models are loading or a worker is restarting"
        return JSONResponse({"ready": False, "error": {"code": "not_ready", "message": reason}}, status_code=503)

    add_v2_routes(app, service)
    add_web_page(app, service)

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus_metrics(accept: str | None = Header(None)):
        _ = service.ready  # refreshes the seg_ready gauge
        body, content_type = metrics.exposition(accept)
        return Response(body, media_type=content_type)

    return app


async def encode_response(service: SegmentationService, served: Served, model: str, fmt: str) -> Response:
    classes, palette = service.classes_palette(model)
    labels = served.result.labels
    start = time.perf_counter()
    if fmt == "json":
        body = await service.run_in_pool(imaging.encode_json, labels, model, classes, palette, served.timings)
    elif fmt == "png":
        body = await service.run_in_pool(imaging.encode_png, labels, palette)
    elif fmt == "overlay":
        # decoded_image(): in the pool, as it decodes here when the worker did the decoding
        body = await service.run_in_pool(lambda: imaging.encode_overlay(served.decoded_image(), labels, palette))
    else:
        body = imaging.label_bytes(labels)
    served.timings["encode"] = time.perf_counter() - start
    service.metrics.observe_outputs(fmt, [served], served.timings["encode"])
    headers = timing_headers(served, model)
    if fmt == "json":
        body["timings_ms"]["encode"] = round(served.timings["encode"] * 1000, 3)
        return JSONResponse(body, headers=headers)
    if fmt == "raw":
        headers.update({"X-Height": str(labels.shape[0]), "X-Width": str(labels.shape[1])})
    return Response(body, media_type=OUTPUT_MEDIA[fmt], headers=headers)
