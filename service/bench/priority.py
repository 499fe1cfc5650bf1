"""`bisenet bench priority`: what a background flood does to live frames, with and without priorities.

One service is started (or an --url given); a live client sends frames at a fixed Poisson rate
(priority 1, the default) in three scenarios, measured one after the other on the same service:

- alone: the live client only;
- flood, same priority: a background closed loop of `--background` clients at priority 1;
- flood, priority 2: the same flood at priority 2.

The table gives the live frames' latency (from their scheduled send time) and its ratio to
"alone", and the flood's throughput. Bounded: `--seconds` and `--requests` per scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass

import httpx

from .load import Level, closed_loop, open_loop, rest_sender, sample_jpeg
from .processes import spawn_service

DEFAULT_SERVICE = "--model bisenetv1_r18=random --device cpu --resize-scale 256x128 --max-batch 4 --warm-shapes 128x256"


@dataclass
class Scenario:
    name: str
    live: Level
    background: Level | None


async def measure(url: str, body: bytes, args) -> list[Scenario]:
    limits = httpx.Limits(max_connections=args.background + 16)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        live = rest_sender(client, body, {"format": "raw"})
        warm = await closed_loop(live, 2, 8, 30)
        if warm.ok == 0:
            raise RuntimeError(f"the service at {url} answered none of the warm-up requests")
        scenarios = [Scenario("alone", await open_loop(live, args.rate, args.requests, args.seconds), None)]
        for name, priority in (("flood, same priority", 1), ("flood, priority 2", 2)):
            flood = rest_sender(client, body, {"format": "raw", "priority": priority})
            # The flood runs for the whole live measurement: a bound in requests only would let it end early.
            background = asyncio.ensure_future(closed_loop(flood, args.background, 10**9, args.seconds + 1))
            await asyncio.sleep(0.5)  # the flood fills the queue first
            measured = await open_loop(live, args.rate, args.requests, args.seconds)
            scenarios.append(Scenario(name, measured, await background))
    return scenarios


def print_table(scenarios: list[Scenario], args) -> None:
    alone = scenarios[0].live
    print(
        f"\nlive: Poisson {args.rate:g}/s, priority 1; flood: {args.background} closed-loop clients; "
        f"{args.size} JPEG, <= {args.requests} live requests or {args.seconds:g} s per scenario\n"
    )
    print("| scenario | live ok/sent | live p50 ms | live p99 ms | p50 vs alone | p99 vs alone | flood images/s |")
    print("|---|---|---|---|---|---|---|")
    for s in scenarios:
        p50, p99 = s.live.percentile(50), s.live.percentile(99)
        flood = f"{s.background.throughput:.2f}" if s.background else "-"
        print(
            f"| {s.name} | {s.live.ok}/{s.live.sent} | {p50 * 1000:.1f} | {p99 * 1000:.1f} | "
            f"{p50 / alone.percentile(50):.2f}x | {p99 / alone.percentile(99):.2f}x | {flood} |"
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bisenet bench priority", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running service (default: start one with --service)")
    p.add_argument("--service", default=DEFAULT_SERVICE, help="flags for the service this starts")
    p.add_argument("--size", default="128x256", help="HxW of the JPEG both clients send")
    p.add_argument("--rate", type=float, default=4.0, help="live frames per second (Poisson)")
    p.add_argument("--background", type=int, default=16, help="closed-loop clients of the flood")
    p.add_argument("--requests", type=int, default=60, help="live requests per scenario at most")
    p.add_argument("--seconds", type=float, default=15.0, help="seconds per scenario at most")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    height, width = (int(v) for v in args.size.lower().split("x"))
    body = sample_jpeg((height, width), None)
    proc = None
    url = args.url
    if url is None:
        print(f"starting: python -m service {args.service}", file=sys.stderr)
        proc, url = spawn_service(args.service)
    try:
        scenarios = asyncio.run(measure(url.rstrip("/"), body, args))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    print_table(scenarios, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
