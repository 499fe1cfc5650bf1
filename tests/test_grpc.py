"""gRPC API against the real running service: unary vs REST, streams (order, drops, back-pressure),
bad input, auth, disconnects, idle streams, health, reflection, the gRPC client and its CLI."""

from __future__ import annotations

import asyncio
import io
import json
import os
import queue
import subprocess
import threading
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from service.client import AsyncGrpcSegmentationClient, GrpcSegmentationClient, SegmentationError
from service.proto import segmentation_pb2 as pb
from service.proto import segmentation_pb2_grpc as pb_grpc
from tests.servicekit import BISENET, FAST_ARGS, ROOT, Service, make_certificate, metric_value, png, wait_for_metrics

KEY = "grpc-key"
AUTH = (("x-api-key", KEY),)
MAX_IMAGE_BYTES = 200_000
MAX_PIXELS = 150_000  # raw frames up to 450 kB; the gRPC message limit is 450 kB + 64 kB headroom
IDLE_SECONDS = 4.0
H, W = 64, 128


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
            "10",
            "--max-image-bytes",
            str(MAX_IMAGE_BYTES),
            "--max-pixels",
            str(MAX_PIXELS),
            "--api-key",
            KEY,
            "--stream-idle-seconds",
            str(IDLE_SECONDS),
        ]
    )
    try:
        yield svc.wait_ready()
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def channel(service):
    with grpc.insecure_channel(service.grpc_target) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.SegmentationStub(channel)


@pytest.fixture(scope="module")
def frames(photo) -> list[np.ndarray]:
    """Four different real-photo crops at HxW: consecutive stream frames have different labels."""
    crops = [photo[:256, :512], photo[256:, :], photo[100:356, 50:], photo[:, ::-1]]
    return [np.asarray(Image.fromarray(np.ascontiguousarray(c)).resize((W, H))) for c in crops]


@pytest.fixture(scope="module")
def references(stub, frames) -> list[np.ndarray]:
    """Unary gRPC labels for each frame: what every streamed copy must equal."""
    return [labels_of(stub.Segment(raw_request(f, format=pb.LABELS_RAW), metadata=AUTH, timeout=60)) for f in frames]


def raw_request(frame: np.ndarray, **fields) -> pb.SegmentRequest:
    return pb.SegmentRequest(
        raw=pb.RawFrame(height=frame.shape[0], width=frame.shape[1], rgb=frame.tobytes()), **fields
    )


def labels_of(response: pb.SegmentResponse) -> np.ndarray:
    assert not response.HasField("error"), response.error
    if response.format == pb.LABELS_PNG:
        return np.asarray(Image.open(io.BytesIO(response.labels)))
    return np.frombuffer(response.labels, np.uint8).reshape(response.height, response.width)


def status_of(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, **kwargs)
        if isinstance(result, grpc.Call):  # a stream: the status arrives while reading it
            list(result)
    return info.value


def assert_nothing_held(service) -> None:
    wait_for_metrics(service, seg_queue_depth=0, seg_shm_slots_in_use=0, seg_streams_active=0, seg_requests_in_flight=0)


# -- unary and models ------------------------------------------------------------------------------
def test_segment_equals_rest(service, stub, frames, photo):
    jpeg = io.BytesIO()
    Image.fromarray(photo).resize((96, 96)).save(jpeg, format="JPEG", quality=90)
    with httpx.Client(base_url=service.url, headers={"X-API-Key": KEY}, timeout=60) as http:
        for body, content_type in [(jpeg.getvalue(), "image/jpeg"), (png(frames[0]), "image/png")]:
            rest = http.post("/segment", content=body, headers={"Content-Type": content_type})
            assert rest.status_code == 200, rest.text
            rest_labels = np.asarray(Image.open(io.BytesIO(rest.content)))
            response = stub.Segment(pb.SegmentRequest(encoded=body, frame_id=42), metadata=AUTH, timeout=60)
            assert (response.frame_id, response.model, response.format) == (42, "bisenetv1_r18", pb.LABELS_PNG)
            np.testing.assert_array_equal(labels_of(response), rest_labels)
            assert response.labels == rest.content  # the same palette PNG, byte for byte
    # A raw frame gives the labels of the same pixels sent as a lossless PNG.
    raw = stub.Segment(raw_request(frames[0], format=pb.LABELS_RAW), metadata=AUTH, timeout=60)
    np.testing.assert_array_equal(labels_of(raw), rest_labels)
    counts = np.bincount(rest_labels.ravel(), minlength=19)
    assert list(raw.class_pixels) == counts.tolist()
    t = raw.timings
    assert t.inference_ms > 0 and t.decode_ms >= 0 and t.total_ms >= t.inference_ms and raw.batch_size >= 1


def test_output_formats_and_alias(stub, frames, references):
    overlay = stub.Segment(raw_request(frames[1], format=pb.OVERLAY_JPEG, model="fast"), metadata=AUTH, timeout=60)
    assert Image.open(io.BytesIO(overlay.labels)).size == (W, H)
    stats = stub.Segment(raw_request(frames[1], format=pb.STATS_ONLY), metadata=AUTH, timeout=60)
    assert stats.labels == b"" and (stats.height, stats.width) == (H, W)
    assert list(stats.class_pixels) == np.bincount(references[1].ravel(), minlength=19).tolist()


def test_list_models(stub):
    reply = stub.ListModels(pb.ListModelsRequest(), metadata=AUTH, timeout=30)
    assert reply.default_model == "bisenetv1_r18"
    (model,) = reply.models
    assert model.name == "bisenetv1_r18" and model.ready and len(model.classes) == 19
    assert (model.palette[0].r, model.palette[0].g, model.palette[0].b) == (128, 64, 128)


def test_health_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "bisenet.v1.Segmentation"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"bisenet.v1.Segmentation", "grpc.health.v1.Health"} <= names


# -- errors ---------------------------------------------------------------------------------------
def test_unary_bad_input(service, stub, frames):
    before = service.metrics()
    cases = [
        (pb.SegmentRequest(encoded=b"\x89PNG not really"), grpc.StatusCode.INVALID_ARGUMENT, "invalid_image"),
        (
            pb.SegmentRequest(raw=pb.RawFrame(height=H, width=W, rgb=b"\0" * 100)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid_image",
        ),
        (
            pb.SegmentRequest(raw=pb.RawFrame(height=0, width=W, rgb=b"")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid_image",
        ),
        (pb.SegmentRequest(), grpc.StatusCode.INVALID_ARGUMENT, "invalid_image"),
        (pb.SegmentRequest(encoded=b"\0" * (MAX_IMAGE_BYTES + 1)), grpc.StatusCode.RESOURCE_EXHAUSTED, "too_large"),
        (
            pb.SegmentRequest(raw=pb.RawFrame(height=400, width=400, rgb=b"\0" * 480_000)),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "too_large",
        ),
        (raw_request(frames[0], model="bisenetv9"), grpc.StatusCode.NOT_FOUND, "not_found"),
        (raw_request(frames[0], deadline_ms=1), grpc.StatusCode.DEADLINE_EXCEEDED, "deadline_exceeded"),
    ]
    for request, code, error_code in cases:
        error = status_of(stub.Segment, request, metadata=AUTH, timeout=60)
        assert error.code() == code, (error_code, error.details())
        assert dict(error.trailing_metadata())["error-code"] == error_code
    # A message over the gRPC limit is refused by the transport before any of our code runs.
    error = status_of(stub.Segment, pb.SegmentRequest(encoded=b"\0" * 600_000), metadata=AUTH, timeout=60)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    after = service.metrics()
    for reason, n in {"invalid_image": 4, "too_large": 2, "not_found": 1, "deadline": 1}.items():
        assert (
            metric_value(after, "seg_requests_rejected_total", reason=reason)
            - metric_value(before, "seg_requests_rejected_total", reason=reason)
            == n
        ), reason
    assert labels_of(stub.Segment(raw_request(frames[0]), metadata=AUTH, timeout=60)).shape == (H, W)


def test_api_key(stub, frames):
    request = raw_request(frames[0])
    for metadata in [(), (("x-api-key", "wrong"),), (("authorization", "Bearer wrong"),)]:
        assert status_of(stub.Segment, request, metadata=metadata, timeout=30).code() == grpc.StatusCode.UNAUTHENTICATED
        assert (
            status_of(stub.ListModels, pb.ListModelsRequest(), metadata=metadata, timeout=30).code()
            == grpc.StatusCode.UNAUTHENTICATED
        )
        error = status_of(stub.StreamSegment, iter([request]), metadata=metadata, timeout=30)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    stub.Segment(request, metadata=(("authorization", f"Bearer {KEY}"),), timeout=60)


def test_stream_protocol_errors_end_the_stream(stub, frames):
    cases = [
        ([raw_request(frames[0], model="nope")], AUTH, grpc.StatusCode.NOT_FOUND),
        ([raw_request(frames[0])], (*AUTH, ("drop-policy", "sometimes")), grpc.StatusCode.INVALID_ARGUMENT),
        (
            [raw_request(frames[0], drop_policy=pb.DROP_POLICY_BLOCK)],
            (*AUTH, ("drop-policy", "latest")),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        ([raw_request(frames[0]), raw_request(frames[1], model="accurate")], AUTH, grpc.StatusCode.NOT_FOUND),
        (
            [raw_request(frames[0]), pb.SegmentRequest(encoded=b"\0" * 600_000)],
            AUTH,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
    ]
    for requests, metadata, code in cases:
        error = status_of(stub.StreamSegment, iter(requests), metadata=metadata, timeout=60)
        assert error.code() == code, error.details()


def test_bad_frames_get_errors_and_the_stream_goes_on(service, stub, frames, references):
    bad = {
        1: (pb.SegmentRequest(encoded=os.urandom(2000)), "invalid_image", grpc.StatusCode.INVALID_ARGUMENT),
        2: (
            pb.SegmentRequest(raw=pb.RawFrame(height=H, width=W, rgb=b"\1" * 999)),
            "invalid_image",
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        4: (pb.SegmentRequest(raw=pb.RawFrame(height=H, width=0)), "invalid_image", grpc.StatusCode.INVALID_ARGUMENT),
        5: (pb.SegmentRequest(encoded=b"\0" * (MAX_IMAGE_BYTES + 10)), "too_large", grpc.StatusCode.RESOURCE_EXHAUSTED),
    }

    def requests():
        for i in range(8):
            request = bad[i][0] if i in bad else raw_request(frames[i % 4], format=pb.LABELS_RAW)
            request.frame_id = i
            if i == 0:
                request.drop_policy = pb.DROP_POLICY_BLOCK
            yield request

    responses = list(stub.StreamSegment(requests(), metadata=AUTH, timeout=120))
    assert [r.frame_id for r in responses] == list(range(8))
    for r in responses:
        if r.frame_id in bad:
            _, code, status = bad[r.frame_id]
            assert (r.error.code, r.error.status) == (code, status.value[0]) and r.error.message
        else:
            np.testing.assert_array_equal(labels_of(r), references[r.frame_id % 4])
    assert_nothing_held(service)


# -- streaming semantics --------------------------------------------------------------------------
def test_block_stream_returns_every_frame_in_order(service, stub, frames, references):
    n = 64

    def requests():
        for i in range(n):
            yield raw_request(frames[i % 4], frame_id=1000 + i, format=pb.LABELS_RAW)

    metadata = (*AUTH, ("drop-policy", "block"))
    responses = list(stub.StreamSegment(requests(), metadata=metadata, timeout=150))
    assert [r.frame_id for r in responses] == [1000 + i for i in range(n)]
    assert sum(r.frames_dropped for r in responses) == 0
    for i, r in enumerate(responses):
        np.testing.assert_array_equal(labels_of(r), references[i % 4], err_msg=f"frame {i}")
    assert_nothing_held(service)


def test_latest_stream_with_a_fast_producer(service, stub, frames, references):
    before = service.metrics()
    shm_before = metric_value(before, "seg_shm_bytes")
    sent: dict[int, float] = {}
    n, period, limit_s = 2000, 0.004, 4.0  # a producer at ~200 fps for 4 s, far faster than the CPU service

    def requests():
        start = time.monotonic()
        for i in range(n):
            if time.monotonic() - start > limit_s:
                return
            sent[i] = time.monotonic()
            yield raw_request(frames[i % 4], frame_id=i, format=pb.LABELS_RAW)
            time.sleep(period)

    results = []
    for r in stub.StreamSegment(requests(), metadata=AUTH, timeout=120):
        results.append((r, time.monotonic() - sent[r.frame_id]))
    served = [r.frame_id for r, _ in results]
    dropped = [d for r, _ in results for d in r.dropped_frame_ids]
    assert served == sorted(served) and served[-1] == len(sent) - 1  # in order; the last frame always served
    assert sorted(served + dropped) == list(range(len(sent)))  # every frame served or reported, once
    assert sum(r.frames_dropped for r, _ in results) == len(dropped) > len(sent) // 3
    for r, _ in results:
        np.testing.assert_array_equal(labels_of(r), references[r.frame_id % 4])
    # Latency stays bounded: a frame waits for at most the batch ahead of it, never for a queue that grows
    # with the stream (which would reach seconds here). Relative to the measured inference time, so that
    # a busy CI machine slowing the model down does not count as queueing.
    assert len(results) >= 10, f"only {len(results)} frames served"
    total_ms = np.array([r.timings.total_ms for r, _ in results])
    infer_ms = np.array([r.timings.inference_ms for r, _ in results])
    prev_ms = np.maximum(infer_ms, np.concatenate([[0], infer_ms[:-1]]))  # this batch or the one before
    late = slice(len(results) // 2, None)
    assert np.all(total_ms[late] <= 3 * prev_ms[late] + 150), np.stack([total_ms, infer_ms]).round().T
    # Nothing queues in the transport either: what the client sees is the server's time plus a little.
    client_ms = np.array([lat for _, lat in results]) * 1000
    assert np.median(client_ms - total_ms) < 100, np.stack([client_ms, total_ms]).round().T
    assert_nothing_held(service)
    after = service.metrics()
    assert metric_value(after, "seg_stream_frames_dropped_total") - metric_value(
        before, "seg_stream_frames_dropped_total"
    ) == len(dropped)
    assert metric_value(after, "seg_shm_bytes") - shm_before <= 4 * 64 * 1024  # slots are reused, not grown


def test_client_disconnect_frees_frames_and_slots(service, stub, frames):
    for policy in ("latest", "block"):
        stop = threading.Event()

        def requests():
            for i in range(10_000):
                if stop.is_set():
                    return
                yield raw_request(frames[i % 4], frame_id=i)
                time.sleep(0.002)

        call = stub.StreamSegment(requests(), metadata=(*AUTH, ("drop-policy", policy)), timeout=120)
        for _ in range(3):
            next(call)
        text = service.metrics()
        assert metric_value(text, "seg_streams_active") == 1
        call.cancel()  # frames are in flight right now
        stop.set()
        assert_nothing_held(service)
    assert labels_of(stub.Segment(raw_request(frames[0]), metadata=AUTH, timeout=60)).shape == (H, W)


def _process_cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_quiet_stream_holds_nothing_then_continues(service, stub, frames, references):
    outbox: queue.Queue = queue.Queue()

    def requests():
        while (item := outbox.get()) is not None:
            yield item

    call = stub.StreamSegment(requests(), metadata=AUTH, timeout=60)
    outbox.put(raw_request(frames[0], frame_id=1, format=pb.LABELS_RAW))
    np.testing.assert_array_equal(labels_of(next(call)), references[0])
    cpu = _process_cpu_seconds(service.proc.pid)
    time.sleep(1.5)  # quiet, but well inside the idle timeout
    assert _process_cpu_seconds(service.proc.pid) - cpu < 0.5  # waiting, not polling
    text = service.metrics()
    assert metric_value(text, "seg_streams_active") == 1
    assert metric_value(text, "seg_shm_slots_in_use") == 0 and metric_value(text, "seg_queue_depth") == 0
    outbox.put(raw_request(frames[1], frame_id=2, format=pb.LABELS_RAW))
    second = next(call)
    assert second.frame_id == 2
    np.testing.assert_array_equal(labels_of(second), references[1])
    outbox.put(None)
    assert list(call) == []


def test_silent_stream_is_ended_after_the_idle_timeout(service, stub, frames):
    outbox: queue.Queue = queue.Queue()

    def requests():
        while (item := outbox.get()) is not None:
            yield item

    start = time.monotonic()
    call = stub.StreamSegment(requests(), metadata=AUTH, timeout=60)
    outbox.put(raw_request(frames[0], frame_id=1))
    next(call)
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert IDLE_SECONDS <= time.monotonic() - start < IDLE_SECONDS + 20
    outbox.put(None)
    assert_nothing_held(service)


# -- the client -----------------------------------------------------------------------------------
def test_grpc_client(service, frames, references):
    with GrpcSegmentationClient(service.grpc_target, api_key=KEY) as client:
        assert client.ready()
        result = client.segment(frames[2], format="raw")
        np.testing.assert_array_equal(result.labels, references[2])
        np.testing.assert_array_equal(client.segment(png(frames[2])).labels, references[2])
        assert client.models()["models"][0]["name"] == "bisenetv1_r18"
        with pytest.raises(SegmentationError) as info:
            client.segment(frames[0], model="nope")
        assert (info.value.status, info.value.code) == (404, "not_found")
        results = list(client.stream((frames[i % 4] for i in range(12)), policy="block"))
        assert [r.frame_id for r in results] == list(range(12)) and not any(r.error for r in results)
        for r in results:
            np.testing.assert_array_equal(r.labels, references[r.frame_id % 4])
            assert r.latency_s > 0
        stream = client.stream(frames[i % 4] for i in range(10_000))
        next(stream)
        stream.close()  # leaving early cancels the call
    assert_nothing_held(service)


def test_async_grpc_client(service, frames, references):
    """The asyncio client: the same answers as the blocking one; a stream fed by an async generator
    (frames from a camera task) in frame order; leaving the `async for` early cancels the call."""

    async def camera(n: int):
        for i in range(n):
            await asyncio.sleep(0)
            yield frames[i % 4]

    async def run():
        async with AsyncGrpcSegmentationClient(service.grpc_target, api_key=KEY) as client:
            assert await client.ready()
            result = await client.segment(frames[2], format="raw")
            np.testing.assert_array_equal(result.labels, references[2])
            assert (await client.models())["default"] == "bisenetv1_r18"
            with pytest.raises(SegmentationError) as info:
                await client.segment(frames[0], model="nope")
            assert (info.value.status, info.value.code) == (404, "not_found")
            results = [r async for r in client.stream(camera(8), policy="block")]
            assert [r.frame_id for r in results] == list(range(8)) and not any(r.error for r in results)
            for r in results:
                np.testing.assert_array_equal(r.labels, references[r.frame_id % 4])
            listed = [r async for r in client.stream([frames[0], frames[1]], format="png", policy="block")]
            np.testing.assert_array_equal(listed[1].labels, references[1])
            async for _ in client.stream(camera(10_000)):
                break  # leaving early cancels the call

    asyncio.run(run())
    assert_nothing_held(service)


def test_stream_cli_on_a_video(service, tmp_path, frames):
    av = pytest.importorskip("av")
    video = tmp_path / "clip.mp4"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for i in range(20):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frames[i % 4], format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    out = tmp_path / "overlay.mp4"
    cmd = [
        BISENET,
        "stream",
        str(video),
        "--api-key",
        KEY,
        "--grpc",
        service.grpc_target,
        "--policy",
        "block",
        "-o",
        str(out),
    ]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert (summary["served"], summary["dropped"], summary["errors"], summary["source_fps"]) == (20, 0, 0, 30.0)
    assert "fps" in run.stderr and "latency" in run.stderr
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 20
    pngs = tmp_path / "pngs"
    run = subprocess.run(
        [*cmd[:-1], str(pngs), "--fast", "--frames", "5"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in pngs.iterdir()) == [f"frame_{i:06d}.png" for i in range(5)]


def test_tls_api_key_and_health_before_ready(tmp_path):
    """The real gRPC server in this process, with TLS, before any worker is up: health NOT_SERVING,
    Segment UNAVAILABLE with retry-after, ListModels over TLS, plaintext refused."""
    import asyncio
    import shutil

    if not shutil.which("openssl"):
        pytest.skip("needs the openssl command")
    from service.api.grpc_server import start_grpc_server
    from service.config import ModelSpec, Settings
    from service.core import SegmentationService

    cert, key = make_certificate(tmp_path)
    settings = Settings(
        models=(ModelSpec("bisenetv1_r18", "random"),),
        devices=("cpu",),
        host="127.0.0.1",
        grpc_port=0,
        api_key=KEY,
        tls_cert=cert,
        tls_key=key,
    )

    async def main():
        service = SegmentationService(settings, {"bisenetv1_r18": "random"})
        server = await start_grpc_server(service, settings)
        try:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(cert).read_bytes())
            async with grpc.aio.secure_channel(f"localhost:{server.port}", creds) as ch:
                health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
                stub = pb_grpc.SegmentationStub(ch)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Segment(pb.SegmentRequest(encoded=b"x"), metadata=AUTH, timeout=10)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert dict(info.value.trailing_metadata())["retry-after"] == "1"
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.ListModels(pb.ListModelsRequest(), timeout=10)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                reply = await stub.ListModels(pb.ListModelsRequest(), metadata=AUTH, timeout=10)
                assert [m.name for m in reply.models] == ["bisenetv1_r18"] and not reply.models[0].ready
            async with grpc.aio.insecure_channel(f"localhost:{server.port}") as ch:
                with pytest.raises(grpc.aio.AioRpcError):
                    await pb_grpc.SegmentationStub(ch).ListModels(pb.ListModelsRequest(), metadata=AUTH, timeout=5)
        finally:
            await server.stop(0)
            service.pool.shutdown()

    asyncio.run(main())


# -- faults (last: they restart the worker and stop the service) ----------------------------------
def test_stream_survives_a_worker_restart(service, stub, frames, references):
    stop = threading.Event()

    def requests():
        for i in range(2000):
            if stop.is_set():
                return
            yield raw_request(frames[i % 4], frame_id=i, format=pb.LABELS_RAW)
            time.sleep(0.05)

    call = stub.StreamSegment(requests(), metadata=(*AUTH, ("drop-policy", "block")), timeout=150)
    seen, errors, killed, served_after = [], set(), None, 0
    deadline = time.monotonic() + 120
    for r in call:
        seen.append(r.frame_id)
        if len(seen) == 3:
            killed = set(service.worker_pids())
            for pid in killed:
                os.kill(pid, 9)
        if r.HasField("error"):
            errors.add(r.error.code)
        elif killed and set(service.worker_pids()) - killed:  # served once a new worker runs
            np.testing.assert_array_equal(labels_of(r), references[r.frame_id % 4])
            served_after += 1
            if served_after == 5:
                stop.set()
        assert time.monotonic() < deadline, "the stream did not recover"
    assert seen == sorted(seen)
    # A frame on the worker when it died gets a retryable error; one sent while it was idle or
    # restarting waits and is served, so whether any error shows depends on when the kill lands.
    assert errors <= {"worker_restarting", "not_ready"}, errors
    assert served_after >= 5
    assert metric_value(service.metrics(), "seg_worker_restarts_total", device="cpu", reason="crashed") >= 1
    assert_nothing_held(service)


def test_sigterm_drains_streams_and_health(service, channel, stub, frames):
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING

    def requests():
        for i in range(2000):
            yield raw_request(frames[i % 4], frame_id=i)
            time.sleep(0.05)

    call = stub.StreamSegment(requests(), metadata=AUTH, timeout=60)
    next(call)
    service.proc.send_signal(15)
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as info:
        for _ in call:
            pass
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    assert service.proc.wait(60) == 0
