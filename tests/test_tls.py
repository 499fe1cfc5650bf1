"""gRPC TLS through the real command-line flags (`--tls-cert`, `--tls-key`): the Python client and
`bisenet stream --ca-cert` over TLS, plaintext and untrusted clients refused cleanly, REST still plain
HTTP, and a missing certificate file at start. Certificates are made here with the openssl command."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image

from service.client import GrpcSegmentationClient, SegmentationError
from tests.servicekit import BISENET, FAST_ARGS, ROOT, Service, free_port, make_certificate, png, service_command

pytestmark = pytest.mark.skipif(not shutil.which("openssl"), reason="needs the openssl command")
H, W = 64, 128


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[str, str]:
    return make_certificate(tmp_path_factory.mktemp("tls"), "service")


@pytest.fixture(scope="module")
def service(r18_checkpoint, certificate):
    cert, key = certificate
    svc = Service([*FAST_ARGS, "--model", f"bisenetv1_r18={r18_checkpoint}", "--tls-cert", cert, "--tls-key", key])
    try:
        yield svc.wait_ready()
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def root(certificate) -> bytes:
    return open(certificate[0], "rb").read()


@pytest.fixture(scope="module")
def frames(photo) -> list[np.ndarray]:
    crops = [photo[:256, :512], photo[256:, :], photo[100:356, 50:]]
    return [np.asarray(Image.fromarray(np.ascontiguousarray(c)).resize((W, H))) for c in crops]


def rest_labels(service, frame: np.ndarray) -> np.ndarray:
    """REST stays plain HTTP beside the TLS gRPC port."""
    r = httpx.post(
        f"{service.url}/segment?format=raw", content=png(frame), headers={"Content-Type": "image/png"}, timeout=120
    )
    assert r.status_code == 200, r.text
    return np.frombuffer(r.content, np.uint8).reshape(int(r.headers["x-height"]), int(r.headers["x-width"]))


# -- TLS clients -----------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_grpc_client_over_tls(service, root, frames, host):
    target = f"{host}:{service.grpc_port}"
    with GrpcSegmentationClient(target, root_certificates=root, timeout=60) as client:
        # Health over TLS (it follows readiness with a short delay, so allow it a moment).
        deadline = time.monotonic() + 60
        while not client.ready(timeout=10):
            assert time.monotonic() < deadline, "health never turned SERVING over TLS"
            time.sleep(0.2)
        models = client.models()
        assert [m["name"] for m in models["models"]] == ["bisenetv1_r18"] and models["default"] == "bisenetv1_r18"
        assert models["models"][0]["ready"] and len(models["models"][0]["classes"]) == 19
        result = client.segment(frames[0], format="raw")
        assert result.labels.shape == (H, W)
        np.testing.assert_array_equal(result.labels, rest_labels(service, frames[0]))
        np.testing.assert_array_equal(client.segment(png(frames[1])).labels, rest_labels(service, frames[1]))
        streamed = list(client.stream(frames, policy="block"))
        assert [r.frame_id for r in streamed] == [0, 1, 2] and not any(r.error for r in streamed)


def test_stream_cli_with_ca_cert(service, certificate, frames, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(frames):
        (folder / f"{i:03d}.png").write_bytes(png(frame))
    out = tmp_path / "overlays"
    cmd = [
        BISENET,
        "stream",
        str(folder),
        "--grpc",
        f"127.0.0.1:{service.grpc_port}",
        "--ca-cert",
        certificate[0],
        "--policy",
        "block",
        "-o",
        str(out),
    ]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert (summary["input"], summary["served"], summary["dropped"], summary["errors"]) == (str(folder), 3, 0, 0)
    assert summary["policy"] == "block" and summary["p50_ms"] > 0
    assert sorted(p.name for p in out.iterdir()) == [f"frame_{i:06d}.png" for i in range(3)]


# -- clients that must be refused ------------------------------------------------------------------
def test_plaintext_client_is_refused_cleanly(service, root, frames):
    with GrpcSegmentationClient(service.grpc_target, timeout=20) as client:
        assert not client.ready()
        with pytest.raises(SegmentationError) as info:
            client.models()
        assert info.value.grpc_status == "UNAVAILABLE" and info.value.status == 503
        with pytest.raises(SegmentationError) as info:
            client.segment(frames[0])
        assert info.value.grpc_status == "UNAVAILABLE"
    with grpc.insecure_channel(service.grpc_target) as channel, pytest.raises(grpc.FutureTimeoutError):
        grpc.channel_ready_future(channel).result(timeout=3)  # the handshake never completes
    # The server is unharmed: a TLS client right after works.
    with GrpcSegmentationClient(service.grpc_target, root_certificates=root, timeout=60) as client:
        assert client.segment(frames[0], format="raw").labels.shape == (H, W)


def test_untrusted_certificate_is_refused(service, frames, tmp_path):
    other_cert, _ = make_certificate(tmp_path, "other")  # a different self-signed CA
    with GrpcSegmentationClient(
        service.grpc_target, root_certificates=open(other_cert, "rb").read(), timeout=20
    ) as client:
        assert not client.ready()
        with pytest.raises(SegmentationError) as info:
            client.segment(frames[0])
        assert info.value.grpc_status == "UNAVAILABLE"


@pytest.mark.parametrize("flags", [[], ["--tls"]], ids=["plaintext", "tls-without-ca"])
def test_stream_cli_without_the_right_credentials_fails_cleanly(service, frames, tmp_path, flags):
    """Plaintext against the TLS port, or TLS with the system roots (which do not trust the
    self-signed certificate): exit 1 with one error line, no traceback."""
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "0.png").write_bytes(png(frames[0]))
    cmd = [BISENET, "stream", str(folder), "--grpc", service.grpc_target, *flags]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    assert "bisenet stream: error:" in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert run.stdout == ""


# -- start-up --------------------------------------------------------------------------------------
def start(*args: str) -> subprocess.CompletedProcess:
    command = service_command(free_port(), free_port(), ["--model", "bisenetv1_r18=random", *FAST_ARGS, *args])
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_tls_cert_without_key_is_refused():
    run = start("--tls-cert", "/nonexistent/cert.pem")
    assert run.returncode == 2 and "--tls-cert and --tls-key go together" in run.stderr, run.stderr


@pytest.mark.parametrize("missing", ["cert", "key"])
def test_missing_tls_file_stops_start_up(certificate, tmp_path, missing):
    """The process exits (non-zero, without serving) and names the missing file. Today this ends in
    an uncaught FileNotFoundError traceback with exit code 1; the message still names the path."""
    cert, key = certificate
    gone = str(tmp_path / f"missing-{missing}.pem")
    run = start("--tls-cert", gone if missing == "cert" else cert, "--tls-key", gone if missing == "key" else key)
    assert run.returncode != 0
    assert gone in run.stderr, run.stderr
