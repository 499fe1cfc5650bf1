"""Triton's system shared-memory extension against the real service, with Triton's own clients and
their shared-memory utilities: inputs read from a region, outputs written into one, over HTTP and
gRPC; registration, status, unregistration and every refusal."""

from __future__ import annotations

import os

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.servicekit import FAST_ARGS, Service, png

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
shm = pytest.importorskip("tritonclient.utils.shared_memory")
from tritonclient.utils import InferenceServerException, serialize_byte_tensor  # noqa: E402

KEY = "shm-key"
MODEL = "bisenetv1_r18"
SHAPE = (48, 64)


def auth() -> dict:
    return {"x-api-key": KEY}


@pytest.fixture(scope="module")
def service(r18_checkpoint):
    svc = Service([*FAST_ARGS, "--model", f"{MODEL}={r18_checkpoint}", "--max-batch", "4", "--api-key", KEY])
    try:
        yield svc.wait_ready()
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def frames(photo) -> np.ndarray:
    crops = [photo[:256, :320], photo[200:456, 100:420]]
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(c)).resize(SHAPE[::-1])) for c in crops])


def clients(service):
    return {
        "http": (httpclient, httpclient.InferenceServerClient(service.url.removeprefix("http://"))),
        "grpc": (grpcclient, grpcclient.InferenceServerClient(service.grpc_target)),
    }


class Regions:
    """POSIX shared-memory objects made by tritonclient's utility, destroyed at the end."""

    def __init__(self, tag: str):
        self.tag = tag
        self.handles = []

    def make(self, name: str, size: int):
        handle = shm.create_shared_memory_region(name, self.key(name), size)
        self.handles.append(handle)
        return handle

    def key(self, name: str) -> str:
        return f"/bisenet-test-{os.getpid()}-{self.tag}-{name}"

    def close(self) -> None:
        for handle in self.handles:
            shm.destroy_shared_memory_region(handle)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_rgb_in_and_labels_out_through_shared_memory(service, frames, protocol):
    module, client = clients(service)[protocol]
    regions = Regions(protocol)
    try:
        expected = client.infer(MODEL, [rgb_tensor(module, frames)], headers=auth()).as_numpy("LABELS")
        pixels = regions.make("in", frames.nbytes)
        shm.set_shared_memory_region(pixels, [frames])
        out = regions.make("out", expected.nbytes + 100)
        client.register_system_shared_memory("in", regions.key("in"), frames.nbytes, headers=auth())
        client.register_system_shared_memory("out", regions.key("out"), expected.nbytes + 100, headers=auth())

        tensor = module.InferInput("RGB", list(frames.shape), "UINT8")
        tensor.set_shared_memory("in", frames.nbytes)
        labels_out = module.InferRequestedOutput("LABELS")
        labels_out.set_shared_memory("out", expected.nbytes + 100, offset=0)
        counts_out = module.InferRequestedOutput("CLASS_PIXELS")  # in the response, as usual
        result = client.infer(MODEL, [tensor], outputs=[labels_out, counts_out], headers=auth())

        got = shm.get_contents_as_numpy(out, np.uint8, list(expected.shape))
        np.testing.assert_array_equal(got, expected)
        counts = result.as_numpy("CLASS_PIXELS")
        assert counts.shape == (2, 19) and counts.sum() == frames.shape[0] * SHAPE[0] * SHAPE[1]
        written = result.get_output("LABELS")
        parameters = (
            written["parameters"]
            if protocol == "http"
            else {
                k: v.WhichOneof("parameter_choice") and getattr(v, v.WhichOneof("parameter_choice"))
                for k, v in written.parameters.items()
            }
        )
        assert parameters["shared_memory_region"] == "out"
        assert parameters["shared_memory_byte_size"] == expected.nbytes  # what was written

        status = client.get_system_shared_memory_status(headers=auth())
        names = [r["name"] for r in status] if protocol == "http" else list(status.regions)
        assert sorted(names) == ["in", "out"]
        client.unregister_system_shared_memory("in", headers=auth())
        client.unregister_system_shared_memory(headers=auth())  # every region
        status = client.get_system_shared_memory_status(headers=auth())
        assert len(status if protocol == "http" else status.regions) == 0
    finally:
        client.unregister_system_shared_memory(headers=auth())
        client.close()
        regions.close()


def rgb_tensor(module, frames: np.ndarray):
    tensor = module.InferInput("RGB", list(frames.shape), "UINT8")
    tensor.set_data_from_numpy(frames)
    return tensor


def test_encoded_images_at_an_offset(service, frames):
    """A BYTES tensor (length-prefixed PNGs) read from a region registered at an offset, and from an
    offset within it: the same labels as POST /segment gives for each image."""
    _, client = clients(service)["http"]
    regions = Regions("bytes")
    try:
        data = serialize_byte_tensor(np.array([[png(f)] for f in frames], dtype=np.object_)).item()
        handle = regions.make("images", 4096 + 100 + len(data))
        shm.set_shared_memory_region(handle, [np.frombuffer(data, np.uint8)], offset=4096 + 100)
        client.register_system_shared_memory(
            "images", regions.key("images"), 100 + len(data), offset=4096, headers=auth()
        )
        tensor = httpclient.InferInput("IMAGE", [len(frames), 1], "BYTES")
        tensor.set_shared_memory("images", len(data), offset=100)
        labels = client.infer(MODEL, [tensor], headers=auth()).as_numpy("LABELS")
        for frame, got in zip(frames, labels):
            r = httpx.post(
                service.url + "/segment?format=raw", content=png(frame), headers={"Content-Type": "image/png", **auth()}
            )
            np.testing.assert_array_equal(got, np.frombuffer(r.content, np.uint8).reshape(SHAPE))
    finally:
        client.unregister_system_shared_memory(headers=auth())
        client.close()
        regions.close()


def test_refusals(service, frames):
    http = httpx.Client(base_url=service.url, headers=auth(), timeout=60)
    regions = Regions("bad")
    try:
        regions.make("small", 64)
        key = regions.key("small")

        def register(name: str, body: dict, headers: dict | None = None) -> httpx.Response:
            return http.post(f"/v2/systemsharedmemory/region/{name}/register", json=body, headers=headers)

        def refused(response: httpx.Response, status: int, *words: str) -> None:
            assert response.status_code == status, response.text
            for word in words:
                assert word in response.json()["error"], response.text

        refused(register("a", {"key": "/../../etc/passwd", "byte_size": 8}), 422, "no path")
        refused(register("a", {"key": "/bisenet-no-such-object", "byte_size": 8}), 422, "cannot open")
        refused(register("a", {"key": "/bisenet_1_0", "byte_size": 8}), 422, "reserved")
        refused(register("a", {"key": key, "byte_size": 65}), 422, "beyond")
        refused(register("a", {"key": key, "byte_size": 0}), 422, "at least 1")
        refused(register("a", {"key": key, "byte_size": -1}), 422, "non-negative")
        refused(register("a", {"key": key, "byte_size": 8}, headers={"x-api-key": "wrong"}), 401)
        assert register("a", {"key": key, "offset": 8, "byte_size": 56}).status_code == 200
        refused(register("a", {"key": key, "byte_size": 8}), 422, "already registered")
        assert http.get("/v2/systemsharedmemory/region/a/status").json() == [
            {"name": "a", "key": key, "offset": 8, "byte_size": 56}
        ]
        refused(http.get("/v2/systemsharedmemory/region/zz/status"), 404, "zz")

        def infer(input_parameters: dict, output_parameters: dict | None = None) -> httpx.Response:
            body = {
                "inputs": [{"name": "RGB", "datatype": "UINT8", "shape": [1, 4, 4, 3], "parameters": input_parameters}]
            }
            if output_parameters is not None:
                body["outputs"] = [{"name": "LABELS", "parameters": output_parameters}]
            return http.post(f"/v2/models/{MODEL}/infer", json=body)

        refused(infer({"shared_memory_region": "zz", "shared_memory_byte_size": 48}), 422, "no shared memory region")
        refused(infer({"shared_memory_region": "a", "shared_memory_byte_size": 57}), 422, "beyond region")
        refused(infer({"shared_memory_byte_size": 48}), 422, "needs shared_memory_region")
        ok_input = {"shared_memory_region": "a", "shared_memory_byte_size": 48}
        refused(infer(ok_input, {"shared_memory_region": "a", "shared_memory_byte_size": 15}), 422, "needs 16 bytes")
        assert infer(ok_input, {"shared_memory_region": "a", "shared_memory_byte_size": 16}).status_code == 200
        assert http.post("/v2/systemsharedmemory/region/never-registered/unregister").status_code == 200
        assert httpx.get(service.url + "/v2/systemsharedmemory/status").status_code == 401
        assert "system_shared_memory" in httpx.get(service.url + "/v2").json()["extensions"]
    finally:
        http.post("/v2/systemsharedmemory/unregister")
        http.close()
        regions.close()


def test_grpc_refusals(service):
    client = grpcclient.InferenceServerClient(service.grpc_target)
    try:
        with pytest.raises(InferenceServerException, match="no path") as info:
            client.register_system_shared_memory("a", "/../x", 8, headers=auth())
        assert "INVALID_ARGUMENT" in info.value.status()
        with pytest.raises(InferenceServerException, match="nope") as info:
            client.get_system_shared_memory_status("nope", headers=auth())
        assert "NOT_FOUND" in info.value.status()
        with pytest.raises(InferenceServerException, match="API key") as info:
            client.get_system_shared_memory_status()
        assert "UNAUTHENTICATED" in info.value.status()
        assert "system_shared_memory" in client.get_server_metadata().extensions
    finally:
        client.close()
