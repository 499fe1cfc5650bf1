"""What a load level cost the service: CPU time of the front-end and worker processes (from
/proc/PID/stat, so it counts every thread) and the mean batch size (from /metrics)."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx

TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads, not its children); 0 if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime: fields 14 and 15 of stat


def worker_pids(front_pid: int) -> list[int]:
    """The front end's spawned worker processes (multiprocessing's spawn_main, not its tracker)."""
    out = subprocess.run(["pgrep", "-P", str(front_pid)], capture_output=True, text=True).stdout.split()
    pids = []
    for pid in map(int, out):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except FileNotFoundError:
            continue
    return pids


@dataclass
class Snapshot:
    front_cpu: float
    worker_cpu: float
    batch_sum: float
    batch_count: float


@dataclass
class Cost:
    front_ms_per_frame: float | None
    worker_ms_per_frame: float | None
    mean_batch: float | None


class ServiceProbe:
    """Snapshots of one service on this machine; `cost(before, after, frames)` per load level.
    Without a PID (a service elsewhere) only the batch sizes are measured."""

    def __init__(self, url: str | None, front_pid: int | None):
        self.url = url
        self.front_pid = front_pid

    def snapshot(self) -> Snapshot:
        front = worker = 0.0
        if self.front_pid:
            front = cpu_seconds(self.front_pid)
            worker = sum(cpu_seconds(pid) for pid in worker_pids(self.front_pid))
        batch_sum, batch_count = self._batch_totals()
        return Snapshot(front, worker, batch_sum, batch_count)

    def _batch_totals(self) -> tuple[float, float]:
        if not self.url:
            return 0.0, 0.0
        try:
            text = httpx.get(f"{self.url}/metrics", timeout=10).text
        except httpx.HTTPError:
            return 0.0, 0.0
        totals = {"seg_batch_size_sum": 0.0, "seg_batch_size_count": 0.0}
        for line in text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in totals:
                totals[name] += float(line.rsplit(" ", 1)[1])
        return totals["seg_batch_size_sum"], totals["seg_batch_size_count"]

    def cost(self, before: Snapshot, after: Snapshot, frames: int) -> Cost:
        per_frame = 1000 / frames if frames else None
        front = worker = batch = None
        if self.front_pid and per_frame:
            front = (after.front_cpu - before.front_cpu) * per_frame
            worker = (after.worker_cpu - before.worker_cpu) * per_frame
        batches = after.batch_count - before.batch_count
        if batches > 0:
            batch = (after.batch_sum - before.batch_sum) / batches
        return Cost(front, worker, batch)
