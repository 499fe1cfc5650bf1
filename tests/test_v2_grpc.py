"""KServe v2 over gRPC against the real running service, with Triton's own client (tritonclient.grpc)
and, for what that client refuses to send, its raw protobuf messages: health, metadata, config,
ModelInfer with IMAGE and RGB, batches, async, ModelStreamInfer (order, drops), reflection and
every kind of bad input."""

from __future__ import annotations

import contextlib
import queue
import threading

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image

from tests.servicekit import FAST_ARGS, Service, metric_value, png

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

KEY = "v2-grpc-key"
HEADERS = {"x-api-key": KEY}


def auth() -> dict:
    """A fresh headers dict per call: tritonclient.http adds its own headers to the dict it is given."""
    return dict(HEADERS)


AUTH = (("x-api-key", KEY),)
MODEL = "bisenetv1_r18"
MAX_IMAGE_BYTES = 200_000
MAX_PIXELS = 150_000
MAX_BATCH = 4


@pytest.fixture(scope="module")
def service(r18_checkpoint):
    svc = Service(
        [
            *FAST_ARGS,
            "--model",
            f"{MODEL}={r18_checkpoint}",
            "--max-batch",
            str(MAX_BATCH),
            "--max-delay-ms",
            "20",
            "--max-image-bytes",
            str(MAX_IMAGE_BYTES),
            "--max-pixels",
            str(MAX_PIXELS),
            "--api-key",
            KEY,
        ]
    )
    try:
        yield svc.wait_ready()
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def client(service):
    c = grpcclient.InferenceServerClient(service.grpc_target)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def raw_stub(service):
    """tritonclient's own generated stub, for requests its high-level client would not send."""
    with grpc.insecure_channel(service.grpc_target) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def images(photo) -> list[np.ndarray]:
    crops = [photo[:256, :384], photo[200:, 100:], photo[::-1, :300]]
    sizes = [(96, 64), (80, 72), (64, 48)]
    return [np.asarray(Image.fromarray(np.ascontiguousarray(c)).resize(s)) for c, s in zip(crops, sizes)]


def segment_labels(service, image: np.ndarray) -> np.ndarray:
    r = httpx.post(
        service.url + "/segment?format=raw",
        content=png(image),
        headers={"Content-Type": "image/png", **HEADERS},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return np.frombuffer(r.content, np.uint8).reshape(int(r.headers["x-height"]), int(r.headers["x-width"]))


def image_input(images: list[np.ndarray]):
    tensor = grpcclient.InferInput("IMAGE", [len(images), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[png(i)] for i in images], dtype=np.object_))
    return tensor


def rgb_input(frames: np.ndarray):
    tensor = grpcclient.InferInput("RGB", list(frames.shape), "UINT8")
    tensor.set_data_from_numpy(frames)
    return tensor


# -- health, metadata, config, reflection ------------------------------------------------------------
def test_health_metadata_and_config(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, model_version="1")
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "bisenet-serve" and "model_configuration" in server["extensions"]
    meta = client.get_model_metadata(MODEL, headers=auth(), as_json=True)
    assert meta["name"] == MODEL and meta["versions"] == ["1"]
    shapes = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"] + meta["outputs"]}
    assert shapes == {
        "IMAGE": ("BYTES", [-1, 1]),
        "RGB": ("UINT8", [-1, -1, -1, 3]),
        "LABELS": ("UINT8", [-1, -1, -1]),
        "CLASS_PIXELS": ("INT64", [-1, 19]),
    }
    config = client.get_model_config(MODEL, headers=auth()).config  # tritonclient's own ModelConfig message
    assert config.name == MODEL and config.max_batch_size == MAX_BATCH
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in config.input] == [
        ("IMAGE", service_pb2.model__config__pb2.TYPE_STRING, [1], True),
        ("RGB", service_pb2.model__config__pb2.TYPE_UINT8, [-1, -1, 3], True),
    ]
    assert [(o.name, list(o.dims)) for o in config.output] == [("LABELS", [-1, -1]), ("CLASS_PIXELS", [19])]
    assert config.dynamic_batching.max_queue_delay_microseconds == 20_000
    assert config.dynamic_batching.preferred_batch_size == [1, 2, 4]


def test_unknown_model_version_and_key(client):
    with pytest.raises(InferenceServerException, match="unknown model") as info:
        client.is_model_ready("bisenetv9")
    assert "NOT_FOUND" in info.value.status()
    with pytest.raises(InferenceServerException, match="version") as info:
        client.get_model_config(MODEL, model_version="7", headers=auth())
    assert "NOT_FOUND" in info.value.status()
    with pytest.raises(InferenceServerException, match="API key") as info:
        client.get_model_metadata(MODEL)
    assert "UNAUTHENTICATED" in info.value.status()


def test_reflection_lists_the_v2_service(service):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(service.grpc_target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService"),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="bisenet.v1.Segmentation"),
        ]
        listed, v2_file, segmentation_file = list(stub.ServerReflectionInfo(iter(requests), timeout=30))
    names = {s.name for s in listed.list_services_response.service}
    assert {"inference.GRPCInferenceService", "bisenet.v1.Segmentation", "grpc.health.v1.Health"} <= names
    assert v2_file.file_descriptor_response.file_descriptor_proto  # describable without the proto
    assert segmentation_file.file_descriptor_response.file_descriptor_proto


# -- inference ---------------------------------------------------------------------------------------
def test_image_labels_equal_segment(service, client, images):
    result = client.infer(MODEL, [image_input(images[:1])], headers=auth(), request_id="one")
    labels = result.as_numpy("LABELS")
    expected = segment_labels(service, images[0])
    assert len(np.unique(expected)) > 3
    assert labels.dtype == np.uint8 and labels.shape == (1, *expected.shape)
    np.testing.assert_array_equal(labels[0], expected)
    np.testing.assert_array_equal(result.as_numpy("CLASS_PIXELS")[0], np.bincount(expected.ravel(), minlength=19))
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == (MODEL, "1", "one")


def test_rgb_batch_of_three_and_one_output(service, client, images):
    frames = np.stack([np.asarray(Image.fromarray(i).resize((64, 48))) for i in images])
    result = client.infer(
        MODEL, [rgb_input(frames)], outputs=[grpcclient.InferRequestedOutput("LABELS")], headers=auth()
    )
    assert result.as_numpy("CLASS_PIXELS") is None
    labels = result.as_numpy("LABELS")
    assert labels.shape == (3, 48, 64)
    for frame, got in zip(frames, labels):
        np.testing.assert_array_equal(got, segment_labels(service, frame))


def test_image_batch_of_different_sizes(service, client, images):
    result = client.infer(MODEL, [image_input(images)], headers=auth())
    labels = result.as_numpy("LABELS")
    assert labels.shape == (3, 72, 96)
    assert result.get_output("LABELS").parameters["shapes"].string_param == "64x96,72x80,48x64"
    for image, got in zip(images, labels):
        h, w = image.shape[:2]
        np.testing.assert_array_equal(got[:h, :w], segment_labels(service, image))


def test_tta_and_auto(service, client, images):
    image = images[0]
    result = client.infer("auto", [image_input([image])], headers=auth(), parameters={"tta": "flip"})
    response = result.get_response()
    assert response.model_name == MODEL
    assert {k: v.string_param for k, v in response.parameters.items()} == {"model": MODEL, "tta": "flip"}
    with pytest.raises(InferenceServerException, match="unknown tta"):
        client.infer(MODEL, [image_input([image])], headers=auth(), parameters={"tta": "sideways"})


def test_async_infer(service, client, images):
    done: queue.Queue = queue.Queue()
    for i, image in enumerate(images):
        client.async_infer(
            MODEL,
            [image_input([image])],
            lambda result, error: done.put((result, error)),
            request_id=str(i),
            headers=auth(),
        )
    results = {}
    for _ in images:
        result, error = done.get(timeout=120)
        assert error is None, error
        results[result.get_response().id] = result.as_numpy("LABELS")[0]
    for i, image in enumerate(images):
        np.testing.assert_array_equal(results[str(i)], segment_labels(service, image))


def test_deadline_parameter(client, images):
    result = client.infer(MODEL, [image_input(images[:1])], headers=auth(), parameters={"deadline_ms": 60_000})
    assert result.as_numpy("LABELS").shape == (1, 64, 96)
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, [image_input(images[:1])], headers=auth(), parameters={"deadline_ms": 1})
    assert "DEADLINE_EXCEEDED" in info.value.status()


# -- streaming ---------------------------------------------------------------------------------------
def run_stream(service, requests: list[tuple[str, list]], headers: dict, timeout: float = 120) -> list:
    """Send (id, inputs) requests on one ModelStreamInfer call; (result, error) per response, in order."""
    client = grpcclient.InferenceServerClient(service.grpc_target)
    responses: queue.Queue = queue.Queue()
    try:
        client.start_stream(lambda result, error: responses.put((result, error)), headers=headers)
        for request_id, inputs in requests:
            client.async_stream_infer(MODEL, inputs, request_id=request_id)
        out = [responses.get(timeout=timeout) for _ in requests]
        client.stop_stream()
        return out
    finally:
        client.close()


def test_stream_in_order_with_block_policy(service, images):
    frames = [np.asarray(Image.fromarray(images[i % 3]).resize((64, 48))) for i in range(8)]
    requests = [(str(i), [rgb_input(f[None])]) for i, f in enumerate(frames)]
    out = run_stream(service, requests, {**auth(), "drop-policy": "block"})
    assert [error for _, error in out] == [None] * 8
    assert [result.get_response().id for result, _ in out] == [str(i) for i in range(8)]
    for frame, (result, _) in zip(frames[:3], out):
        np.testing.assert_array_equal(result.as_numpy("LABELS")[0], segment_labels(service, frame))


def test_stream_latest_policy_answers_every_request(service, images):
    """`latest` drops waiting requests when the client outruns the service; each still gets an answer."""
    before = service.metrics()
    requests = [(str(i), [image_input([images[i % 3]])]) for i in range(12)]
    out = run_stream(service, requests, {**auth(), "max-in-flight": "1"})
    assert len(out) == 12
    served = [r.get_response().id for r, e in out if e is None]
    dropped = [e for _, e in out if e is not None]
    assert served and served == sorted(served, key=int)
    ids = [(r.get_response().id if e is None else e.message().split()[2]) for r, e in out]
    assert ids == [str(i) for i in range(12)]  # one answer per request, in request order, drops included
    assert all("dropped" in e.message() for e in dropped)
    after = service.metrics()
    assert metric_value(after, "seg_stream_frames_dropped_total") - metric_value(
        before, "seg_stream_frames_dropped_total"
    ) == len(dropped)


def test_stream_bad_request_does_not_end_it(service, images):
    bad = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
    bad.set_data_from_numpy(np.array([[b"not an image"]], dtype=np.object_))
    requests = [("0", [image_input(images[:1])]), ("1", [bad]), ("2", [image_input(images[1:2])])]
    out = run_stream(service, requests, {**auth(), "drop-policy": "block"})
    assert out[0][1] is None and out[2][1] is None
    assert out[1][0] is None and "INVALID_ARGUMENT" in out[1][1].message()
    np.testing.assert_array_equal(out[2][0].as_numpy("LABELS")[0], segment_labels(service, images[1]))


def test_stream_without_key_is_refused(service, images):
    client = grpcclient.InferenceServerClient(service.grpc_target)
    errors: queue.Queue = queue.Queue()
    try:
        client.start_stream(lambda result, error: errors.put(error))
        with contextlib.suppress(InferenceServerException):  # the refusal may end the stream before this
            client.async_stream_infer(MODEL, [image_input(images[:1])])
        error = errors.get(timeout=60)
        assert error is not None and "API key" in error.message()
    finally:
        client.stop_stream()
        client.close()


# -- bad input -----------------------------------------------------------------------------------------
def request(inputs, raw=None, outputs=(), model=MODEL, **kw) -> service_pb2.ModelInferRequest:
    message = service_pb2.ModelInferRequest(model_name=model, **kw)
    for name, datatype, shape in inputs:
        message.inputs.add(name=name, datatype=datatype, shape=shape)
    for name in outputs:
        message.outputs.add(name=name)
    message.raw_input_contents.extend(raw or [])
    return message


def elements(*items: bytes) -> bytes:
    return b"".join(len(i).to_bytes(4, "little") + i for i in items)


def test_bad_input(service, raw_stub, client, images):
    good = elements(png(images[0]))
    rgb = images[0][:8, :8].tobytes()
    json_like = request([("RGB", "UINT8", [1, 1, 1, 3])])
    json_like.inputs[0].contents.uint_contents.extend([0, 300, 0])
    cases = [
        ("wrong-datatype", request([("IMAGE", "FP32", [1, 1])], [good]), "INVALID_ARGUMENT", "must be BYTES"),
        ("wrong-rank", request([("RGB", "UINT8", [8, 8, 3])], [rgb]), "INVALID_ARGUMENT", "rank 4"),
        ("missing-input", request([]), "INVALID_ARGUMENT", "no input"),
        ("unknown-input", request([("PIXELS", "BYTES", [1, 1])], [good]), "INVALID_ARGUMENT", "unknown input"),
        (
            "unknown-output",
            request([("IMAGE", "BYTES", [1, 1])], [good], ["LOGITS"]),
            "INVALID_ARGUMENT",
            "unknown output",
        ),
        (
            "unknown-model",
            request([("IMAGE", "BYTES", [1, 1])], [good], model="bisenetv9"),
            "NOT_FOUND",
            "unknown model",
        ),
        (
            "bytes-not-matching-shape",
            request([("RGB", "UINT8", [1, 8, 8, 3])], [rgb[:-1]]),
            "INVALID_ARGUMENT",
            "needs 192",
        ),
        ("raw-count", request([("IMAGE", "BYTES", [1, 1])], [good, good]), "INVALID_ARGUMENT", "raw_input_contents"),
        (
            "undecodable-image",
            request([("IMAGE", "BYTES", [1, 1])], [elements(b"garbage")]),
            "INVALID_ARGUMENT",
            "image",
        ),
        (
            "image-over-limit",
            request([("IMAGE", "BYTES", [1, 1])], [elements(b"\xff" * (MAX_IMAGE_BYTES + 1))]),
            "RESOURCE_EXHAUSTED",
            "limit",
        ),
        ("rgb-over-pixels", request([("RGB", "UINT8", [1, 400, 400, 3])], [b""]), "RESOURCE_EXHAUSTED", "pixels"),
        ("batch-over-max", request([("IMAGE", "BYTES", [5, 1])], [good * 5]), "INVALID_ARGUMENT", "max_batch_size"),
        ("contents-out-of-range", json_like, "INVALID_ARGUMENT", "0..255"),
        (
            "unknown-parameter",
            request(
                [("IMAGE", "BYTES", [1, 1])],
                [good],
                parameters={"tta_mode": service_pb2.InferParameter(string_param="x")},
            ),
            "INVALID_ARGUMENT",
            "unknown parameter",
        ),
    ]
    before = service.metrics()
    for name, message, code, word in cases:
        with pytest.raises(grpc.RpcError) as info:
            raw_stub.ModelInfer(message, metadata=AUTH, timeout=60)
        assert info.value.code().name == code, (name, info.value.details())
        assert word in info.value.details(), (name, info.value.details())
    after = service.metrics()
    refused = metric_value(after, "seg_requests_rejected_total") - metric_value(before, "seg_requests_rejected_total")
    assert refused == len(cases)
    assert metric_value(after, "seg_queue_depth") == 0 and metric_value(after, "seg_shm_slots_in_use") == 0
    # Still serving, and a request with typed contents instead of raw bytes works too.
    typed = request([("RGB", "UINT8", [1, 2, 2, 3])])
    typed.inputs[0].contents.uint_contents.extend(range(12))
    response = raw_stub.ModelInfer(typed, metadata=AUTH, timeout=60)
    assert [o.name for o in response.outputs] == ["LABELS", "CLASS_PIXELS"] and len(response.raw_output_contents) == 2
    assert client.infer(MODEL, [image_input(images[:1])], headers=auth()).as_numpy("LABELS").shape == (1, 64, 96)


def test_metrics_label_v2_grpc(service, client, images):
    before = service.metrics()
    client.infer(MODEL, [image_input(images[:1])], headers=auth())
    after = service.metrics()
    ok = {"model": MODEL, "protocol": "v2_grpc", "code": "OK"}
    count = "seg_request_duration_seconds_count"
    assert metric_value(after, count, **ok) == metric_value(before, count, **ok) + 1


def test_model_statistics(client, images):
    """Triton's statistics over gRPC: a success and a failure counted, phases per image, batches."""

    def stats(name: str = MODEL) -> dict:
        (entry,) = client.get_inference_statistics(name, headers=auth(), as_json=True)["model_stats"]
        return entry

    before = stats()
    client.infer(MODEL, [image_input(images[:2])], headers=auth())
    broken = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
    broken.set_data_from_numpy(np.array([[b"not an image"]], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="image"):
        client.infer(MODEL, [broken], headers=auth())
    after = stats("fast")  # an alias names the model
    assert after["name"] == MODEL and after["version"] == "1"

    def delta(*keys) -> int:  # as_json writes uint64 as strings; an absent field is zero
        def get(entry):
            for key in keys:
                entry = entry.get(key, {})
            return int(entry or 0)

        return get(after) - get(before)

    assert delta("inference_stats", "success", "count") == 1 and delta("inference_stats", "fail", "count") == 1
    for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert delta("inference_stats", phase, "count") == 2, phase
    assert delta("inference_count") == 2 and 1 <= delta("execution_count") <= 2
    assert delta("inference_stats", "compute_infer", "ns") > 0
    every = client.get_inference_statistics(headers=auth()).model_stats  # no name: every model
    assert [s.name for s in every] == [MODEL]
    with pytest.raises(InferenceServerException, match="unknown model") as info:
        client.get_inference_statistics("bisenetv9", headers=auth())
    assert "NOT_FOUND" in info.value.status()
    with pytest.raises(InferenceServerException, match="API key") as info:
        client.get_inference_statistics(MODEL)
    assert "UNAUTHENTICATED" in info.value.status()


def test_a_refused_model_name_never_becomes_a_metric_label(service, raw_stub, images):
    """The model label comes from the served models, never from what a client wrote: a call
    refused for its key, or for a model that does not exist, is counted under model="none"."""
    good = elements(png(images[0]))
    refusals = [
        (request([("IMAGE", "BYTES", [1, 1])], [good], model="made-up-1"), (), "UNAUTHENTICATED"),
        (request([("IMAGE", "BYTES", [1, 1])], [good], model="made-up-2"), AUTH, "NOT_FOUND"),
    ]
    for message, metadata, code in refusals:
        with pytest.raises(grpc.RpcError) as info:
            raw_stub.ModelInfer(message, metadata=metadata, timeout=60)
        assert info.value.code().name == code
    with grpc.insecure_channel(service.grpc_target) as channel:
        stream = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
        )
        message = request([("IMAGE", "BYTES", [1, 1])], [good], model="made-up-3")
        (answer,) = list(stream(iter([message]), metadata=AUTH, timeout=60))
        assert "NOT_FOUND" in answer.error_message
    text = service.metrics()
    assert "made-up" not in text
    for protocol, code in [("v2_grpc", "UNAUTHENTICATED"), ("v2_grpc", "NOT_FOUND"), ("v2_grpc_stream", "NOT_FOUND")]:
        assert metric_value(text, "seg_request_duration_seconds_count", model="none", protocol=protocol, code=code) >= 1


def test_concurrent_clients(service, images):
    """Several threads, each its own client, at once: every answer is right (bounded: 3 x 4 requests)."""
    expected = segment_labels(service, images[0])
    failures = []

    def worker():
        c = grpcclient.InferenceServerClient(service.grpc_target)
        try:
            for _ in range(4):
                got = c.infer(MODEL, [image_input(images[:1])], headers=auth()).as_numpy("LABELS")[0]
                if not np.array_equal(got, expected):
                    failures.append("labels differ")
        except Exception as exc:  # noqa: BLE001
            failures.append(repr(exc))
        finally:
            c.close()

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert failures == []
