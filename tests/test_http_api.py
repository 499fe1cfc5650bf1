"""REST API against the real running service: results, formats, errors, metrics, client."""

from __future__ import annotations

import io
import json
import subprocess
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from model import CITYSCAPES_PALETTE, Segmenter
from service.client import SegmentationClient, SegmentationError
from tests.servicekit import BISENET, FAST_ARGS, Service, metric_value

KEY = "test-key"
HEADERS = {"X-API-Key": KEY}


@pytest.fixture(scope="module")
def service(r18_checkpoint):
    svc = Service(
        [
            *FAST_ARGS,
            "--model",
            f"bisenetv1_r18={r18_checkpoint}",
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


def test_formats_overlay_json_raw(http, photo_small, reference):
    expected = reference.predict(photo_small)
    overlay = post(http, encode(photo_small), format="overlay")
    assert overlay.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(overlay.content)).size == (96, 64)
    stats = post(http, encode(photo_small), format="json").json()
    assert (stats["model"], stats["height"], stats["width"]) == ("bisenetv1_r18", 64, 96)
    assert sum(c["pixels"] for c in stats["classes"]) == 64 * 96
    counts = np.bincount(expected.ravel(), minlength=19)
    assert {c["id"]: c["pixels"] for c in stats["classes"]} == {i: int(n) for i, n in enumerate(counts) if n}
    assert {"decode", "queue", "inference", "encode"} <= set(stats["timings_ms"])
    raw = post(http, encode(photo_small), format="raw")
    assert (raw.headers["x-height"], raw.headers["x-width"]) == ("64", "96")
    np.testing.assert_array_equal(np.frombuffer(raw.content, np.uint8).reshape(64, 96), expected)


def test_model_aliases_and_models_endpoint(http, photo_small):
    assert post(http, encode(photo_small), model="fast").status_code == 200
    info = http.get("/models").json()
    (entry,) = info["models"]
    assert entry["name"] == "bisenetv1_r18" and entry["ready"] and len(entry["classes"]) == 19
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


def test_api_key_required(service, photo_small):
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(
            f"{service.url}/segment", content=encode(photo_small), headers={"Content-Type": "image/png", **headers}
        )
        error_of(r, 401, "unauthorized")
    ok = httpx.post(
        f"{service.url}/segment",
        content=encode(photo_small),
        headers={"Content-Type": "image/png", "Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert ok.status_code == 200


# -- health, metrics, docs ----------------------------------------------------------------------
def test_health_readiness_openapi(service):
    for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/docs"):
        assert httpx.get(service.url + path).status_code == 200, path
    spec = httpx.get(service.url + "/openapi.json").json()
    assert "/segment" in spec["paths"] and "multipart/form-data" in json.dumps(spec["paths"]["/segment"])


def test_metrics_exposition(service, http, photo_small):
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
    assert metric_value(text, "seg_requests_rejected_total", reason="invalid_image") >= 1
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
