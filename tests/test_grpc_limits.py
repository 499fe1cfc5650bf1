"""StreamSegment's max_in_flight bounds (docs/grpc.md: 1-16, default 2) against the real service,
with the worker held by SIGSTOP so the frames in the worker can be counted without timing; and
`--grpc-port 0`, which turns gRPC off (nothing listens, REST works and the service becomes ready)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from service.api.streaming import DEFAULT_MAX_IN_FLIGHT, MAX_IN_FLIGHT_LIMIT
from service.proto import segmentation_pb2 as pb
from tests.servicekit import FAST_ARGS, Service, held, metric_value, segmentation_stub, wait_for_metrics

H, W = 64, 128
MODEL = "bisenetv1_r18"


@pytest.fixture(scope="module")
def service(r18_checkpoint):
    svc = Service([*FAST_ARGS, "--model", f"{MODEL}={r18_checkpoint}"])
    try:
        yield svc.wait_ready()
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def stub(service):
    with segmentation_stub(service.grpc_target) as stub:
        yield stub


@pytest.fixture(scope="module")
def frame(photo) -> np.ndarray:
    return np.ascontiguousarray(photo[:H, :W])


def raw_request(frame: np.ndarray, **fields) -> pb.SegmentRequest:
    return pb.SegmentRequest(
        raw=pb.RawFrame(height=frame.shape[0], width=frame.shape[1], rgb=frame.tobytes()),
        format=pb.STATS_ONLY,
        **fields,
    )


def stream_error(stub, requests, metadata=()) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.StreamSegment(iter(requests), metadata=metadata, timeout=60))
    return info.value


# -- refused bounds --------------------------------------------------------------------------------
def test_the_documented_range():
    assert (DEFAULT_MAX_IN_FLIGHT, MAX_IN_FLIGHT_LIMIT) == (2, 16)


@pytest.mark.parametrize(
    ("fields", "metadata"),
    [
        ({"max_in_flight": MAX_IN_FLIGHT_LIMIT + 1}, ()),
        ({"max_in_flight": 1000}, ()),
        ({}, (("max-in-flight", str(MAX_IN_FLIGHT_LIMIT + 1)),)),
        ({}, (("max-in-flight", "0"),)),
        ({}, (("max-in-flight", "-1"),)),
        ({}, (("max-in-flight", "two"),)),
    ],
    ids=["message-17", "message-1000", "metadata-17", "metadata-0", "metadata-negative", "metadata-text"],
)
def test_max_in_flight_out_of_range_is_invalid_argument(service, stub, frame, fields, metadata):
    before = metric_value(service.metrics(), "seg_requests_rejected_total", reason="bad_request")
    error = stream_error(stub, [raw_request(frame, frame_id=1, **fields)], metadata)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert f"1..{MAX_IN_FLIGHT_LIMIT}" in error.details(), error.details()
    assert dict(error.trailing_metadata())["error-code"] == "bad_request"
    after = metric_value(service.metrics(), "seg_requests_rejected_total", reason="bad_request")
    assert after == before + 1
    assert metric_value(service.metrics(), "seg_queue_depth") == 0  # refused before any frame ran


def test_metadata_contradicting_the_first_message_is_invalid_argument(stub, frame):
    error = stream_error(stub, [raw_request(frame, frame_id=1, max_in_flight=3)], (("max-in-flight", "4"),))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "contradicts" in error.details() and "4" in error.details() and "3" in error.details()


def test_only_the_first_message_sets_the_bound(stub, frame):
    """A later message's max_in_flight is ignored (the bound is fixed when the stream opens)."""
    requests = [raw_request(frame, frame_id=0, max_in_flight=1), raw_request(frame, frame_id=1, max_in_flight=99)]
    responses = list(stub.StreamSegment(iter(requests), timeout=60))
    assert [r.frame_id for r in responses] == [0, 1] and not any(r.HasField("error") for r in responses)


# -- the bound holds in the worker -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "metadata", "limit"),
    [
        ({}, (), DEFAULT_MAX_IN_FLIGHT),
        ({"max_in_flight": 1}, (), 1),
        ({}, (("max-in-flight", "3"),), 3),
        ({"max_in_flight": MAX_IN_FLIGHT_LIMIT}, (("max-in-flight", str(MAX_IN_FLIGHT_LIMIT)),), MAX_IN_FLIGHT_LIMIT),
    ],
    ids=["default", "message-1", "metadata-3", "both-at-the-limit"],
)
def test_frames_in_the_worker_never_exceed_max_in_flight(service, stub, frame, fields, metadata, limit):
    """With the worker stopped nothing completes: of limit+4 frames sent at once, exactly `limit`
    are admitted (seg_queue_depth, shared-memory slots), one waits and three are dropped (latest
    policy). After the worker resumes, the admitted ones and the newest are answered, in order."""
    (worker,) = service.worker_pids()
    n = limit + 4
    requests = [raw_request(frame, frame_id=i, **(fields if i == 0 else {})) for i in range(n)]
    dropped_before = metric_value(service.metrics(), "seg_stream_frames_dropped_total", model=MODEL)
    with held(worker):
        call = stub.StreamSegment(iter(requests), metadata=metadata, timeout=120)
        try:
            # Three drops mean the server has read every frame; if the bound did not hold, more
            # frames would be queued and none dropped, and this would not settle.
            wait_for_metrics(
                service,
                seg_stream_frames_dropped_total=dropped_before + 3,
                seg_queue_depth=limit,
                seg_shm_slots_in_use=limit,
                seg_streams_active=1,
            )
        except BaseException:
            call.cancel()
            raise
    responses = list(call)
    assert [r.frame_id for r in responses] == [*range(limit), n - 1]
    assert not any(r.HasField("error") for r in responses)
    assert [i for r in responses for i in r.dropped_frame_ids] == [limit, limit + 1, limit + 2]
    assert sum(r.frames_dropped for r in responses) == 3
    wait_for_metrics(service, seg_queue_depth=0, seg_shm_slots_in_use=0, seg_streams_active=0)


def test_block_policy_reads_no_more_than_max_in_flight(service, stub, frame):
    """`block` with the worker held: exactly max_in_flight frames are admitted and none dropped;
    everything is answered once the worker resumes."""
    (worker,) = service.worker_pids()
    limit, n = 3, 12
    requests = [raw_request(frame, frame_id=i, max_in_flight=limit, drop_policy=pb.DROP_POLICY_BLOCK) for i in range(n)]
    dropped_before = metric_value(service.metrics(), "seg_stream_frames_dropped_total", model=MODEL)
    with held(worker):
        call = stub.StreamSegment(iter(requests), timeout=120)
        try:
            wait_for_metrics(service, seg_queue_depth=limit, seg_shm_slots_in_use=limit, seg_streams_active=1)
            time.sleep(1.0)  # give a broken bound the chance to admit more (not needed to pass)
            text = service.metrics()
            assert metric_value(text, "seg_queue_depth") == limit
            assert metric_value(text, "seg_stream_frames_dropped_total", model=MODEL) == dropped_before
        except BaseException:
            call.cancel()
            raise
    responses = list(call)
    assert [r.frame_id for r in responses] == list(range(n))
    assert not any(r.HasField("error") or r.frames_dropped for r in responses)


# -- --grpc-port 0 ---------------------------------------------------------------------------------
def listening_ports(pids: list[int]) -> set[int]:
    """TCP ports in LISTEN state on sockets that `pids` hold open (from /proc, IPv4 and IPv6)."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_grpc_port_0_disables_grpc(r18_checkpoint, frame):
    svc = Service([*FAST_ARGS, "--model", f"{MODEL}={r18_checkpoint}", "--grpc-port", "0"])
    try:
        svc.wait_ready()
        assert httpx.get(f"{svc.url}/readyz", timeout=10).status_code == 200
        r = httpx.post(
            f"{svc.url}/segment?format=raw",
            content=_png(frame),
            headers={"Content-Type": "image/png"},
            timeout=120,
        )
        assert r.status_code == 200 and (int(r.headers["x-height"]), int(r.headers["x-width"])) == (H, W)
        # Only the REST port listens, in the front end and in its workers.
        assert listening_ports([svc.proc.pid, *svc.worker_pids()]) == {svc.http_port}
        # ... and the gRPC port the test kit would have used is not served either.
        with grpc.insecure_channel(svc.grpc_target) as channel, pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(channel).result(timeout=2)
    finally:
        code = svc.stop()
    assert code == 0  # a clean SIGTERM exit without a gRPC server to stop


def _png(array: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
