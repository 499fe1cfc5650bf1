"""The stream policy on its own (plain asyncio, no gRPC): order, in-flight bound, drops, clean-up."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import pytest

from service.api.streaming import OrderedStream, StreamIdle


async def frames(n: int, every: float = 0.0, log: list | None = None):
    for i in range(n):
        if log is not None:
            log.append(i)
        yield i
        if every:
            await asyncio.sleep(every)


class Worker:
    """Serves a frame after `seconds` (jittered), recording concurrency, cancellation and timing."""

    def __init__(self, seconds: float = 0.01, jitter: float = 0.0, fail: set | None = None):
        self.seconds, self.jitter, self.fail = seconds, jitter, fail or set()
        self.active = self.peak = 0
        self.started: dict[int, float] = {}
        self.cancelled: list[int] = []

    async def __call__(self, frame: int) -> int:
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.started[frame] = time.monotonic()
        try:
            await asyncio.sleep(self.seconds + random.uniform(0, self.jitter))
            if frame in self.fail:
                raise ValueError(f"bad frame {frame}")
            return frame * 10
        except asyncio.CancelledError:
            self.cancelled.append(frame)
            raise
        finally:
            self.active -= 1


async def collect(stream: OrderedStream) -> list:
    return [o async for o in stream]


def test_block_serves_every_frame_in_order_within_the_bound():
    worker = Worker(0.005, jitter=0.01)
    outcomes = asyncio.run(collect(OrderedStream(frames(40), worker, policy="block", max_in_flight=3)))
    assert [o.frame for o in outcomes] == list(range(40))
    assert [o.result for o in outcomes] == [i * 10 for i in range(40)]
    assert all(not o.dropped for o in outcomes)
    assert worker.peak <= 3


def test_block_stops_reading_while_the_bound_is_reached():
    async def run():
        pulled: list[int] = []
        stream = OrderedStream(frames(30, log=pulled), Worker(0.01), policy="block", max_in_flight=2)
        behind = []
        done = 0
        async for _ in stream:
            done += 1
            await asyncio.sleep(0.005)  # a slow consumer
            behind.append(len(pulled) - done)
        return behind

    # Read ahead of the consumer: at most the frames in flight (plus the one being pulled).
    assert max(asyncio.run(run())) <= 3


def test_latest_drops_oldest_waiting_frames_and_reports_them():
    async def run():
        dropped = []
        worker = Worker(0.02)
        stream = OrderedStream(
            frames(200, every=0.001), worker, policy="latest", max_in_flight=2, on_drop=dropped.append
        )
        arrivals = {}

        async def timed():  # when each frame reached the stream, for latency
            async for i in frames(200, every=0.001):
                arrivals[i] = time.monotonic()
                yield i

        stream.source = timed()
        out = []
        async for o in stream:
            out.append((o, time.monotonic() - arrivals[o.frame]))
        return out, dropped, worker

    out, dropped, worker = asyncio.run(run())
    served = [o.frame for o, _ in out]
    reported = [f for o, _ in out for f in o.dropped]
    assert served == sorted(served) and served[-1] == 199  # in order; the newest frame is never dropped
    assert sorted(served + reported) == list(range(200))  # each frame served or reported, once
    assert reported == dropped and len(dropped) > 100
    assert worker.peak <= 2
    latencies = [lat for _, lat in out]
    # Bounded: about (in flight + 1) service times, however long the stream; no growth from start to end.
    assert max(latencies) < 0.02 * 3 + 0.25
    tail = latencies[len(latencies) // 2 :]
    assert max(tail) < 0.02 * 3 + 0.25


def test_a_failing_frame_is_reported_and_the_stream_goes_on():
    outcomes = asyncio.run(collect(OrderedStream(frames(6), Worker(0.001, fail={2}), policy="block")))
    assert [o.frame for o in outcomes] == list(range(6))
    assert isinstance(outcomes[2].error, ValueError)
    assert [o.result for o in outcomes if o.error is None] == [0, 10, 30, 40, 50]


def test_leaving_early_cancels_frames_in_flight():
    async def run():
        worker = Worker(10.0)  # never finishes on its own
        stream = OrderedStream(frames(5), worker, policy="latest", max_in_flight=2)
        outcomes = aiter(stream)
        task = asyncio.ensure_future(anext(outcomes))
        await asyncio.sleep(0.05)
        task.cancel()  # what grpc.aio does when the client goes away
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return worker

    worker = asyncio.run(run())
    assert sorted(worker.cancelled) == [0, 1] and worker.active == 0


def test_a_source_error_ends_the_stream_and_cancels_work():
    async def broken():
        yield 0
        yield 1
        raise RuntimeError("protocol problem")

    async def run():
        worker = Worker(10.0)
        with pytest.raises(RuntimeError, match="protocol problem"):
            await collect(OrderedStream(broken(), worker, policy="latest", max_in_flight=2))
        return worker

    worker = asyncio.run(run())
    # Everything that started was cancelled (a frame cancelled before it started never runs at all).
    assert 0 in worker.cancelled and sorted(worker.cancelled) == sorted(worker.started) and worker.active == 0


def test_a_quiet_stream_waits_without_work_then_goes_on():
    async def paused():
        yield 0
        await asyncio.sleep(0.3)
        yield 1

    outcomes = asyncio.run(collect(OrderedStream(paused(), Worker(0.001), idle_timeout=5)))
    assert [o.frame for o in outcomes] == [0, 1]


def test_idle_timeout_ends_a_silent_stream():
    async def silent():
        yield 0
        await asyncio.sleep(10)
        yield 1

    async def run():
        start = time.monotonic()
        with pytest.raises(StreamIdle):
            await collect(OrderedStream(silent(), Worker(0.001), idle_timeout=0.2))
        return time.monotonic() - start

    assert asyncio.run(run()) < 2


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        OrderedStream(frames(1), Worker(), policy="newest")
    with pytest.raises(ValueError):
        OrderedStream(frames(1), Worker(), max_in_flight=0)
