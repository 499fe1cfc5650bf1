"""Per-stream state for StreamSegment: frame order, a bound on frames in flight, and the drop policy.

Protocol-free (plain asyncio) so the policy can be tested on its own; api/grpc.py supplies the
frames and the function that serves one.

- Frames are served by `process(frame)` in tasks, at most `max_in_flight` at once; a frame
  counts as in flight from submission until its outcome has been handed to the consumer, so a
  client that stops reading responses also stops new work (memory stays bounded).
- Outcomes come out in arrival order: the head of the line is awaited first.
- `latest`: while the bound is reached, one newer frame waits; a newer one still replaces it and
  the replaced frame is dropped, reported with the next outcome. Latency stays bounded by about
  (max_in_flight + 1) service times however fast the client sends.
- `block`: while the bound is reached the source is not read at all, so the transport's flow
  control pushes back on the sender; nothing is dropped.
- Leaving the iteration early (client cancelled, error) cancels the reader and every frame's task.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")
POLICIES = ("latest", "block")
DEFAULT_MAX_IN_FLIGHT = 2
MAX_IN_FLIGHT_LIMIT = 16


class StreamIdle(Exception):
    """No frame arrived within the idle timeout."""


@dataclass
class Outcome(Generic[T]):
    frame: T
    result: Any = None
    error: BaseException | None = None  # raised by process(): the consumer decides if it is fatal
    dropped: list[T] = field(default_factory=list)  # frames dropped since the previous outcome


class OrderedStream(Generic[T]):
    def __init__(
        self,
        source: AsyncIterator[T],
        process: Callable[[T], Awaitable[Any]],
        *,
        policy: str = "latest",
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        idle_timeout: float | None = None,
        on_drop: Callable[[T], None] | None = None,
    ):
        if policy not in POLICIES:
            raise ValueError(f"drop policy must be one of {POLICIES}, not {policy!r}")
        if not 1 <= max_in_flight <= MAX_IN_FLIGHT_LIMIT:
            raise ValueError(f"max_in_flight must be 1..{MAX_IN_FLIGHT_LIMIT}, not {max_in_flight}")
        self.source = source
        self.process = process
        self.policy = policy
        self.limit = max_in_flight
        self.idle_timeout = idle_timeout
        self.on_drop = on_drop
        self.in_flight: deque[tuple[T, asyncio.Task]] = deque()
        self.waiting: T | None = None
        self.has_waiting = False
        self.dropped: list[T] = []
        self.received = 0
        self.dropped_total = 0
        self._changed = asyncio.Event()  # a frame arrived, a frame finished, or the source ended
        self._room = asyncio.Event()  # block policy: the in-flight count went below the bound

    # -- the reading side ------------------------------------------------------------------------
    async def _read(self) -> None:
        iterator = aiter(self.source)
        try:
            while True:
                if self.policy == "block":
                    while len(self.in_flight) >= self.limit:
                        self._room.clear()
                        await self._room.wait()
                try:
                    frame = await asyncio.wait_for(anext(iterator), self.idle_timeout)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise StreamIdle(f"no frame for {self.idle_timeout:g} s") from None
                self.received += 1
                self._accept(frame)
        finally:
            self._changed.set()

    def _accept(self, frame: T) -> None:
        if len(self.in_flight) < self.limit and not self.has_waiting:
            self._submit(frame)
            return
        if self.has_waiting:  # latest: the older waiting frame gives way to this one
            self._drop(self.waiting)
        self.waiting, self.has_waiting = frame, True
        self._changed.set()

    def _drop(self, frame: T) -> None:
        self.dropped.append(frame)
        self.dropped_total += 1
        if self.on_drop is not None:
            self.on_drop(frame)

    def _submit(self, frame: T) -> None:
        task = asyncio.ensure_future(self.process(frame))
        task.add_done_callback(lambda _: self._changed.set())
        self.in_flight.append((frame, task))
        self._changed.set()

    def _refill(self) -> None:
        if self.has_waiting and len(self.in_flight) < self.limit:
            frame, self.waiting, self.has_waiting = self.waiting, None, False
            self._submit(frame)
        if len(self.in_flight) < self.limit:
            self._room.set()

    # -- the writing side ------------------------------------------------------------------------
    async def __aiter__(self) -> AsyncIterator[Outcome[T]]:
        reader = asyncio.create_task(self._read())
        try:
            while True:
                self._changed.clear()
                if self.in_flight and self.in_flight[0][1].done():
                    frame, task = self.in_flight.popleft()
                    outcome = Outcome(frame, dropped=self.dropped)
                    self.dropped = []
                    if task.cancelled():
                        outcome.error = asyncio.CancelledError()
                    elif task.exception() is not None:
                        outcome.error = task.exception()
                    else:
                        outcome.result = task.result()
                    self._refill()
                    yield outcome
                    continue
                if reader.done() and not self.in_flight and not self.has_waiting:
                    reader.result()  # re-raises what ended the source (StreamIdle, a protocol error)
                    return
                if reader.done() and reader.exception() is not None:
                    reader.result()  # a failed source ends the stream now, without waiting
                self._refill()
                if not self._changed.is_set():
                    await self._changed.wait()
        finally:
            reader.cancel()
            tasks = [task for _, task in self.in_flight]
            for task in tasks:
                task.cancel()
            self.in_flight.clear()
            self.waiting, self.has_waiting = None, False
            # Let the cancelled tasks run their clean-up (slots, queue places) before we return.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(reader, *tasks, return_exceptions=True)
