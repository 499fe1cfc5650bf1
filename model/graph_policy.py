"""Which shapes get CUDA graphs, and when: plain Python, so it is tested without a GPU.

A shape is a key that starts with (H, W); the engine adds its TTA mode, (H, W, tta), since a
`flip` batch has graphs of its own.

Rules:
- A shape is captured whole (every bucket) or not at all, so no batch size of a captured shape
  runs eagerly.
- Warm shapes are captured at start and never evicted.
- Other shapes run eagerly and are *queued* for capture once seen `lazy_after` times; the worker
  captures queued shapes only between batches while its queue is empty, never while requests wait.
- Lazily captured shapes are bounded in count (least recently used evicted) and in pixels per
  image, so clients cannot make the worker hold graphs for arbitrary sizes.
- A shape whose capture failed (e.g. out of memory) runs eagerly from then on.
- The per-shape sighting counter keeps at most `max_tracked` shapes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

Shape = tuple  # (H, W, ...): the pixel limit reads H and W


@dataclass(frozen=True)
class CaptureLimits:
    lazy_after: int = 3  # sightings of a shape before it is queued for capture
    max_lazy_shapes: int = 4  # lazily captured shapes kept (warm shapes do not count)
    max_lazy_pixels: int = 1024 * 2048  # H * W above which a shape is never captured lazily
    max_tracked: int = 256  # shapes whose sightings are counted


class CapturePolicy:
    def __init__(self, limits: CaptureLimits | None = None):
        self.limits = limits or CaptureLimits()
        self.warm: set[Shape] = set()
        self.lazy: OrderedDict[Shape, None] = OrderedDict()  # least recently used first
        self.failed: dict[Shape, str] = {}
        self.queued: OrderedDict[Shape, None] = OrderedDict()
        self._sightings: OrderedDict[Shape, int] = OrderedDict()

    def is_captured(self, shape: Shape) -> bool:
        return shape in self.warm or shape in self.lazy

    def route(self, shape: Shape) -> bool:
        """True: replay this shape's graph; False: run eagerly (and maybe queue the shape)."""
        if shape in self.warm:
            return True
        if shape in self.lazy:
            self.lazy.move_to_end(shape)
            return True
        if self._eligible(shape):
            seen = self._sightings.pop(shape, 0) + 1
            self._sightings[shape] = seen
            while len(self._sightings) > self.limits.max_tracked:
                self._sightings.popitem(last=False)
            if seen >= self.limits.lazy_after:
                self.queued[shape] = None
        return False

    def _eligible(self, shape: Shape) -> bool:
        return (
            shape not in self.failed
            and shape not in self.queued
            and self.limits.max_lazy_shapes > 0
            and shape[0] * shape[1] <= self.limits.max_lazy_pixels
        )

    def next_queued(self) -> Shape | None:
        return next(iter(self.queued), None)

    def captured(self, shape: Shape, warm: bool = False) -> list[Shape]:
        """Record a finished capture; returns the lazy shapes to evict to stay within the bounds."""
        self.queued.pop(shape, None)
        self._sightings.pop(shape, None)
        if warm:
            self.lazy.pop(shape, None)
            self.warm.add(shape)
            return []
        self.lazy[shape] = None
        evicted = []
        while len(self.lazy) > self.limits.max_lazy_shapes:
            evicted.append(self.lazy.popitem(last=False)[0])
        return evicted

    def capture_failed(self, shape: Shape, reason: str) -> None:
        self.queued.pop(shape, None)
        self._sightings.pop(shape, None)
        self.lazy.pop(shape, None)
        self.failed[shape] = reason


def validate_buckets(buckets: tuple[int, ...], max_batch: int) -> tuple[int, ...]:
    """Sorted unique buckets up to max_batch; the largest must equal max_batch, so every batch the
    scheduler forms has a bucket (a bucket above max_batch would never be used)."""
    if any(b < 1 for b in buckets):
        raise ValueError(f"batch buckets must be >= 1, got {buckets}")
    kept = tuple(sorted({b for b in buckets if b <= max_batch}))
    dropped = sorted({b for b in buckets if b > max_batch})
    if not kept or kept[-1] != max_batch:
        hint = f" ({', '.join(map(str, dropped))} exceed it)" if dropped else ""
        raise ValueError(f"batch buckets {tuple(buckets)} must include max batch {max_batch}{hint}")
    return kept
