"""Start-up errors, readiness, overload, worker crash and SIGTERM draining, with real processes.

The tests share one slow-ish service (bigger resize, batch 1, queue of 3) and run in file order:
not ready -> queue full -> deadline passed in the worker -> worker killed -> drained by SIGTERM.
Nothing waits for a race to go one way: the worker (or the front end) is held with SIGSTOP at the
point a test needs, what each process has done is read from /proc (its state, its write() calls),
and a small sitecustomize hook makes the next spawned worker stop itself before it loads anything.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from tests.servicekit import (
    ROOT,
    Service,
    free_port,
    metric_value,
    proc_state,
    service_command,
    service_metric,
    sigstop,
    wait_for,
)

ARGS = [
    "--device",
    "cpu",
    "--cpu-threads",
    "2",
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


RESTART_BACKOFF = (0.5, 1, 2)  # the first delays of service/worker/link.py RESTART_BACKOFF


def run_service(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        service_command(free_port(), free_port(), list(args)),
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


# -- holding processes where a test needs them -------------------------------------------------------
# Put first on PYTHONPATH of the service: in a spawned worker (argv ends with --multiprocessing-fork),
# if the flag file exists, remove it and stop this process before anything else runs. One flag, one hold.
HOLD_HOOK = """\
import os
import signal
import sys

_flag = os.environ.get("BISENET_TEST_HOLD_WORKER")
if _flag and sys.argv[-1:] == ["--multiprocessing-fork"]:
    try:
        os.unlink(_flag)
    except FileNotFoundError:
        pass
    else:
        os.kill(os.getpid(), signal.SIGSTOP)
"""


def hold_env(flag: Path) -> dict:
    """Environment for a Service whose next spawned worker stops itself at start while `flag` exists."""
    (flag.parent / "sitecustomize.py").write_text(HOLD_HOOK)
    path = os.pathsep.join(filter(None, [str(flag.parent), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, "BISENET_TEST_HOLD_WORKER": str(flag)}


def proc_io(pid: int) -> dict[str, int]:
    """/proc/PID/io: syscw counts write() calls, wchar their bytes; a worker writes each message to
    the front end with one write() (Connection.send joins header and payload for small messages)."""
    lines = Path(f"/proc/{pid}/io").read_text().splitlines()
    return {k: int(v) for k, v in (line.split(":") for line in lines)}


def message_bytes(*msg) -> set[int]:
    """What one worker -> front-end message costs in wchar, for job ids of any width."""
    return {4 + len(ForkingPickler.dumps(tuple(m if m != "ID" else [i] for m in msg))) for i in (1, 300, 70000)}


def wait_quiet(pid: int, quiet: float = 0.3, timeout: float = 30.0) -> dict[str, int]:
    """Wait until the process has made no write() for `quiet` seconds; its /proc/PID/io then."""
    io_now, since = proc_io(pid), time.monotonic()
    deadline = since + timeout
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, "the process never went quiet"
        time.sleep(0.02)
        latest = proc_io(pid)
        if latest["syscw"] != io_now["syscw"]:
            io_now, since = latest, time.monotonic()
    return io_now


def hold_worker_mid_request(service, worker: int, pool: ThreadPoolExecutor, body: bytes, attempts: int = 5):
    """Send one request to the idle worker and SIGSTOP the worker while it computes it: after its first
    write (the "running" message, which marks the request as running in the front end) and before
    "done". Returns the response future and the worker's /proc/PID/io when stopped."""
    running = message_bytes("running", "ID")
    for _ in range(attempts):
        idle = wait_quiet(worker)
        future = pool.submit(post, service, body)
        deadline = time.monotonic() + 60
        while proc_io(worker)["syscw"] == idle["syscw"]:
            assert time.monotonic() < deadline and not future.done(), "the worker never started the request"
            time.sleep(0.002)
        sigstop(worker)
        held = proc_io(worker)
        if held["syscw"] == idle["syscw"] + 1 and held["wchar"] - idle["wchar"] in running:
            return future, held
        os.kill(worker, signal.SIGCONT)  # it finished before the stop landed: let it answer, try again
        assert future.result().status_code == 200
    raise AssertionError(f"could not stop the worker mid-request in {attempts} attempts")


# -- one running service through its life ----------------------------------------------------------
@pytest.fixture(scope="module")
def hold(tmp_path_factory) -> Path:
    """The flag file of the hold hook; touch it to hold the next worker the service spawns."""
    return tmp_path_factory.mktemp("hold") / "hold-next-worker"


@pytest.fixture(scope="module")
def started(r18_checkpoint, hold):
    """The shared service as started: its first worker is held before loading (see hold_env)."""
    hold.touch()
    svc = Service([*ARGS, "--model", f"bisenetv1_r18={r18_checkpoint}"], env=hold_env(hold))
    yield svc
    hold.unlink(missing_ok=True)
    release(svc)
    svc.stop()


@pytest.fixture
def service(started):
    """The shared service, ready: a worker still held (test_not_ready_while_loading deselected, or a
    failed test) is let go first."""
    deadline = time.monotonic() + 180
    while not _ready(started):  # a held worker may not have stopped itself yet: keep letting go
        assert started.proc.poll() is None and time.monotonic() < deadline, "the service never became ready"
        release(started)
        time.sleep(0.2)
    return started


def release(service) -> None:
    if service.proc.poll() is not None:
        return
    for pid in [service.proc.pid, *service.worker_pids()]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def body():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 128, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def post(service, body, **kw) -> httpx.Response:
    return httpx.post(f"{service.url}/segment", content=body, headers={"Content-Type": "image/png"}, timeout=180, **kw)


def measured_seconds(service, body: bytes) -> float:
    """Run the `body` image (64x128) once; the service's latency estimate for it, measured."""
    assert post(service, body).status_code == 200
    (info,) = httpx.get(f"{service.url}/models", timeout=30).json()["models"]
    measured = info["latency_estimates"]["measured"]
    (row,) = [r for r in measured if (r["tta"], r["height"], r["width"]) == ("none", 64, 128)]
    return row["ms"] / 1000


def submit_and_wait_in_slots(service, pool: ThreadPoolExecutor, body: bytes, n: int, **kw) -> list:
    """Send `n` requests one after another, each once the previous one has been handed to the worker
    (the slots gauge is set when a request is sent to the worker, so it counts those sent)."""
    futures = []
    start = service_metric(service, "seg_shm_slots_in_use")
    for i in range(1, n + 1):
        futures.append(pool.submit(post, service, body, **kw))
        wait_for(lambda i=i: service_metric(service, "seg_shm_slots_in_use") == start + i, timeout=30)
    return futures


def held_worker(service) -> int:
    """The worker the hold hook stopped (waits for it to be spawned and stopped)."""
    found = []

    def stopped():
        found[:] = [pid for pid in service.worker_pids() if proc_state(pid) == "T"]
        return bool(found)

    wait_for(stopped, timeout=120)
    return found[0]


def test_not_ready_while_loading(started, body, hold):
    service = started
    worker = held_worker(service)  # stopped before it loaded anything; nothing below can race with it
    assert not hold.exists()
    wait_for(lambda: _answers(service))
    ready = httpx.get(f"{service.url}/readyz")
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
    r = post(service, body)
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready", r.text
    assert int(r.headers["retry-after"]) >= 1
    assert httpx.get(f"{service.url}/healthz").status_code == 200
    assert service_metric(service, "seg_ready") == 0
    assert proc_state(worker) == "T"
    os.kill(worker, signal.SIGCONT)
    service.wait_ready()
    assert service.worker_pids() == [worker]
    assert post(service, body).status_code == 200
    assert service_metric(service, "seg_ready") == 1


def _ready(service) -> bool:
    try:
        return httpx.get(f"{service.url}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _answers(service) -> bool:
    try:
        return httpx.get(f"{service.url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_cpu_worker_openmp_threads_sleep_instead_of_spinning(service):
    (worker,) = service.worker_pids()
    environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
    assert b"OMP_WAIT_POLICY=PASSIVE" in environ
    # --cpu-threads 2: what OpenMP and MKL start every engine thread from
    assert b"OMP_NUM_THREADS=2" in environ and b"MKL_NUM_THREADS=2" in environ


def test_full_queue_gets_429_with_retry_after(service, body):
    before = service_metric(service, "seg_requests_rejected_total", reason="queue_full")
    (worker,) = service.worker_pids()
    sigstop(worker)  # nothing is answered while the queue fills
    with ThreadPoolExecutor(3) as pool:
        try:
            admitted = submit_and_wait_in_slots(service, pool, body, 3)  # --max-queue 3
            assert service_metric(service, "seg_queue_depth") == 3
            rejected = post(service, body)
            assert rejected.status_code == 429, rejected.text
            assert rejected.json()["error"]["code"] == "queue_full" and int(rejected.headers["retry-after"]) >= 1
        finally:
            os.kill(worker, signal.SIGCONT)
        assert [f.result().status_code for f in admitted] == [200, 200, 200]
    assert service_metric(service, "seg_requests_rejected_total", reason="queue_full") - before == 1
    assert post(service, body).status_code == 200


def test_deadline_passing_in_the_worker_queue_is_not_computed(service, body):
    """A request whose deadline passes while it waits in the worker behind another one is expired by
    the worker (504) without being computed. The front end is held (SIGSTOP) from before the deadline
    until the worker has answered, so its own timeout cannot answer first or cancel the request."""
    (worker,) = service.worker_pids()
    front = service.proc.pid
    # Long enough that the front end, which refuses deadlines its latency estimates say cannot be
    # met, sends the request to the worker: 3 s, or more on a machine where one request takes seconds.
    deadline_s = max(3.0, 3 * measured_seconds(service, body))
    before = service.metrics()
    with ThreadPoolExecutor(2) as pool:
        try:
            first, held = hold_worker_mid_request(service, worker, pool, body)
            sent = time.monotonic()
            (late,) = submit_and_wait_in_slots(service, pool, body, 1, params={"deadline_ms": int(deadline_s * 1000)})
            queued = time.monotonic()  # the request was admitted before this: its deadline is earlier
            sigstop(front)
            assert time.monotonic() < sent + deadline_s, "the front end was not held before the deadline"
            time.sleep(max(0.0, queued + deadline_s + 0.1 - time.monotonic()))
            os.kill(worker, signal.SIGCONT)
            # The worker finishes the first request ("done"), sends its stats (the last are over a
            # second old), then finds the deadline passed: "expired". Three writes, front end still held.
            wait_for(lambda: proc_io(worker)["syscw"] >= held["syscw"] + 3, timeout=60, every=0.01)
        finally:
            os.kill(worker, signal.SIGCONT)
            os.kill(front, signal.SIGCONT)
        assert first.result().status_code == 200
        r = late.result()
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded", r.text
    # One more request: the worker runs one batch at a time, so once it is answered, anything the
    # worker had started before (the expired request, had it been computed) has been counted.
    assert post(service, body).status_code == 200
    after = service.metrics()

    def delta(name, **labels):
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    # Computed: the first request and the last, each a batch of one; never the expired one.
    assert delta("seg_batch_size_count") == 2 and delta("seg_batch_size_sum") == 2
    assert delta("seg_inference_seconds_count") == 2
    assert delta("seg_requests_rejected_total", reason="deadline") == 1
    assert metric_value(after, "seg_shm_slots_in_use") == 0 and metric_value(after, "seg_queue_depth") == 0


def test_worker_killed_under_load(service, body, hold):
    """The worker dies while computing one request with two more queued: the one it was computing
    gets a retryable 503, the queued ones are re-sent to the replacement and answered 200."""
    restarts = service_metric(service, "seg_worker_restarts_total")
    rejected = service_metric(service, "seg_requests_rejected_total", reason="worker_restarting")
    (worker,) = service.worker_pids()
    with ThreadPoolExecutor(3) as pool:
        try:
            running, _ = hold_worker_mid_request(service, worker, pool, body)
            queued = submit_and_wait_in_slots(service, pool, body, 2)
            hold.touch()  # the replacement stops itself at start, so the queued requests must wait for it
            os.kill(worker, signal.SIGKILL)
            r = running.result(timeout=30)  # answered as soon as the front end sees the death
            assert r.status_code == 503 and r.json()["error"]["code"] == "worker_restarting", r.text
            assert int(r.headers["retry-after"]) >= 1
            replacement = held_worker(service)
            assert replacement != worker
            assert httpx.get(f"{service.url}/readyz").status_code == 503
            assert httpx.get(f"{service.url}/healthz").status_code == 200  # the front end stays up
            assert not any(f.done() for f in queued)
        finally:
            hold.unlink(missing_ok=True)
            for pid in service.worker_pids():
                os.kill(pid, signal.SIGCONT)
        assert [f.result().status_code for f in queued] == [200, 200]
    service.wait_ready(60)
    assert service.worker_pids() == [replacement]
    assert post(service, body).status_code == 200
    text = service.metrics()
    assert metric_value(text, "seg_worker_restarts_total") - restarts == 1
    assert metric_value(text, "seg_requests_rejected_total", reason="worker_restarting") - rejected == 1
    assert metric_value(text, "seg_shm_slots_in_use") == 0 and metric_value(text, "seg_queue_depth") == 0


def test_sigterm_finishes_in_flight_then_exits(service, body):
    (worker,) = service.worker_pids()
    sigstop(worker)  # the three stay in flight until SIGTERM has been handled
    with ThreadPoolExecutor(3) as pool:
        try:
            futures = submit_and_wait_in_slots(service, pool, body, 3)
            service.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: httpx.get(f"{service.url}/readyz").status_code == 503, timeout=10, every=0.01)
            late = post(service, body)
            assert late.status_code == 503 and late.json()["error"]["code"] == "not_ready"
        finally:
            os.kill(worker, signal.SIGCONT)
        assert [f.result().status_code for f in futures] == [200, 200, 200]
    assert service.proc.wait(60) == 0


def test_missing_weights_file():
    run = run_service("--model", "bisenetv1_r18=/nonexistent/r18.pth")
    assert run.returncode == 2 and "/nonexistent/r18.pth does not exist" in run.stderr


def test_restart_that_fails_is_retried_until_it_works(r18_checkpoint, tmp_path, body):
    """A worker that dies and cannot come back (its weights vanished) is retried with back-off;
    the front end stays up, and the service is ready again once the file is back.

    Each worker process is watched from outside: between the last time one is seen alive and the
    first time its replacement is seen, at least the back-off delay (0.5 s, 1 s, 2 s, ...) passes.
    That lower bound needs no timing slack, and a busy restart loop cannot meet it."""
    weights = tmp_path / "r18.pth"
    weights.write_bytes(open(r18_checkpoint, "rb").read())
    svc = Service([*ARGS, "--model", f"bisenetv1_r18={weights}"]).wait_ready()
    try:
        (worker,) = svc.worker_pids()
        weights.rename(tmp_path / "moved.pth")
        seen: dict[int, list[float]] = {worker: [time.monotonic()] * 2}  # pid -> [first seen, last seen]
        order = [worker]
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while len(order) < 4:  # the killed worker and three restarts, the first two of which fail
            assert time.monotonic() < deadline, f"only {len(order) - 1} restarts seen"
            assert _answers(svc) and httpx.get(f"{svc.url}/readyz").status_code == 503
            now = time.monotonic()
            for pid in svc.worker_pids():  # live ones only: a dead worker is reaped at once
                if pid not in seen:
                    order.append(pid)
                    seen[pid] = [now, now]
                seen[pid][1] = now
            time.sleep(0.05)
        (tmp_path / "moved.pth").rename(weights)
        gaps = [seen[b][0] - seen[a][1] for a, b in zip(order, order[1:])]
        assert all(gap >= delay for gap, delay in zip(gaps, RESTART_BACKOFF)), gaps
        assert service_metric(svc, "seg_worker_restarts_total") >= 3  # the kill and two failed restarts
        svc.wait_ready(120)
        assert post(svc, body).status_code == 200
    finally:
        svc.stop()
