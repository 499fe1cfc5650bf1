"""`--batching adaptive` against the real service: it waits for a batch to fill only while the front
end is still decoding requests that could join it."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.servicekit import FAST_ARGS, Service, metric_value, png, server_timing

httpclient = pytest.importorskip("tritonclient.http")

MODEL = "bisenetv1_r18"
DELAY_MS = 5000  # far longer than any request here takes: a batch that waited for it would show


@pytest.fixture(scope="module")
def service(r18_checkpoint):
    svc = Service(
        [*FAST_ARGS, "--model", f"{MODEL}={r18_checkpoint}", "--max-batch", "4"]
        + ["--batching", "adaptive", "--max-delay-ms", str(DELAY_MS)]
    )
    try:
        yield svc.wait_ready()
    finally:
        svc.stop()


def test_a_lone_request_does_not_wait_for_company(service, photo):
    response = httpx.post(
        f"{service.url}/segment",
        content=png(np.ascontiguousarray(photo[:64, :96])),
        headers={"Content-Type": "image/png"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert server_timing(response)["queue"] < DELAY_MS / 5


def test_images_decoded_together_share_one_batch_without_the_wait(service, photo):
    """The three images of one v2 request are decoded side by side: the first two reach the worker
    saying others are on their way, the last saying none is, and the batch of three runs then."""
    crops = [np.ascontiguousarray(photo[i * 40 : i * 40 + 64, :96]) for i in range(3)]
    tensor = httpclient.InferInput("IMAGE", [3, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[png(c)] for c in crops], dtype=np.object_), binary_data=True)
    before = service.metrics()
    with httpclient.InferenceServerClient(service.url.removeprefix("http://")) as client:
        result = client.infer(MODEL, [tensor])
    after = service.metrics()
    assert result.as_numpy("LABELS").shape == (3, 64, 96)
    batches = metric_value(after, "seg_batch_size_count") - metric_value(before, "seg_batch_size_count")
    images = metric_value(after, "seg_batch_size_sum") - metric_value(before, "seg_batch_size_sum")
    assert (batches, images) == (1, 3)
    queue_seconds = metric_value(after, "seg_queue_wait_seconds_sum") - metric_value(
        before, "seg_queue_wait_seconds_sum"
    )
    assert queue_seconds < 3 * DELAY_MS / 1000 / 5  # none of the three waited out --max-delay-ms
