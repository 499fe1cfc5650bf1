"""The engine every peer of `bisenet bench peers` serves: the same model/ engine, weights, resize scale,
device, batch buckets and torch threads as `python -m service` builds in its worker, and the same image
decoding, so that the peers differ only in how they serve it.

Imported by the Triton (PyTriton) launcher in .venv-peers and by the Ray Serve launcher in the main
venv; it needs torch, numpy and Pillow only.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from ..api.imaging import decode_image
from ..config import parse_shape
from ..errors import ServiceError

MAX_PIXELS = 16_777_216  # the service's default --max-pixels


@dataclass(frozen=True)
class EngineSpec:
    model: str  # architecture or zoo name
    weights: str  # 'random', a zoo entry, a path or URL
    device: str
    resize_scale: tuple[int, int]
    max_batch: int
    warm_shape: tuple[int, int]
    threads: int  # torch intra-op threads (0: torch's default)

    def service_args(self) -> list[str]:
        """The `bisenet serve` flags that build the same engine in the service's worker."""
        return [
            "--model",
            f"{self.model}={self.weights}",
            "--device",
            self.device,
            "--resize-scale",
            "x".join(map(str, self.resize_scale)),
            "--max-batch",
            str(self.max_batch),
            "--warm-shapes",
            "x".join(map(str, self.warm_shape)),
        ]

    def cli_args(self) -> list[str]:
        """The same spec as flags for a launcher (`add_engine_args`)."""
        return [
            "--model",
            self.model,
            "--weights",
            self.weights,
            "--device",
            self.device,
            "--resize-scale",
            "x".join(map(str, self.resize_scale)),
            "--max-batch",
            str(self.max_batch),
            "--warm-shape",
            "x".join(map(str, self.warm_shape)),
            "--threads",
            str(self.threads),
        ]


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="bisenetv1_r18")
    p.add_argument("--weights", default="random")
    p.add_argument("--device", default="cpu")
    p.add_argument("--resize-scale", default="2048x1024")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--warm-shape", default="1024x2048")
    p.add_argument("--threads", type=int, default=0)


def spec_from_args(args) -> EngineSpec:
    return EngineSpec(
        args.model,
        args.weights,
        args.device,
        parse_shape(args.resize_scale),
        args.max_batch,
        parse_shape(args.warm_shape),
        args.threads,
    )


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The service's default --batch-buckets: powers of 2 below max batch, then max batch."""
    return tuple(b for b in (1, 2, 4, 8, 16, 32, 64) if b < max_batch) + (max_batch,)


def load_engine(spec: EngineSpec):
    """A warmed SegmentationEngine built exactly as the service's worker builds it."""
    import torch

    from model import Segmenter

    if spec.threads:
        torch.set_num_threads(spec.threads)  # the launchers also set OMP_NUM_THREADS for other threads
    torch.manual_seed(0)  # the service seeds 'random' weights the same way
    seg = Segmenter(
        spec.model,
        weights=spec.weights,
        device=spec.device,
        dtype="auto",
        buckets=batch_buckets(spec.max_batch),
        scale=spec.resize_scale,
    )
    seg.engine.warmup([spec.warm_shape], batch_buckets(spec.max_batch))
    return seg.engine


def decode(data: bytes) -> np.ndarray:
    """JPEG/PNG/... bytes -> HxWx3 uint8 RGB, with the service's own decoder (ValueError when bad)."""
    try:
        return decode_image(data, MAX_PIXELS)
    except ServiceError as exc:
        raise ValueError(exc.message) from None


def segment_images(engine, images: list[np.ndarray]) -> list[np.ndarray]:
    """Label maps for a list of RGB images: one engine call per group of equal size, as the scheduler does."""
    out: list[np.ndarray | None] = [None] * len(images)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(image.shape[:2], []).append(i)
    for indices in groups.values():
        labels = engine.segment(np.stack([images[i] for i in indices]))
        for i, lab in zip(indices, labels):
            out[i] = lab
    return out  # type: ignore[return-value]
