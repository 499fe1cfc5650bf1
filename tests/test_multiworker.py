"""Two worker processes behind one front end (`--device cpu,cpu`), with the real service: least-loaded
routing, gRPC streams sticky to one worker, and one worker killed while the other serves.

Routing is observed without timing: a worker held with SIGSTOP completes nothing, so whatever was
routed to it stays in flight (seg_shm_slots_in_use counts requests handed to a worker) while requests
routed to the running one are answered. The tests run in file order; the last one restarts a worker.
"""

from __future__ import annotations

import io
import os
import queue
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image

from service.proto import segmentation_pb2 as pb
from tests.servicekit import FAST_ARGS, Service, metric_value, proc_state, segmentation_stub, sigcont, sigstop, wait_for

H, W = 64, 128


@pytest.fixture(scope="module")
def service(r18_checkpoint):
    svc = Service([*FAST_ARGS, "--device", "cpu,cpu", "--model", f"bisenetv1_r18={r18_checkpoint}"])
    try:
        svc.wait_ready()
        yield svc
    finally:
        for pid in svc.worker_pids():  # never leave a worker stopped behind a failed test
            os.kill(pid, signal.SIGCONT)
        svc.stop()


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(8) as executor:
        yield executor


@pytest.fixture(scope="module")
def stub(service):
    with segmentation_stub(service.grpc_target) as stub:
        yield stub


@pytest.fixture(scope="module")
def frame(photo) -> np.ndarray:
    return np.asarray(Image.fromarray(photo).resize((W, H)))


@pytest.fixture(scope="module")
def body(frame) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


# -- helpers ---------------------------------------------------------------------------------------
def post(service, body: bytes, timeout: float = 120) -> httpx.Response:
    return httpx.post(
        f"{service.url}/segment?format=raw", content=body, headers={"Content-Type": "image/png"}, timeout=timeout
    )


def slots(service) -> float:
    return metric_value(service.metrics(), "seg_shm_slots_in_use")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def submit_held(service, pool, body: bytes, expected_slots: int) -> Future:
    """POST in the background and wait until the front end has handed it to a worker."""
    future = pool.submit(post, service, body)
    wait_for(lambda: slots(service) == expected_slots, f"{expected_slots} request(s) handed to workers")
    return future


def first_done(futures: list[Future], timeout: float = 60.0) -> int:
    wait_for(lambda: any(f.done() for f in futures), "a request to complete", timeout)
    return next(i for i, f in enumerate(futures) if f.done())


def one_request_each(service, pool, body: bytes, running: int, held: int) -> Future:
    """Both workers stopped, two requests: least-loaded routing gives one to each. Resuming `running`
    answers exactly one of them (the other stays in flight on `held`, still stopped); on return,
    `held` is stopped holding one request and `running` is idle."""
    assert slots(service) == 0
    sigstop(running, held)
    futures = [submit_held(service, pool, body, 1), submit_held(service, pool, body, 2)]
    sigcont(running)
    done = first_done(futures)
    response = futures[done].result()
    assert response.status_code == 200, response.text
    assert slots(service) == 1  # the other request is held by the stopped worker
    assert not futures[1 - done].done()
    return futures[1 - done]


# -- least-loaded routing --------------------------------------------------------------------------
def test_two_workers_are_started(service):
    pids = service.worker_pids()
    assert len(pids) == 2
    text = service.metrics()
    assert metric_value(text, "seg_ready") == 1 and metric_value(text, "seg_worker_restarts_total") == 0


def test_concurrent_load_reaches_both_workers(service, pool, body):
    """Concurrent REST requests until each worker has spent CPU on inference (bounded)."""
    pids = service.worker_pids()
    before = {pid: cpu_seconds(pid) for pid in pids}
    codes = []
    for _ in range(10):  # rounds of 4 concurrent requests, at most 40 requests
        codes += [r.status_code for r in pool.map(lambda _: post(service, body), range(4))]
        if all(cpu_seconds(pid) - before[pid] >= 0.05 for pid in pids):
            break
    assert set(codes) == {200}
    grown = {pid: round(cpu_seconds(pid) - before[pid], 3) for pid in pids}
    assert all(g >= 0.05 for g in grown.values()), f"worker CPU seconds during the load: {grown}"


@pytest.mark.parametrize("which", [0, 1])
def test_requests_go_to_the_less_loaded_worker(service, pool, body, which):
    """One worker held (stopped, one request in flight): every new request goes to the other one and
    is answered; the held request is answered once its worker resumes. Run with each worker as the
    held one, so neither 'always the first worker' nor round-robin could pass both."""
    pids = service.worker_pids()
    running, held = pids[which], pids[1 - which]
    try:
        waiting = one_request_each(service, pool, body, running, held)
        cpu = cpu_seconds(running)
        for _ in range(4):
            r = post(service, body, timeout=60)  # a request routed to the stopped worker would hang here
            assert r.status_code == 200, r.text
            assert np.frombuffer(r.content, np.uint8).size == H * W
        assert cpu_seconds(running) > cpu  # the running worker did the work
        assert slots(service) == 1 and not waiting.done() and proc_state(held) in ("T", "t")
    finally:
        sigcont(held)
    assert waiting.result(timeout=120).status_code == 200
    wait_for(lambda: slots(service) == 0, "slots to be given back")


# -- sticky streams --------------------------------------------------------------------------------
class StreamProbe:
    """A StreamSegment call fed frame by frame, its responses collected by a thread."""

    def __init__(self, stub, frame: np.ndarray):
        self.frame = frame
        self.outbox: queue.Queue = queue.Queue()
        self.inbox: queue.Queue = queue.Queue()
        self.call = stub.StreamSegment(self._requests(), timeout=300)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _requests(self):
        while (item := self.outbox.get()) is not None:
            yield item

    def _read(self) -> None:
        try:
            for response in self.call:
                self.inbox.put(response)
            self.inbox.put("end")
        except grpc.RpcError as exc:
            self.inbox.put(exc)

    def send(self, frame_id: int) -> None:
        raw = pb.RawFrame(height=self.frame.shape[0], width=self.frame.shape[1], rgb=self.frame.tobytes())
        self.outbox.put(pb.SegmentRequest(raw=raw, frame_id=frame_id, format=pb.LABELS_RAW))

    def receive(self, timeout: float = 60.0) -> pb.SegmentResponse:
        item = self.inbox.get(timeout=timeout)
        if isinstance(item, Exception) or item == "end":
            raise AssertionError(f"the stream ended: {item}")
        assert not item.HasField("error"), item.error
        assert (item.height, item.width) == (H, W)
        return item

    def close(self) -> None:
        self.outbox.put(None)
        self.thread.join(30)
        if self.thread.is_alive():
            self.call.cancel()
            self.thread.join(10)


def test_a_stream_sticks_to_one_worker(service, pool, stub, frame, body):
    """The stream opens while one worker holds a request (both stopped), so it picks the other, S.
    Then (1) with the other worker held, the stream flows; (2) with S held and the other idle, the
    stream's frames stay with S (still in flight) while unary requests are answered by the other."""
    p, q = service.worker_pids()
    probe = StreamProbe(stub, frame)
    unary: Future | None = None
    try:
        sigstop(p, q)
        unary = submit_held(service, pool, body, 1)  # on one worker
        probe.send(0)  # the stream opens now: least loaded is the other worker
        wait_for(lambda: slots(service) == 2, "the stream's first frame to reach a worker")
        sigcont(p)
        wait_for(lambda: unary.done() or not probe.inbox.empty(), "the unary request or frame 0")
        if unary.done():  # p served the unary request: the stream is on q
            stream_worker, other = q, p
            sigstop(p)
            sigcont(q)
        else:  # p is the stream's worker; q still holds the unary request
            stream_worker, other = p, q
        assert probe.receive().frame_id == 0

        # (1) the other worker is stopped: the stream keeps flowing on its own worker.
        assert proc_state(other) in ("T", "t")
        for i in range(1, 6):
            probe.send(i)
            assert probe.receive().frame_id == i
        sigcont(other)
        assert unary.result(timeout=120).status_code == 200
        wait_for(lambda: slots(service) == 0, "every request answered")

        # (2) the stream's worker is stopped, the other idle: both new frames go to the stopped one.
        sigstop(stream_worker)
        probe.send(6)
        probe.send(7)
        wait_for(lambda: slots(service) == 2, "frames 6 and 7 to reach a worker")
        for _ in range(3):
            r = post(service, body, timeout=60)  # least loaded: the other worker
            assert r.status_code == 200, r.text
        # Frames sent before those requests are still in flight: they were not given to the idle worker.
        assert slots(service) == 2 and probe.inbox.empty()
        sigcont(stream_worker)
        assert [probe.receive().frame_id for _ in range(2)] == [6, 7]
        for i in range(8, 11):
            probe.send(i)
            assert probe.receive().frame_id == i
    finally:
        sigcont(p, q)
        probe.close()
    assert probe.inbox.get(timeout=30) == "end"
    wait_for(lambda: slots(service) == 0, "slots to be given back")


# -- a worker dies ---------------------------------------------------------------------------------
def test_one_worker_killed_while_the_other_serves(service, pool, body):
    """SIGKILL one worker under load: requests keep being answered by the survivor (at most the ones
    the dead worker was running get a retryable 503), the dead one is restarted (new pid, counted),
    readiness is 503 until the replacement is up (held here with SIGSTOP) and 200 after."""
    victim, survivor = service.worker_pids()
    results: list[tuple[int, str | None, str | None]] = []
    lock = threading.Lock()
    stop_load = threading.Event()

    def client() -> None:
        deadline = time.monotonic() + 240
        for _ in range(400):
            if stop_load.is_set() or time.monotonic() > deadline:
                return
            r = post(service, body)
            code = r.json()["error"]["code"] if r.status_code != 200 else None
            with lock:
                results.append((r.status_code, code, r.headers.get("retry-after")))

    def answered() -> int:
        with lock:
            return len(results)

    clients = [pool.submit(client) for _ in range(2)]
    replacement = None
    try:
        wait_for(lambda: answered() >= 4, "the load to start")
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: httpx.get(f"{service.url}/readyz", timeout=10).status_code == 503, "readiness to drop")

        def new_worker():
            return next((pid for pid in service.worker_pids() if pid not in (victim, survivor)), None)

        wait_for(lambda: new_worker() is not None, "the replacement worker", every=0.02)
        replacement = new_worker()
        sigstop(replacement)  # hold its start-up: the service runs on the survivor alone
        assert metric_value(service.metrics(), "seg_worker_restarts_total", device="cpu") == 1
        count = answered()
        wait_for(lambda: answered() >= count + 6, "requests answered by the survivor alone", timeout=120)
        assert httpx.get(f"{service.url}/readyz", timeout=10).status_code == 503
        assert httpx.get(f"{service.url}/healthz", timeout=10).status_code == 200
        assert proc_state(survivor) not in ("T", "t", "Z")
        sigcont(replacement)
        service.wait_ready(120)  # the replacement was held: readiness comes back only now
    finally:
        if replacement is not None:
            sigcont(replacement)
        stop_load.set()
        for c in clients:
            c.result(timeout=300)

    codes = [(status, code) for status, code, _ in results]
    assert set(codes) <= {(200, None), (503, "worker_restarting")}, codes
    assert sum(status == 503 for status, _ in codes) <= 2, codes  # at most one running request per client
    assert all(retry for status, _, retry in results if status == 503)
    assert sorted(service.worker_pids()) == sorted([survivor, replacement])
    text = service.metrics()
    assert metric_value(text, "seg_worker_restarts_total", device="cpu") == 1
    assert metric_value(text, "seg_ready") == 1

    # The replacement takes its share again: with both held, one request each, and each answered.
    waiting = one_request_each(service, pool, body, running=replacement, held=survivor)
    sigcont(survivor)
    assert waiting.result(timeout=120).status_code == 200
    wait_for(lambda: slots(service) == 0 and metric_value(service.metrics(), "seg_queue_depth") == 0, "idle")
