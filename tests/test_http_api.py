"""REST API against the real running service: results, formats, errors, metrics, client."""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import subprocess
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from model import CITYSCAPES_PALETTE, Segmenter
from service.client import SegmentationClient, SegmentationError
from tests.servicekit import BISENET, FAST_ARGS, Service, metric_value

KEY = "test-key"
HEADERS = {"X-API-Key": KEY}


CLASS_NAMES = tuple(f"class{i}" for i in range(19))


@pytest.fixture(scope="module")
def named_checkpoint(r18_checkpoint, tmp_path_factory) -> str:
    """The random R18 checkpoint with distinct class names, so that names can be checked against ids."""
    ckpt = torch.load(r18_checkpoint, weights_only=True)
    ckpt["meta"]["CLASSES"] = CLASS_NAMES
    path = tmp_path_factory.mktemp("ckpt") / "r18_named.pth"
    torch.save(ckpt, path)
    return str(path)


@pytest.fixture(scope="module")
def service(named_checkpoint):
    svc = Service(
        [
            *FAST_ARGS,
            "--model",
            f"bisenetv1_r18={named_checkpoint}",
            "--max-batch",
            "4",
            "--max-delay-ms",
            "30",
            "--max-image-bytes",
            "300000",
            "--max-pixels",
            "1000000",
            "--api-key",
            KEY,
        ]
    )
    try:
        yield svc.wait_ready()
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def reference(r18_checkpoint):
    return Segmenter("bisenetv1_r18", weights=r18_checkpoint, scale=(256, 128))


@pytest.fixture(scope="module")
def http(service):
    with httpx.Client(base_url=service.url, headers=HEADERS, timeout=120) as client:
        yield client


def encode(array: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def post(http, body: bytes, content_type="image/png", **params) -> httpx.Response:
    return http.post("/segment", content=body, params=params, headers={"Content-Type": content_type})


def labels_of(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)))


def assert_still_serves(http, photo_small) -> None:
    assert post(http, encode(photo_small)).status_code == 200


@pytest.fixture(scope="module")
def photo_small(photo):
    return np.asarray(Image.fromarray(photo).resize((96, 64)))


# -- results ---------------------------------------------------------------------------------------
def test_labels_equal_segmenter_on_real_photos(http, reference):
    from skimage import data

    for image in (data.astronaut(), data.coffee(), data.chelsea()):
        jpeg = encode(image, "JPEG", quality=90)
        decoded = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        served = labels_of(post(http, jpeg, "image/jpeg"))
        assert served.shape == image.shape[:2]
        np.testing.assert_array_equal(served, reference.predict(decoded))


def test_multipart_upload_and_palette_png(http, photo_small, reference):
    r = http.post("/segment", files={"image": ("x.png", encode(photo_small), "image/png")})
    img = Image.open(io.BytesIO(r.content))
    assert img.mode == "P" and img.size == (96, 64)
    assert list(img.getpalette()[: 19 * 3]) == [v for c in CITYSCAPES_PALETTE for v in c]
    np.testing.assert_array_equal(np.asarray(img), reference.predict(photo_small))
    assert r.headers["x-model"] == "bisenetv1_r18"
    stages = {p.split(";")[0].strip() for p in r.headers["server-timing"].split(",")}
    assert {"decode", "queue", "inference", "encode"} <= stages


def blocks(image: np.ndarray, k: int = 8) -> np.ndarray:
    """Means over k x k blocks: what JPEG keeps best (the DC terms), to compare a JPEG with its source."""
    h, w = image.shape[0] // k * k, image.shape[1] // k * k
    return image[:h, :w].astype(np.float64).reshape(h // k, k, w // k, k, -1).mean((1, 3))


def test_overlay_is_the_image_blended_with_the_class_colours(http, photo_small, reference):
    labels = reference.predict(photo_small)
    assert len(np.unique(labels)) > 3  # several colours, so a wrong colour per class shows
    overlay = post(http, encode(photo_small), format="overlay")
    assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(overlay.content))
    assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (96, 64))
    palette = np.asarray(CITYSCAPES_PALETTE, np.uint8)
    blend = (photo_small.astype(np.float32) * 0.5 + palette[labels] * 0.5).astype(np.uint8)
    # JPEG changes single pixels by up to tens of levels, block means by a level or two; the image
    # alone, the colours alone or another weight (0.45) are several levels off on average.
    error = np.abs(blocks(np.asarray(img)) - blocks(blend))
    assert error.mean() < 1.5 and error.max() < 6, (error.mean(), error.max())


def test_json_format_fields(http, photo_small, reference):
    expected = reference.predict(photo_small)
    h, w = expected.shape
    stats = post(http, encode(photo_small), format="json").json()
    assert set(stats) == {"model", "height", "width", "classes", "timings_ms", "labels_png"}
    assert (stats["model"], stats["height"], stats["width"]) == ("bisenetv1_r18", 64, 96)
    counts = np.bincount(expected.ravel(), minlength=19)
    assert [c["id"] for c in stats["classes"]] == [i for i, n in enumerate(counts) if n]  # present ones, by id
    for c in stats["classes"]:
        assert set(c) == {"id", "name", "pixels", "fraction"}
        assert c["name"] == CLASS_NAMES[c["id"]] and c["pixels"] == counts[c["id"]]
        assert c["fraction"] == pytest.approx(c["pixels"] / (h * w), abs=1e-6)
    assert sum(c["pixels"] for c in stats["classes"]) == h * w
    assert sum(c["fraction"] for c in stats["classes"]) == pytest.approx(1.0, abs=1e-5)
    assert set(stats["timings_ms"]) == {"decode", "queue", "inference", "encode"}
    assert all(isinstance(v, float | int) and v >= 0 for v in stats["timings_ms"].values())
    png = Image.open(io.BytesIO(base64.b64decode(stats["labels_png"])))
    assert png.mode == "P"
    np.testing.assert_array_equal(np.asarray(png), labels_of(post(http, encode(photo_small), format="png")))
    np.testing.assert_array_equal(np.asarray(png), expected)


def test_raw_format(http, photo_small, reference):
    raw = post(http, encode(photo_small), format="raw")
    assert raw.headers["content-type"] == "application/octet-stream"
    assert (raw.headers["x-height"], raw.headers["x-width"]) == ("64", "96") and len(raw.content) == 64 * 96
    np.testing.assert_array_equal(np.frombuffer(raw.content, np.uint8).reshape(64, 96), reference.predict(photo_small))


def test_model_aliases_and_models_endpoint(http, photo_small):
    by_name = post(http, encode(photo_small), model="bisenetv1_r18")
    fast = post(http, encode(photo_small), model="fast")
    assert by_name.headers["x-model"] == fast.headers["x-model"] == "bisenetv1_r18"
    np.testing.assert_array_equal(labels_of(fast), labels_of(by_name))
    # `accurate` names bisenetv1_r50, which this service does not serve; an unknown alias is unknown
    for model in ("accurate", "fastest", "FAST"):
        error_of(post(http, encode(photo_small), model=model), 404, "not_found")
    info = http.get("/models").json()
    (entry,) = info["models"]
    assert info["default"] == "bisenetv1_r18"
    assert entry["name"] == "bisenetv1_r18" and entry["ready"] and entry["classes"] == list(CLASS_NAMES)
    assert entry["palette"][0] == [128, 64, 128] and entry["dtype"] == "float32"


@pytest.mark.parametrize("convert", ["L", "RGBA", "P", "I;16", "CMYK"])
def test_other_image_modes_are_served(http, photo_small, reference, convert):
    img = Image.fromarray(photo_small)
    if convert == "I;16":
        gray = np.asarray(img.convert("L")).astype(np.uint16) * 257
        body, expected_rgb = encode(gray), np.repeat(np.asarray(img.convert("L"))[:, :, None], 3, 2)
    elif convert == "CMYK":
        cmyk = img.convert("CMYK")
        buf = io.BytesIO()
        cmyk.save(buf, format="JPEG", quality=95)
        body = buf.getvalue()
        expected_rgb = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
    else:
        converted = img.convert(convert)
        buf = io.BytesIO()
        converted.save(buf, format="PNG")
        body = buf.getvalue()
        expected_rgb = np.asarray(
            converted.convert("RGBA").convert("RGB") if convert == "P" else converted.convert("RGB")
        )
    served = labels_of(post(http, body, "image/jpeg" if convert == "CMYK" else "image/png"))
    np.testing.assert_array_equal(served, reference.predict(expected_rgb))


@pytest.mark.parametrize(
    ("fmt", "options", "content_type"),
    [
        ("WEBP", {"lossless": True}, "image/webp"),
        ("BMP", {}, "image/bmp"),
        ("BMP", {}, "image/x-ms-bmp"),
        ("TIFF", {}, "image/tiff"),
        ("TIFF", {"compression": "tiff_lzw"}, "image/tiff"),
    ],
    ids=["webp-lossless", "bmp", "x-ms-bmp", "tiff", "tiff-lzw"],
)
def test_other_formats_give_the_labels_of_the_same_pixels_as_png(http, photo_small, fmt, options, content_type):
    body = encode(photo_small, fmt, **options)
    decoded = Image.open(io.BytesIO(body))
    assert decoded.format == fmt
    np.testing.assert_array_equal(np.asarray(decoded.convert("RGB")), photo_small)  # the same pixels
    np.testing.assert_array_equal(labels_of(post(http, body, content_type)), labels_of(post(http, encode(photo_small))))


def test_exif_orientation_is_applied(http, photo_small, reference):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buf = io.BytesIO()
    Image.fromarray(photo_small).save(buf, format="JPEG", quality=95, exif=exif)
    served = labels_of(post(http, buf.getvalue(), "image/jpeg"))
    upright = np.asarray(Image.open(io.BytesIO(buf.getvalue())).transpose(Image.Transpose.ROTATE_270).convert("RGB"))
    assert served.shape == (96, 64)
    np.testing.assert_array_equal(served, reference.predict(upright))


def test_concurrent_requests_are_batched(service, http, photo_small):
    before = service.metrics()
    body = encode(photo_small)
    results = []

    def send():
        with httpx.Client(base_url=service.url, headers=HEADERS, timeout=120) as c:
            results.append(post(c, body).status_code)

    threads = [threading.Thread(target=send) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 12
    after = service.metrics()
    batches = metric_value(after, "seg_batch_size_count") - metric_value(before, "seg_batch_size_count")
    served = metric_value(after, "seg_batch_size_sum") - metric_value(before, "seg_batch_size_sum")
    assert served == 12 and batches < 12, (batches, served)  # some batch held more than one request


# -- bad input: each answered with a JSON error, and the service keeps serving ---------------------
def error_of(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code
    return body["error"]["message"]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (np.random.default_rng(0).bytes(5000), "image/jpeg", 400, "invalid_image"),
        (b"", "image/png", 400, "invalid_image"),
        (b"hello", "text/plain", 415, "unsupported_media_type"),
        (b"GIF89a" + bytes(100), "image/gif", 415, "unsupported_media_type"),
    ],
    ids=["random-bytes", "empty", "text-plain", "gif"],
)
def test_bad_bodies(http, photo_small, body, content_type, status, code):
    error_of(post(http, body, content_type), status, code)
    assert_still_serves(http, photo_small)


def test_truncated_jpeg(http, photo):
    jpeg = encode(photo, "JPEG")
    error_of(post(http, jpeg[: len(jpeg) // 2], "image/jpeg"), 400, "invalid_image")


def test_missing_content_type(http, photo_small):
    r = http.post("/segment", content=encode(photo_small))
    error_of(r, 415, "unsupported_media_type")


def test_body_over_limit_is_refused_before_reading(http, photo_small):
    big = b"\xff" * 400_000
    message = error_of(post(http, big, "image/jpeg"), 413, "too_large")
    assert "300000" in message

    def chunks():  # no Content-Length: the limit holds while streaming
        for _ in range(100):
            yield b"\x00" * 10_000

    r = http.post("/segment", content=chunks(), headers={"Content-Type": "image/png"})
    error_of(r, 413, "too_large")
    assert_still_serves(http, photo_small)


def test_decompression_bomb_refused_before_decoding(http, photo_small):
    bomb = encode(np.zeros((3000, 3000), np.uint8))  # 9 Mpx in a few kB
    assert len(bomb) < 300_000
    message = error_of(post(http, bomb), 413, "too_large")
    assert "3000x3000" in message
    assert_still_serves(http, photo_small)


def test_unknown_model_and_bad_parameters(http, photo_small):
    error_of(post(http, encode(photo_small), model="nope"), 404, "not_found")
    error_of(post(http, encode(photo_small), format="gif"), 422, "bad_request")
    error_of(post(http, encode(photo_small), deadline_ms="-5"), 422, "bad_request")
    assert_still_serves(http, photo_small)


def test_expired_deadline(http, photo_small):
    error_of(post(http, encode(photo_small), deadline_ms="1"), 504, "deadline_exceeded")
    assert_still_serves(http, photo_small)


# Answered without the API key, deliberately: liveness, readiness, Prometheus and the API docs.
OPEN_ENDPOINTS = {
    ("GET", "/healthz"),
    ("GET", "/v2/health/live"),
    ("GET", "/readyz"),
    ("GET", "/v2/health/ready"),
    ("GET", "/metrics"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
    ("GET", "/openapi.json"),
    ("GET", "/"),  # the web page asks for the key itself
    ("GET", "/web/config"),
    ("GET", "/v2"),
    ("GET", "/v2/models/{model}/ready"),
    ("GET", "/v2/models/{model}/versions/{version}/ready"),
}
KEYED_ENDPOINTS = {
    ("POST", "/segment"),
    ("GET", "/models"),
    ("GET", "/v2/models/{model}"),
    ("GET", "/v2/models/{model}/versions/{version}"),
    ("GET", "/v2/models/{model}/config"),
    ("GET", "/v2/models/{model}/versions/{version}/config"),
    ("GET", "/v2/models/stats"),
    ("GET", "/v2/systemsharedmemory/status"),
    ("GET", "/v2/systemsharedmemory/region/{name}/status"),
    ("POST", "/v2/systemsharedmemory/region/{name}/register"),
    ("POST", "/v2/systemsharedmemory/region/{name}/unregister"),
    ("POST", "/v2/systemsharedmemory/unregister"),
    ("GET", "/v2/models/{model}/stats"),
    ("GET", "/v2/models/{model}/versions/{version}/stats"),
    ("POST", "/v2/models/{model}/infer"),
    ("POST", "/v2/models/{model}/versions/{version}/infer"),
    ("GET", "/v2/logging"),
    ("POST", "/v2/logging"),
}


def app_endpoints() -> set[tuple[str, str]]:
    """(method, path) of every route of the REST app, including those left out of the OpenAPI schema."""
    from service.api.rest import create_app
    from service.config import ModelSpec, Settings
    from service.core import SegmentationService

    settings = Settings(models=(ModelSpec("bisenetv1_r18", "random"),), devices=("cpu",), api_key=KEY)
    svc = SegmentationService(settings, {"bisenetv1_r18": "random"})
    try:
        app = create_app(svc)
        return {(m, route.path) for route in app.routes for m in getattr(route, "methods", ()) if m != "HEAD"}
    finally:
        svc.pool.shutdown()


def test_api_key_on_every_endpoint(service, photo_small, request):
    # Every route is one of the two lists: a new endpoint must be classified (and is then checked).
    assert app_endpoints() == OPEN_ENDPOINTS | KEYED_ENDPOINTS
    body = encode(photo_small)
    # A shared-memory region "probe" for the region routes; each accepted registration takes a new name.
    shm_key = f"bisenet-keyed-{os.getpid()}"
    Path("/dev/shm", shm_key).write_bytes(bytes(64))
    request.addfinalizer(lambda: Path("/dev/shm", shm_key).unlink(missing_ok=True))
    region = {"key": f"/{shm_key}", "byte_size": 64}
    registered = httpx.post(
        f"{service.url}/v2/systemsharedmemory/region/probe/register", json=region, headers={"X-API-Key": KEY}
    )
    assert registered.status_code == 200, registered.text
    names = (f"r{i}" for i in itertools.count())

    v2_body = json.dumps(
        {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1], "data": [base64.b64encode(body).decode()]}]}
    )

    def call(method: str, path: str, headers: dict) -> httpx.Response:
        path = path.format(
            model="bisenetv1_r18", version="1", name=next(names) if path.endswith("/register") else "probe"
        )
        if path.endswith("/register"):
            return httpx.post(service.url + path, json=region, headers=headers, timeout=60)
        if path.endswith("/infer"):
            return httpx.post(service.url + path, content=v2_body, headers=headers, timeout=120)
        if path == "/v2/logging" and method == "POST":
            return httpx.post(service.url + path, json={"log_verbose_level": 0}, headers=headers, timeout=60)
        if method == "POST":
            headers = {"Content-Type": "image/png", **headers}
            return httpx.post(service.url + path, content=body, headers=headers, timeout=120)
        return httpx.request(method, service.url + path, headers=headers, timeout=120)

    refused = (
        {},
        {"X-API-Key": ""},
        {"X-API-Key": "wrong"},
        {"X-API-Key": KEY.upper()},
        {"Authorization": "Bearer wrong"},
        {"Authorization": KEY},
        {"Authorization": f"Basic {KEY}"},
        {"X-Api-Key-Typo": KEY},
    )
    for method, path in sorted(KEYED_ENDPOINTS):
        for headers in refused:
            response = call(method, path, headers)
            if path.startswith("/v2/"):  # the v2 error body: {"error": "message"}
                assert response.status_code == 401, response.text
                message = response.json()["error"]
            else:
                message = error_of(response, 401, "unauthorized")
            assert KEY not in message
        for headers in ({"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}):
            assert call(method, path, headers).status_code == 200, (method, path, headers)
    for method, path in sorted(OPEN_ENDPOINTS):
        assert call(method, path, {}).status_code == 200, (method, path)


# -- health, metrics, docs ----------------------------------------------------------------------
def test_health_readiness_openapi(service):
    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/docs"):
        assert httpx.get(service.url + path).status_code == 200, path
    spec = httpx.get(service.url + "/openapi.json").json()
    assert "/segment" in spec["paths"] and "multipart/form-data" in json.dumps(spec["paths"]["/segment"])


def test_metrics_exposition(service, http, photo_small):
    before = service.metrics()
    error_of(post(http, b"not an image", "image/png"), 400, "invalid_image")
    post(http, encode(photo_small))
    text = service.metrics()
    for name in (
        "seg_request_duration_seconds_bucket",
        "seg_decode_seconds_count",
        "seg_queue_wait_seconds_count",
        "seg_inference_seconds_count",
        "seg_encode_seconds_count",
        "seg_batch_size_count",
        "seg_queue_depth",
        "seg_realtime_target_seconds",
        "seg_requests_rejected_total",
        "seg_ready",
        "seg_shm_slots_in_use",
        "process_resident_memory_bytes",
    ):
        assert name in text, name
    assert metric_value(text, "seg_realtime_target_seconds") == pytest.approx(1 / 30, rel=1e-6)
    assert 'le="0.033333"' in text  # a bucket edge sits exactly on the frame budget
    assert metric_value(text, "seg_ready") == 1
    rejected = metric_value(text, "seg_requests_rejected_total", reason="invalid_image")
    assert rejected - metric_value(before, "seg_requests_rejected_total", reason="invalid_image") == 1
    assert metric_value(text, "seg_queue_depth") == 0


# -- client ------------------------------------------------------------------------------------------
def test_python_client_inputs(service, photo_small, reference, tmp_path):
    expected = reference.predict(photo_small)
    path = tmp_path / "frame.png"
    path.write_bytes(encode(photo_small))
    with SegmentationClient(service.url, api_key=KEY) as client:
        for image in (str(path), path.read_bytes(), photo_small, Image.fromarray(photo_small)):
            np.testing.assert_array_equal(client.segment(image).labels, expected)
        assert client.segment(photo_small, format="json").stats["height"] == 64
        np.testing.assert_array_equal(client.segment(photo_small, format="raw").labels, expected)
        with pytest.raises(SegmentationError) as err:
            client.segment(photo_small, model="missing")
        assert err.value.status == 404 and not err.value.retryable


def test_client_cli(service, photo_small, tmp_path):
    src = tmp_path / "in.png"
    src.write_bytes(encode(photo_small))
    out, overlay = tmp_path / "labels.png", tmp_path / "overlay.jpg"
    run = subprocess.run(
        [
            BISENET,
            "segment",
            str(src),
            "--url",
            service.url,
            "--api-key",
            KEY,
            "-o",
            str(out),
            "--overlay",
            str(overlay),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert Image.open(out).size == (96, 64) and Image.open(overlay).format == "JPEG"
