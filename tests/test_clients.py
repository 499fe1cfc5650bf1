"""The Python REST clients against the real service: the asyncio client (labels equal to the blocking
client's, requests in flight together, errors), and retries after 429 that keep the request's
deadline. The worker is held with SIGSTOP where a test needs the queue to stay full."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.client import AsyncSegmentationClient, SegmentationClient, SegmentationError
from tests.servicekit import FAST_ARGS, Service, held, service_metric, wait_for

MODEL = "bisenetv1_r18"


@pytest.fixture(scope="module")
def service(r18_checkpoint):
    svc = Service([*FAST_ARGS, "--model", f"{MODEL}={r18_checkpoint}", "--max-batch", "4", "--max-queue", "1"])
    try:
        yield svc.wait_ready()
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def frames(photo) -> list[np.ndarray]:
    return [np.ascontiguousarray(photo[i * 32 : i * 32 + 64, :96]) for i in range(3)]


def test_the_async_client_gives_what_the_blocking_one_gives(service, frames):
    with SegmentationClient(service.url) as client:
        expected = [client.segment(f).labels for f in frames]

    async def run():
        async with AsyncSegmentationClient(service.url) as client:
            assert await client.ready()
            assert (await client.models())["default"] == MODEL
            got = [await client.segment(f) for f in frames]
            raw = await client.segment(frames[0], format="raw", tta="flip")
            with pytest.raises(SegmentationError) as missing:
                await client.segment(frames[0], model="missing")
            return got, raw, missing.value

    got, raw, missing = asyncio.run(run())
    for result, labels in zip(got, expected):
        np.testing.assert_array_equal(result.labels, labels)
        assert result.model == MODEL and "inference" in result.timings_ms
    assert raw.tta == "flip" and raw.labels.shape == (64, 96)
    assert missing.status == 404 and missing.code == "not_found" and not missing.retryable


def test_the_async_client_keeps_requests_in_flight_together(service, frames):
    """Three requests gathered at once while the worker is held: all three reach the service before
    any is answered. The queue holds one; the other two are refused (429) while it is held, which a
    client sending one request at a time, stuck on the first, would never see."""

    async def run():
        async with AsyncSegmentationClient(service.url, retries=20) as client:
            return await asyncio.gather(*(client.segment(f) for f in frames))

    before = service_metric(service, "seg_requests_rejected_total", reason="queue_full")
    (worker,) = service.worker_pids()
    with held(worker):
        box = {}
        thread = threading.Thread(target=lambda: box.update(results=asyncio.run(run())))
        thread.start()
        wait_for(lambda: service_metric(service, "seg_queue_depth") == 1, "a request queued")
        wait_for(
            lambda: service_metric(service, "seg_requests_rejected_total", reason="queue_full") - before >= 2,
            "the two others to be sent (and refused) while the first waits",
        )
        assert thread.is_alive()  # nothing answered while the worker is held
    thread.join(60)
    assert [r.labels.shape for r in box["results"]] == [(64, 96)] * 3


def test_a_refused_request_is_retried_after_retry_after(service, frames):
    before = service_metric(service, "seg_requests_rejected_total", reason="queue_full")
    (worker,) = service.worker_pids()
    with ThreadPoolExecutor(2) as pool, SegmentationClient(service.url, retries=3) as patient:
        with held(worker):
            first = pool.submit(SegmentationClient(service.url).segment, frames[0])
            wait_for(lambda: service_metric(service, "seg_queue_depth") == 1, "the queue to be full")
            with SegmentationClient(service.url) as impatient, pytest.raises(SegmentationError) as refused:
                impatient.segment(frames[1])  # retries=0: the 429 is the answer
            assert refused.value.status == 429 and refused.value.retry_after >= 1
            with pytest.raises(SegmentationError) as late:
                patient.segment(frames[1], deadline_ms=500)  # Retry-After (1 s) is past its deadline
            assert late.value.code == "queue_full"
            second = pool.submit(patient.segment, frames[1])  # refused now, answered after a retry
            wait_for(
                lambda: service_metric(service, "seg_requests_rejected_total", reason="queue_full") - before >= 3,
                "the patient request to be refused once",
            )
        assert first.result(60).labels.shape == (64, 96)
        assert second.result(60).labels.shape == (64, 96)
