"""The page for people: `GET /` serves a small HTML/CSS/JS page shipped in the package (no build step,
nothing fetched from elsewhere) that segments a picked, dropped or webcam image through the REST API;
`GET /web/config` tells it what it cannot read from `/models`."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from ..core import SegmentationService
from ..errors import ServiceError

STATIC = Path(__file__).with_name("static")
# Everything the page loads comes from this service; images are data: and blob: URLs it makes itself.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-cache",
}


def query_choices(app: FastAPI, path: str, name: str) -> list[str]:
    """The values the OpenAPI schema allows for query parameter `name` of POST `path` ([] if none)."""
    operation = app.openapi().get("paths", {}).get(path, {}).get("post", {})
    for parameter in operation.get("parameters", []):
        if parameter.get("name") != name:
            continue
        schema = parameter.get("schema", {})
        for option in [schema, *schema.get("anyOf", [])]:
            if option.get("enum"):
                return [str(v) for v in option["enum"]]
    return []


def accepts_model(service: SegmentationService, name: str) -> bool:
    try:
        service.resolve_model(name)
    except ServiceError:
        return False
    return True


def add_web_page(app: FastAPI, service: SegmentationService) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    @app.get("/web/config", summary="What the web page needs: frame budget, limits, optional modes")
    async def web_config():
        settings = service.settings
        return {
            "budget_ms": round(settings.budget_seconds * 1000, 3),
            "target_fps": settings.target_fps,
            "max_image_bytes": settings.max_image_bytes,
            "api_key_required": bool(settings.api_key),
            # Shown only when the API announces them: the accuracy mode and the automatic model choice.
            "accuracy_modes": query_choices(app, "/segment", "tta"),
            "auto_model": accepts_model(service, "auto"),
        }
