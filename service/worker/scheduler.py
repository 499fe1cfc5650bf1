"""Batching policy of the worker: dynamic batches of same-model, same-shape requests.

- Requests are grouped by (model, tta, height, width): only those can share a batch (and a graph).
- Urgency is the request's deadline, or arrival + the frame budget when it has none. Among the
  groups that are due, the one holding the request of the highest priority (1 first) runs first,
  and among those the most urgent (earliest deadline first). With `separate` (the default) the
  priority is part of the group: requests of different priorities never share a batch, so a
  high-priority request never computes beside lower ones. With `shared` (Triton's way) a batch
  takes its group's requests in priority order, and lower priorities fill what room is left.
- Three policies decide when a group is due:
  `wait`: when the group holds `max_batch` requests, when its oldest request has waited
  `max_delay`, or when its most urgent deadline would pass by waiting longer.
  `greedy`: at once. The worker runs what is queued as soon as it is free, so a lone request never
  waits, and batches form only from what arrives while the previous batch runs.
  `adaptive`: as `wait`, but only while requests are on their way. Each job carries how many
  requests the front end was still decoding when it was sent (`incoming`); once the latest job says
  none, nothing known can join, and the group is due at once.
- Requests whose deadline has passed are handed back as expired, never computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Job:
    id: int
    model: str
    slot: str
    height: int
    width: int
    deadline: float | None  # time.monotonic() value, shared by the processes of one machine
    arrival: float
    tta: str = "none"  # test-time augmentation: none, flip, ms_flip (model/tta.py)
    cost: float = 0.0  # predicted worker seconds (the front end's estimate; counts as work queued ahead)
    urgency: float = field(default=0.0, compare=False)
    encoded: int = 0  # > 0: the slot holds this many bytes of a compressed image (--decode worker)
    incoming: int = 0  # requests the front end was still decoding when it sent this one
    priority: int = 1  # 1 runs first, then 2, ... (--priority-levels)

    @property
    def key(self) -> tuple[str, str, int, int]:
        return self.model, self.tta, self.height, self.width

    @property
    def rank(self) -> tuple[int, float]:
        """What runs first: the highest priority, then the earliest urgency."""
        return self.priority, self.urgency


POLICIES = ("adaptive", "greedy", "wait")
PRIORITY_BATCHES = ("separate", "shared")


class BatchScheduler:
    def __init__(
        self,
        max_batch: int,
        max_delay: float,
        default_budget: float,
        policy: str = "wait",
        priority_batches: str = "separate",
    ):
        if policy not in POLICIES:
            raise ValueError(f"unknown batching policy {policy!r}; use one of {', '.join(POLICIES)}")
        if priority_batches not in PRIORITY_BATCHES:
            raise ValueError(f"priority batches must be one of {', '.join(PRIORITY_BATCHES)}, not {priority_batches!r}")
        self.separate = priority_batches == "separate"
        self.max_batch = max_batch
        self.max_delay = 0.0 if policy == "greedy" else max_delay
        self.policy = policy
        self.default_budget = default_budget
        self.incoming = 0  # what the latest job said is on its way
        self._groups: dict[tuple, list[Job]] = {}
        self._where: dict[int, tuple] = {}

    def __len__(self) -> int:
        return len(self._where)

    def add(self, job: Job) -> None:
        job.urgency = job.deadline if job.deadline is not None else job.arrival + self.default_budget
        self.incoming = job.incoming
        key = (*job.key, job.priority) if self.separate else job.key
        self._groups.setdefault(key, []).append(job)
        self._where[job.id] = key

    def cancel(self, job_id: int) -> Job | None:
        key = self._where.pop(job_id, None)
        if key is None:
            return None
        group = self._groups[key]
        job = next(j for j in group if j.id == job_id)
        group.remove(job)
        if not group:
            del self._groups[key]
        return job

    def expire(self, now: float) -> list[Job]:
        expired = [j for group in self._groups.values() for j in group if j.deadline is not None and j.deadline <= now]
        for job in expired:
            self.cancel(job.id)
        return expired

    def next_batch(self, now: float) -> tuple[list[Job] | None, float | None]:
        """(batch to run now, None) or (None, seconds to wait; None = until a request arrives)."""
        best_key, best_rank, wake = None, None, None
        nothing_coming = self.policy == "adaptive" and self.incoming == 0
        for key, group in self._groups.items():
            rank = min(j.rank for j in group)
            due_at = min(j.arrival for j in group) + self.max_delay
            deadlines = [j.deadline for j in group if j.deadline is not None]
            if deadlines:  # only an explicit deadline cuts the wait short
                due_at = min(due_at, min(deadlines) - self.max_delay)
            if len(group) >= self.max_batch or due_at <= now or nothing_coming:
                if best_rank is None or rank < best_rank:
                    best_key, best_rank = key, rank
            else:
                wake = due_at if wake is None else min(wake, due_at)
        if best_key is None:
            return None, None if wake is None else max(wake - now, 0.0)
        group = sorted(self._groups[best_key], key=lambda j: j.rank)
        batch = group[: self.max_batch]
        for job in batch:
            self.cancel(job.id)
        return batch, None
