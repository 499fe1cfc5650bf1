"""The worker process driven directly over its pipe, as the front end's link drives it."""

from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np
import pytest

from service.worker.process import WorkerConfig, run_worker
from service.worker.scheduler import Job
from service.worker.shm import SlotPool

HEIGHT, WIDTH = 64, 128


@pytest.fixture(scope="module")
def worker():
    """A real CPU worker (R18, random weights) that runs one request per batch at once."""
    config = WorkerConfig(
        device="cpu",
        models=(("bisenetv1_r18", "random"),),
        dtype="auto",
        buckets=(1,),
        max_batch=1,
        max_delay=0.0,
        budget=1.0,
        warm_shapes=(),
        resize_scale=(WIDTH, HEIGHT),
        cpu_threads=1,
    )
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=run_worker, args=(child, config), daemon=True)
    process.start()
    child.close()
    pool = SlotPool(64 << 20)
    try:
        assert receive(parent, "ready", timeout=120)[0] == "ready"
        yield parent, pool
    finally:
        parent.send(("stop",))
        process.join(30)
        if process.is_alive():
            process.kill()
        pool.close()


def receive(conn, *kinds: str, timeout: float = 60) -> tuple:
    """The next message of one of `kinds` (stats and the like are skipped)."""
    deadline = time.monotonic() + timeout
    while conn.poll(max(0.0, deadline - time.monotonic())):
        msg = conn.recv()
        if msg[0] in kinds:
            return msg
    raise TimeoutError(f"no {kinds} message within {timeout} s")


def test_a_batch_is_answered_before_the_next_one_runs(worker):
    """On the CPU a batch is done when it has run: its answer must not wait for the batch after it
    (which would add a whole batch to every request's latency under load)."""
    conn, pool = worker
    rng = np.random.default_rng(0)
    slots = []
    for job_id in (1, 2, 3):
        slot = pool.acquire(HEIGHT * WIDTH * 3)
        slot.write_image(rng.integers(0, 256, (HEIGHT, WIDTH, 3), np.uint8))
        slots.append(slot)
    now = time.monotonic()
    for job_id, slot in zip((1, 2, 3), slots, strict=True):
        conn.send(("submit", Job(job_id, "bisenetv1_r18", slot.name, HEIGHT, WIDTH, None, now)))
    events = []
    while sum(kind == "done" for kind, _ in events) < 3:
        kind, ids, *_ = receive(conn, "running", "done", "failed")
        assert kind != "failed", ids
        events += [(kind, job_id) for job_id in ids]
    assert events == [("running", 1), ("done", 1), ("running", 2), ("done", 2), ("running", 3), ("done", 3)]
    labels = slots[0].read_labels(HEIGHT, WIDTH)
    assert labels.shape == (HEIGHT, WIDTH) and labels.max() < 19
