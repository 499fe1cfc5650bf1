"""Test-time pre- and post-processing, exactly as mmsegmentation 1.x runs it (docs/model.md, "Test-time path").

Everything works on torch tensors on any device, so the worker can keep the whole path
(uint8 in -> uint8 labels out) on the GPU and inside one CUDA graph.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

MEAN = (123.675, 116.28, 103.53)  # RGB, 0-255
STD = (58.395, 57.12, 57.375)
TEST_SCALE = (2048, 1024)  # mmseg Resize(scale=(2048, 1024), keep_ratio=True)


def test_size(height: int, width: int, scale: tuple[int, int] = TEST_SCALE) -> tuple[int, int]:
    """mmcv `imrescale`: long edge to at most max(scale), short edge to at most min(scale).

    Images are enlarged as well as shrunk; sizes round half up as mmcv does.
    """
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def normalise(images: torch.Tensor, size: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (N, H, W, 3) RGB -> normalised float (N, 3, h, w) at the network input size.

    mmseg resizes the uint8 image with OpenCV INTER_LINEAR and keeps it uint8; `resize_uint8`
    reproduces OpenCV's fixed-point arithmetic bit for bit (a float bilinear resize differs by 1
    on a few % of pixels, enough to move ~2 % of labels on upscaled photos).
    """
    if tuple(images.shape[1:3]) != tuple(size):
        images = resize_uint8(images, size)
    x = images.permute(0, 3, 1, 2).float()
    mean, std = mean_std(x.device)
    return ((x - mean) / std).to(dtype)


@functools.cache
def mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: a host-to-device copy is not allowed while a CUDA graph is captured,
    # and the eager warm-up before capture fills this cache.
    with torch.inference_mode(False):  # ordinary tensors, usable in and out of inference mode
        return torch.tensor(MEAN, device=device).view(1, 3, 1, 1), torch.tensor(STD, device=device).view(1, 3, 1, 1)


_COEF_BITS = 11  # OpenCV INTER_RESIZE_COEF_BITS: weights are integers scaled by 2048


def _linear_taps(src: int, dst: int, device: torch.device, clamp: bool):
    """Source indices and 11-bit weights of OpenCV's bilinear resize along one axis.

    As OpenCV: the position is computed in double and rounded to float32; each weight is rounded
    on its own. Horizontally (`clamp`) positions outside the image snap to the edge pixel with
    weights (2048, 0); vertically only the row indices are clipped, the weights are kept.
    """
    pos = ((torch.arange(dst, device=device, dtype=torch.float64) + 0.5) * (1.0 / (dst / src)) - 0.5).float()
    first = pos.floor()
    frac = pos - first
    first = first.long()
    if clamp:
        low, high = first < 0, first >= src - 1
        frac = torch.where(low | high, torch.zeros_like(frac), frac)
        first = torch.where(low, torch.zeros_like(first), torch.where(high, torch.full_like(first, src - 1), first))
    scale = float(1 << _COEF_BITS)
    w0 = ((1.0 - frac) * scale).round().int()
    w1 = (frac * scale).round().int()
    return first.clamp(0, src - 1), (first + 1).clamp(0, src - 1), w0, w1


def resize_uint8(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (N, H, W, C) -> uint8 (N, h, w, C), bit-exact with `cv2.resize(..., INTER_LINEAR)`.

    Integer arithmetic in int32 on the images' device (no host round trips, so it can be captured
    in a CUDA graph): a horizontal pass with 11-bit weights, then OpenCV's vertical pass
    `((b0 * (r0 >> 4)) >> 16) + ((b1 * (r1 >> 4)) >> 16) + 2) >> 2`.
    """
    height, width = images.shape[1:3]
    x0, x1, a0, a1 = _linear_taps(width, size[1], images.device, clamp=True)
    y0, y1, b0, b1 = _linear_taps(height, size[0], images.device, clamp=False)
    x = images.int()
    rows = x[:, :, x0] * a0.view(1, 1, -1, 1) + x[:, :, x1] * a1.view(1, 1, -1, 1)
    top = (rows[:, y0] >> 4) * b0.view(1, -1, 1, 1) >> 16
    bottom = (rows[:, y1] >> 4) * b1.view(1, -1, 1, 1) >> 16
    return ((top + bottom + 2) >> 2).clamp_(0, 255).to(torch.uint8)


# Full-size fp32 bytes held at once while turning logits into labels: an image's 19 planes at
# 4096x4096 would be 1.3 GB (of graph pool, when captured), so large images go a few planes at a time.
LABEL_CHUNK_BYTES = 256 << 20


def logits_to_labels(
    logits: torch.Tensor,
    input_size: tuple[int, int],
    output_size: tuple[int, int],
    chunk_bytes: int = LABEL_CHUNK_BYTES,
) -> torch.Tensor:
    """(N, C, h/8, w/8) logits -> (N, H, W) uint8 labels: resize to the input, then the original size.

    Bilinear resizing treats each channel plane on its own, so this goes one image, and for large
    images one group of channels, at a time with exactly the values of resizing the whole batch: a
    running first maximum over the groups equals one argmax over all channels. The full-size fp32
    held at once stays under `chunk_bytes` (or one plane, if that is larger).
    """
    n, classes = logits.shape[:2]
    group = channel_group(classes, input_size, output_size, chunk_bytes)
    labels = torch.empty((n, *output_size), dtype=torch.uint8, device=logits.device)
    for i in range(n):
        if group == classes:
            labels[i] = _resized(logits[i : i + 1], input_size, output_size)[0].argmax(dim=0)
            continue
        best = None
        for start in range(0, classes, group):
            planes = _resized(logits[i : i + 1, start : start + group], input_size, output_size)[0]
            for c, plane in enumerate(planes, start):
                if best is None:
                    best = plane.clone()
                    labels[i] = 0
                else:  # strictly higher: on a tie the earlier class stays, as in argmax
                    higher = plane > best
                    torch.maximum(best, plane, out=best)
                    labels[i].masked_fill_(higher, c)
            del planes, plane  # freed before the next group is resized, not after
    return labels


def channel_group(
    classes: int, input_size: tuple[int, int], output_size: tuple[int, int], chunk_bytes: int = LABEL_CHUNK_BYTES
) -> int:
    """How many channels `logits_to_labels` resizes at once: as many full-size fp32 planes (at the
    larger of the two sizes) as fit in `chunk_bytes`, at least one."""
    plane_bytes = 4 * max(input_size[0] * input_size[1], output_size[0] * output_size[1])
    return max(1, min(classes, chunk_bytes // plane_bytes))


def _resized(logits: torch.Tensor, input_size: tuple[int, int], output_size: tuple[int, int]) -> torch.Tensor:
    # Contiguous NCHW whatever the network's memory format, so a group of channels and the whole
    # tensor go through the same interpolation kernel (and the one mmsegmentation uses).
    x = F.interpolate(logits.float().contiguous(), size=input_size, mode="bilinear", align_corners=False)
    if tuple(input_size) != tuple(output_size):
        x = F.interpolate(x, size=output_size, mode="bilinear", align_corners=False)
    return x


def as_rgb_uint8(image) -> np.ndarray:
    """A PIL image or an HxW / HxWx1 / HxWx3 / HxWx4 uint8 array as a contiguous HxWx3 RGB array.

    Grayscale is replicated to three channels and alpha is dropped (as OpenCV's colour loader
    does); anything else is refused with ValueError.
    """
    if hasattr(image, "mode") and hasattr(image, "convert"):  # PIL without importing it eagerly
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise ValueError(f"expected an RGB uint8 numpy array or a PIL image, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected dtype uint8 (0-255 RGB), got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an HxW, HxWx3 or HxWx4 image, got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image has zero size: {image.shape[1]}x{image.shape[0]}")
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.shape[2] == 4:
        image = image[:, :, :3]
    return np.ascontiguousarray(image)
