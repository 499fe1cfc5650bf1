"""Latency estimates per (model, tta, input size), from the worker's own measured batch times.

Seeded by the timings each worker measures at warm-up (plain passes at the warm shapes); the first
batch that runs for a key replaces its seed (a warm-up on a busy machine can be far off), later
ones are folded in (exponentially weighted moving average). A key never measured
is predicted from the measured key of the same model whose network work is closest, scaled by
the ratio of work: network input megapixels, summed over a mode's passes (model/tta.py), so an
`ms_flip` estimate exists from the first plain measurement and is corrected once one runs.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from model.tta import work_units

ALPHA = 0.3  # weight of the newest measurement
PROBE_AFTER = 30.0  # seconds without a measurement after which an estimate may be put to the test


@dataclass
class Sample:
    seconds: float  # per image (the batch's time divided by its size)
    units: float  # network megapixels per image
    updated: float  # time.monotonic() of the last measurement (or probe)
    count: int = 1
    seed: bool = False  # only the warm-up measurement so far


class Estimates:
    def __init__(self, scale: tuple[int, int], alpha: float = ALPHA):
        self.scale = tuple(scale)
        self.alpha = alpha
        self._samples: dict[tuple[str, str, int, int], Sample] = {}
        self._lock = threading.Lock()

    def units(self, tta: str, height: int, width: int) -> float:
        return work_units(tta, height, width, self.scale)

    def observe(
        self, model: str, tta: str, height: int, width: int, batch: int, seconds: float, seed: bool = False
    ) -> None:
        """Fold one measured batch time into the estimate of its key (`seed`: a warm-up timing)."""
        if batch < 1 or not math.isfinite(seconds) or seconds < 0:
            return
        key = (model, tta, height, width)
        per_image = seconds / batch
        now = time.monotonic()
        with self._lock:
            sample = self._samples.get(key)
            if sample is None or (sample.seed and not seed):
                count = sample.count + 1 if sample else 1
                self._samples[key] = Sample(per_image, self.units(tta, height, width), now, count, seed)
            else:
                sample.seconds += self.alpha * (per_image - sample.seconds)
                sample.updated = now
                sample.count += 1

    def probe(self, model: str, tta: str, height: int, width: int) -> bool:
        """Whether a request its estimate would refuse should run anyway, to measure again: an
        estimate that nothing has confirmed for PROBE_AFTER seconds (a slow warm-up, a load that
        has gone) would otherwise refuse every deadline forever. At most one probe per interval."""
        now = time.monotonic()
        with self._lock:
            sample = self._nearest(model, tta, height, width)
            if sample is None or now - sample.updated < PROBE_AFTER:
                return False
            sample.updated = now
            return True

    def _nearest(self, model: str, tta: str, height: int, width: int) -> Sample | None:
        sample = self._samples.get((model, tta, height, width))
        if sample is not None:
            return sample
        same_model = [s for k, s in self._samples.items() if k[0] == model]
        if not same_model:
            return None
        units = self.units(tta, height, width)
        return min(same_model, key=lambda s: abs(math.log(units / s.units)))

    def predict(self, model: str, tta: str, height: int, width: int, batch: int = 1) -> float | None:
        """Seconds the worker needs for `batch` such images; None before anything was measured."""
        with self._lock:
            nearest = self._nearest(model, tta, height, width)
        if nearest is None:
            return None
        return nearest.seconds * self.units(tta, height, width) / nearest.units * batch

    def measured(self, model: str) -> list[dict]:
        """The measured keys of `model` (for /models)."""
        with self._lock:
            items = [(k, s) for k, s in self._samples.items() if k[0] == model]
        return [
            {
                "tta": k[1],
                "height": k[2],
                "width": k[3],
                "ms": round(s.seconds * 1000, 3),
                "measurements": s.count,
                "warm_up_only": s.seed,
            }
            for k, s in sorted(items, key=lambda kv: (kv[0][1], kv[0][2], kv[0][3]))
        ]
