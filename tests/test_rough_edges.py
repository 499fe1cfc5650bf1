"""The rough edges a new user met (issue 14), each through the real service: one log format and
start-up steps, every error code documented, TLS files checked at start, decode messages without
Python reprs, the API key compared in constant time, 431 for oversized headers, the body read
before an early error (urllib sees the answer), undecodable gRPC messages as INVALID_ARGUMENT."""

from __future__ import annotations

import contextlib
import hmac
import io
import json
import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image

from service.api.auth import key_matches
from service.errors import CODES
from service.worker.process import warm_buckets
from tests.servicekit import FAST_ARGS, ROOT, Service, make_certificate

API_KEY = "rough-edges-key"
KEY = {"X-API-Key": API_KEY}
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+\[\d+\]: ")


@pytest.fixture(scope="module")
def logged(tmp_path_factory, r18_checkpoint):
    """The service with an API key, its output in a file (text format, info level)."""
    log_path = tmp_path_factory.mktemp("logs") / "service.log"
    args = [*FAST_ARGS, "--model", f"bisenetv1_r18={r18_checkpoint}", "--api-key", API_KEY, "--log-level", "info"]
    svc = Service(args, log_path=log_path)
    svc.log_path = log_path
    try:
        yield svc.wait_ready()
    finally:
        svc.stop()


def png_bytes(photo: np.ndarray, size=(96, 64)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(photo).resize(size).save(buf, format="PNG")
    return buf.getvalue()


# -- logs and warming ------------------------------------------------------------------------------
def test_one_text_format_for_uvicorn_the_service_and_the_worker_and_no_warming_with_none(logged):
    lines = logged.log_path.read_text().splitlines()
    assert lines and all(TEXT_LINE.match(line) for line in lines), [ln for ln in lines if not TEXT_LINE.match(ln)]
    text = "\n".join(lines)
    assert "INFO uvicorn.error[" in text and "Uvicorn running on" in text  # uvicorn's own lines, our format
    assert re.search(r"INFO service\.worker\[\d+\]: load: model bisenetv1_r18 \(.*r18\.pth\) on cpu in \d", text)
    assert "warm: model bisenetv1_r18 skipped (--warm-shapes none)" in text
    assert re.search(r"ready: bisenetv1_r18 on cpu, [\d.]+s after start", text)


def test_cpu_warms_one_batch_size_and_cuda_captures_every_bucket():
    assert warm_buckets((1, 2, 4, 8), cuda_graphs=False) == (1,)
    assert warm_buckets((1, 2, 4, 8), cuda_graphs=True) == (1, 2, 4, 8)


# -- errors: documented, in OpenAPI, with clear messages -------------------------------------------
def readme_error_rows() -> dict[str, tuple[str, str]]:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Errors", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[1].startswith("`"):
            rows[cells[1].strip("`")] = (cells[0], cells[3].strip("`"))
    return rows


def test_every_error_code_is_in_the_readme_table_and_the_openapi_responses(logged):
    rows = readme_error_rows()
    openapi = httpx.get(f"{logged.url}/openapi.json", timeout=10).json()
    responses = openapi["paths"]["/segment"]["post"]["responses"]
    for code, (http_status, grpc_status, _) in CODES.items():
        assert code in rows, f"README's error table lacks {code}"
        assert rows[code] == (str(http_status), grpc_status), code
        examples = responses[str(http_status)]["content"]["application/json"]["examples"]
        assert examples[code]["value"]["error"]["code"] == code
    assert set(rows) <= set(CODES), f"README lists codes the service never sends: {set(rows) - set(CODES)}"


def test_readme_says_what_the_code_does_for_x_model_and_queue_wait(logged, photo):
    readme = (ROOT / "README.md").read_text()
    assert "Every successful response carries `X-Model`" in readme
    queue_row = next(line for line in readme.splitlines() if line.startswith("| `seg_queue_wait_seconds`"))
    assert "submission to a worker" in queue_row
    ok = httpx.post(f"{logged.url}/segment", content=png_bytes(photo), headers={**KEY, "Content-Type": "image/png"})
    refused = httpx.post(f"{logged.url}/segment?model=nope", content=b"x", headers={**KEY, "Content-Type": "image/png"})
    assert ok.status_code == 200 and ok.headers["x-model"] == "bisenetv1_r18"
    assert refused.status_code == 404 and "x-model" not in refused.headers


@pytest.mark.parametrize(
    "body",
    [b"hello, not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "truncated"],
    ids=["text", "png-signature-only", "truncated-png"],
)
def test_decode_errors_name_the_problem_not_python_objects(logged, photo, body):
    if body == "truncated":
        whole = png_bytes(photo)
        body = whole[: len(whole) // 2]
    r = httpx.post(f"{logged.url}/segment", content=body, headers={**KEY, "Content-Type": "image/png"}, timeout=60)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert message.startswith("cannot decode image: ")
    assert not re.search(r"0x[0-9a-f]{6,}|<[\w.]+ object|_io\.", message), message


def test_malformed_multipart_and_wrong_methods_answer_documented_codes(logged):
    r = httpx.post(
        f"{logged.url}/segment",
        content=b"no boundary anywhere--",
        headers={**KEY, "Content-Type": "multipart/form-data; boundary=xx"},
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "bad_request", r.text
    assert r.json()["error"]["message"].startswith("malformed multipart body")
    r = httpx.put(f"{logged.url}/segment", headers=KEY)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


# -- TLS files -------------------------------------------------------------------------------------
def serve_fails_at_start(args: list[str]) -> str:
    """Runs `python -m service ARGS`, which must stop with exit code 2 and one line on stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "service", "--device", "cpu", "--http-port", "0", "--grpc-port", "0", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_tls_files_are_checked_at_start_with_a_one_line_error(tmp_path):
    cert, key = make_certificate(tmp_path, "a")
    other_cert, other_key = make_certificate(tmp_path, "b")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    line = serve_fails_at_start(["--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", key])
    assert "--tls-cert" in line and "missing.pem" in line and "no such file" in line
    line = serve_fails_at_start(["--tls-cert", cert, "--tls-key", str(garbage)])
    assert "garbage.pem" in line and "PEM" in line
    line = serve_fails_at_start(["--tls-cert", cert, "--tls-key", other_key])
    assert "mismatch" in line


# -- the API key -----------------------------------------------------------------------------------
def test_key_matches_compares_in_constant_time(monkeypatch):
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    assert key_matches("secret", "secret") and not key_matches("secret", "secreT")
    assert not key_matches("secret", "sécret") and not key_matches("secret", None)
    assert len(calls) == 3 and all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in calls)


def test_wrong_or_non_ascii_keys_get_401_on_both_protocols(logged, photo):
    body = png_bytes(photo)
    url = f"{logged.url}/segment"
    for headers in ({"X-API-Key": "wrong"}, {"X-API-Key": "clé".encode()}, {"Authorization": "Bearer wrong"}, {}):
        r = httpx.post(url, content=body, headers={**headers, "Content-Type": "image/png"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", (headers, r.text)
    assert httpx.post(url, content=body, headers={**KEY, "Content-Type": "image/png"}).status_code == 200
    from service.proto import segmentation_pb2 as pb
    from service.proto import segmentation_pb2_grpc as pb_grpc

    with grpc.insecure_channel(logged.grpc_target) as channel:
        stub = pb_grpc.SegmentationStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Segment(pb.SegmentRequest(encoded=body), metadata=[("x-api-key", "wrong")], timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.Segment(pb.SegmentRequest(encoded=body), metadata=[("x-api-key", API_KEY)], timeout=60)
        assert (ok.height, ok.width) == (64, 96)


# -- oversized headers -----------------------------------------------------------------------------
@pytest.mark.parametrize("size", [40_000, 300_000])
def test_request_headers_over_the_limit_get_431(logged, size):
    r = httpx.get(f"{logged.url}/healthz", headers={"X-Padding": "a" * size}, timeout=30)
    assert r.status_code == 431, r.text
    assert r.json()["error"]["code"] == "headers_too_large"
    assert httpx.get(f"{logged.url}/healthz", headers={"X-Padding": "a" * 1000}, timeout=10).status_code == 200


def test_a_header_that_never_ends_gets_431_without_growing_the_server(logged):
    """llhttp buffers a header until its line ends: the front end cuts it off at the limit."""
    host, port = logged.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        answer = b""
        with contextlib.suppress(OSError):  # the server may close while we still send
            for _ in range(64):  # up to 1 MiB of one header value, never ended
                sock.sendall(b"a" * 16384)
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert b"headers_too_large" in answer
    assert httpx.get(f"{logged.url}/healthz", timeout=10).status_code == 200


# -- early errors after the body is read: urllib sends it all before reading the answer --------------
@pytest.mark.parametrize(
    "path, headers, status",
    [
        ("/segment?model=no-such-model", {**KEY, "Content-Type": "image/png"}, 404),
        ("/segment", {"X-API-Key": "wrong", "Content-Type": "image/png"}, 401),
        ("/segment", {**KEY, "Content-Type": "text/plain"}, 415),
        ("/segment?format=gif", {**KEY, "Content-Type": "image/png"}, 422),
    ],
    ids=["unknown-model", "wrong-key", "wrong-type", "bad-parameter"],
)
def test_urllib_sees_early_errors_after_posting_a_large_body(logged, path, headers, status):
    body = os.urandom(3 * 1024 * 1024)
    for _ in range(6):  # the broken pipe this guards against was intermittent
        request = urllib.request.Request(f"{logged.url}{path}", data=body, headers=headers, method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=60)
        assert err.value.code == status
        assert "code" in json.loads(err.value.read())["error"]


# -- gRPC messages that are not protobuf -----------------------------------------------------------
BAD_PROTOBUF = b"\xff\xff\xff\xff\x0f"  # field 0x1fffffff... with wire type 7: no such wire type


def test_undecodable_grpc_messages_get_invalid_argument_with_a_message(logged):
    metadata = [("x-api-key", API_KEY)]
    with grpc.insecure_channel(logged.grpc_target) as channel:
        for method in ("Segment", "ListModels"):
            call = channel.unary_unary(f"/bisenet.v1.Segmentation/{method}")  # bytes in, bytes out
            with pytest.raises(grpc.RpcError) as err:
                call(BAD_PROTOBUF, metadata=metadata, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.value)
            assert "not a valid bisenet.v1." in err.value.details()
        stream = channel.stream_stream("/bisenet.v1.Segmentation/StreamSegment")
        with pytest.raises(grpc.RpcError) as err:
            list(stream(iter([BAD_PROTOBUF]), metadata=metadata, timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid bisenet.v1.SegmentRequest" in err.value.details()
        # and the service goes on serving
        assert httpx.get(f"{logged.url}/readyz", timeout=10).status_code == 200
