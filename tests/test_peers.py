"""`bisenet bench peers`: Triton (PyTriton, in .venv-peers), Ray Serve and this service serve the same
engine and answer the same JPEG with the same labels; bad images are refused without harming the
peer; perf_analyzer (from .venv-peers) measures Triton, and this service once it speaks v2; the CLI
prints its table. Real processes on loopback, bounded loads.

The peers are heavy: these tests skip (with the reason) when .venv-peers or Ray is missing, unless
BISENET_REQUIRE_PEERS=1 (set by `make test`, which builds .venv-peers first), where they fail instead.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import struct
import subprocess

import httpx
import numpy as np
import pytest
from PIL import Image

from service.bench import peers as bench_peers
from service.bench.load import Level, closed_loop
from service.bench.peers import Peer, Row, http_sender, print_rows, start_peer, wait_ready
from service.bench.peers_clients import v2_image_request, v2_labels
from service.bench.peers_engine import EngineSpec, decode, load_engine
from service.bench.peers_perf import peers_venv, perf_analyzer_binary, run_perf_analyzer
from tests.servicekit import BISENET, ROOT

REQUIRED = os.environ.get("BISENET_REQUIRE_PEERS") == "1"
# Ray Serve's own pydantic models use deprecated Field arguments: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")
SIZE = (96, 160)  # small frames and a small resize scale: milliseconds per image on the CPU


def need(condition: bool, reason: str) -> None:
    if condition:
        return
    if REQUIRED:
        pytest.fail(f"BISENET_REQUIRE_PEERS=1 but {reason}")
    pytest.skip(reason)


def has_ray() -> bool:
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def spec(r18_checkpoint) -> EngineSpec:
    return EngineSpec("bisenetv1_r18", r18_checkpoint, "cpu", (160, 96), 4, SIZE, 2)


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.coffee()).resize((SIZE[1], SIZE[0])).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def expected(spec, jpeg) -> np.ndarray:
    """The labels of the engine itself, in this process."""
    return load_engine(spec).segment(decode(jpeg)[None])[0]


def running(name: str, spec: EngineSpec, jpeg: bytes, tmp_path_factory):
    """A started peer, once one real request succeeded (model loaded and warm)."""
    peer = start_peer(name, spec, 5.0, tmp_path_factory.mktemp(name), peers_venv())

    async def ready() -> None:
        async with httpx.AsyncClient(base_url=peer.url, timeout=60) as client:
            await wait_ready(peer, http_sender(peer, client, spec.model, jpeg, SIZE[0] * SIZE[1]), timeout=240)

    try:
        asyncio.run(ready())
        yield peer
    finally:
        peer.stop()


@pytest.fixture(scope="module")
def triton(spec, jpeg, tmp_path_factory):
    need((peers_venv() / "bin" / "python").exists(), f"no peers venv at {peers_venv()} (tools/ensure_peers_venv.sh)")
    yield from running("triton", spec, jpeg, tmp_path_factory)


@pytest.fixture(scope="module")
def ray_peer(spec, jpeg, tmp_path_factory):
    need(has_ray(), "ray[serve] is not installed in this venv (the dev extras)")
    yield from running("ray", spec, jpeg, tmp_path_factory)


@pytest.fixture(scope="module")
def service(spec, jpeg, tmp_path_factory):
    yield from running("service", spec, jpeg, tmp_path_factory)


async def one_request(peer: Peer, spec: EngineSpec, body: bytes) -> httpx.Response:
    """The peer's JPEG-in request; returns the raw response."""
    async with httpx.AsyncClient(base_url=peer.url, timeout=60) as client:
        if peer.name == "triton":
            path, data, headers = v2_image_request(spec.model, body)
            return await client.post(path, content=data, headers=headers)
        params = {"format": "raw"} if peer.name == "service" else None
        return await client.post("/segment", content=body, params=params, headers={"Content-Type": "image/jpeg"})


def labels_of(peer: Peer, response: httpx.Response) -> np.ndarray:
    data = v2_labels(response) if peer.name == "triton" else response.content
    assert response.status_code == 200, response.text
    return np.frombuffer(data, np.uint8).reshape(SIZE)


@pytest.mark.parametrize("name", ["service", "triton", "ray_peer"])
def test_peer_serves_the_same_engine(name, request, spec, jpeg, expected):
    """One request to each peer: the labels equal the engine's own, so every peer does the same work;
    then an undecodable image is refused with the decoder's message and the peer still answers."""
    peer = request.getfixturevalue(name)
    got = labels_of(peer, asyncio.run(one_request(peer, spec, jpeg)))
    assert np.unique(expected).size > 1  # a meaningful comparison, not one class everywhere
    np.testing.assert_array_equal(got, expected)

    bad = asyncio.run(one_request(peer, spec, b"\xff\xd8\xff not a jpeg"))
    assert "cannot decode image" in bad.text
    # PyTriton reports every exception of a Python model as INTERNAL (HTTP 500); the others say 400.
    assert bad.status_code == (500 if peer.name == "triton" else 400), (bad.status_code, bad.text)
    assert peer.proc.poll() is None
    np.testing.assert_array_equal(labels_of(peer, asyncio.run(one_request(peer, spec, jpeg))), expected)


def test_triton_batches_concurrent_requests(triton, spec, jpeg):
    """16 concurrent JPEG requests, bounded: all answered with labels of the right size."""

    async def go() -> Level:
        async with httpx.AsyncClient(base_url=triton.url, timeout=60) as client:
            return await closed_loop(http_sender(triton, client, spec.model, jpeg, SIZE[0] * SIZE[1]), 16, 32, 60)

    level = asyncio.run(go())
    assert (level.ok, level.errors) == (32, 0)


def perf_or_skip():
    need(perf_analyzer_binary() is not None, f"no perf_analyzer in {peers_venv()} (tools/ensure_peers_venv.sh)")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_against_triton(protocol, triton, spec, jpeg):
    perf_or_skip()
    url = triton.url.removeprefix("http://") if protocol == "http" else triton.grpc
    headers = triton.perf_headers[protocol]  # Triton's statistics need its access token
    result = run_perf_analyzer(url, spec.model, protocol, 2, SIZE, 1000, 3, headers, timeout=120)
    assert result.protocol == protocol and result.concurrency == 2
    assert result.throughput > 0 and 0 < result.p50_ms <= result.p99_ms
    assert result.server_ms is not None and result.server_ms[2] > 0  # Triton's statistics: compute infer


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_against_the_service(protocol, service, spec, jpeg):
    """perf_analyzer drives the service as it drives Triton, and reads the server's own split of the
    time from the statistics extension, as it does Triton's."""
    perf_or_skip()
    assert bench_peers.has_v2_config(service.url, spec.model)
    url = service.url.removeprefix("http://") if protocol == "http" else service.grpc
    result = run_perf_analyzer(url, spec.model, protocol, 2, SIZE, window_ms=2000, trials=3, timeout=180)
    assert result.throughput > 0 and 0 < result.p50_ms <= result.p99_ms
    assert result.server_ms is not None, "perf_analyzer found no server-side statistics"
    queue, compute_input, compute_infer, compute_output = result.server_ms
    assert compute_infer > 0 and compute_input > 0 and compute_output > 0 and queue >= 0


def test_perf_analyzer_failure_is_reported(spec):
    """A server that is not there: a RuntimeError with perf_analyzer's own words, not a hang."""
    perf_or_skip()
    from service.bench.processes import free_port

    with pytest.raises(RuntimeError, match="perf_analyzer exited"):
        run_perf_analyzer(f"127.0.0.1:{free_port()}", spec.model, "http", 1, SIZE, window_ms=500, trials=1, timeout=60)


# -- the pieces without processes ------------------------------------------------------------------
def test_v2_request_and_response_framing():
    path, body, headers = v2_image_request("m", b"JPEGDATA")
    size = int(headers["Inference-Header-Content-Length"])
    header = json.loads(body[:size])
    assert path == "/v2/models/m/infer"
    assert header["inputs"][0]["parameters"]["binary_data_size"] == 12
    assert body[size:] == struct.pack("<I", 8) + b"JPEGDATA"

    out = json.dumps(
        {
            "outputs": [
                {"name": "OTHER", "parameters": {"binary_data_size": 3}},
                {"name": "LABELS", "datatype": "UINT8", "shape": [1, 2, 2], "parameters": {"binary_data_size": 4}},
            ]
        }
    ).encode()
    response = httpx.Response(
        200, content=out + b"xyz" + b"\x01\x02\x03\x04", headers={"Inference-Header-Content-Length": str(len(out))}
    )
    assert v2_labels(response) == b"\x01\x02\x03\x04"
    with pytest.raises(ValueError, match="HTTP 400"):
        v2_labels(httpx.Response(400, json={"error": "bad"}))


def test_table_ratios_are_against_the_service(capsys):
    rows = [
        Row("service", "http jpeg", 4, 20.0, 10, 20, 40.0, "40/40"),
        Row("triton", "http jpeg", 4, 10.0, 10, 20, 80.0, "40/40"),
        Row("ray", "http jpeg", 16, 5.0, 10, 20, 80.0, "40/40"),
        Row("service", "perf_analyzer grpc", 2, 30.0, 10, 20, 30.0, server_ms=(5.0, 0.04, 20.0, 0.3)),
    ]
    print_rows(rows, "t")
    out = capsys.readouterr().out
    assert "| triton | http jpeg | 4 | 40/40 | 10.00 | 10.0 | 20.0 | 80.0 | 0.50x | 2.00x | - |" in out
    assert "| service | http jpeg | 4 | 40/40 | 20.00 | 10.0 | 20.0 | 40.0 | 1.00x | 1.00x | - |" in out
    assert "| ray | http jpeg | 16 | 40/40 | 5.00 | 10.0 | 20.0 | 80.0 | n/a | n/a | - |" in out
    assert (
        "| service | perf_analyzer grpc | 2 | - | 30.00 | 10.0 | 20.0 | 30.0 | 1.00x | 1.00x | 5.0 / 0.0 / 20.0 / 0.3 |"
        in out
    )


def test_engine_spec_flags_match_the_service(spec):
    args = spec.service_args()
    assert args[args.index("--resize-scale") + 1] == "160x96"
    assert args[args.index("--max-batch") + 1] == "4"
    assert args[args.index("--model") + 1] == f"bisenetv1_r18={spec.weights}"


def test_cli_prints_the_table_for_the_service():
    """`bisenet bench peers` end to end with one peer, tiny levels (bounded), no perf_analyzer."""
    cmd = [BISENET, "bench", "peers", "--peers", "service", "--size", "96x160", "--concurrency", "1,2"]
    cmd += ["--requests", "4", "--seconds", "20", "--warmup", "1", "--no-perf-analyzer", "--threads", "2"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| service | http jpeg | 1 | 4/4 |" in out.stdout
    assert "| service | http jpeg | 2 | 4/4 |" in out.stdout


def test_cli_refuses_an_unknown_peer():
    out = subprocess.run([BISENET, "bench", "peers", "--peers", "tritonn"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "unknown peer(s) tritonn" in out.stderr
