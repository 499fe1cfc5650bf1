"""What a training run writes besides checkpoints: `train.log` (mmseg-style lines, rank 0) and
`scalars.jsonl`, plus TensorBoard when it is installed."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("model.training")


def setup_logging(work_dir: Path, is_main: bool) -> None:
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%m/%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if is_main:
        handlers.append(logging.FileHandler(work_dir / "train.log"))
    for handler in handlers:
        handler.setFormatter(fmt)
        log.addHandler(handler)


class Recorder:
    """scalars.jsonl always; TensorBoard too when installed and wanted (rank 0 only)."""

    def __init__(self, work_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = work_dir / "scalars.jsonl"
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.info("TensorBoard is not installed (pip install -e '.[train]'); logging to scalars.jsonl only")
            else:
                self.writer = SummaryWriter(str(work_dir / "tensorboard"))

    def write(self, group: str, iteration: int, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"mode": group, "iter": iteration, **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, int | float):
                    self.writer.add_scalar(f"{group}/{key}", value, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
