"""`bisenet bench peers`: the same engine served by Triton (PyTriton), Ray Serve and this service,
driven by the same load on the same machine, the peers measured in turn.

    bisenet bench peers                                   # CPU: 256x512 frames, concurrency 1,4,16
    bisenet bench peers --gpu                             # 1024x2048 frames at the Cityscapes scale
    bisenet bench peers --peers service,ray --seconds 5   # a subset, shorter levels

Every peer builds the engine with the same architecture, weights, device, resize scale, batch buckets
(max batch) and torch threads, decodes with the service's decoder, and batches for at most
--max-delay-ms. The HTTP load (JPEG in, label map out) runs against all three; perf_analyzer (v2, HTTP
and gRPC, RGB zeros) against Triton and against this service when it answers Triton's model
configuration. Triton runs in .venv-peers (tools/ensure_peers_venv.sh, made on first use); Ray Serve in
this venv. Prints one Markdown table with each peer's ratio to this service.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ..config import parse_shape
from .load import Level, closed_loop, sample_jpeg
from .peers_clients import raw_labels_sender, v2_image_sender
from .peers_engine import EngineSpec
from .peers_perf import ROOT, PerfResult, peers_venv, perf_analyzer_binary, run_perf_analyzer
from .processes import free_port, service_command

PEERS = ("service", "triton", "ray")
START_TIMEOUT = 600.0


@dataclass
class Peer:
    """A running peer: its process, where to reach it, and how the HTTP load talks to it."""

    name: str
    proc: subprocess.Popen
    log: Path
    url: str
    grpc: str | None = None  # host:port of its v2 gRPC, when it has one
    v2: bool = False  # answers Triton's model configuration (perf_analyzer can drive it)
    perf_headers: dict = field(default_factory=dict)
    scratch: Path | None = None  # a folder of its own, removed once it stopped
    ready: bool = False  # answered and warmed up

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        # Helpers the peer left behind (Ray's agents outlive ray.shutdown) are in its process group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


def _popen(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a process group of its own, swept by Peer.stop
        )


def thread_env(threads: int) -> dict:
    """The same OpenMP settings for every peer's processes.

    Threads: torch.set_num_threads in one thread is not enough, the threads that run the engine
    (PyTriton's and Ray's handler threads) start from OMP_NUM_THREADS. Wait policy: OpenMP's default
    spins while it waits; on a machine with more runnable threads than cores, the thread that owns
    OpenMP's pool (the service's engine thread) then ran R18 5-7x slower than a handler thread of the
    same process (see docs/peers.md). PASSIVE for everyone compares the serving, not the spinning."""
    env = {"OMP_WAIT_POLICY": "PASSIVE"}
    if threads:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return env


def start_peer(name: str, spec: EngineSpec, max_delay_ms: float, logs: Path, venv: Path) -> Peer:
    """Start one peer on free loopback ports (returns at once; `wait_ready` waits)."""
    log = logs / f"{name}.log"
    http = free_port()
    env = thread_env(spec.threads)
    if name == "service":
        grpc = free_port()
        args = [*spec.service_args(), "--max-delay-ms", str(max_delay_ms), "--log-level", "warning"]
        proc = _popen(service_command(http, grpc, args), log, env)
        return Peer(name, proc, log, f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc}")
    if name == "triton":
        python = venv / "bin" / "python"
        if not python.exists():
            raise RuntimeError(f"no {venv}: run tools/ensure_peers_venv.sh (it builds the PyTriton venv)")
        grpc, token = free_port(), secrets.token_hex(16)
        cmd = [str(python), "-m", "service.bench.peers_triton", *spec.cli_args()]
        cmd += ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(free_port())]
        cmd += ["--max-delay-ms", str(max_delay_ms), "--access-token", token]
        proc = _popen(cmd, log, env)
        peer = Peer(name, proc, log, f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc}", v2=True)
        peer.perf_headers = {
            "http": {"triton-access-token": token},
            "grpc": {"triton-grpc-protocol-triton-access-token": token},
        }
        return peer
    if name == "ray":
        cmd = [sys.executable, "-m", "service.bench.peers_ray", *spec.cli_args()]
        # Ray's temporary folder holds its Unix sockets: a short path under /tmp (107-byte limit).
        scratch = Path(tempfile.mkdtemp(prefix="bisenet-ray-"))
        cmd += ["--http-port", str(http), "--max-delay-ms", str(max_delay_ms), "--temp-dir", str(scratch)]
        return Peer(name, _popen(cmd, log, env), log, f"http://127.0.0.1:{http}", scratch=scratch)
    raise ValueError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")


def http_sender(peer: Peer, client: httpx.AsyncClient, model: str, jpeg: bytes, pixels: int):
    """The JPEG-in, labels-out request each peer understands."""
    if peer.name == "triton":
        return v2_image_sender(client, model, jpeg, pixels)
    params = {"format": "raw", "model": model} if peer.name == "service" else None
    return raw_labels_sender(client, "/segment", jpeg, pixels, params)


async def wait_ready(peer: Peer, send, timeout: float = START_TIMEOUT) -> None:
    """Until one real request succeeds (the model loaded and warm), or the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if peer.proc.poll() is not None:
            raise RuntimeError(f"{peer.name} exited with code {peer.proc.returncode}:\n{peer.log_tail()}")
        if await send():
            return
        await asyncio.sleep(0.5)
    raise TimeoutError(f"{peer.name} not ready within {timeout:g} s:\n{peer.log_tail()}")


def has_v2_config(url: str, model: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/v2/models/{model}/config", timeout=10).status_code == 200
    return False


@dataclass
class Row:
    peer: str
    client: str  # "http load" or "perf_analyzer http/grpc"
    concurrency: int
    throughput: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    ok: str = ""  # ok/sent for the HTTP load
    server_ms: tuple | None = None  # perf_analyzer's server-side split: queue, input, infer, output

    @classmethod
    def from_level(cls, peer: str, level: Level) -> Row:
        return cls(
            peer,
            "http jpeg",
            int(level.load.split("=")[1]),
            level.throughput,
            level.percentile(50) * 1000,
            level.percentile(90) * 1000,
            level.percentile(99) * 1000,
            f"{level.ok}/{level.sent}",
        )

    @classmethod
    def from_perf(cls, peer: str, result: PerfResult) -> Row:
        return cls(
            peer,
            f"perf_analyzer {result.protocol}",
            result.concurrency,
            result.throughput,
            result.p50_ms,
            result.p90_ms,
            result.p99_ms,
            server_ms=result.server_ms,
        )


async def http_rows(peer: Peer, args, spec: EngineSpec, jpeg: bytes, levels: list[int], log) -> list[Row]:
    """The HTTP JPEG load at each of `levels`, once the peer answers (the first call also warms it;
    with no levels, that is all it does)."""
    height, width = parse_shape(args.size)
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    rows: list[Row] = []
    async with httpx.AsyncClient(base_url=peer.url, timeout=120, limits=limits) as client:
        send = http_sender(peer, client, spec.model, jpeg, height * width)
        if not peer.ready:
            await wait_ready(peer, send)
            log(f"{peer.name}: ready")
            await closed_loop(send, 1, args.warmup, 120)  # warm-up, not reported
            peer.ready = True
        for c in levels:
            level = await closed_loop(send, c, args.requests, args.seconds)
            level.load = f"c={c}"
            rows.append(Row.from_level(peer.name, level))
            log(f"{peer.name}: http c={c}: {level.throughput:.2f}/s, {level.ok}/{level.sent} ok")
    return rows


def perf_rows(peer: Peer, args, spec: EngineSpec, levels: list[int], log) -> list[Row]:
    """perf_analyzer over v2 HTTP and gRPC at each of `levels`, for a peer with Triton's model config."""
    if not args.perf_analyzer:
        return []
    peer.v2 = peer.v2 or has_v2_config(peer.url, spec.model)
    if not peer.v2:
        log(f"{peer.name}: no v2 model configuration, perf_analyzer skipped")
        return []
    rows = []
    for protocol, url in (("http", peer.url.removeprefix("http://")), ("grpc", peer.grpc)):
        if url is None:
            continue
        for c in levels:
            try:
                result = run_perf_analyzer(
                    url,
                    spec.model,
                    protocol,
                    c,
                    parse_shape(args.size),
                    window_ms=args.perf_window_ms,
                    trials=args.perf_trials,
                    headers=peer.perf_headers.get(protocol),
                )
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                log(f"{peer.name}: perf_analyzer {protocol} c={c} failed: {exc}")
                continue
            rows.append(Row.from_perf(peer.name, result))
            log(f"{peer.name}: perf_analyzer {protocol} c={c}: {result.throughput:.2f}/s")
    return rows


def run_one_at_a_time(names: list[str], args, spec: EngineSpec, jpeg: bytes, tmp: Path, venv: Path, log) -> list[Row]:
    """Each peer alone on the machine: started, measured at every level, stopped."""
    rows: list[Row] = []
    for name in names:
        peer = start_peer(name, spec, args.max_delay_ms, tmp, venv)
        try:
            rows += asyncio.run(http_rows(peer, args, spec, jpeg, args.levels, log))
            rows += perf_rows(peer, args, spec, args.levels, log)
        finally:
            peer.stop()
    return rows


def run_interleaved(names: list[str], args, spec: EngineSpec, jpeg: bytes, tmp: Path, venv: Path, log) -> list[Row]:
    """All peers up at once (idle ones wait), measured in turn level by level: on a shared machine a
    change of load from outside then falls on every peer alike instead of on whichever ran then."""
    peers = []
    rows: list[Row] = []
    try:
        for name in names:
            peers.append(start_peer(name, spec, args.max_delay_ms, tmp, venv))
        # Every peer up and warm before any is measured: the first one measured would otherwise share
        # the cores with the others' start-up (Ray's is heavy), which made it look slower.
        for peer in peers:
            asyncio.run(http_rows(peer, args, spec, jpeg, [], log))  # no levels: readiness and warm-up
        for c in args.levels:
            for peer in peers:
                rows += asyncio.run(http_rows(peer, args, spec, jpeg, [c], log))
        for c in args.levels:
            for peer in peers:
                rows += perf_rows(peer, args, spec, [c], log)
    finally:
        for peer in peers:
            peer.stop()
    return rows


def print_rows(rows: list[Row], title: str) -> None:
    """One table; each peer's throughput and p99 as a ratio to the service's for the same client and load."""
    base = {(r.client, r.concurrency): r for r in rows if r.peer == "service"}
    print(f"\n{title}\n")
    print(
        "| peer | client | concurrency | ok/sent | images/s | p50 ms | p90 ms | p99 ms | images/s vs service "
        "| p99 vs service | server ms: queue / input / infer / output |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r.client, r.concurrency, PEERS.index(r.peer))):
        ref = base.get((r.client, r.concurrency))
        tput = f"{r.throughput / ref.throughput:.2f}x" if ref and ref.throughput else "n/a"
        p99 = f"{r.p99_ms / ref.p99_ms:.2f}x" if ref and ref.p99_ms else "n/a"
        print(
            f"| {r.peer} | {r.client} | {r.concurrency} | {r.ok or '-'} | {r.throughput:.2f} | "
            f"{r.p50_ms:.1f} | {r.p90_ms:.1f} | {r.p99_ms:.1f} | {tput} | {p99} | {server_split(r)} |"
        )


def server_split(row: Row) -> str:
    """The server's own time split, as perf_analyzer read it from the statistics extension."""
    return " / ".join(f"{ms:.1f}" for ms in row.server_ms) if row.server_ms else "-"


def ensure_venv(venv: Path, log) -> None:
    """Build .venv-peers on first use (minutes; a stamp file makes later calls instant)."""
    log(f"peers venv: {venv} (tools/ensure_peers_venv.sh)")
    subprocess.run(["bash", str(ROOT / "tools" / "ensure_peers_venv.sh"), str(venv)], cwd=ROOT, check=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bisenet bench peers",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--peers", default=",".join(PEERS), help="comma-separated, from service, triton, ray")
    p.add_argument("--gpu", action="store_true", help="device cuda, 1024x2048 frames, resize scale 2048x1024")
    p.add_argument("--model", default="bisenetv1_r18", help="architecture or zoo entry served by every peer")
    p.add_argument("--weights", default="random", help="weights for every peer (speed does not depend on them)")
    p.add_argument("--device", default=None, help="default: cuda with --gpu, else cpu")
    p.add_argument("--size", default=None, help="HxW of the JPEG sent (default 256x512, 1024x2048 with --gpu)")
    p.add_argument(
        "--resize-scale",
        default=None,
        help="the engine's test-time resize (default: the frame's own size; --gpu 2048x1024)",
    )
    p.add_argument("--max-batch", type=int, default=4, help="every peer's largest batch")
    p.add_argument("--max-delay-ms", type=float, default=5.0, help="every peer's longest wait to fill a batch")
    p.add_argument("--threads", type=int, default=0, help="torch threads per engine (default: torch's own)")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=400, help="requests per level at most")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds per level at most")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument(
        "--one-at-a-time",
        action="store_true",
        help="run each peer alone (default: all up at once, measured in turn level by level)",
    )
    p.add_argument("--no-perf-analyzer", dest="perf_analyzer", action="store_false")
    p.add_argument("--perf-window-ms", type=int, default=2000, help="perf_analyzer measurement window")
    p.add_argument("--perf-trials", type=int, default=3, help="perf_analyzer windows at most per level")
    p.add_argument("--venv", default=None, help="the peers venv (default .venv-peers, or $BISENET_PEERS_VENV)")
    p.add_argument("--no-build-venv", dest="build_venv", action="store_false", help="fail instead of building it")
    return p


def spec_from(args) -> EngineSpec:
    height, width = parse_shape(args.size)
    scale = parse_shape(args.resize_scale) if args.resize_scale else (max(height, width), min(height, width))
    threads = args.threads
    if not threads:
        import torch

        threads = torch.get_num_threads()  # what a fresh process (the service's worker) gets
    return EngineSpec(args.model, args.weights, args.device, scale, args.max_batch, (height, width), threads)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.device = args.device or ("cuda" if args.gpu else "cpu")
    args.size = args.size or ("1024x2048" if args.gpu else "256x512")
    if args.gpu and not args.resize_scale:
        args.resize_scale = "2048x1024"
    args.levels = [int(v) for v in args.concurrency.split(",") if v]
    names = [n for n in args.peers.split(",") if n]
    unknown = set(names) - set(PEERS)
    if unknown:
        raise SystemExit(f"unknown peer(s) {', '.join(sorted(unknown))}; choose from {', '.join(PEERS)}")
    venv = Path(args.venv) if args.venv else peers_venv()
    log = lambda line: print(line, file=sys.stderr, flush=True)
    needs_venv = "triton" in names or args.perf_analyzer
    if needs_venv and args.build_venv:
        ensure_venv(venv, log)
    if args.perf_analyzer and perf_analyzer_binary(venv) is None:
        log(f"no perf_analyzer in {venv}: perf_analyzer rows skipped")
        args.perf_analyzer = False
    os.environ["BISENET_PEERS_VENV"] = str(venv)
    spec = spec_from(args)
    jpeg = sample_jpeg(parse_shape(args.size), None)
    with tempfile.TemporaryDirectory(prefix="bisenet-peers-") as tmp:
        run = run_one_at_a_time if args.one_at_a_time else run_interleaved
        rows = run(names, args, spec, jpeg, Path(tmp), venv, log)
    print_rows(
        rows,
        f"{spec.model} ({spec.weights} weights) on {spec.device}, {args.size} JPEG, resize scale "
        f"{'x'.join(map(str, spec.resize_scale))}, max batch {spec.max_batch}, max delay {args.max_delay_ms:g} ms, "
        f"{spec.threads} torch threads; closed loop, <= {args.requests} requests or {args.seconds:g} s per level; "
        f"{'one peer at a time' if args.one_at_a_time else 'peers measured in turn, level by level'}",
    )
    return 0
