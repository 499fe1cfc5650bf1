"""tools/bench_v2_transport.py end to end, bounded: tiny frames, two requests per transport."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servicekit import ROOT

pytest.importorskip("tritonclient.utils.shared_memory")


def test_prints_a_row_per_transport_against_the_real_service():
    proc = subprocess.Popen(
        [sys.executable, "tools/bench_v2_transport.py", "--size", "64x128", "--requests", "2", "--rounds", "1"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    rows = re.findall(r"^\| ([a-z ]+) \| (\d+) \| [\d.]+ \| [\d.]+ \| [\d.]+ \| ([\d.]+)x \|$", stdout, re.M)
    assert [(name, count) for name, count, _ in rows] == [
        ("http binary", "2"),
        ("grpc raw", "2"),
        ("http shared memory", "2"),
        ("grpc shared memory", "2"),
    ], stdout
    assert rows[0][2] == "1.00"
    assert not list(Path("/dev/shm").glob(f"bisenet-bench-{proc.pid}-*"))  # its regions were removed
