"""`--decode frontend|worker` against the real service: the same labels over REST and gRPC, the
header-only checks of worker mode, a corrupt JPEG failing alone inside a batch, and greedy batching
(no fixed wait) against `--batching wait`."""

from __future__ import annotations

import io
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from service.proto import segmentation_pb2 as pb
from tests.servicekit import FAST_ARGS, Service, metric_value, segmentation_stub, server_timing

WAIT_MS = 600  # the `wait` service's batching delay: long enough to tell from greedy on a busy CPU


@pytest.fixture(scope="module")
def services(varied_r18_checkpoint):
    model = ["--model", f"bisenetv1_r18={varied_r18_checkpoint}"]
    # frontend decode with greedy batching and a long --max-delay-ms that greedy ignores; worker
    # decode with `wait` batching (the default), so that three requests sent together form one batch.
    front = Service(
        [*FAST_ARGS, *model, "--max-pixels", "1000000", "--max-batch", "3"]
        + ["--batching", "greedy", "--max-delay-ms", "5000"]
    )
    worker = Service(
        [*FAST_ARGS, *model, "--max-pixels", "1000000", "--max-batch", "3"]
        + ["--decode", "worker", "--max-delay-ms", str(WAIT_MS)]
    )
    try:
        yield {"frontend": front.wait_ready(), "worker": worker.wait_ready()}
    finally:
        front.stop()
        worker.stop()


def encode(array: np.ndarray, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def post(url: str, body: bytes, **params) -> httpx.Response:
    return httpx.post(
        f"{url}/segment", content=body, params=params, headers={"Content-Type": "image/jpeg"}, timeout=120
    )


def raw_labels(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    h, w = int(response.headers["X-Height"]), int(response.headers["X-Width"])
    return np.frombuffer(response.content, np.uint8).reshape(h, w)


def png_labels(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    img = Image.open(io.BytesIO(response.content))
    assert img.mode == "P"
    return np.asarray(img)


def error_code(response: httpx.Response) -> str:
    return response.json()["error"]["code"]


@pytest.fixture(scope="module")
def photo_small(photo):
    return np.asarray(Image.fromarray(photo).resize((96, 64)))


def rotated_jpeg(image: np.ndarray) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned 90 degrees clockwise: 64x96 stored, 96x64 shown
    return encode(image, quality=95, exif=exif)


@pytest.mark.parametrize("kind", ["jpeg", "png", "jpeg_exif"])
def test_rest_labels_are_equal_in_both_decode_modes(services, photo_small, kind):
    body = {
        "jpeg": lambda: encode(photo_small, quality=90),
        "png": lambda: encode(photo_small, "PNG"),
        "jpeg_exif": lambda: rotated_jpeg(photo_small),
    }[kind]()
    front = raw_labels(post(services["frontend"].url, body, format="raw"))
    worker_raw = raw_labels(post(services["worker"].url, body, format="raw"))
    worker_png = png_labels(post(services["worker"].url, body, format="png"))
    assert front.shape == ((96, 64) if kind == "jpeg_exif" else (64, 96))
    assert len(np.unique(front)) > 1  # the varied checkpoint: a comparison that can fail
    np.testing.assert_array_equal(worker_raw, front)
    np.testing.assert_array_equal(worker_png, front)


def test_overlay_in_worker_mode_equals_frontend(services, photo_small):
    body = encode(photo_small, quality=90)
    front = post(services["frontend"].url, body, format="overlay")
    worker = post(services["worker"].url, body, format="overlay")
    assert front.status_code == worker.status_code == 200
    assert front.content == worker.content


def test_grpc_labels_are_equal_in_both_decode_modes(services, photo_small):
    body = rotated_jpeg(photo_small)
    results = {}
    for mode, svc in services.items():
        with segmentation_stub(svc.grpc_target) as stub:
            reply = stub.Segment(pb.SegmentRequest(encoded=body, format=pb.LABELS_RAW), timeout=120)
        results[mode] = np.frombuffer(reply.labels, np.uint8).reshape(reply.height, reply.width)
    assert results["frontend"].shape == (96, 64)
    np.testing.assert_array_equal(results["worker"], results["frontend"])


def test_grpc_corrupt_jpeg_in_worker_mode_is_invalid_argument(services, photo_small):
    import grpc

    good = encode(photo_small, quality=90)
    with segmentation_stub(services["worker"].grpc_target) as stub:
        with pytest.raises(grpc.RpcError) as err:
            stub.Segment(pb.SegmentRequest(encoded=good[: len(good) * 2 // 3]), timeout=120)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_worker_mode_checks_headers_before_shipping(services, photo_small):
    url = services["worker"].url
    huge = encode(np.zeros((1, 1, 3), np.uint8), "PNG")
    big = Image.new("RGB", (2000, 1000))  # 2 Mpixel, a few kB as PNG: refused from its header
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    response = post(url, buf.getvalue())
    assert response.status_code == 413 and error_code(response) == "too_large"
    gif = io.BytesIO()
    Image.fromarray(photo_small).save(gif, format="GIF")
    response = post(url, gif.getvalue())
    assert response.status_code == 400 and "GIF" in response.json()["error"]["message"]
    for body in (b"", np.random.default_rng(0).bytes(3000)):
        response = post(url, body)
        assert response.status_code == 400 and error_code(response) == "invalid_image"
    assert post(url, huge).status_code == 200  # and it still serves


def test_corrupt_jpeg_fails_alone_in_its_batch(services, photo_small):
    """A JPEG whose header is fine but whose data is cut: the worker's decode fails for it only."""
    svc = services["worker"]
    good = encode(photo_small, quality=90)
    corrupt = good[: len(good) * 2 // 3]
    expected = raw_labels(post(services["frontend"].url, good, format="raw"))
    before = svc.metrics()
    responses: dict[str, httpx.Response] = {}

    def send(name: str, body: bytes) -> None:
        responses[name] = post(svc.url, body, format="raw")

    # --max-batch 3 with `wait` batching: the three same-size requests run as one batch
    threads = [threading.Thread(target=send, args=a) for a in (("a", good), ("bad", corrupt), ("b", good))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert responses["bad"].status_code == 400, responses["bad"].text
    assert error_code(responses["bad"]) == "invalid_image"
    assert "truncated" in responses["bad"].json()["error"]["message"]
    for name in ("a", "b"):
        np.testing.assert_array_equal(raw_labels(responses[name]), expected)
        assert responses[name].headers["X-Batch-Size"] == "2"  # served together, without the bad one
    after = svc.metrics()
    assert metric_value(after, "seg_batch_size_count") - metric_value(before, "seg_batch_size_count") == 1
    rejected = metric_value(after, "seg_requests_rejected_total", reason="invalid_image")
    assert rejected - metric_value(before, "seg_requests_rejected_total", reason="invalid_image") == 1


def test_greedy_batching_runs_a_lone_request_at_once(services, photo_small):
    body = encode(photo_small, quality=90)
    greedy = post(services["frontend"].url, body)  # --max-delay-ms 5000, ignored by greedy
    waiting = post(services["worker"].url, body)  # --batching wait
    assert greedy.status_code == waiting.status_code == 200
    assert server_timing(greedy)["queue"] < 1000
    assert server_timing(waiting)["queue"] >= WAIT_MS * 0.9
