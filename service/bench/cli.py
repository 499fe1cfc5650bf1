"""`bisenet bench service`: closed-loop concurrency and open-loop Poisson sweeps over REST or gRPC, and
paced gRPC streams with a capacity search, next to the raw engine measured in the same run (the
serving overhead).

    bisenet bench service --spawn "--model bisenetv1_r18=random --device cpu" --size 512x1024
    bisenet bench service --url http://localhost:8000 --concurrency 1,8,32 --rates 10,30,60
    bisenet bench service --protocol grpc --grpc localhost:50051 --concurrency 1,8     # unary gRPC
    bisenet bench service --grpc localhost:50051 --concurrency "" --streams 1,4 --capacity --seconds 10

Every sweep level is bounded by --requests and --seconds. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys

import httpx

from ..config import parse_shape
from .load import Level, print_table, raw_engine, rest_sender, sample_jpeg, sweep
from .probe import ServiceProbe
from .processes import free_port, spawn_service


async def run(args) -> list[Level]:
    body = sample_jpeg(parse_shape(args.size), args.image)
    probe = ServiceProbe(args.url, args.pid)
    await asyncio.to_thread(probe.measure_idle, args.idle_seconds)
    if args.protocol == "grpc":
        from . import grpc_load

        async with grpc_load.channel(args.grpc) as ch:
            stub = grpc_load.pb_grpc.SegmentationStub(ch)
            make = grpc_load.request_factory(body, "jpeg", args.format, args.model)
            return await sweep(grpc_load.unary_sender(stub, make, grpc_metadata(args)), args, "grpc", probe)
    params = {"format": args.format, **({"model": args.model} if args.model else {})}
    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
    async with httpx.AsyncClient(base_url=args.url, timeout=300, limits=limits, headers=headers) as client:
        return await sweep(rest_sender(client, body, params), args, "rest", probe)


def grpc_metadata(args) -> tuple:
    return (("x-api-key", args.api_key),) if args.api_key else ()


async def run_streams(args) -> tuple[list, int | None]:
    """Stream levels at --target-fps (--streams), then the capacity search (--capacity)."""
    from . import grpc_load

    budget = 1 / args.target_fps
    async with grpc_load.channel(args.grpc) as ch:
        stub = grpc_load.pb_grpc.SegmentationStub(ch)
        make = grpc_load.request_factory(
            sample_jpeg(parse_shape(args.size), args.image), args.stream_send, args.format, args.model
        )
        meta = grpc_metadata(args)
        await grpc_load.stream_level(stub, make, 1, args.target_fps, 1.0, meta, args.policy)  # warm-up
        levels = [
            await grpc_load.stream_level(stub, make, int(n), args.target_fps, args.seconds, meta, args.policy)
            for n in args.streams.split(",")
            if n
        ]
        capacity = None
        if args.capacity:
            print(f"capacity search: streams at {args.target_fps:g} fps, {args.seconds:g} s per level", file=sys.stderr)
            capacity, tried = await grpc_load.capacity_search(
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
    p = argparse.ArgumentParser(
        prog="bisenet bench service",
        description="Load sweeps over REST or gRPC and paced gRPC streams, beside the raw engine measured in the same run.",
    )
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--spawn", metavar="ARGS", help="start `bisenet serve ARGS` on free ports for the run")
    p.add_argument(
        "--pid",
        type=int,
        default=None,
        help="PID of a service running on this machine (--url), to report its front-end and worker CPU "
        "per frame (--spawn knows it)",
    )
    p.add_argument(
        "--idle-seconds",
        type=float,
        default=3.0,
        help="seconds to measure the service's idle CPU before the load; subtracted from the CPU columns",
    )
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
    size = parse_shape(args.size)
    proc = None
    uses_grpc = args.protocol == "grpc" or args.streams or args.capacity
    if args.spawn:
        grpc_port = free_port() if uses_grpc else 0
        proc, args.url = spawn_service(args.spawn, grpc_port=grpc_port)
        args.pid = proc.pid
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
        from .grpc_load import print_stream_table

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
    return parse_shape(text or "2048x1024")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False
