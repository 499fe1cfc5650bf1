"""`bisenet bench menu`: the accuracy/latency menu model=auto chooses from, measured.

For each model and tta mode: the engine's latency on one frame (uint8 in, labels out, as the worker
runs it) beside the published Cityscapes mIoU of the official weights (single scale for `none`,
multi-scale + flip for `ms_flip`; `flip` alone has no published number). Random weights: latency
does not depend on them. Prints a Markdown table.

    bisenet bench menu                                   # 1024x2048, both models, every mode
    bisenet bench menu --size 512x1024 --tta none,flip --iters 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from .predictor import Segmenter
from .tta import TTA_MODES, work_units
from .zoo import default_entry


def published(model: str, tta: str) -> float | None:
    entry = default_entry(model)
    return {"none": entry.miou, "ms_flip": entry.miou_ms_flip}.get(tta)


def time_mode(segmenter: Segmenter, frame: np.ndarray, tta: str, iters: int, max_seconds: float) -> list[float]:
    segmenter.engine.segment(frame[None], tta)  # warm-up: allocations, cuDNN autotune
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < iters and (not times or time.perf_counter() - start < max_seconds):
        begin = time.perf_counter()
        segmenter.engine.segment(frame[None], tta)
        if segmenter.device.type == "cuda":
            torch.cuda.synchronize(segmenter.device)
        times.append(time.perf_counter() - begin)
    return times


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bisenet bench menu", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="bisenetv1_r18,bisenetv1_r50", help="comma-separated architectures")
    p.add_argument("--tta", default=",".join(TTA_MODES), help="comma-separated modes")
    p.add_argument("--size", default="1024x2048", help="frame HxW (the test-time resize still applies)")
    p.add_argument(
        "--resize-scale",
        default="2048x1024",
        help="test-time resize as `bisenet serve --resize-scale` (smaller: quicker)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=1, help="timed calls per row at most (after one untimed)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="stop timing a row after this long")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    height, width = (int(v) for v in args.size.lower().split("x"))
    scale = tuple(int(v) for v in args.resize_scale.lower().split("x"))
    modes = [m.strip() for m in args.tta.split(",") if m.strip()]
    for mode in modes:
        if mode not in TTA_MODES:
            raise SystemExit(f"unknown tta {mode!r}; choose {', '.join(TTA_MODES)}")
    frame = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(
        f"frame {height}x{width}, resize scale {scale[0]}x{scale[1]}, {where}, "
        f"{torch.get_num_threads()} torch threads, random weights"
    )
    print("\n| model | tta | published mIoU | network Mpx | latency ms (median) | runs |")
    print("|---|---|---|---|---|---|")
    for model in (m.strip() for m in args.models.split(",")):
        torch.manual_seed(0)
        segmenter = Segmenter(model, weights="random", device=device, scale=scale)
        for mode in modes:
            times = time_mode(segmenter, frame, mode, args.iters, args.max_seconds)
            miou = published(model, mode)
            print(
                f"| {model} | {mode} | {miou if miou is not None else '-'} | "
                f"{work_units(mode, height, width, scale):.2f} | {statistics.median(times) * 1000:.0f} | {len(times)} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
