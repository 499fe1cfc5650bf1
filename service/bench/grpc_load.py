"""gRPC load for `bisenet bench service`: unary calls, paced video streams, and the stream capacity search.

A stream sends frames at --target-fps (each stream starting at a random phase, as independent
cameras would) and measures each frame's latency from handing it to gRPC to receiving its
result. A load level is *sustained* when every stream kept up (at most 1 % of frames dropped,
no errors) and the p99 latency is within the frame budget. The capacity search doubles the
number of streams until a level is not sustained, then bisects.
"""

from __future__ import annotations

import asyncio
import io
import random
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
from PIL import Image

from ..proto import segmentation_pb2 as pb
from ..proto import segmentation_pb2_grpc as pb_grpc

FORMATS = {"png": pb.LABELS_PNG, "raw": pb.LABELS_RAW, "overlay": pb.OVERLAY_JPEG, "json": pb.STATS_ONLY}
MAX_MESSAGE = 256 * 1024 * 1024
MAX_DROP_SHARE = 0.01


@dataclass
class StreamLevel:
    streams: int
    fps: float
    sent: int = 0
    served: int = 0
    dropped: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")

    def within(self, budget: float) -> float:
        return float(np.mean(np.asarray(self.latencies) <= budget)) if self.latencies else 0.0

    def sustained(self, budget: float) -> bool:
        return (
            self.served > 0
            and self.errors == 0
            and self.dropped <= MAX_DROP_SHARE * self.sent
            and self.percentile(99) <= budget
        )


def channel(target: str) -> grpc.aio.Channel:
    options = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
    return grpc.aio.insecure_channel(target, options=options)


def frame_of(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def request_factory(jpeg: bytes, send: str, fmt: str, model: str | None):
    """frame_id -> SegmentRequest carrying the test image as JPEG or as a raw RGB frame."""
    fields = {"format": FORMATS[fmt], "model": model or ""}
    if send == "jpeg":
        return lambda i: pb.SegmentRequest(encoded=jpeg, frame_id=i, **fields)
    rgb = frame_of(jpeg)
    raw = pb.RawFrame(height=rgb.shape[0], width=rgb.shape[1], rgb=rgb.tobytes())
    return lambda i: pb.SegmentRequest(raw=raw, frame_id=i, **fields)


def unary_sender(stub: pb_grpc.SegmentationStub, make_request, metadata):
    """An async () -> bool (ok) for bench's closed and open loops."""

    async def send() -> bool:
        try:
            await stub.Segment(make_request(0), metadata=metadata, timeout=300)
            return True
        except grpc.aio.AioRpcError:
            return False

    return send


async def _one_stream(
    stub, make_request, level: StreamLevel, seconds: float, metadata, policy: str, phase: float
) -> None:
    sent: dict[int, float] = {}
    frames = max(1, int(level.fps * seconds))
    period = 1.0 / level.fps

    async def requests():
        start = time.perf_counter() + phase
        for i in range(frames):
            delay = start + i * period - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            request = make_request(i)
            if i == 0:
                request.drop_policy = pb.DROP_POLICY_BLOCK if policy == "block" else pb.DROP_POLICY_LATEST
            sent[i] = time.perf_counter()
            level.sent += 1
            yield request

    try:
        async for response in stub.StreamSegment(requests(), metadata=metadata, timeout=seconds + 300):
            now = time.perf_counter()
            level.dropped += response.frames_dropped
            if response.HasField("error"):
                level.errors += 1
            else:
                level.served += 1
                level.latencies.append(now - sent[response.frame_id])
    except grpc.aio.AioRpcError:
        level.errors += 1


async def stream_level(
    stub, make_request, streams: int, fps: float, seconds: float, metadata=(), policy: str = "latest", seed: int = 0
) -> StreamLevel:
    level = StreamLevel(streams, fps)
    rng = random.Random(seed)
    start = time.perf_counter()
    await asyncio.gather(
        *(
            _one_stream(stub, make_request, level, seconds, metadata, policy, rng.uniform(0, 1 / fps))
            for _ in range(streams)
        )
    )
    level.seconds = time.perf_counter() - start
    return level


async def capacity_search(
    stub,
    make_request,
    fps: float,
    seconds: float,
    budget: float,
    max_streams: int,
    metadata=(),
    policy: str = "latest",
    log=print,
) -> tuple[int, list[StreamLevel]]:
    """Most concurrent streams at `fps` that are sustained (see module doc), with every level tried."""
    levels: list[StreamLevel] = []

    async def trial(n: int) -> bool:
        level = await stream_level(stub, make_request, n, fps, seconds, metadata, policy, seed=n)
        levels.append(level)
        ok = level.sustained(budget)
        log(
            f"  {n} stream(s) at {fps:g} fps: p99 {level.percentile(99) * 1000:.1f} ms, "
            f"dropped {level.dropped}/{level.sent}, errors {level.errors} -> {'sustained' if ok else 'not sustained'}"
        )
        return ok

    best, n = 0, 1
    while n <= max_streams and await trial(n):
        best, n = n, n * 2
    low, high = best, min(n, max_streams + 1)
    while high - low > 1:
        mid = (low + high) // 2
        if await trial(mid):
            low = mid
        else:
            high = mid
    return low, levels


def print_stream_table(levels: list[StreamLevel], budget: float) -> None:
    print(
        f"\nstreams (budget {budget * 1000:.1f} ms; sustained: <= {MAX_DROP_SHARE:.0%} dropped, no errors, "
        "p99 within budget)\n"
    )
    print(
        "| streams | fps each | served/sent | dropped | served fps/stream | p50 ms | p90 ms | p99 ms "
        "| within budget | sustained |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for lv in levels:
        per_stream = lv.served / lv.seconds / lv.streams if lv.seconds else 0.0
        print(
            f"| {lv.streams} | {lv.fps:g} | {lv.served}/{lv.sent} | {lv.dropped} | {per_stream:.1f} | "
            f"{lv.percentile(50) * 1000:.1f} | {lv.percentile(90) * 1000:.1f} | {lv.percentile(99) * 1000:.1f} | "
            f"{lv.within(budget):.0%} | {'yes' if lv.sustained(budget) else 'no'} |"
        )
