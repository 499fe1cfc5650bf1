"""tools/bench_tracing.py end to end, bounded: a tiny image, five requests per variant."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.servicekit import ROOT


def test_prints_a_row_per_variant_with_the_spans_each_exported():
    done = subprocess.run(
        [sys.executable, "tools/bench_tracing.py", "--size", "64x128", "--requests", "5", "--warmup", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = re.findall(
        r"^\| ([a-z0-9 ()]+) \| [\d.]+ \| [\d.]+ \| [\d.]+ \| ([\d.]+) \| ([\d.]+)x \| [\d.]+x \|$", done.stdout, re.M
    )
    assert [(name, spans) for name, spans, _ in rows] == [
        ("off", "0.0"),
        ("rate 1 (all exported)", "6.0"),  # POST /segment, decode, queue, infer, prepare, encode
        ("rate 0 (none sampled)", "0.0"),
    ], done.stdout
    assert rows[0][2] == "1.00"
