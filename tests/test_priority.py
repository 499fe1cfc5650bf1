"""Request priorities against the real service: a request of priority 1 runs before the requests of
priority 2 queued ahead of it, on every front door; lower priorities leave queue places for higher
ones; priorities outside --priority-levels are refused."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pytest

from service.client.grpc import GrpcSegmentationClient
from service.client.results import SegmentationError
from service.proto import segmentation_pb2 as pb
from service.proto import segmentation_pb2_grpc as pb_grpc
from tests.servicekit import FAST_ARGS, Service, held, png, service_metric, wait_for

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "bisenetv1_r18"
LEVELS = 3


@pytest.fixture(scope="module")
def service(r18_checkpoint):
    # One request per batch, so the order in which the worker takes requests is the order they finish.
    svc = Service(
        [*FAST_ARGS, "--model", f"{MODEL}={r18_checkpoint}", "--max-batch", "1"] + ["--priority-levels", str(LEVELS)]
    )
    try:
        yield svc.wait_ready()
    finally:
        svc.stop()


async def post(client: httpx.AsyncClient, body: bytes, **params) -> httpx.Response:
    response = await client.post("/segment", content=body, params=params, headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    return response


def test_priority_one_overtakes_the_queue(service, photo):
    """While the worker is busy with a long request (ms_flip on a 2048x2048 image: seconds on a
    CPU), four requests of priority 2 and then one of priority 1 are queued; the worker takes the
    priority-1 request first, and the others in their order of arrival."""
    blocker = png(np.tile(photo, (4, 4, 1)))  # 2048x2048
    small = png(photo[:64, :96])
    finished: list[str] = []

    async def run() -> None:
        async with httpx.AsyncClient(base_url=service.url, timeout=120) as client:

            async def send(name: str, delay: float, **params) -> None:
                await asyncio.sleep(delay)
                await post(client, blocker if name == "blocker" else small, **params)
                finished.append(name)

            await asyncio.gather(
                send("blocker", 0.0, tta="ms_flip"),
                *(send(f"low{i}", 0.3 + 0.03 * i, priority=2) for i in range(4)),
                send("high", 0.5),  # no priority: the default, 1
            )

    asyncio.run(run())
    assert finished == ["blocker", "high", "low0", "low1", "low2", "low3"], finished


def test_v2_and_grpc_take_a_priority(service, photo):
    """Triton's `priority` parameter (v2) and SegmentRequest.priority (gRPC) are honoured: in range
    they serve, outside it they are refused with the range in the message."""
    tensor = httpclient.InferInput("IMAGE", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[png(photo[:64, :96])]], dtype=np.object_), binary_data=True)
    with httpclient.InferenceServerClient(service.url.removeprefix("http://")) as client:
        assert client.infer(MODEL, [tensor], priority=LEVELS).as_numpy("LABELS").shape == (1, 64, 96)
        with pytest.raises(InferenceServerException, match=f"priority must be an integer 1..{LEVELS}") as info:
            client.infer(MODEL, [tensor], priority=LEVELS + 1)
        assert info.value.status() == "422"
    with grpc.insecure_channel(service.grpc_target) as channel:
        stub = pb_grpc.SegmentationStub(channel)
        request = pb.SegmentRequest(encoded=png(photo[:64, :96]), format=pb.STATS_ONLY, priority=2)
        assert stub.Segment(request, timeout=60).height == 64
        with pytest.raises(grpc.RpcError) as info:
            stub.Segment(pb.SegmentRequest(encoded=request.encoded, priority=LEVELS + 1), timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "priority" in info.value.details()


@pytest.mark.parametrize("priority", ["-1", str(LEVELS + 1), "high"])
def test_rest_refuses_a_priority_outside_the_levels(service, photo, priority):
    response = httpx.post(
        f"{service.url}/segment",
        params={"priority": priority},
        content=png(photo[:64, :96]),
        headers={"Content-Type": "image/png"},
        timeout=60,
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "bad_request" and "priority" in response.text


def test_a_stream_takes_the_priority_of_its_first_message(service, photo):
    frames = [photo[:64, :96], photo[64:128, :96]]
    with GrpcSegmentationClient(service.grpc_target) as client:
        results = list(client.stream(frames, format="stats", policy="block", priority=LEVELS))
        assert [r.error for r in results] == [None, None] and [r.frame_id for r in results] == [0, 1]
        with pytest.raises(SegmentationError, match="priority"):
            list(client.stream(frames, format="stats", priority=LEVELS + 1))


def test_lower_priorities_leave_queue_places_for_higher_ones(r18_checkpoint, photo):
    """With --max-queue 4 and two levels, priority-2 requests fill at most 2 places and are refused
    beyond; priority 1 still gets the other 2, then is refused too. The worker is held (SIGSTOP)
    so every admitted request stays queued; after it resumes, each admitted request is answered."""
    svc = Service([*FAST_ARGS, "--model", f"{MODEL}={r18_checkpoint}", "--max-batch", "1", "--max-queue", "4"])
    body = png(photo[:64, :96])

    def post_sync(priority: int) -> httpx.Response:
        return httpx.post(
            f"{svc.url}/segment",
            params={"priority": priority},
            content=body,
            headers={"Content-Type": "image/png"},
            timeout=180,
        )

    def queued(n: int) -> None:
        wait_for(lambda: service_metric(svc, "seg_queue_depth") == n, f"{n} requests queued")

    try:
        svc.wait_ready()
        (worker,) = svc.worker_pids()
        with ThreadPoolExecutor(4) as pool:
            with held(worker):
                admitted = [pool.submit(post_sync, 2), pool.submit(post_sync, 2)]
                queued(2)
                refused = post_sync(2)
                assert refused.status_code == 429, refused.text
                assert "full for priority 2: it may fill 2 of the 4 places" in refused.json()["error"]["message"]
                admitted += [pool.submit(post_sync, 1), pool.submit(post_sync, 1)]
                queued(4)
                refused = post_sync(1)
                assert refused.status_code == 429 and "full (4 requests)" in refused.json()["error"]["message"]
                assert int(refused.headers["retry-after"]) >= 1
            assert [f.result().status_code for f in admitted] == [200] * 4
    finally:
        svc.stop()
