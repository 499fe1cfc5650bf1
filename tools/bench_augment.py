"""Per-sample cost of the training augmentation: resize the whole image with cv2 and crop, or
interpolate only the crop window with a numpy re-implementation of OpenCV's fixed-point bilinear
resize (what model/training/augment.py did before it called OpenCV).

    python tools/bench_augment.py [--samples 30] [--cv2-threads 1] [--size 1024x2048] [--crop 1024x1024]

The recipe's settings: a 1024x2048 image, RandomResize(scale=(2048, 1024), ratio_range=(0.5, 2.0))
and a 1024x1024 crop. Both variants get the same random draws (same resized sizes, same crops),
run alternately so load from other processes hits both alike, and must give the same pixels.
Prints a Markdown table: the whole TrainTransform (resize, crop, flip, PhotoMetricDistortion, pad)
and the image resize step alone, median and mean per sample, and the ratio window / whole.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import cv2
import numpy as np

from model.bench import cpu_name
from model.training.augment import TrainTransform, random_crop_bbox, random_resize_size, resize_label

# -- the window variant: OpenCV's INTER_LINEAR on uint8, bit-exact, for output pixels of one window --
_COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS: weights are integers out of 2048


def _linear_taps(in_len: int, out_len: int, start: int, count: int, clamp_weight: bool):
    """Source indices and integer weights for output pixels [start, start+count): half-pixel
    centres in float32 as OpenCV computes them; along x OpenCV moves out-of-range taps onto the edge
    pixel with weight 0, along y it keeps the weight and clips the row index."""
    dst = np.arange(start, start + count, dtype=np.float64)
    src = ((dst + 0.5) * (1.0 / (out_len / in_len)) - 0.5).astype(np.float32)
    lo = np.floor(src).astype(np.int64)
    frac = (src - lo.astype(np.float32)).astype(np.float32)
    if clamp_weight:
        edge = (lo < 0) | (lo >= in_len - 1)
        frac[edge] = 0
        lo = np.clip(lo, 0, in_len - 1)
    scale = np.float32(1 << _COEF_BITS)
    w1 = np.rint(frac * scale).astype(np.int32)
    w0 = np.rint((np.float32(1) - frac) * scale).astype(np.int32)
    return np.clip(lo, 0, in_len - 1), np.clip(lo + 1, 0, in_len - 1), w0, w1


def resize_window_bilinear(image: np.ndarray, size: tuple[int, int], bbox: tuple[int, int, int, int]) -> np.ndarray:
    """The (y0, y1, x0, x1) window of `image` resized to `size`, as cv2.resize(INTER_LINEAR) gives it:
    a horizontal pass with 11-bit integer weights, then a vertical pass that drops 4 bits before each
    16-bit multiply and rounds the sum (OpenCV's SIMD kernel)."""
    y0, y1, x0, x1 = bbox
    ylo, yhi, wy0, wy1 = _linear_taps(image.shape[0], size[0], y0, y1 - y0, clamp_weight=False)
    xlo, xhi, wx0, wx1 = _linear_taps(image.shape[1], size[1], x0, x1 - x0, clamp_weight=True)
    first, last = int(ylo.min()), int(yhi.max())
    rows = image[first : last + 1].astype(np.int32)  # only the rows the window needs
    horizontal = rows[:, xlo] * wx0[None, :, None] + rows[:, xhi] * wx1[None, :, None]
    top, bottom = horizontal[ylo - first] >> 4, horizontal[yhi - first] >> 4
    out = ((wy0[:, None, None] * top) >> 16) + ((wy1[:, None, None] * bottom) >> 16)
    return ((out + 2) >> 2).clip(0, 255).astype(np.uint8)


class WindowTransform(TrainTransform):
    """TrainTransform with only the crop window of the image interpolated."""

    resize_and_crop = staticmethod(resize_window_bilinear)


def whole_then_crop(image: np.ndarray, size: tuple[int, int], bbox: tuple[int, int, int, int]) -> np.ndarray:
    return TrainTransform.resize_and_crop(image, size, bbox)


# -- inputs ---------------------------------------------------------------------------------------
def inputs(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A photo enlarged to the frame size (random pixels without scikit-image) and a street-like
    label (sky, building, road, cars, a void strip) so RandomCrop's re-draws behave as on Cityscapes."""
    try:
        from skimage import data

        image = cv2.resize(data.rocket(), (width, height), interpolation=cv2.INTER_CUBIC)
    except ImportError:
        image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    label = np.full((height, width), 2, np.uint8)  # building
    label[: height // 4] = 10  # sky
    label[height // 2 :] = 0  # road
    for i in range(6):
        x = i * width // 6
        label[height // 2 - height // 16 : height // 2 + height // 10, x + width // 40 : x + width // 10] = 13  # car
    label[-height // 16 :] = 255
    return np.ascontiguousarray(image), label


def timed(fn, *args) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=30, help="samples per variant (default 30)")
    parser.add_argument("--size", default="1024x2048", help="input HxW (default 1024x2048)")
    parser.add_argument("--crop", default="1024x1024", help="crop HxW (default 1024x1024)")
    parser.add_argument("--cv2-threads", type=int, default=1, help="cv2.setNumThreads (default 1: one per data worker)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cv2.setNumThreads(args.cv2_threads)
    height, width = (int(v) for v in args.size.split("x"))
    crop = tuple(int(v) for v in args.crop.split("x"))
    image, label = inputs(height, width)
    whole, window = TrainTransform(crop=crop), WindowTransform(crop=crop)

    times: dict[str, list[float]] = {"whole_pipe": [], "window_pipe": [], "whole_resize": [], "window_resize": []}
    for _ in range(2):  # warm-up: page in both code paths
        whole(image, label, np.random.default_rng(args.seed))
        window(image, label, np.random.default_rng(args.seed))
    draws = np.random.default_rng(args.seed)
    for i in range(args.samples):
        seed = int(draws.integers(1 << 31))
        first, second = (("whole", whole), ("window", window)) if i % 2 == 0 else (("window", window), ("whole", whole))
        outputs = {}
        for name, transform in (first, second):
            elapsed, outputs[name] = timed(transform, image, label, np.random.default_rng(seed))
            times[f"{name}_pipe"].append(elapsed)
        for a, b in zip(outputs["whole"], outputs["window"]):
            assert np.array_equal(np.asarray(a), np.asarray(b)), f"the variants differ on seed {seed}"
        # The resize step alone, on this sample's draws (resized size and crop window).
        rng = np.random.default_rng(seed)
        size = random_resize_size(height, width, window.scale, window.ratio_range, rng)
        bbox = random_crop_bbox(resize_label(label, size), crop, window.cat_max_ratio, rng)
        for name, fn in (("whole", whole_then_crop), ("window", resize_window_bilinear)):
            times[f"{name}_resize"].append(timed(fn, image, size, bbox)[0])

    def ms(values: list[float]) -> tuple[float, float]:
        return 1000 * statistics.median(values), 1000 * statistics.mean(values)

    print(
        f"{args.samples} samples per variant, input {height}x{width}, crop {crop[0]}x{crop[1]}, ratio 0.5-2.0 of "
        f"scale (2048, 1024); {cpu_name()}, {os.cpu_count()} cores, cv2 {cv2.__version__} "
        f"with {cv2.getNumThreads()} thread(s), numpy {np.__version__}\n"
    )
    print(
        "| step | whole image: cv2.resize then crop, ms median (mean) | window only: numpy, ms median (mean) | window / whole (median) |"
    )
    print("|---|---|---|---|")
    for step, key in (("TrainTransform (whole sample)", "pipe"), ("image resize + crop alone", "resize")):
        (wm, wa), (nm, na) = ms(times[f"whole_{key}"]), ms(times[f"window_{key}"])
        print(f"| {step} | {wm:.1f} ({wa:.1f}) | {nm:.1f} ({na:.1f}) | {nm / wm:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
