"""The load generator (service.bench.load): closed and open loops against a fake async sender in
virtual time (deterministic: no real clock, no sleeps), Level arithmetic, the Markdown table, and one
bounded end-to-end `bisenet bench service --spawn ...` run against the real service."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import random
import re
import subprocess
from types import SimpleNamespace

import pytest

from service.bench import load
from service.bench.load import Level, closed_loop, open_loop, print_table, sweep
from service.bench.probe import Cost
from tests.servicekit import BISENET, ROOT


class VirtualClock:
    """Virtual time for load.py: `time.perf_counter` reads it, `asyncio.sleep` waits on it. `run`
    drives a coroutine: whenever every task is blocked, time jumps to the next timer. A coroutine
    that blocks with no timer pending is stuck (e.g. a loop waiting for responses that never come)."""

    def __init__(self):
        self.now = 0.0
        self.timers: list = []
        self.seq = itertools.count()

    def perf_counter(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self.timers, (self.now + max(delay, 0.0), next(self.seq), future))
        await future

    async def _settle(self) -> None:
        for _ in range(50):  # plenty for every runnable callback chain to reach its next await
            await asyncio.sleep(0)

    def run(self, coro):
        async def drive():
            task = asyncio.ensure_future(coro)
            while True:
                await self._settle()
                if task.done():
                    return task.result()
                if not self.timers:
                    task.cancel()
                    raise AssertionError("stuck: every task waits and no timer is pending")
                when, _, future = heapq.heappop(self.timers)
                self.now = max(self.now, when)
                future.set_result(None)

        return asyncio.run(drive())


@pytest.fixture
def clock(monkeypatch) -> VirtualClock:
    clock = VirtualClock()
    monkeypatch.setattr(load, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    monkeypatch.setattr(
        load, "asyncio", SimpleNamespace(sleep=clock.sleep, gather=asyncio.gather, create_task=asyncio.create_task)
    )
    return clock


class FakeSender:
    """An async () -> bool that takes `duration` virtual seconds; records starts and concurrency."""

    def __init__(self, clock: VirtualClock, duration: float = 0.125, ok=lambda n: True):
        self.clock, self.duration, self.ok = clock, duration, ok
        self.starts: list[float] = []
        self.active = self.max_active = 0

    async def __call__(self) -> bool:
        n = len(self.starts)
        self.starts.append(self.clock.now)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await self.clock.sleep(self.duration)
        finally:
            self.active -= 1
        return self.ok(n)


def poisson_schedule(rate: float, requests: int, seconds: float, seed: int = 0) -> list[float]:
    """Arrival times (from 0) that open_loop must keep: exponential gaps from random.Random(seed)."""
    rng, times, t = random.Random(seed), [], 0.0
    while len(times) < requests and t < seconds:
        times.append(t)
        t += rng.expovariate(rate)
    return times


# -- closed loop -----------------------------------------------------------------------------------
def test_closed_loop_stops_after_the_requests(clock):
    send = FakeSender(clock, duration=0.125)
    level = clock.run(closed_loop(send, concurrency=3, requests=10, seconds=60))
    assert (level.mode, level.load) == ("closed", "c=3")
    assert (level.sent, level.ok, level.errors) == (10, 10, 0)
    assert len(send.starts) == 10
    assert level.latencies == [0.125] * 10
    assert send.max_active == 3  # three users, each waiting for its answer before sending again
    assert level.seconds == 0.5  # rounds at 0, 0.125, 0.25, 0.375 (one request), done at 0.5
    assert level.throughput == 20.0


@pytest.mark.parametrize(("concurrency", "expected_active"), [(1, 1), (4, 4), (8, 5)])
def test_closed_loop_keeps_exactly_its_concurrency(clock, concurrency, expected_active):
    send = FakeSender(clock, duration=0.25)
    level = clock.run(closed_loop(send, concurrency, requests=5, seconds=60))
    assert level.sent == 5
    assert send.max_active == expected_active  # never more users than asked, nor than requests


def test_closed_loop_stops_after_the_seconds(clock):
    send = FakeSender(clock, duration=0.125)
    level = clock.run(closed_loop(send, concurrency=2, requests=10**6, seconds=1.0))
    # Each user starts a request at 0, 0.125, ..., 0.875 (< 1 s) and none at 1.0: 8 each.
    assert (level.sent, level.ok) == (16, 16)
    assert max(send.starts) == 0.875
    assert level.seconds == 1.0


def test_closed_loop_counts_errors_without_their_latency(clock):
    send = FakeSender(clock, duration=0.5, ok=lambda n: n % 3 != 0)  # requests 0, 3, 6, 9 fail
    level = clock.run(closed_loop(send, concurrency=1, requests=10, seconds=60))
    assert (level.sent, level.ok, level.errors) == (10, 6, 4)
    assert level.latencies == [0.5] * 6
    assert level.seconds == 5.0 and level.throughput == 6 / 5.0


# -- open loop -------------------------------------------------------------------------------------
def test_open_loop_sends_on_schedule_without_waiting_for_responses(clock):
    """No response comes back until every request has been sent: a loop that waited for responses
    would be stuck; arrivals follow the seeded Poisson schedule exactly."""
    release: list[asyncio.Future] = []
    starts: list[float] = []
    n = 40

    async def send() -> bool:
        starts.append(clock.now)
        future = asyncio.get_running_loop().create_future()
        release.append(future)
        if len(release) == n:  # the last one lets every request answer
            for f in release:
                if not f.done():
                    f.set_result(None)
        await future
        return True

    level = clock.run(open_loop(send, rate=20.0, requests=n, seconds=1000, seed=3))
    assert (level.mode, level.load) == ("poisson", "20/s")
    assert (level.sent, level.ok, level.errors) == (n, n, 0)
    assert starts == pytest.approx(poisson_schedule(20.0, n, 1000, seed=3))
    assert len(set(starts)) == n  # one arrival at a time, not a burst


def test_open_loop_keeps_the_rate_while_responses_are_slow(clock):
    """Responses take 2 s, arrivals come every ~0.1 s: many requests are outstanding at once."""
    send = FakeSender(clock, duration=2.0)
    level = clock.run(open_loop(send, rate=10.0, requests=200, seconds=1000, seed=0))
    schedule = poisson_schedule(10.0, 200, 1000, seed=0)
    assert send.starts == pytest.approx(schedule)
    assert send.max_active >= 10
    assert level.sent == level.ok == 200
    assert level.latencies == pytest.approx([2.0] * 200)
    assert level.seconds == pytest.approx(schedule[-1] + 2.0)  # ends when the last answer is in
    assert 200 / schedule[-1] == pytest.approx(10.0, rel=0.25)  # the mean rate is `rate`, not 1/rate


def test_open_loop_latency_counts_from_the_scheduled_send_time(clock):
    """The client stalls for 1 s on its first send (a blocked loop, a slow connect): requests due
    meanwhile go out late, and their latency includes the lag (no coordinated omission)."""
    stalled = []

    async def send() -> bool:
        if not stalled:
            stalled.append(clock.now)
            clock.now += 1.0  # synchronous stall: nothing else runs meanwhile
        await clock.sleep(0.1)
        return True

    level = clock.run(open_loop(send, rate=20.0, requests=10, seconds=1000, seed=0))
    schedule = poisson_schedule(20.0, 10, 1000, seed=0)
    late = [t for t in schedule[1:] if t < 1.0]
    assert late  # the schedule has requests due during the stall
    for due, latency in zip(schedule, sorted(level.latencies, reverse=True)):
        if due in late:
            assert latency >= 1.0 - due + 0.1 - 1e-9  # waited for the stall, then 0.1 s of service
    assert max(level.latencies) == pytest.approx(1.1)  # the first: stalled 1 s, then served


def test_open_loop_stops_after_the_seconds(clock):
    send = FakeSender(clock, duration=0.01, ok=lambda n: n % 2 == 0)
    level = clock.run(open_loop(send, rate=20.0, requests=10**6, seconds=3.0, seed=0))
    schedule = poisson_schedule(20.0, 10**6, 3.0, seed=0)
    assert level.sent == len(schedule) and 30 <= level.sent <= 90
    assert max(send.starts) < 3.0
    assert (level.ok, level.errors) == (math.ceil(level.sent / 2), level.sent // 2)
    assert len(level.latencies) == level.ok


def test_open_loop_stops_after_the_requests(clock):
    send = FakeSender(clock, duration=0.01)
    level = clock.run(open_loop(send, rate=100.0, requests=7, seconds=1000, seed=0))
    assert level.sent == len(send.starts) == 7


def test_sweep_runs_warmup_then_each_level(clock):
    send = FakeSender(clock, duration=0.125)
    args = SimpleNamespace(warmup=2, concurrency="1,2", rates="5", requests=4, seconds=60)
    levels = clock.run(sweep(send, args, "rest"))
    assert [(lv.mode, lv.load, lv.sent) for lv in levels] == [
        ("rest closed", "c=1", 4),
        ("rest closed", "c=2", 4),
        ("rest poisson", "5/s", 4),
    ]
    assert len(send.starts) == 2 + 12  # the warm-up is sent but not reported


# -- Level and the table ---------------------------------------------------------------------------
def test_level_statistics():
    level = Level("closed", "c=2", sent=5, ok=4, errors=1, seconds=2.0, latencies=[0.4, 0.1, 0.3, 0.2])
    assert level.throughput == 2.0
    assert level.percentile(50) == pytest.approx(0.25)
    assert level.percentile(0) == pytest.approx(0.1) and level.percentile(100) == pytest.approx(0.4)
    assert level.percentile(90) == pytest.approx(0.37)  # numpy's linear interpolation
    assert level.within(0.25) == 0.5 and level.within(1.0) == 1.0 and level.within(0.05) == 0.0
    empty = Level("poisson", "1/s", sent=3, ok=0, errors=3, seconds=0.0, latencies=[])
    assert empty.throughput == 0.0 and math.isnan(empty.percentile(50)) and empty.within(1.0) == 0.0


def test_print_table(capsys):
    levels = [
        Level("rest closed", "c=1", 4, 4, 0, 2.0, [0.010, 0.020, 0.030, 0.040], Cost(2.5, 10.0, 1.5)),
        Level("rest poisson", "5/s", 4, 3, 1, 1.0, [0.050, 0.050, 0.050]),  # nothing measured
    ]
    print_table(levels, budget=1 / 30, raw=4.0, device="cpu")
    out = capsys.readouterr().out
    assert "raw engine: 4.00 images/s on cpu; budget 33.3 ms" in out
    rows = [line for line in out.splitlines() if line.startswith("| rest")]
    assert rows == [
        "| rest closed | c=1 | 4/4 | 2.00 | 50% | 25.0 | 37.0 | 39.7 | 75% | 2.5 | 10.0 | 1.50 |",
        "| rest poisson | 5/s | 3/4 | 3.00 | 75% | 50.0 | 50.0 | 50.0 | 0% | - | - | - |",
    ]


# -- end to end ------------------------------------------------------------------------------------
def test_bench_service_spawns_the_service_and_prints_the_table():
    spawn = "--model bisenetv1_r18=random --device cpu --warm-shapes none --resize-scale 256x128 --log-level warning"
    cmd = [
        BISENET,
        "bench",
        "service",
        "--spawn",
        spawn,
        "--size",
        "64x96",
        "--concurrency",
        "1,2",
        "--requests",
        "4",
        "--seconds",  # per level at most, and the raw engine's measurement (the bulk of the test's time)
        "8",
        "--raw-batch",
        "1",
        "--idle-seconds",  # no idle subtraction: the CPU columns must then be positive
        "0",
        "--device",
        "cpu",
    ]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout + run.stderr
    assert re.search(r"raw engine: \d+\.\d\d images/s on cpu; budget 33\.3 ms", run.stdout), run.stdout
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines() if line.startswith("| rest")]
    assert [[cell.strip() for cell in row[:3]] for row in rows] == [
        ["rest closed", "c=1", "4/4"],
        ["rest closed", "c=2", "4/4"],
    ], run.stdout
    for row in rows:
        assert float(row[3]) > 0 and float(row[5]) > 0  # images/s and p50 ms
        front_cpu, worker_cpu, mean_batch = (float(cell) for cell in row[9:12])
        assert front_cpu > 0 and worker_cpu > 0  # read from the spawned processes
        assert 1.0 <= mean_batch <= 2.0
