"""The load machinery: closed-loop users, open-loop Poisson arrivals, the REST sender, the raw engine
measured beside them, and the Markdown table. `bisenet bench service` (cli.py) drives it."""

from __future__ import annotations

import asyncio
import io
import random
import time
from dataclasses import dataclass

import httpx
import numpy as np
from PIL import Image

from .probe import Cost, ServiceProbe


@dataclass
class Level:
    mode: str
    load: str
    sent: int
    ok: int
    errors: int
    seconds: float
    latencies: list[float]
    cost: Cost | None = None  # what the level cost the service (CPU per frame, mean batch)

    @property
    def throughput(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")

    def within(self, budget: float) -> float:
        return float(np.mean(np.asarray(self.latencies) <= budget)) if self.latencies else 0.0


def sample_jpeg(size: tuple[int, int], path: str | None) -> bytes:
    """A JPEG at `size`: the given photo resized, or scikit-image's street-like 'coffee' photo tiled."""
    if path:
        img = Image.open(path).convert("RGB")
    else:
        try:
            from skimage import data

            img = Image.fromarray(data.coffee())
        except ImportError:
            img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 600, 3), np.uint8))
    img = img.resize((size[1], size[0]), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def rest_sender(client: httpx.AsyncClient, body: bytes, params: dict):
    """An async () -> bool (ok): one POST /segment."""

    async def send() -> bool:
        try:
            r = await client.post("/segment", content=body, params=params, headers={"Content-Type": "image/jpeg"})
            return r.status_code == 200
        except httpx.HTTPError:
            return False

    return send


async def _one(send, level: Level, scheduled: float | None = None) -> None:
    """One request; latency from `scheduled` (open loop: when it was due to be sent, so a sender that
    falls behind its schedule counts the lag: no coordinated omission), else from now."""
    start = time.perf_counter() if scheduled is None else scheduled
    ok = await send()
    level.sent += 1
    if ok:
        level.ok += 1
        level.latencies.append(time.perf_counter() - start)
    else:
        level.errors += 1


async def closed_loop(send, concurrency: int, requests: int, seconds: float) -> Level:
    level = Level("closed", f"c={concurrency}", 0, 0, 0, 0.0, [])
    remaining = [requests]
    end = time.perf_counter() + seconds

    async def user():
        while remaining[0] > 0 and time.perf_counter() < end:
            remaining[0] -= 1
            await _one(send, level)

    start = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(concurrency)))
    level.seconds = time.perf_counter() - start
    return level


async def open_loop(send, rate: float, requests: int, seconds: float, seed: int = 0) -> Level:
    """Poisson arrivals at `rate`/s regardless of responses: shows queueing that closed loops hide."""
    level = Level("poisson", f"{rate:g}/s", 0, 0, 0, 0.0, [])
    rng = random.Random(seed)
    tasks = []
    start = time.perf_counter()
    next_at = start
    while len(tasks) < requests and next_at - start < seconds:
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        tasks.append(asyncio.create_task(_one(send, level, scheduled=next_at)))
        next_at += rng.expovariate(rate)
    await asyncio.gather(*tasks)
    level.seconds = time.perf_counter() - start
    return level


def raw_engine(
    model: str,
    weights: str,
    device: str,
    size: tuple[int, int],
    batch: int,
    seconds: float,
    scale: tuple[int, int] = (2048, 1024),
) -> float:
    """Images/s of the worker's engine alone (same weights, device, batch, resize), in this process."""
    import torch

    from model import Segmenter

    torch.manual_seed(0)
    seg = Segmenter(model, weights=weights, device=device, scale=scale)
    image = np.asarray(Image.open(io.BytesIO(sample_jpeg(size, None))).convert("RGB"))
    batch_images = np.stack([image] * batch)
    seg.engine.warmup([size], (batch,))
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done == 0:
        seg.engine.segment(batch_images)
        done += batch
    return done / (time.perf_counter() - start)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_table(levels: list[Level], budget: float, raw: float, device: str) -> None:
    print(f"\nraw engine: {raw:.2f} images/s on {device}; budget {budget * 1000:.1f} ms")
    print(
        "open-loop latency counts from each request's scheduled send time; CPU ms are per answered frame, "
        "less the service's idle CPU\n"
    )
    print(
        "| mode | load | ok/sent | images/s | vs raw | p50 ms | p90 ms | p99 ms | within budget "
        "| front-end CPU ms | worker CPU ms | mean batch |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for lv in levels:
        cost = lv.cost or Cost(None, None, None)
        batch = "-" if cost.mean_batch is None else f"{cost.mean_batch:.2f}"
        print(
            f"| {lv.mode} | {lv.load} | {lv.ok}/{lv.sent} | {lv.throughput:.2f} | {lv.throughput / raw:.0%} | "
            f"{lv.percentile(50) * 1000:.1f} | {lv.percentile(90) * 1000:.1f} | {lv.percentile(99) * 1000:.1f} | "
            f"{lv.within(budget):.0%} | {_ms(cost.front_ms_per_frame)} | {_ms(cost.worker_ms_per_frame)} | {batch} |"
        )


async def _measured(level_coro, probe: ServiceProbe | None) -> Level:
    """Run one level, with the service's CPU time and batch sizes read before and after it."""
    if probe is None:
        return await level_coro
    before = await asyncio.to_thread(probe.snapshot)
    level = await level_coro
    after = await asyncio.to_thread(probe.snapshot)
    level.cost = probe.cost(before, after, level.ok)
    return level


async def sweep(send, args, mode: str, probe: ServiceProbe | None = None) -> list[Level]:
    levels = []
    if args.warmup:
        await closed_loop(send, 1, args.warmup, 300)  # warm-up, not reported
    for c in [int(v) for v in args.concurrency.split(",") if v]:
        levels.append(await _measured(closed_loop(send, c, args.requests, args.seconds), probe))
    for rate in [float(v) for v in args.rates.split(",") if v]:
        levels.append(await _measured(open_loop(send, rate, args.requests, args.seconds), probe))
    for level in levels:
        level.mode = f"{mode} {level.mode}"
    return levels
