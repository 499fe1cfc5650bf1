"""Learning-rate schedules of the recipe, as closed forms of the iteration (so resuming is exact).

style 'mmcv' (default): what trained the released checkpoints (mmseg 0.x `schedule_160k.py`,
  `lr_config=dict(policy='poly', power=0.9, min_lr=1e-4, by_epoch=False, warmup='linear',
  warmup_iters=1000)` with mmcv's default warmup_ratio 0.1):
      regular(i) = (base - min_lr) * (1 - i / max_iters) ** power + min_lr
      lr(i) = regular(i) * (1 - (1 - i / warmup) * (1 - ratio))  for i < warmup, else regular(i)
style 'mmengine': the mmseg 1.x configs, LinearLR(start_factor=0.1, 0-1000) then
  PolyLR(eta_min=1e-4, power=0.9, 1000-max_iters), in the closed form of mmengine's chained steps:
      lr(i) = base * (ratio + (1 - ratio) * i / (warmup - 1))              for i < warmup
      lr(i) = min_lr + (base - min_lr) * (1 - s / T) ** power, s = i - warmup, T = max_iters - warmup - 1
"""

from __future__ import annotations

from dataclasses import dataclass

STYLES = ("mmcv", "mmengine")


@dataclass(frozen=True)
class PolyWarmupSchedule:
    base_lr: float
    max_iters: int
    power: float = 0.9
    min_lr: float = 1e-4
    warmup_iters: int = 1000
    warmup_ratio: float = 0.1
    style: str = "mmcv"

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"unknown schedule style {self.style!r}; choose {', '.join(STYLES)}")

    def __call__(self, iteration: int) -> float:
        """The learning rate used for the step of (0-based) `iteration`."""
        if self.style == "mmcv":
            return self._mmcv(iteration)
        return self._mmengine(iteration)

    def _mmcv(self, i: int) -> float:
        regular = (self.base_lr - self.min_lr) * (1 - i / self.max_iters) ** self.power + self.min_lr
        if i < self.warmup_iters:
            return regular * (1 - (1 - i / self.warmup_iters) * (1 - self.warmup_ratio))
        return regular

    def _mmengine(self, i: int) -> float:
        if i < self.warmup_iters:
            span = self.warmup_iters - 1
            progress = i / span if span > 0 else 0.0
            return self.base_lr * (self.warmup_ratio + (1 - self.warmup_ratio) * progress)
        span = self.max_iters - self.warmup_iters - 1
        progress = min((i - self.warmup_iters) / span, 1.0) if span > 0 else 0.0
        return self.min_lr + (self.base_lr - self.min_lr) * (1 - progress) ** self.power
