"""Start-up errors, readiness, overload, worker crash and SIGTERM draining, with real processes.

The tests share one slow-ish service (bigger resize, batch 1, queue of 3) and run in file order:
not ready -> queue full -> worker killed -> drained by SIGTERM.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from tests.servicekit import ROOT, Service, free_port, metric_value

ARGS = [
    "--device",
    "cpu",
    "--warm-shapes",
    "none",
    "--resize-scale",
    "1024x512",
    "--max-batch",
    "1",
    "--max-queue",
    "3",
    "--drain-seconds",
    "60",
    "--log-level",
    "warning",
]


def run_service(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service", "--host", "127.0.0.1", "--http-port", str(free_port()), *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- start-up errors: the process exits at once with a clear message ------------------------------
def test_unknown_model_from_environment():
    run = run_service(env={"BISENET_MODELS": "bisenetv1_r101"})
    assert run.returncode == 2 and "unknown model 'bisenetv1_r101'" in run.stderr


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("BISENET_MAX_BATCH", "many", "bad --max-batch (BISENET_MAX_BATCH)"),
        ("BISENET_WARM_SHAPES", "1024by2048", "bad shape"),
        ("BISENET_DEVICE", "tpu", "bad --device"),
        ("BISENET_TARGET_FPS", "0", "must be at least"),
    ],
)
def test_malformed_settings(var, value, message):
    run = run_service("--model", "bisenetv1_r18=random", env={var: value})
    assert run.returncode == 2 and message in run.stderr, run.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_requested_without_gpu():
    run = run_service("--model", "bisenetv1_r18=random", "--device", "cuda")
    assert run.returncode == 2 and "0 CUDA device" in run.stderr


def test_weights_download_failure_names_file_source_and_mirror(tmp_path):
    mirror = f"http://127.0.0.1:{free_port()}/weights"  # nothing listens there
    run = run_service(
        "--model", "bisenetv1_r18", env={"BISENET_CACHE_DIR": str(tmp_path), "BISENET_WEIGHTS_MIRROR": mirror}
    )
    assert run.returncode == 2
    assert "bisenetv1_r18-d32_in1k-pre_4x8_1024x1024_160k_cityscapes_20210905_220322-bb8db75f.pth" in run.stderr
    assert mirror in run.stderr and "BISENET_WEIGHTS_MIRROR" in run.stderr
    assert not list(tmp_path.iterdir())  # nothing half-written in the cache


# -- one running service through its life ----------------------------------------------------------
@pytest.fixture(scope="module")
def service(r18_checkpoint):
    svc = Service([*ARGS, "--model", f"bisenetv1_r18={r18_checkpoint}"])
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def body():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 128, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def post(service, body, **kw) -> httpx.Response:
    return httpx.post(f"{service.url}/segment", content=body, headers={"Content-Type": "image/png"}, timeout=180, **kw)


def concurrently(service, body, n: int) -> list[httpx.Response]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: post(service, body), range(n)))


def wait_for(predicate, timeout: float = 60.0, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(every)


def test_not_ready_while_loading(service, body):
    wait_for(lambda: _answers(service))
    if httpx.get(f"{service.url}/readyz").status_code == 503:  # still loading the model
        r = post(service, body)
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready" and r.headers["retry-after"]
    service.wait_ready()
    assert post(service, body).status_code == 200


def _answers(service) -> bool:
    try:
        return httpx.get(f"{service.url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_full_queue_gets_429_with_retry_after(service, body):
    responses = concurrently(service, body, 10)
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 429} and codes.count(200) >= 3, codes
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.json()["error"]["code"] == "queue_full" and int(rejected.headers["retry-after"]) >= 1
    assert metric_value(service.metrics(), "seg_requests_rejected_total", reason="queue_full") >= 1
    assert post(service, body).status_code == 200


def test_worker_killed_under_load(service, body):
    (worker,) = service.worker_pids()
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(post, service, body) for _ in range(3)]
        wait_for(lambda: metric_value(service.metrics(), "seg_queue_depth") >= 3)
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: httpx.get(f"{service.url}/readyz").status_code == 503, timeout=10, every=0.01)
        assert httpx.get(f"{service.url}/healthz").status_code == 200  # the front end stays up
        responses = [f.result() for f in futures]
    codes = sorted(r.status_code for r in responses)
    # The request being computed fails retryably; those still queued are re-sent to the new worker.
    assert codes.count(200) >= 2 and set(codes) <= {200, 503}, codes
    for r in responses:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "worker_restarting" and r.headers["retry-after"]
    service.wait_ready(60)
    assert service.worker_pids() and service.worker_pids() != [worker]
    assert post(service, body).status_code == 200
    text = service.metrics()
    assert metric_value(text, "seg_worker_restarts_total") == 1
    assert metric_value(text, "seg_shm_slots_in_use") == 0 and metric_value(text, "seg_queue_depth") == 0


def test_sigterm_finishes_in_flight_then_exits(service, body):
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(post, service, body) for _ in range(3)]
        wait_for(lambda: metric_value(service.metrics(), "seg_queue_depth") >= 3)
        service.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(f"{service.url}/readyz").status_code == 503, timeout=10, every=0.01)
        late = post(service, body)
        assert late.status_code == 503 and late.json()["error"]["code"] == "not_ready"
        assert [f.result().status_code for f in futures] == [200, 200, 200]
    assert service.proc.wait(60) == 0


def test_missing_weights_file():
    run = run_service("--model", "bisenetv1_r18=/nonexistent/r18.pth")
    assert run.returncode == 2 and "/nonexistent/r18.pth does not exist" in run.stderr


def test_restart_that_fails_is_retried_until_it_works(r18_checkpoint, tmp_path, body):
    """A worker that dies and cannot come back (its weights vanished) is retried with back-off;
    the front end stays up, and the service is ready again once the file is back."""
    weights = tmp_path / "r18.pth"
    weights.write_bytes(open(r18_checkpoint, "rb").read())
    svc = Service([*ARGS, "--model", f"bisenetv1_r18={weights}"]).wait_ready()
    try:
        (worker,) = svc.worker_pids()
        weights.rename(tmp_path / "moved.pth")
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: metric_value(svc.metrics(), "seg_worker_restarts_total") >= 2, timeout=120, every=0.5)
        assert httpx.get(f"{svc.url}/readyz").status_code == 503 and _answers(svc)
        (tmp_path / "moved.pth").rename(weights)
        svc.wait_ready(120)
        assert post(svc, body).status_code == 200
    finally:
        svc.stop()
