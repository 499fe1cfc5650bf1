"""Start `python -m service` on free loopback ports and wait for it: for the load generator and the tests."""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
import time

import httpx


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
