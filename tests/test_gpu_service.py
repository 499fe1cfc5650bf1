"""The whole service on a GPU (tools/gpu_check.sh runs these with `-m gpu`; without CUDA they skip):
concurrent requests through shared memory, the pipelined copies, CUDA graphs and nvJPEG, each
answer checked against the model run in this process on the same pixels (decoded here by the
worker's own decoder, so nvJPEG's few differing pixels do not blur the comparison)."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from conftest import gpu
from PIL import Image

from model import Segmenter
from service.worker.decode import FrameDecoder
from tests.servicekit import Service, service_metric, wait_for

pytestmark = gpu
MODEL = "bisenetv1_r18"
SCALE = (256, 128)
SIZE = (128, 256)  # the warm shape: its graphs are captured at start


@pytest.fixture(scope="module")
def service(varied_r18_checkpoint):
    svc = Service(
        ["--device", "cuda:0", "--model", f"{MODEL}={varied_r18_checkpoint}", "--resize-scale", "256x128"]
        + ["--warm-shapes", "128x256", "--max-batch", "4", "--batch-buckets", "1,2,4", "--decode", "worker"]
        + ["--log-level", "warning"]
    )
    try:
        yield svc.wait_ready(timeout=300)
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def reference(varied_r18_checkpoint):
    """What the worker computes for one image: its decoder, then the model in this process."""
    segmenter = Segmenter(MODEL, weights=varied_r18_checkpoint, device="cuda", scale=SCALE)
    decoder = FrameDecoder("cuda:0", max_pixels=1 << 24)

    def labels(body: bytes) -> np.ndarray:
        (frame,) = decoder.decode([body])
        assert not isinstance(frame, str), frame
        return segmenter.predict(frame.cpu().numpy() if isinstance(frame, torch.Tensor) else frame)

    return labels


def encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def graph_replays(service) -> float:
    return service_metric(service, "seg_cuda_graph_replays_total")


def labels_of(url: str, body: bytes, content_type: str) -> np.ndarray:
    r = httpx.post(f"{url}/segment?format=raw", content=body, headers={"Content-Type": content_type}, timeout=120)
    assert r.status_code == 200, r.text
    return np.frombuffer(r.content, np.uint8).reshape(int(r.headers["x-height"]), int(r.headers["x-width"]))


def test_concurrent_requests_each_get_their_own_labels(service, reference, photo):
    """Sixteen requests of eight different frames, four at a time: batches of mixed requests, two
    in flight, JPEGs decoded by nvJPEG and PNGs on the CPU. A label map that went to the wrong
    slot, or was overwritten by the next batch, agrees with its own frame's labels far less."""
    frames = [np.ascontiguousarray(np.roll(photo, 37 * i, axis=1)[96 : 96 + SIZE[0], : SIZE[1]]) for i in range(8)]
    bodies = [
        (encode(f, "JPEG"), "image/jpeg") if i % 2 == 0 else (encode(f, "PNG"), "image/png")
        for i, f in enumerate(frames)
    ]
    expected = [reference(body) for body, _ in bodies]
    # the frames' labels differ enough that a label map sent to the wrong request would show
    assert all((expected[i] == expected[i + 1]).mean() < 0.9 for i in range(7))
    graph_replays_before = graph_replays(service)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: labels_of(service.url, *bodies[i % 8]), range(16)))
    for i, labels in enumerate(got):
        agreement = float((labels == expected[i % 8]).mean())
        assert agreement >= 0.98, (i, agreement)  # fp16 batches of other sizes: a few pixels at most
    # the worker reports its graph counters about once a second: the warm shape's graphs served these
    wait_for(lambda: graph_replays(service) > graph_replays_before, "graph replays", timeout=10)


def test_a_corrupt_jpeg_fails_alone_on_the_gpu(service, photo):
    frame = np.ascontiguousarray(photo[:128, :256])
    good = encode(frame, "JPEG")
    broken = good[: len(good) // 2]  # the header is fine; the data ends early
    with ThreadPoolExecutor(3) as pool:
        answers = list(
            pool.map(
                lambda body: httpx.post(
                    f"{service.url}/segment?format=raw",
                    content=body,
                    headers={"Content-Type": "image/jpeg"},
                    timeout=120,
                ),
                [good, broken, good],
            )
        )
    assert [a.status_code for a in answers] == [200, 400, 200]
    assert answers[1].json()["error"]["code"] == "invalid_image"
