"""Test-time augmentation: `flip` and `ms_flip`, as mmsegmentation's SegTTAModel computes them.

- `flip`: the image and its horizontal mirror; softmax probabilities averaged, then argmax.
- `ms_flip`: mmsegmentation's Cityscapes `tta_pipeline`: the test-time size scaled by each of
  0.5, 0.75, 1.0, 1.25, 1.5 and 1.75, each with and without the mirror (12 passes).

Each pass follows mmseg's order exactly: resize the uint8 image (OpenCV bilinear), mirror it,
run the network, resize the logits to the pass's input, mirror them back, resize them to the
original size, softmax; the probabilities are summed in pass order, divided by the pass count and
turned into labels. A pass and its mirror run as one batch (2N images for a batch of N); the
probabilities are then summed one image at a time, in the same order, so only one image's
full-size probabilities exist at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .transforms import TEST_SCALE, test_size

TTA_MODES = ("none", "flip", "ms_flip")
MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def check_mode(mode: str) -> str:
    if mode not in TTA_MODES:
        raise ValueError(f"unknown tta mode {mode!r}; choose {', '.join(TTA_MODES)}")
    return mode


def pass_sizes(mode: str, height: int, width: int, scale: tuple[int, int] = TEST_SCALE) -> list[tuple[int, int]]:
    """Network input sizes of a mode's passes (each run with and without the mirror unless 'none').

    The ratios scale the test-time size (mmseg `Resize(scale_factor=r, keep_ratio=True)`: round
    half up, then rescale keeping the ratio); on a 2048x1024 frame this is mmseg's tta_pipeline.
    """
    base = test_size(height, width, scale)
    if check_mode(mode) != "ms_flip":
        return [base]
    sizes = []
    for ratio in MS_RATIOS:
        target = (int(base[1] * ratio + 0.5), int(base[0] * ratio + 0.5))
        sizes.append(test_size(base[0], base[1], target))
    return sizes


def work_units(mode: str, height: int, width: int, scale: tuple[int, int] = TEST_SCALE) -> float:
    """Network input megapixels one image costs in `mode`: the unit latency estimates scale by."""
    passes = 1 if mode == "none" else 2
    return passes * sum(h * w for h, w in pass_sizes(mode, height, width, scale)) / 1e6


def segment_tta(engine, images: torch.Tensor, mode: str) -> torch.Tensor:
    """uint8 (N, H, W, 3) on the engine's device -> (N, H, W) uint8 labels, averaged over `mode`'s passes."""
    n, height, width = images.shape[:3]
    with torch.inference_mode():
        passes = []  # (logits of the originals then the mirrors, network input size), in pass order
        for size in pass_sizes(mode, height, width, engine.scale):
            x = engine.network_input(images, size)
            batch = torch.cat([x, x.flip(3)])
            if engine.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            passes.append((engine.network(batch), size))
        labels = torch.empty((n, height, width), dtype=torch.uint8, device=images.device)
        # One image at a time: full-size probabilities are 19 x H x W fp32 (160 MB at 1024x2048),
        # and the logits of every pass together are about a quarter of that per image.
        for i in range(n):
            probs = None
            for logits, size in passes:
                for flipped in (False, True):
                    p = _probabilities(logits[i + n * flipped][None], size, (height, width), flipped)[0]
                    if probs is None:
                        probs = p  # a fresh tensor: summing into it in place saves a full-size copy
                    else:
                        probs += p
            labels[i] = (probs / (2 * len(passes))).argmax(dim=0)
    return labels


def _probabilities(logits: torch.Tensor, size: tuple[int, int], output: tuple[int, int], flipped: bool):
    x = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    if flipped:
        x = x.flip(3)
    x = F.interpolate(x, size=output, mode="bilinear", align_corners=False)
    return x.softmax(dim=1)
