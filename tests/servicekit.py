"""Start the real service (`bisenet serve`, as `python -m service`) as a subprocess on free 127.0.0.1 ports."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
from PIL import Image

from service.bench.processes import free_port, service_command, wait_http_ready
from service.proto import segmentation_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
BISENET = str(Path(sys.executable).with_name("bisenet"))  # the installed console script
# Small test-time resize so CPU inference takes milliseconds; the pipeline is otherwise the real one.
FAST_ARGS = ["--device", "cpu", "--warm-shapes", "none", "--resize-scale", "256x128", "--log-level", "warning"]


class Service:
    def __init__(self, args: list[str], env: dict | None = None, log_path: Path | None = None):
        self.http_port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        cmd = service_command(self.http_port, self.grpc_port, args)
        if log_path is not None:  # the test reads the service's output
            self.log = open(log_path, "wb")  # noqa: SIM115
        else:
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


def png(array: np.ndarray) -> bytes:
    """An RGB array as PNG bytes (lossless: the service decodes exactly these pixels)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    return buf.getvalue()


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


def server_timing(response) -> dict[str, float]:
    """A response's Server-Timing header as {stage: milliseconds}."""
    parts = (part.strip().split(";dur=") for part in response.headers["Server-Timing"].split(","))
    return {stage: float(ms) for stage, ms in parts}


def service_metric(service: Service, name: str, **labels) -> float:
    """One metric of a running service, summed over the samples matching `labels`."""
    return metric_value(service.metrics(), name, **labels)


def wait_for(predicate, what: str = "the condition", timeout: float = 60.0, every: float = 0.05) -> None:
    """Poll `predicate` until it is true; fail after `timeout` seconds naming `what`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def wait_for_metrics(service: Service, timeout: float = 30.0, **expected) -> str:
    """Poll /metrics until each `name=value` holds (summed over labels); return the last text."""
    texts = [service.metrics()]

    def settled() -> bool:
        texts.append(service.metrics())
        return all(metric_value(texts[-1], name) == value for name, value in expected.items())

    try:
        wait_for(settled, "metrics to settle", timeout, every=0.1)
    except AssertionError:
        got = {name: metric_value(texts[-1], name) for name in expected}
        raise AssertionError(f"metrics did not settle: expected {expected}, got {got}") from None
    return texts[-1]


# -- holding processes: a stopped worker completes nothing, so tests need no races -----------------
def proc_state(pid: int) -> str:
    """One-letter state from /proc/PID/stat ('T' stopped, 'Z' zombie, '?' gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return "?"
    return stat[stat.rindex(")") + 2]


def sigstop(*pids: int) -> None:
    """SIGSTOP each process and wait until the kernel reports it stopped."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    for pid in pids:
        wait_for(lambda pid=pid: proc_state(pid) in ("T", "t"), f"process {pid} to stop", timeout=10, every=0.005)


def sigcont(*pids: int) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def held(*pids: int):
    """The processes stopped for the `with` block, and always resumed after it."""
    sigstop(*pids)
    try:
        yield
    finally:
        sigcont(*pids)


@contextlib.contextmanager
def segmentation_stub(target: str):
    """A plaintext channel to the service's gRPC port, once connected, as a Segmentation stub."""
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield pb_grpc.SegmentationStub(channel)


def make_certificate(folder: Path, name: str = "service") -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and localhost (openssl): (cert.pem, key.pem) paths."""
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"]
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", *subject]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return str(cert), str(key)
