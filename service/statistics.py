"""Triton's statistics extension: per model, counts and cumulative nanoseconds of each phase.

This is what `GET /v2/models/{model}/stats` and gRPC `ModelStatistics` answer, and what Triton's
perf_analyzer reads to split the server's side of a request's latency into queue, compute input,
compute infer and compute output (the rest it calls overhead). The phases, per image:

- queue: from the image's entry into the worker's queue to the start of its batch;
- compute_input: decoding the image (or reading its header) and placing it in shared memory in the
  front end, then the worker's preparation of the batch (decoding there with --decode worker);
- compute_infer: the rest of the batch in the worker: network, resize, argmax, labels into
  shared memory (copies to and from the device included);
- compute_output: encoding the response (PNG, JSON, raw bytes or v2 tensors), shared evenly by
  the images encoded together.

`success` and `fail` time whole requests (a v2 request may carry several images); the phases and
`inference_count` count images; `execution_count` and `batch_stats` count the worker's batches.
Everything is in the front end's event loop, so no locks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

PHASES = ("compute_input", "compute_infer", "compute_output")
VERSION = "1"  # every served model has the one version


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += max(round(seconds * 1e9), 0)  # clocks of two processes may disagree by a hair

    def as_dict(self) -> dict:
        return {"count": self.count, "ns": self.ns}


def _phases() -> dict[str, Duration]:
    return {phase: Duration() for phase in PHASES}


def _add(phases: dict[str, Duration], *seconds: float) -> None:
    """Seconds of compute input, infer and output, in that order."""
    for phase, value in zip(PHASES, seconds, strict=True):
        phases[phase].add(value)


@dataclass
class ModelStatistics:
    name: str
    last_inference: int = 0  # milliseconds since the epoch, of the last image served
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    phases: dict[str, Duration] = field(default_factory=_phases)
    batches: dict[int, dict[str, Duration]] = field(default_factory=dict)  # batch size -> phases

    @property
    def inference_count(self) -> int:
        """Images served: each one waited in the queue once."""
        return self.queue.count

    @property
    def execution_count(self) -> int:
        """Batches run, of every size."""
        return sum(phases["compute_infer"].count for phases in self.batches.values())

    def as_dict(self) -> dict:
        """The extension's JSON for one model (Triton's field names and nesting)."""
        inference_stats = {"success": self.success, "fail": self.fail, "queue": self.queue, **self.phases}
        return {
            "name": self.name,
            "version": VERSION,
            "last_inference": self.last_inference,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {key: d.as_dict() for key, d in inference_stats.items()},
            "batch_stats": [
                {"batch_size": size, **{phase: d.as_dict() for phase, d in phases.items()}}
                for size, phases in sorted(self.batches.items())
            ],
        }


class Statistics:
    def __init__(self, models: list[str] = ()):
        self.models = {name: ModelStatistics(name) for name in models}

    def add_models(self, models: list[str]) -> None:
        for name in models:
            self.models.setdefault(name, ModelStatistics(name))

    def request(self, model: str, ok: bool, seconds: float) -> None:
        """A whole request, answered or refused. Requests refused before their model was known are
        nobody's (`model` is not a served name) and are not counted."""
        stats = self.models.get(model)
        if stats is not None:
            (stats.success if ok else stats.fail).add(seconds)

    def image(self, model: str, queue: float, compute_input: float, compute_infer: float, compute_output: float):
        """One image served; seconds in each phase."""
        stats = self.models.get(model)
        if stats is None:
            return
        stats.last_inference = int(time.time() * 1000)
        stats.queue.add(queue)
        _add(stats.phases, compute_input, compute_infer, compute_output)

    def batch(self, model: str, size: int, compute_input: float, compute_infer: float, compute_output: float):
        """One batch the worker ran; seconds in each phase for the whole batch."""
        stats = self.models.get(model)
        if stats is None:
            return
        _add(stats.batches.setdefault(size, _phases()), compute_input, compute_infer, compute_output)

    def snapshot(self, model: str | None = None) -> list[dict]:
        """Every model's statistics (in the order served), or the one named."""
        chosen = [self.models[model]] if model else self.models.values()
        return [stats.as_dict() for stats in chosen]
