"""KServe v2 over HTTP against the real running service, with Triton's own client (tritonclient.http)
and, for what that client refuses to send, raw requests: health, metadata, config, infer with IMAGE
and RGB, JSON and binary tensors, batches, async, and every kind of bad input."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.servicekit import FAST_ARGS, Service, metric_value, png

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

KEY = "v2-key"
HEADERS = {"x-api-key": KEY}


def auth() -> dict:
    """A fresh headers dict per call: tritonclient.http adds its own headers to the dict it is given."""
    return dict(HEADERS)


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
    with httpclient.InferenceServerClient(service.url.removeprefix("http://"), concurrency=4) as c:
        yield c


@pytest.fixture(scope="module")
def http(service):
    with httpx.Client(base_url=service.url, headers=auth(), timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def images(photo) -> list[np.ndarray]:
    """Three real-photo crops of different sizes."""
    crops = [photo[:256, :384], photo[200:, 100:], photo[::-1, :300]]
    sizes = [(96, 64), (80, 72), (64, 48)]
    return [np.asarray(Image.fromarray(np.ascontiguousarray(c)).resize(s)) for c, s in zip(crops, sizes)]


def segment_labels(http, image: np.ndarray, tta: str = "none") -> np.ndarray:
    """What POST /segment answers for the same image (format=raw)."""
    r = http.post(f"/segment?format=raw&tta={tta}", content=png(image), headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    return np.frombuffer(r.content, np.uint8).reshape(int(r.headers["x-height"]), int(r.headers["x-width"]))


def image_input(images: list[np.ndarray], binary: bool = True):
    tensor = httpclient.InferInput("IMAGE", [len(images), 1], "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array([[png(i)] for i in images], dtype=np.object_), binary_data=True)
    else:  # JSON carries no bytes: IMAGE items are base64 strings there
        data = [[base64.b64encode(png(i)).decode()] for i in images]
        tensor.set_data_from_numpy(np.array(data, dtype=np.object_), binary_data=False)
    return tensor


def rgb_input(frames: np.ndarray, binary: bool = True):
    tensor = httpclient.InferInput("RGB", list(frames.shape), "UINT8")
    tensor.set_data_from_numpy(frames, binary_data=binary)
    return tensor


def outputs(binary: bool):
    return [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("LABELS", "CLASS_PIXELS")]


def v2_error(response: httpx.Response, status: int, *words: str) -> str:
    """The v2 error body is {"error": "message"}: check the status and the words of the message."""
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert isinstance(message, str)
    for word in words:
        assert word in message, message
    return message


# -- health, metadata, config ------------------------------------------------------------------------
def test_health_metadata_and_config(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready("fast")  # aliases work here too
    assert client.is_model_ready(MODEL, model_version="1")
    server = client.get_server_metadata()
    assert server["name"] == "bisenet-serve" and "model_configuration" in server["extensions"]
    assert "binary_tensor_data" in server["extensions"]
    meta = client.get_model_metadata(MODEL, headers=auth())
    assert meta["name"] == MODEL and meta["versions"] == ["1"]
    assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]} == {
        "IMAGE": ("BYTES", [-1, 1]),
        "RGB": ("UINT8", [-1, -1, -1, 3]),
    }
    assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["outputs"]} == {
        "LABELS": ("UINT8", [-1, -1, -1]),
        "CLASS_PIXELS": ("INT64", [-1, 19]),
    }
    config = client.get_model_config(MODEL, headers=auth())
    assert config["name"] == MODEL and config["max_batch_size"] == MAX_BATCH
    assert {i["name"]: (i["data_type"], i["dims"]) for i in config["input"]} == {
        "IMAGE": ("TYPE_STRING", [1]),
        "RGB": ("TYPE_UINT8", [-1, -1, 3]),
    }
    assert {o["name"]: (o["data_type"], o["dims"]) for o in config["output"]} == {
        "LABELS": ("TYPE_UINT8", [-1, -1]),
        "CLASS_PIXELS": ("TYPE_INT64", [19]),
    }
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 20_000
    assert client.get_model_config(MODEL, model_version="1", headers=auth())["name"] == MODEL


def test_unknown_model_and_version(client, http):
    assert not client.is_model_ready("bisenetv9")
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("bisenetv9", headers=auth())
    v2_error(http.get(f"/v2/models/{MODEL}/versions/2/config"), 404, "version")
    v2_error(http.post("/v2/models/bisenetv9/infer", content=b"{}"), 404, "unknown model")


def test_api_key(service, client):
    with pytest.raises(InferenceServerException, match="API key") as info:
        client.infer(MODEL, [image_input([np.zeros((8, 8, 3), np.uint8)])])
    assert info.value.status() == "401"
    assert httpx.get(service.url + f"/v2/models/{MODEL}/config").status_code == 401
    assert httpx.get(service.url + f"/v2/models/{MODEL}/ready").status_code == 200  # health stays open


# -- inference ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_image_labels_equal_segment(client, http, images, binary):
    image = images[0]
    result = client.infer(MODEL, [image_input([image], binary)], outputs=outputs(binary), headers=auth())
    labels = result.as_numpy("LABELS")
    assert labels.dtype == np.uint8 and labels.shape == (1, *image.shape[:2])
    expected = segment_labels(http, image)
    assert len(np.unique(expected)) > 3  # a varied label map, so equality means something
    np.testing.assert_array_equal(labels[0], expected)
    counts = result.as_numpy("CLASS_PIXELS")
    assert counts.dtype == np.int64 and counts.shape == (1, 19)
    np.testing.assert_array_equal(counts[0], np.bincount(expected.ravel(), minlength=19))
    response = result.get_response()
    assert response["model_name"] == MODEL and response["model_version"] == "1"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_rgb_batch_of_three(client, http, images, binary):
    frames = np.stack([np.asarray(Image.fromarray(i).resize((64, 48))) for i in images])
    result = client.infer(
        MODEL, [rgb_input(frames, binary)], outputs=outputs(binary), headers=auth(), request_id="batch-3"
    )
    labels = result.as_numpy("LABELS")
    assert labels.shape == (3, 48, 64)
    for frame, got in zip(frames, labels):
        np.testing.assert_array_equal(got, segment_labels(http, frame))
    assert result.get_response()["id"] == "batch-3"
    assert result.as_numpy("CLASS_PIXELS").sum(axis=1).tolist() == [48 * 64] * 3


def test_image_batch_of_different_sizes_is_padded(client, http, images):
    result = client.infer(MODEL, [image_input(images)], headers=auth())  # no outputs named: all, binary
    labels = result.as_numpy("LABELS")
    assert labels.shape == (3, 72, 96)  # the largest height and width of the three
    assert result.get_output("LABELS")["parameters"]["shapes"] == "64x96,72x80,48x64"
    for image, got, counts in zip(images, labels, result.as_numpy("CLASS_PIXELS")):
        h, w = image.shape[:2]
        expected = segment_labels(http, image)
        np.testing.assert_array_equal(got[:h, :w], expected)
        assert (got[h:, :] == 255).all() and (got[:, w:] == 255).all()
        assert counts.sum() == h * w


def test_one_output_and_deadline_parameter(client, images):
    result = client.infer(
        MODEL,
        [image_input(images[:1])],
        outputs=[httpclient.InferRequestedOutput("CLASS_PIXELS", binary_data=False)],
        headers=auth(),
        parameters={"deadline_ms": 60_000},
    )
    assert result.as_numpy("LABELS") is None and result.as_numpy("CLASS_PIXELS").sum() == 64 * 96
    with pytest.raises(InferenceServerException, match="deadline") as info:
        client.infer(MODEL, [image_input(images[:1])], headers=auth(), parameters={"deadline_ms": 1})
    assert info.value.status() == "504"
    with pytest.raises(InferenceServerException, match="unknown parameter 'tta_mode'"):
        client.infer(MODEL, [image_input(images[:1])], headers=auth(), parameters={"tta_mode": "flip"})


def test_tta_and_auto_parameters(client, http, images):
    """`tta` is a request parameter and `auto` a model name for infer, as on POST /segment; what ran
    comes back in the response parameters."""
    image = images[0]
    result = client.infer(MODEL, [image_input([image])], headers=auth(), parameters={"tta": "flip"})
    np.testing.assert_array_equal(result.as_numpy("LABELS")[0], segment_labels(http, image, "flip"))
    assert result.get_response()["parameters"] == {"model": MODEL, "tta": "flip"}
    result = client.infer("auto", [image_input([image])], headers=auth(), parameters={"deadline_ms": 60_000})
    response = result.get_response()
    assert response["model_name"] == MODEL and response["parameters"] == {"model": MODEL, "tta": "none"}
    with pytest.raises(InferenceServerException, match="unknown tta 'sideways'; choose none, flip, ms_flip, auto"):
        client.infer(MODEL, [image_input([image])], headers=auth(), parameters={"tta": "sideways"})


def test_async_infer(client, http, images):
    pending = [client.async_infer(MODEL, [image_input([image])], headers=auth()) for image in images]
    for image, request in zip(images, pending):
        np.testing.assert_array_equal(request.get_result().as_numpy("LABELS")[0], segment_labels(http, image))


def test_version_path_and_metrics(service, http, images):
    before = service.metrics()
    body = {
        "inputs": [
            {"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1], "data": [base64.b64encode(png(images[2])).decode()]}
        ]
    }
    r = http.post(f"/v2/models/{MODEL}/versions/1/infer", json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    out = {o["name"]: o for o in r.json()["outputs"]}
    labels = np.asarray(out["LABELS"]["data"], np.uint8).reshape(out["LABELS"]["shape"])
    np.testing.assert_array_equal(labels[0], segment_labels(http, images[2]))
    after = service.metrics()
    ok = {"model": MODEL, "protocol": "v2_http", "code": "200"}
    assert metric_value(after, "seg_request_duration_seconds_count", **ok) == (
        metric_value(before, "seg_request_duration_seconds_count", **ok) + 1
    )


# -- statistics (Triton's extension) -----------------------------------------------------------------
def model_stats(client, model: str = MODEL, version: str = "") -> dict:
    (stats,) = client.get_inference_statistics(model, version, headers=auth())["model_stats"]
    return stats


def phase_counts(stats: dict) -> dict:
    return {phase: d["count"] for phase, d in stats["inference_stats"].items()}


def batched_images(stats: dict) -> int:
    """Images in every batch the worker ran, from batch_stats."""
    return sum(b["batch_size"] * b["compute_infer"]["count"] for b in stats["batch_stats"])


def test_statistics_count_requests_images_and_batches(client, http, images):
    """Requests in success and fail, images in the phases and inference_count, batches in
    execution_count and batch_stats; /segment counts as much as v2 infer does."""
    before = model_stats(client)
    frames = np.stack([images[2]] * 3)
    client.infer(MODEL, [rgb_input(frames)], outputs=outputs(True), headers=auth())  # one request, 3 images
    assert http.post("/segment", content=png(images[0]), headers={"Content-Type": "image/png"}).status_code == 200
    assert http.post("/segment", content=b"not an image", headers={"Content-Type": "image/png"}).status_code == 400
    after = model_stats(client)
    counts, counted = phase_counts(after), phase_counts(before)
    assert counts["success"] - counted["success"] == 2 and counts["fail"] - counted["fail"] == 1
    for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert counts[phase] - counted[phase] == 4, phase
    assert after["inference_count"] - before["inference_count"] == 4
    assert batched_images(after) - batched_images(before) == 4  # each image in exactly one batch
    executions = sum(b["compute_infer"]["count"] for b in after["batch_stats"])
    assert after["execution_count"] == executions and 1 <= executions - before["execution_count"] <= 4
    infer_ns = after["inference_stats"]["compute_infer"]["ns"] - before["inference_stats"]["compute_infer"]["ns"]
    success_ns = after["inference_stats"]["success"]["ns"] - before["inference_stats"]["success"]["ns"]
    assert 0 < infer_ns and 0 < success_ns
    assert after["last_inference"] > 0 and after["last_inference"] >= before["last_inference"]
    assert after["name"] == MODEL and after["version"] == "1"


def test_statistics_paths_and_refusals(service, client, http):
    assert "statistics" in client.get_server_metadata()["extensions"]
    every = http.get("/v2/models/stats")
    assert every.status_code == 200 and [s["name"] for s in every.json()["model_stats"]] == [MODEL]
    assert model_stats(client, "fast")["name"] == MODEL  # an alias names the model
    assert model_stats(client, MODEL, "1")["name"] == MODEL
    assert http.get(f"/v2/models/{MODEL}/versions/1/stats").json()["model_stats"][0]["name"] == MODEL
    v2_error(http.get(f"/v2/models/{MODEL}/versions/2/stats"), 404, "version")
    v2_error(http.get("/v2/models/bisenetv9/stats"), 404, "unknown model")
    with pytest.raises(InferenceServerException, match="API key"):
        client.get_inference_statistics(MODEL)
    assert httpx.get(service.url + "/v2/models/stats").status_code == 401


# -- bad input: each refused with its status and a v2 error body; the service keeps serving ----------
def binary_body(header: dict, *chunks: bytes) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    return head + b"".join(chunks), {"Inference-Header-Content-Length": str(len(head))}


def image_elements(*items: bytes) -> bytes:
    return b"".join(len(i).to_bytes(4, "little") + i for i in items)


def cases(images) -> list[tuple[str, bytes, dict, int, str]]:
    """(id, body, headers, status, a word of the message)."""
    good = image_elements(png(images[0]))
    rgb = images[0][:8, :8]

    def tensor(name="IMAGE", datatype="BYTES", shape=(1, 1), size=None, **extra):
        t = {"name": name, "datatype": datatype, "shape": list(shape), **extra}
        if size is not None:
            t["parameters"] = {"binary_data_size": size}
        return t

    def binary(*tensors_and_data, outputs=None):
        header = {"inputs": [t for t, _ in tensors_and_data]}
        if outputs is not None:
            header["outputs"] = outputs
        return binary_body(header, *(d for _, d in tensors_and_data))

    return [
        ("wrong-datatype", *binary((tensor(datatype="FP32", size=len(good)), good)), 422, "must be BYTES"),
        ("wrong-rank", *binary((tensor(shape=(1,), size=len(good)), good)), 422, "rank 2"),
        ("rgb-wrong-rank", *binary((tensor("RGB", "UINT8", (8, 8, 3), size=192), rgb.tobytes())), 422, "rank 4"),
        ("rgb-not-3-channels", *binary((tensor("RGB", "UINT8", (1, 8, 24, 1), size=192), rgb.tobytes())), 422, "shape"),
        ("missing-input", *binary_body({"inputs": []}), 422, "no input"),
        ("unknown-input", *binary((tensor("PIXELS", size=len(good)), good)), 422, "unknown input"),
        (
            "two-inputs",
            *binary((tensor(size=len(good)), good), (tensor("RGB", "UINT8", (1, 8, 8, 3), size=192), rgb.tobytes())),
            422,
            "one input",
        ),
        (
            "unknown-output",
            *binary((tensor(size=len(good)), good), outputs=[{"name": "LOGITS"}]),
            422,
            "unknown output",
        ),
        (
            "rgb-bytes-short",
            *binary((tensor("RGB", "UINT8", (1, 8, 8, 3), size=191), rgb.tobytes()[:191])),
            422,
            "needs 192 bytes",
        ),
        ("image-count-mismatch", *binary((tensor(shape=(2, 1), size=len(good)), good)), 422, "carries 1 elements"),
        ("bytes-element-overrun", *binary((tensor(size=len(good) - 5), good[:-5])), 422, "claims"),
        ("undecodable-image", *binary((tensor(size=27), image_elements(b"definitely not an image"))), 400, "image"),
        (
            "image-over-limit",
            *binary((tensor(size=MAX_IMAGE_BYTES + 5), image_elements(b"\xff" * (MAX_IMAGE_BYTES + 1)))),
            413,
            "limit",
        ),
        (
            "rgb-over-pixel-limit",
            *binary_body({"inputs": [tensor("RGB", "UINT8", (1, 1000, 1000, 3), data=[0])]}),
            413,
            "pixels",
        ),
        ("batch-over-max", *binary((tensor(shape=(5, 1), size=5 * len(good)), good * 5)), 422, "max_batch_size"),
        ("malformed-json", *binary_body_raw(b'{"inputs": [', b""), 422, "malformed"),
        ("json-not-object", b"[1, 2]", {}, 422, "object"),
        (
            "header-length-beyond-body",
            b'{"inputs": []}',
            {"Inference-Header-Content-Length": "5000"},
            422,
            "only 14 bytes",
        ),
        ("binary-size-beyond-body", *binary((tensor(size=len(good) + 100), good)), 422, "beyond"),
        ("leftover-binary", *binary((tensor(size=len(good)), good + b"extra")), 422, "belong to no input"),
        ("bad-json-base64", json.dumps({"inputs": [tensor(data=["***"])]}).encode(), {}, 422, "base64"),
        (
            "rgb-json-out-of-range",
            json.dumps({"inputs": [tensor("RGB", "UINT8", (1, 1, 1, 3), data=[0, 256, 0])]}).encode(),
            {},
            422,
            "0..255",
        ),
        (
            "bad-deadline",
            json.dumps({"inputs": [tensor(data=[])], "parameters": {"deadline_ms": "soon"}}).encode(),
            {},
            422,
            "deadline_ms",
        ),
        ("gzip-body", b"\x1f\x8b", {"Content-Encoding": "gzip"}, 415, "Content-Encoding"),
    ]


def binary_body_raw(head: bytes, rest: bytes) -> tuple[bytes, dict]:
    return head + rest, {"Inference-Header-Content-Length": str(len(head))}


def test_bad_input(service, http, client, images):
    before = service.metrics()
    for name, body, headers, status, word in cases(images):
        r = http.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers)
        assert r.status_code == status, (name, r.text)
        message = r.json()["error"]
        assert isinstance(message, str) and word in message, (name, message)
    # Nothing leaked: every queue place and frame slot was given back, and the service still answers.
    after = service.metrics()
    assert metric_value(after, "seg_queue_depth") == 0 and metric_value(after, "seg_shm_slots_in_use") == 0
    refused = metric_value(after, "seg_requests_rejected_total") - metric_value(before, "seg_requests_rejected_total")
    assert refused == len(cases(images))
    result = client.infer(MODEL, [image_input(images[:1])], headers=auth())
    np.testing.assert_array_equal(result.as_numpy("LABELS")[0], segment_labels(http, images[0]))


def test_body_over_limit_is_refused_before_reading(service, http):
    limit = MAX_BATCH * (max(MAX_IMAGE_BYTES, MAX_PIXELS * 3) + 4) + 64 * 1024
    v2_error(http.post(f"/v2/models/{MODEL}/infer", content=b"{" + b" " * limit + b"}"), 413, "limit")


def test_tritonclient_sees_errors_as_exceptions(client, images):
    tensor = httpclient.InferInput("RGB", [1, 8, 8, 3], "UINT8")
    tensor.set_data_from_numpy(np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(InferenceServerException, match="unknown output") as info:
        client.infer(MODEL, [tensor], outputs=[httpclient.InferRequestedOutput("LOGITS")], headers=auth())
    assert info.value.status() == "422"
    broken = httpclient.InferInput("IMAGE", [1, 1], "BYTES")
    broken.set_data_from_numpy(np.array([[b"GIF89a not really"]], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="image") as info:
        client.infer(MODEL, [broken], headers=auth())
    assert info.value.status() == "400"
