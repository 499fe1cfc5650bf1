"""What a load level cost the service: CPU time of the front-end and worker processes (every
thread's, from /proc) and the mean batch size (from /metrics).

An idle service still spends a little CPU (timers, the worker's stats messages); when frames take
seconds, as at full resolution on a CPU, that would be counted against each frame. The probe
measures the idle rate once, before the load, and subtracts it for the length of each level."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """CPU seconds of one process's live threads (not its children); 0 if it is gone. Read from each
    thread's schedstat (nanoseconds), as /proc/PID/stat counts in 10 ms ticks, too coarse here."""
    total, found = 0, False
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0.0
    for tid in tasks:
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
            found = True
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError, ValueError):
            continue
    return total / 1e9 if found else _stat_cpu_seconds(pid)


def _stat_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds from /proc/PID/stat (kernels without schedstat)."""
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
    wall: float = 0.0  # time.monotonic() when taken


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
        self.idle_front = self.idle_worker = 0.0  # CPU seconds per second with no load

    def measure_idle(self, seconds: float) -> None:
        """The idle CPU rate of both processes, to subtract from the levels (call with no load)."""
        if not self.front_pid or seconds <= 0:
            return
        before = self.snapshot(batches=False)  # no /metrics request: it would count as idle CPU
        time.sleep(seconds)
        after = self.snapshot(batches=False)
        elapsed = after.wall - before.wall
        self.idle_front = max(after.front_cpu - before.front_cpu, 0.0) / elapsed
        self.idle_worker = max(after.worker_cpu - before.worker_cpu, 0.0) / elapsed

    def snapshot(self, batches: bool = True) -> Snapshot:
        front = worker = 0.0
        if self.front_pid:
            front = cpu_seconds(self.front_pid)
            worker = sum(cpu_seconds(pid) for pid in worker_pids(self.front_pid))
        batch_sum, batch_count = self._batch_totals() if batches else (0.0, 0.0)
        return Snapshot(front, worker, batch_sum, batch_count, time.monotonic())

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
            elapsed = after.wall - before.wall
            front = max(after.front_cpu - before.front_cpu - self.idle_front * elapsed, 0.0) * per_frame
            worker = max(after.worker_cpu - before.worker_cpu - self.idle_worker * elapsed, 0.0) * per_frame
        batches = after.batch_count - before.batch_count
        if batches > 0:
            batch = (after.batch_sum - before.batch_sum) / batches
        return Cost(front, worker, batch)
