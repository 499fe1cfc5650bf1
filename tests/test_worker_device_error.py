"""A CUDA error that poisons the context ends the worker, which the supervisor restarts, with the
reason in seg_worker_restarts_total; a failed capture is counted and served eagerly.

There is no GPU here, so a sitecustomize hook stands in for the driver: in the spawned worker, the
first batch after the flag file appears raises the message PyTorch gives for an illegal address
(and removes the flag, so the restarted worker runs normally). The worker's reaction is real.
"""

from __future__ import annotations

import io
import os

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.servicekit import FAST_ARGS, Service, metric_value, wait_for

POISON_HOOK = """\
import os
import sys

_flag = os.environ.get("BISENET_TEST_POISON_FLAG")
if _flag and sys.argv[-1:] == ["--multiprocessing-fork"]:
    from model import runtime

    _run = runtime.SegmentationEngine.run_device

    def run_device(self, images, *args, **kwargs):
        try:
            os.unlink(_flag)
        except FileNotFoundError:
            return _run(self, images, *args, **kwargs)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    runtime.SegmentationEngine.run_device = run_device
"""


@pytest.fixture(scope="module")
def body():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (48, 96, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def post(service: Service, body: bytes) -> httpx.Response:
    return httpx.post(f"{service.url}/segment", content=body, headers={"Content-Type": "image/png"}, timeout=120)


def test_poisoned_context_restarts_the_worker_with_a_reason(tmp_path, body):
    (tmp_path / "sitecustomize.py").write_text(POISON_HOOK)
    flag = tmp_path / "poison"
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    env = {"PYTHONPATH": path, "BISENET_TEST_POISON_FLAG": str(flag)}
    service = Service([*FAST_ARGS, "--model", "bisenetv1_r18=random", "--max-batch", "1"], env=env).wait_ready()
    try:
        assert post(service, body).status_code == 200
        (old_worker,) = service.worker_pids()
        flag.touch()
        r = post(service, body)
        assert r.status_code == 503 and r.json()["error"]["code"] == "worker_restarting", r.text
        assert not flag.exists()
        wait_for(lambda: httpx.get(f"{service.url}/readyz", timeout=10).status_code == 200, "the restart", timeout=120)
        assert service.worker_pids() != [old_worker]
        text = service.metrics()
        assert metric_value(text, "seg_worker_restarts_total", device="cpu", reason="illegal_address") == 1
        assert metric_value(text, "seg_worker_restarts_total", device="cpu", reason="crashed") == 0
        assert post(service, body).status_code == 200  # the fresh worker serves again
    finally:
        service.stop()
