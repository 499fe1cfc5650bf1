"""Load generator: closed-loop concurrency sweep and open-loop Poisson rate sweep over REST,
next to the raw engine throughput measured in the same run (the serving overhead).

    python -m service.bench --spawn "--model bisenetv1_r18=random --device cpu" --size 512x1024
    python -m service.bench --url http://localhost:8000 --concurrency 1,8,32 --rates 10,30,60
    python -m service.bench --protocol grpc --grpc localhost:50051 --concurrency 1,8     # unary gRPC
    python -m service.bench --grpc localhost:50051 --concurrency "" --streams 1,4 --capacity --seconds 10

Every sweep level is bounded by --requests and --seconds. Prints Markdown tables. Streams
(--streams, --capacity) are gRPC StreamSegment calls paced at --target-fps; see bench_grpc.py.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
import numpy as np
from PIL import Image


@dataclass
class Level:
    mode: str
    load: str
    sent: int
    ok: int
    errors: int
    seconds: float
    latencies: list[float]

    @property
    def throughput(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")

    def within(self, budget: float) -> float:
        return float(np.mean(np.asarray(self.latencies) <= budget)) if self.latencies else 0.0


def test_image(size: tuple[int, int], path: str | None) -> bytes:
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


async def _one(send, level: Level) -> None:
    start = time.perf_counter()
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
        tasks.append(asyncio.create_task(_one(send, level)))
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
    image = np.asarray(Image.open(io.BytesIO(test_image(size, None))).convert("RGB"))
    batch_images = np.stack([image] * batch)
    seg.engine.warmup([size], (batch,))
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done == 0:
        seg.engine.segment(batch_images)
        done += batch
    return done / (time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_command(http_port: int, grpc_port: int, args: list[str]) -> list[str]:
    """`python -m service` on loopback at the given ports (0 for gRPC disables it)."""
    return [
        sys.executable,
        "-m",
        "service",
        "--host",
        "127.0.0.1",
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
        *args,
    ]


def wait_http_ready(proc: subprocess.Popen, url: str, timeout: float, interval: float = 0.3) -> None:
    """Poll `url` until it answers 200. RuntimeError if `proc` exits first, TimeoutError after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the process exited with code {proc.returncode} before {url} was ready")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(interval)
    raise TimeoutError(f"{url} not ready within {timeout:g} s")


def spawn_service(extra_args: str, timeout: float = 600.0, grpc_port: int = 0) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        service_command(port, grpc_port, shlex.split(extra_args)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http_ready(proc, f"{url}/readyz", timeout, interval=0.5)
    except (RuntimeError, TimeoutError):
        proc.kill()
        raise
    return proc, url


def print_table(levels: list[Level], budget: float, raw: float, device: str) -> None:
    print(f"\nraw engine: {raw:.2f} images/s on {device}; budget {budget * 1000:.1f} ms\n")
    print("| mode | load | ok/sent | images/s | vs raw | p50 ms | p90 ms | p99 ms | within budget |")
    print("|---|---|---|---|---|---|---|---|---|")
    for lv in levels:
        print(
            f"| {lv.mode} | {lv.load} | {lv.ok}/{lv.sent} | {lv.throughput:.2f} | {lv.throughput / raw:.0%} | "
            f"{lv.percentile(50) * 1000:.1f} | {lv.percentile(90) * 1000:.1f} | {lv.percentile(99) * 1000:.1f} | "
            f"{lv.within(budget):.0%} |"
        )


async def sweep(send, args, mode: str) -> list[Level]:
    levels = []
    if args.warmup:
        await closed_loop(send, 1, args.warmup, 300)  # warm-up, not reported
    for c in [int(v) for v in args.concurrency.split(",") if v]:
        levels.append(await closed_loop(send, c, args.requests, args.seconds))
    for rate in [float(v) for v in args.rates.split(",") if v]:
        levels.append(await open_loop(send, rate, args.requests, args.seconds))
    for level in levels:
        level.mode = f"{mode} {level.mode}"
    return levels


async def run(args) -> list[Level]:
    size = tuple(int(v) for v in args.size.lower().split("x"))
    body = test_image(size, args.image)
    if args.protocol == "grpc":
        from . import bench_grpc

        async with bench_grpc.channel(args.grpc) as ch:
            stub = bench_grpc.pb_grpc.SegmentationStub(ch)
            make = bench_grpc.request_factory(body, "jpeg", args.format, args.model)
            return await sweep(bench_grpc.unary_sender(stub, make, grpc_metadata(args)), args, "grpc")
    params = {"format": args.format, **({"model": args.model} if args.model else {})}
    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
    async with httpx.AsyncClient(base_url=args.url, timeout=300, limits=limits, headers=headers) as client:
        return await sweep(rest_sender(client, body, params), args, "rest")


def grpc_metadata(args) -> tuple:
    return (("x-api-key", args.api_key),) if args.api_key else ()


async def run_streams(args) -> tuple[list, int | None]:
    """Stream levels at --target-fps (--streams), then the capacity search (--capacity)."""
    from . import bench_grpc

    size = tuple(int(v) for v in args.size.lower().split("x"))
    budget = 1 / args.target_fps
    async with bench_grpc.channel(args.grpc) as ch:
        stub = bench_grpc.pb_grpc.SegmentationStub(ch)
        make = bench_grpc.request_factory(test_image(size, args.image), args.stream_send, args.format, args.model)
        meta = grpc_metadata(args)
        await bench_grpc.stream_level(stub, make, 1, args.target_fps, 1.0, meta, args.policy)  # warm-up
        levels = [
            await bench_grpc.stream_level(stub, make, int(n), args.target_fps, args.seconds, meta, args.policy)
            for n in args.streams.split(",")
            if n
        ]
        capacity = None
        if args.capacity:
            print(f"capacity search: streams at {args.target_fps:g} fps, {args.seconds:g} s per level", file=sys.stderr)
            capacity, tried = await bench_grpc.capacity_search(
                stub,
                make,
                args.target_fps,
                args.seconds,
                budget,
                args.max_streams,
                meta,
                args.policy,
                log=lambda line: print(line, file=sys.stderr),
            )
            levels += tried
    return levels, capacity


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.bench", description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--spawn", metavar="ARGS", help="start `python -m service ARGS` on free ports for the run")
    p.add_argument("--model", default=None, help="model to request (default: the service's first)")
    p.add_argument("--raw-model", default="bisenetv1_r18", help="architecture for the raw engine measurement")
    p.add_argument("--raw-weights", default="random", help="weights for the raw engine (speed does not depend on them)")
    p.add_argument("--device", default="cuda" if _has_cuda() else "cpu", help="device for the raw engine")
    p.add_argument("--raw-batch", type=int, default=1, help="batch size for the raw engine measurement")
    p.add_argument("--size", default="512x1024", help="HxW of the JPEG sent")
    p.add_argument(
        "--resize-scale",
        default=None,
        help="the service's --resize-scale, for the raw engine (default: read from --spawn, else 2048x1024)",
    )
    p.add_argument("--image", help="a photo to send instead of the built-in one")
    p.add_argument("--format", default="png", choices=["png", "raw", "json", "overlay"])
    p.add_argument("--concurrency", default="1,8")
    p.add_argument("--rates", default="", help="Poisson arrival rates per second, comma-separated")
    p.add_argument("--requests", type=int, default=32, help="requests per level at most")
    p.add_argument("--seconds", type=float, default=60, help="seconds per level at most")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--target-fps", type=float, default=30.0)
    p.add_argument("--api-key", default=os.environ.get("BISENET_API_KEY"))
    p.add_argument("--protocol", choices=["rest", "grpc"], default="rest", help="for the unary sweeps")
    p.add_argument("--grpc", default="127.0.0.1:50051", help="gRPC target (host:port) for --protocol grpc and streams")
    p.add_argument("--streams", default="", help="concurrent gRPC streams at --target-fps, comma-separated levels")
    p.add_argument(
        "--capacity",
        action="store_true",
        help="search the most streams at --target-fps with p99 within the budget and <= 1%% dropped",
    )
    p.add_argument("--max-streams", type=int, default=64, help="upper bound for the capacity search")
    p.add_argument("--policy", choices=["latest", "block"], default="latest", help="stream drop policy")
    p.add_argument("--stream-send", choices=["raw", "jpeg"], default="raw", help="stream frames as raw RGB or JPEG")
    args = p.parse_args(argv)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    proc = None
    uses_grpc = args.protocol == "grpc" or args.streams or args.capacity
    if args.spawn:
        grpc_port = free_port() if uses_grpc else 0
        proc, args.url = spawn_service(args.spawn, grpc_port=grpc_port)
        args.grpc = f"127.0.0.1:{grpc_port}"
    stream_levels, capacity = [], None
    try:
        raw = raw_engine(
            args.raw_model,
            args.raw_weights,
            args.device,
            size,
            args.raw_batch,
            min(args.seconds, 20),
            resize_scale(args),
        )
        levels = asyncio.run(run(args))
        if args.streams or args.capacity:
            stream_levels, capacity = asyncio.run(run_streams(args))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    print_table(levels, 1 / args.target_fps, raw, args.device)
    if stream_levels:
        from .bench_grpc import print_stream_table

        print_stream_table(stream_levels, 1 / args.target_fps)
    if capacity is not None:
        print(
            f"\ncapacity: {capacity} concurrent stream(s) of {args.size} frames at {args.target_fps:g} fps "
            f"(p99 within {1000 / args.target_fps:.1f} ms, <= 1% dropped) on {args.device}"
        )
    return 0


def resize_scale(args) -> tuple[int, int]:
    """The test-time resize the service runs with, so the raw engine does the same work."""
    text = args.resize_scale
    if text is None and args.spawn:
        spawn = shlex.split(args.spawn)
        if "--resize-scale" in spawn:
            text = spawn[spawn.index("--resize-scale") + 1]
    h, w = (int(v) for v in (text or "2048x1024").lower().split("x"))
    return h, w


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
