"""tools/bench_labels.py: one process per budget, the table, and the check that labels agree."""

from __future__ import annotations

import subprocess
import sys

from tests.servicekit import ROOT


def test_bench_labels_prints_the_table_and_checks_labels_agree():
    cmd = [sys.executable, "tools/bench_labels.py", "--size", "600x800", "--budgets", "200,1", "--repeats", "1"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines() if line.startswith("| ") and "budget" not in line]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [("200", "19"), ("1", "1")], run.stdout
    for row in rows:
        assert float(row[2]) > 0 and float(row[3]) >= 0  # median ms, peak MB
    assert "labels identical across budgets: yes" in run.stdout
