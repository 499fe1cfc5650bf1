"""What tracing costs: the same requests with tracing off, on at rate 1 (every request traced and
exported to a local OTLP/HTTP collector), and on at rate 0 (spans made but not sampled).

Starts the service once per variant (same flags otherwise), sends `--requests` PNG requests to each
in turn, one at a time over REST, and prints per variant the client's median and p90 latency, the front-end process's
CPU time per request (its exporter thread included, the idle process's own CPU subtracted) and the
spans the collector received per request. The exporter runs with OpenTelemetry's defaults (a batch
every 5 s), as the service does. The
network runs on a small resize scale by default so the front end's share of each request is visible.

    python tools/bench_tracing.py --requests 200
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.bench.probe import cpu_seconds  # noqa: E402
from service.bench.processes import spawn_service  # noqa: E402
from service.bench.trace_sink import TraceSink  # noqa: E402

MODEL = "bisenetv1_r18"
EXPORT_WAIT = 5.5  # seconds: OpenTelemetry's batch exporter sends every 5 s by default
DEFAULT_SERVICE = f"--model {MODEL}=random --device cpu --resize-scale 256x128 --warm-shapes none --max-batch 1"


def photo_png(height: int, width: int) -> bytes:
    from skimage import data

    image = np.resize(data.astronaut(), (height, width, 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def measure(services: dict[str, tuple], body: bytes, requests: int, warmup: int) -> dict[str, dict]:
    """Requests to each service in turn, one at a time (so a change in the machine's load falls on
    every variant alike); latency per request, and front-end CPU per request over the whole run."""
    clients = {name: httpx.Client(base_url=url, timeout=60) for name, (_, url) in services.items()}

    def send(name: str) -> float:
        start = time.perf_counter()
        response = clients[name].post("/segment", content=body, headers={"content-type": "image/png"})
        assert response.status_code == 200, response.text
        return time.perf_counter() - start

    def cpu() -> dict[str, float]:
        return {name: cpu_seconds(proc.pid) for name, (proc, _) in services.items()}

    try:
        for name in services:
            for _ in range(warmup):
                send(name)
        time.sleep(EXPORT_WAIT)  # the warm-up's spans are exported before the measurement
        before = cpu()
        time.sleep(EXPORT_WAIT)
        idle = {name: seconds - before[name] for name, seconds in cpu().items()}  # subtracted below
        latencies = {name: [] for name in services}
        before = cpu()
        for _ in range(requests):
            for name in services:
                latencies[name].append(send(name))
        time.sleep(EXPORT_WAIT)  # the exporter sends what is left: its work counts too
        after = cpu()
    finally:
        for client in clients.values():
            client.close()
    return {
        name: {
            "median_ms": statistics.median(latencies[name]) * 1000,
            "p90_ms": float(np.percentile(latencies[name], 90)) * 1000,
            "front_cpu_ms": (after[name] - before[name] - idle[name]) / requests * 1000,
        }
        for name in services
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="128x256", help="HxW of the PNG sent")
    p.add_argument("--requests", type=int, default=200, help="requests per variant")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--service", default=DEFAULT_SERVICE, help="flags for the service this starts")
    args = p.parse_args(argv)
    body = photo_png(*(int(v) for v in args.size.lower().split("x")))
    sink = TraceSink()
    variants = {
        "off": "",
        "rate 1 (all exported)": f"--trace-endpoint {sink.url} --trace-rate 1",
        "rate 0 (none sampled)": f"--trace-endpoint {sink.url} --trace-rate 0",
    }
    services = {}
    try:
        for name, flags in variants.items():
            os.environ["OTEL_SERVICE_NAME"] = name  # tells the collector whose spans it received
            services[name] = spawn_service(f"{args.service} {flags}")
        rows = measure(services, body, args.requests, args.warmup)
    finally:
        for proc, _ in services.values():
            proc.terminate()
            proc.wait(60)
        sink.close()
    for name, row in rows.items():
        row["spans"] = sum(resource["service.name"] == name for resource, _ in sink.spans) / (
            args.requests + args.warmup
        )
    off = rows["off"]
    print(f"\nPNG {args.size} over REST, one request at a time, {args.requests} requests per variant\n")
    print(
        "| tracing | median ms | p90 ms | front-end CPU ms/request | spans exported per request | median vs off | CPU vs off |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} | {r['front_cpu_ms']:.2f} | {r['spans']:.1f} | "
            f"{r['median_ms'] / off['median_ms']:.2f}x | {r['front_cpu_ms'] / off['front_cpu_ms']:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
