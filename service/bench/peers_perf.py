"""Triton's load tool, perf_analyzer, as `bisenet bench peers` and the tests run it.

The binary is the one inside tritonclient[all]==2.51.0 in .venv-peers (tools/ensure_peers_venv.sh):
the newest that runs on glibc 2.36. It needs libcudart from nvidia-cuda-runtime-cu12 on
LD_LIBRARY_PATH even on a CPU machine, and Debian's libb64-0d.
"""

from __future__ import annotations

import base64
import csv
import glob
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def peers_venv() -> Path:
    """The peers' virtual environment: $BISENET_PEERS_VENV, else .venv-peers in the checkout."""
    return Path(os.environ.get("BISENET_PEERS_VENV") or ROOT / ".venv-peers")


def perf_analyzer_binary(venv: Path | None = None) -> Path | None:
    path = (venv or peers_venv()) / "bin" / "perf_analyzer"
    return path if os.access(path, os.X_OK) else None


def perf_env(venv: Path | None = None) -> dict:
    """The environment perf_analyzer starts in: the venv's libcudart first on LD_LIBRARY_PATH."""
    venv = venv or peers_venv()
    libs = glob.glob(str(venv / "lib" / "python3*" / "site-packages" / "nvidia" / "cuda_runtime" / "lib"))
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, *filter(None, [env.get("LD_LIBRARY_PATH")])])
    return env


def rgb_zeros(folder: Path, height: int, width: int) -> Path:
    """perf_analyzer's input-data JSON: one `RGB` tensor of zeros, base64-encoded raw bytes."""
    data = {
        "data": [{"RGB": {"b64": base64.b64encode(bytes(height * width * 3)).decode(), "shape": [height, width, 3]}}]
    }
    path = folder / "rgb.json"
    path.write_text(json.dumps(data))
    return path


@dataclass
class PerfResult:
    protocol: str
    concurrency: int
    throughput: float  # inferences/s
    p50_ms: float
    p90_ms: float
    p99_ms: float
    # The server's own split of a request (Triton's statistics extension), ms per request:
    # queue, compute input, compute infer, compute output; None when the server has no statistics.
    server_ms: tuple[float, float, float, float] | None = None


def run_perf_analyzer(
    url: str,
    model: str,
    protocol: str,
    concurrency: int,
    shape: tuple[int, int],
    window_ms: int = 2000,
    trials: int = 4,
    headers: dict | None = None,
    timeout: float = 120.0,
    venv: Path | None = None,
) -> PerfResult:
    """One perf_analyzer measurement at a fixed concurrency against a v2 server (Triton or the service).

    It sends `RGB` uint8 zeros of HxWx3 (no decoding: the serving path and the engine only), batch 1,
    and measures `max(trials, 3)` windows of `window_ms`; its summary row is returned.
    RuntimeError with perf_analyzer's own words when it fails.
    """
    binary = perf_analyzer_binary(venv)
    if binary is None:
        raise RuntimeError(f"no perf_analyzer in {venv or peers_venv()}: run tools/ensure_peers_venv.sh")
    height, width = shape
    with tempfile.TemporaryDirectory(prefix="perf-") as tmp:
        out = Path(tmp) / "perf.csv"
        cmd = [
            str(binary),
            "-m",
            model,
            "-u",
            url,
            "-i",
            protocol,
            "--concurrency-range",
            f"{concurrency}:{concurrency}",
            # Zeros for RGB only: with --input-data zero it would send every input of the model
            # configuration, and a request carries one of IMAGE and RGB.
            "--input-data",
            str(rgb_zeros(Path(tmp), height, width)),
            "-p",
            str(window_ms),
            # Bounded in time: `trials` windows (3 at least, what the stability check looks at),
            # whatever their spread on a shared CPU, instead of perf_analyzer's wait for a 10 % spread.
            "--max-trials",
            str(max(trials, 3)),
            "--stability-percentage",
            "1000",
            "-f",
            str(out),
        ]
        for key, value in (headers or {}).items():
            cmd += ["-H", f"{key}:{value}"]
        proc = subprocess.run(cmd, env=perf_env(venv), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-6:]
            raise RuntimeError(f"perf_analyzer exited {proc.returncode}: " + " | ".join(tail))
        rows = list(csv.DictReader(out.read_text().splitlines()))
    row = rows[-1]
    return PerfResult(
        protocol,
        int(row["Concurrency"]),
        float(row["Inferences/Second"]),
        float(row["p50 latency"]) / 1000,
        float(row["p90 latency"]) / 1000,
        float(row["p99 latency"]) / 1000,
        server_phases(row),
    )


SERVER_COLUMNS = ("Server Queue", "Server Compute Input", "Server Compute Infer", "Server Compute Output")


def server_phases(row: dict) -> tuple[float, float, float, float] | None:
    """perf_analyzer's server-side columns (µs), present when the server answers statistics, in ms."""
    if not all(row.get(column) for column in SERVER_COLUMNS):
        return None
    queue, compute_input, infer, output = (float(row[column]) / 1000 for column in SERVER_COLUMNS)
    return queue, compute_input, infer, output
