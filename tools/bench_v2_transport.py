"""How a v2 frame travels: HTTP binary, gRPC raw, and system shared memory, side by side.

Starts the service (CPU unless --service says otherwise), then sends the same RGB frame
(`--size`, default 1024x2048) one request at a time over each transport, LABELS coming back the
same way (shared memory: written into a region), and prints per transport the client's median and
p90 latency, the server's median time outside its phases (the statistics extension's request time
less queue and compute: reading and parsing the request, writing the response) and the ratio of
the median to HTTP binary's. The network runs on a small resize scale by default so that the
transport is a visible part of each request.

    python tools/bench_v2_transport.py --requests 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.bench.processes import free_port, spawn_service  # noqa: E402

MODEL = "bisenetv1_r18"
DEFAULT_SERVICE = f"--model {MODEL}=random --device cpu --resize-scale 256x128 --warm-shapes none --max-batch 1"


@dataclass
class Row:
    transport: str
    latencies: list[float]
    server_overhead: list[float]  # seconds per request outside queue and compute (statistics)

    def median_ms(self) -> float:
        return statistics.median(self.latencies) * 1000

    def p90_ms(self) -> float:
        return float(np.percentile(self.latencies, 90)) * 1000


def overhead_probe(url: str):
    """A () -> seconds reader: the server's request time outside its phases since the last call."""
    last = [None]

    def totals() -> tuple[int, int, int]:
        (stats,) = httpx.get(f"{url}/v2/models/{MODEL}/stats", timeout=30).json()["model_stats"]
        s = stats["inference_stats"]
        phases = sum(s[p]["ns"] for p in ("queue", "compute_input", "compute_infer", "compute_output"))
        return s["success"]["ns"], phases, s["success"]["count"]

    def read() -> float:
        now = totals()
        before, last[0] = last[0], now
        if before is None or now[2] == before[2]:
            return 0.0
        return ((now[0] - before[0]) - (now[1] - before[1])) / (now[2] - before[2]) / 1e9

    read()
    return read


def transports(url: str, grpc_target: str, frame: np.ndarray):
    """name -> (setup, one request, teardown) for each transport."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    import tritonclient.utils.shared_memory as shm

    frames = frame[None]
    label_bytes = frames.shape[0] * frames.shape[1] * frames.shape[2]
    tag = f"bisenet-bench-{os.getpid()}"

    def plain(module, client, binary: dict):
        def one() -> None:
            tensor = module.InferInput("RGB", list(frames.shape), "UINT8")
            tensor.set_data_from_numpy(frames, **binary)
            out = module.InferRequestedOutput("LABELS", **binary)
            assert client.infer(MODEL, [tensor], outputs=[out]).as_numpy("LABELS").shape == frames.shape[:3]

        return one

    def shared(module, client, label: str):
        """Regions of its own per client (the service's regions are shared by HTTP and gRPC)."""
        names = {part: f"{label}-{part}" for part in ("pixels", "labels")}
        pixels = shm.create_shared_memory_region(names["pixels"], f"/{tag}-{names['pixels']}", frames.nbytes)
        labels = shm.create_shared_memory_region(names["labels"], f"/{tag}-{names['labels']}", label_bytes)
        client.register_system_shared_memory(names["pixels"], f"/{tag}-{names['pixels']}", frames.nbytes)
        client.register_system_shared_memory(names["labels"], f"/{tag}-{names['labels']}", label_bytes)

        def one() -> None:
            shm.set_shared_memory_region(pixels, [frames])  # a camera writes each frame
            tensor = module.InferInput("RGB", list(frames.shape), "UINT8")
            tensor.set_shared_memory(names["pixels"], frames.nbytes)
            out = module.InferRequestedOutput("LABELS")
            out.set_shared_memory(names["labels"], label_bytes)
            client.infer(MODEL, [tensor], outputs=[out])
            assert shm.get_contents_as_numpy(labels, np.uint8, list(frames.shape[:3])).shape == frames.shape[:3]

        def close() -> None:
            for name in names.values():
                client.unregister_system_shared_memory(name)
            shm.destroy_shared_memory_region(pixels)
            shm.destroy_shared_memory_region(labels)

        return one, close

    options = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]
    http = httpclient.InferenceServerClient(url.removeprefix("http://"))
    grpc = grpcclient.InferenceServerClient(grpc_target, channel_args=options)
    http_shm, http_close = shared(httpclient, http, "http")
    grpc_shm, grpc_close = shared(grpcclient, grpc, "grpc")
    return {
        "http binary": plain(httpclient, http, {"binary_data": True}),
        "grpc raw": plain(grpcclient, grpc, {}),
        "http shared memory": http_shm,
        "grpc shared memory": grpc_shm,
    }, lambda: (http_close(), grpc_close(), http.close(), grpc.close())


def measure(url: str, grpc_target: str, frame: np.ndarray, requests: int, rounds: int) -> list[Row]:
    """Each transport in turn, `rounds` times over (so a change in the machine's load falls on all)."""
    sends, close = transports(url, grpc_target, frame)
    rows = {name: Row(name, [], []) for name in sends}
    probe = overhead_probe(url)
    try:
        for send in sends.values():
            send()  # warm: connections, the shape's first run
        for _ in range(rounds):
            for name, send in sends.items():
                probe()
                for _ in range(requests):
                    start = time.perf_counter()
                    send()
                    rows[name].latencies.append(time.perf_counter() - start)
                rows[name].server_overhead.append(probe())
    finally:
        close()
    return list(rows.values())


def print_table(rows: list[Row], size: str) -> None:
    base = rows[0].median_ms()
    print(f"\nRGB {size} in, LABELS out, one request at a time\n")
    print("| transport | requests | median ms | p90 ms | server outside its phases, ms | median vs http binary |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        overhead = statistics.median(r.server_overhead) * 1000
        print(
            f"| {r.transport} | {len(r.latencies)} | {r.median_ms():.1f} | {r.p90_ms():.1f} | {overhead:.1f} | "
            f"{r.median_ms() / base:.2f}x |"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1024x2048", help="HxW of the RGB frame")
    p.add_argument("--requests", type=int, default=10, help="requests per transport per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--service", default=DEFAULT_SERVICE, help="flags for the service this starts")
    args = p.parse_args(argv)
    height, width = (int(v) for v in args.size.lower().split("x"))
    frame = np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8)
    grpc_port = free_port()
    proc, url = spawn_service(args.service, grpc_port=grpc_port)
    try:
        rows = measure(url, f"127.0.0.1:{grpc_port}", frame, args.requests, args.rounds)
    finally:
        proc.terminate()
        proc.wait(60)
    print_table(rows, args.size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
