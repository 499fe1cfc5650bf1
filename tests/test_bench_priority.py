"""`bisenet bench priority`: the table's arithmetic, and one bounded run against the real service."""

from __future__ import annotations

import re
import subprocess
from types import SimpleNamespace

from service.bench.load import Level
from service.bench.priority import Scenario, print_table
from tests.servicekit import BISENET, ROOT


def level(latencies_ms: list[float], seconds: float = 1.0) -> Level:
    latencies = [ms / 1000 for ms in latencies_ms]
    return Level("poisson", "4/s", len(latencies), len(latencies), 0, seconds, latencies)


def test_ratios_are_against_the_live_client_alone(capsys):
    args = SimpleNamespace(rate=4.0, background=16, size="128x256", requests=60, seconds=15.0)
    scenarios = [
        Scenario("alone", level([100.0] * 10), None),
        Scenario("flood, same priority", level([400.0] * 10), level([50.0] * 20, seconds=2.0)),
        Scenario("flood, priority 2", level([150.0] * 10), level([50.0] * 18, seconds=2.0)),
    ]
    print_table(scenarios, args)
    out = capsys.readouterr().out
    assert "| alone | 10/10 | 100.0 | 100.0 | 1.00x | 1.00x | - |" in out
    assert "| flood, same priority | 10/10 | 400.0 | 400.0 | 4.00x | 4.00x | 10.00 |" in out
    assert "| flood, priority 2 | 10/10 | 150.0 | 150.0 | 1.50x | 1.50x | 9.00 |" in out


def test_cli_prints_the_three_scenarios():
    """Bounded: 6 live requests or 3 s per scenario, 4 flood clients, tiny frames."""
    service = "--model bisenetv1_r18=random --device cpu --resize-scale 128x64 --max-batch 2 --warm-shapes 64x128"
    proc = subprocess.run(
        [BISENET, "bench", "priority", "--service", service, "--size", "64x128"]
        + ["--rate", "3", "--background", "4", "--requests", "6", "--seconds", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| ([a-z ,0-9]+) \| (\d+/\d+) \|", proc.stdout, re.M)}
    assert list(rows) == ["alone", "flood, same priority", "flood, priority 2"], proc.stdout
    for name, ok_sent in rows.items():
        ok, sent = map(int, ok_sent.split("/"))
        assert ok == sent > 0, (name, ok_sent)
