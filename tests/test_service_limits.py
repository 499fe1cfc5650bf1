"""The shared-memory budget for frames in flight (--shm-bytes), through the real service.

The budget is the smallest allowed (1 MiB): two 320x480 frames (460,800 bytes each, 512 KiB slots).
The worker is held with SIGSTOP where a test needs frames to stay in flight, so nothing depends on
how fast this machine computes.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.servicekit import FAST_ARGS, Service, metric_value, service_metric, sigstop, wait_for

SHM_BYTES = 1 << 20  # the smallest --shm-bytes
SLOT = 512 * 1024  # what one 320x480 RGB frame takes (slots are 64 KiB-aligned)


@pytest.fixture(scope="module")
def service(r18_checkpoint):
    svc = Service(
        [
            *FAST_ARGS,
            "--model",
            f"bisenetv1_r18={r18_checkpoint}",
            "--shm-bytes",
            str(SHM_BYTES),
            "--max-batch",
            "1",
            "--max-queue",
            "16",
        ]
    )
    try:
        yield svc.wait_ready()
    finally:
        for pid in svc.worker_pids():  # a failed test may have left it stopped
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        svc.stop()


def encode(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def frames(photo) -> dict[str, bytes]:
    """PNG frames of three sizes: two fill the budget, sixteen small ones would."""
    img = Image.fromarray(photo)
    return {
        "large": encode(np.asarray(img.resize((480, 320)))),  # 512 KiB slot
        "medium": encode(np.asarray(img.resize((256, 160)))),  # 128 KiB slot
        "small": encode(np.asarray(img.resize((96, 64)))),  # 64 KiB slot
    }


def post(service, body: bytes) -> httpx.Response:
    return httpx.post(f"{service.url}/segment", content=body, headers={"Content-Type": "image/png"}, timeout=180)


def assert_refused_for_memory(r: httpx.Response) -> None:
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "queue_full" and int(r.headers["retry-after"]) >= 1


def test_frames_over_the_budget_are_refused_with_429_until_memory_frees(service, frames):
    before = service_metric(service, "seg_requests_rejected_total", reason="queue_full")
    (worker,) = service.worker_pids()
    sigstop(worker)  # the frames sent stay in their slots
    with ThreadPoolExecutor(2) as pool:
        try:
            held = []
            for n in (1, 2):
                held.append(pool.submit(post, service, frames["large"]))
                wait_for(lambda n=n: service_metric(service, "seg_shm_slots_in_use") == n)
            assert service_metric(service, "seg_shm_bytes") == SHM_BYTES
            assert service_metric(service, "seg_queue_depth") == 2  # the queue (16) has room: memory is what is short
            assert_refused_for_memory(post(service, frames["large"]))
            assert_refused_for_memory(post(service, frames["small"]))  # no room for any frame
        finally:
            os.kill(worker, signal.SIGCONT)
        assert [f.result().status_code for f in held] == [200, 200]
    assert service_metric(service, "seg_requests_rejected_total", reason="queue_full") - before == 2
    assert service_metric(service, "seg_shm_slots_in_use") == 0
    for size in ("large", "small", "large"):  # freed slots are reused, or unlinked to make room
        assert post(service, frames[size]).status_code == 200
    assert service_metric(service, "seg_shm_bytes") <= SHM_BYTES


def test_frame_larger_than_the_whole_budget_is_too_large_not_retryable(service, photo):
    big = encode(np.asarray(Image.fromarray(photo).resize((640, 640))))  # 1,228,800 bytes of pixels
    r = post(service, big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large", r.text
    assert "retry-after" not in r.headers
    assert service_metric(service, "seg_shm_slots_in_use") == 0


def test_concurrent_mixed_sizes_leak_no_slot_and_keep_labels_apart(service, frames):
    expected = {}
    for size, body in frames.items():  # one at a time, each answered with its own labels
        r = post(service, body)
        assert r.status_code == 200
        expected[size] = np.asarray(Image.open(io.BytesIO(r.content)))
    before = service_metric(service, "seg_requests_rejected_total", reason="queue_full")
    sizes = ["large", "medium", "small"] * 6
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda size: post(service, frames[size]), sizes))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429} and 200 in codes, codes
    for size, r in zip(sizes, responses):
        if r.status_code == 200:
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), expected[size])
        else:
            assert_refused_for_memory(r)
    text = httpx.get(f"{service.url}/metrics", timeout=10).text
    assert metric_value(text, "seg_requests_rejected_total", reason="queue_full") - before == codes.count(429)
    assert metric_value(text, "seg_shm_slots_in_use") == 0 and metric_value(text, "seg_queue_depth") == 0
    assert metric_value(text, "seg_shm_bytes") <= SHM_BYTES
    assert post(service, frames["large"]).status_code == 200


def test_a_budget_larger_than_dev_shm_is_cut_to_what_it_holds(monkeypatch, caplog):
    """Writing past a full tmpfs kills the writer with SIGBUS (a container's /dev/shm is 64 MB by
    default), so the service never trusts --shm-bytes beyond what /dev/shm has free."""
    from service.worker import shm

    class SixtyFourMegabytes:
        f_bavail, f_frsize = 16384, 4096

    assert shm.usable_shm_bytes(1 << 20) == 1 << 20  # this machine's /dev/shm holds 1 MiB
    monkeypatch.setattr(shm.os, "statvfs", lambda root: SixtyFourMegabytes())
    with caplog.at_level("WARNING", logger="service.shm"):
        usable = shm.usable_shm_bytes(1 << 30)
    assert usable == int((64 << 20) * shm.SHM_HEADROOM)
    assert "less than --shm-bytes (1024 MiB)" in caplog.text and "--shm-size" in caplog.text
    assert shm.usable_shm_bytes(32 << 20) == 32 << 20  # a budget it can hold is kept


def test_the_service_starts_with_a_budget_dev_shm_cannot_hold(tmp_path, r18_checkpoint, photo):
    log_path = tmp_path / "service.log"
    svc = Service(
        [*FAST_ARGS, "--model", f"bisenetv1_r18={r18_checkpoint}", "--shm-bytes", str(1 << 60)], log_path=log_path
    )
    try:
        svc.wait_ready()
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(photo[:64, :96])).save(buf, format="PNG")
        r = httpx.post(f"{svc.url}/segment", content=buf.getvalue(), headers={"Content-Type": "image/png"}, timeout=120)
        assert r.status_code == 200, r.text
    finally:
        svc.stop()
    assert "less than --shm-bytes" in log_path.read_text()
