"""Start the real service (`bisenet serve`, as `python -m service`) as a subprocess on free 127.0.0.1 ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from service.bench.processes import free_port, service_command, wait_http_ready

ROOT = Path(__file__).resolve().parents[1]
BISENET = str(Path(sys.executable).with_name("bisenet"))  # the installed console script
# Small test-time resize so CPU inference takes milliseconds; the pipeline is otherwise the real one.
FAST_ARGS = ["--device", "cpu", "--warm-shapes", "none", "--resize-scale", "256x128", "--log-level", "warning"]


class Service:
    def __init__(self, args: list[str], env: dict | None = None):
        self.http_port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        cmd = service_command(self.http_port, self.grpc_port, args)
        self.log = open(os.devnull, "wb") if not os.environ.get("SERVICE_LOGS") else None  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=self.log,
            stderr=subprocess.STDOUT if self.log else None,
        )

    def wait_ready(self, timeout: float = 180.0) -> Service:
        wait_http_ready(self.proc, f"{self.url}/readyz", timeout)
        return self

    def worker_pids(self) -> list[int]:
        """The spawned worker processes (children running multiprocessing.spawn, not the tracker)."""
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
        pids = []
        for pid in map(int, out):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if b"spawn_main" in cmdline:
                pids.append(pid)
        return pids

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.log:
            self.log.close()
        return self.proc.returncode


def metric_value(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0.0 if none)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += float(value)
    return total
