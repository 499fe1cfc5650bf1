"""The training augmentation of mmsegmentation's Cityscapes recipe (reference section 3), in numpy.

RandomResize(scale=(2048, 1024), ratio_range=(0.5, 2.0), keep_ratio=True) -> RandomCrop(crop,
cat_max_ratio=0.75) -> RandomFlip(0.5) -> PhotoMetricDistortion -> pad to the crop.

mmseg resizes the whole image with OpenCV and then crops; here the label is resized first (nearest
is cheap), the crop is chosen on it, and only the cropped window of the image is interpolated, with
the same bilinear (half-pixel centres, no antialias) sampling positions, so the pixels are those of
resize-then-crop at a fraction of the cost. Random draws come from a per-sample numpy Generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..transforms import test_size as rescale_size

IGNORE_INDEX = 255


# -- resizing (OpenCV INTER_LINEAR on uint8, bit-exact) ---------------------------------------
_COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS: weights are integers out of 2048


def _linear_taps(in_len: int, out_len: int, start: int, count: int, clamp_weight: bool):
    """Source indices and integer weights for output pixels [start, start+count).

    Half-pixel centres in float32 as OpenCV computes them. Along x OpenCV moves out-of-range taps
    onto the edge pixel with weight 0; along y it keeps the weight and clips the row index.
    """
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


def resize_window_bilinear(image: np.ndarray, out_hw: tuple[int, int], window: tuple[int, int, int, int]) -> np.ndarray:
    """The (y0, y1, x0, x1) window of `image` resized to out_hw, as cv2.resize(INTER_LINEAR) gives it.

    OpenCV's 8-bit path: a horizontal pass with 11-bit integer weights, then a vertical pass that
    drops 4 bits before each 16-bit multiply and rounds the sum (its SIMD kernel); matching it
    bit for bit keeps the training pixels those of mmseg's pipeline.
    """
    y0, y1, x0, x1 = window
    ylo, yhi, wy0, wy1 = _linear_taps(image.shape[0], out_hw[0], y0, y1 - y0, clamp_weight=False)
    xlo, xhi, wx0, wx1 = _linear_taps(image.shape[1], out_hw[1], x0, x1 - x0, clamp_weight=True)
    first, last = int(ylo.min()), int(yhi.max())
    rows = image[first : last + 1].astype(np.int32)  # only the rows the window needs; int32 holds 255 * 2048 * 2
    horizontal = rows[:, xlo] * wx0[None, :, None] + rows[:, xhi] * wx1[None, :, None]
    top, bottom = horizontal[ylo - first] >> 4, horizontal[yhi - first] >> 4
    out = ((wy0[:, None, None] * top) >> 16) + ((wy1[:, None, None] * bottom) >> 16)
    return ((out + 2) >> 2).clip(0, 255).astype(np.uint8)


def nearest_indices(in_len: int, out_len: int) -> np.ndarray:
    """OpenCV INTER_NEAREST: src = floor(dst * (1 / (out / in))) in double, exactly as cv2 rounds it."""
    return np.minimum(np.floor(np.arange(out_len) * (1.0 / (out_len / in_len))).astype(np.int64), in_len - 1)


def random_resize_size(
    height: int, width: int, scale: tuple[int, int], ratio_range: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int]:
    """mmcv RandomResize with keep_ratio: scale both edges by a uniform ratio, then imrescale."""
    ratio = rng.random() * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
    target = (int(scale[0] * ratio), int(scale[1] * ratio))
    return rescale_size(height, width, target)


# -- cropping ----------------------------------------------------------------------------------
def _random_bbox(size: tuple[int, int], crop: tuple[int, int], rng: np.random.Generator) -> tuple[int, int, int, int]:
    margin_h, margin_w = max(size[0] - crop[0], 0), max(size[1] - crop[1], 0)
    y0, x0 = int(rng.integers(0, margin_h + 1)), int(rng.integers(0, margin_w + 1))
    return y0, min(y0 + crop[0], size[0]), x0, min(x0 + crop[1], size[1])


def random_crop_bbox(
    label: np.ndarray, crop: tuple[int, int], cat_max_ratio: float, rng: np.random.Generator, tries: int = 10
) -> tuple[int, int, int, int]:
    """mmseg RandomCrop: re-draw up to `tries` times while one class fills >= cat_max_ratio of the
    non-ignored pixels (or fewer than two classes are present); the last draw is kept as it is."""
    bbox = _random_bbox(label.shape, crop, rng)
    if cat_max_ratio >= 1.0:
        return bbox
    for _ in range(tries):
        y0, y1, x0, x1 = bbox
        counts = np.bincount(label[y0:y1, x0:x1].ravel(), minlength=IGNORE_INDEX + 1)
        counts = np.delete(counts, IGNORE_INDEX)
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
        bbox = _random_bbox(label.shape, crop, rng)
    return bbox


# -- photometric distortion (OpenCV's 8-bit HSV, as mmcv.bgr2hsv / hsv2bgr) ---------------------
_SHIFT = 12
_SDIV = np.array([0] + [round((255 << _SHIFT) / i) for i in range(1, 256)], dtype=np.int32)
_HDIV = np.array([0] + [round((180 << _SHIFT) / (6 * i)) for i in range(1, 256)], dtype=np.int32)


def rgb_to_hsv_u8(rgb: np.ndarray) -> np.ndarray:
    """OpenCV COLOR_RGB2HSV on uint8 (H in 0-179), with its integer arithmetic.

    mmseg works on BGR and calls COLOR_BGR2HSV; on the same colours both give the same HSV.
    """
    r, g, b = (rgb[..., i].astype(np.int32) for i in range(3))
    v = np.maximum(np.maximum(r, g), b)
    vmin = np.minimum(np.minimum(r, g), b)
    diff = v - vmin
    s = (diff * _SDIV[v] + (1 << (_SHIFT - 1))) >> _SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + (1 << (_SHIFT - 1))) >> _SHIFT
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], axis=-1).astype(np.uint8)


_SECTORS = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])  # b, g, r taps


def hsv_to_rgb_u8(hsv: np.ndarray, simd_pixels: int = 32) -> np.ndarray:
    """OpenCV COLOR_HSV2RGB on uint8 (H in 0-179): float32 sector arithmetic, as OpenCV computes it.

    OpenCV fuses `1 - s*h` into one multiply-add (the float64 product of two float32 values is
    exact, so rounding `1 - s*h` once to float32 reproduces it). Its vector kernel converts whole
    groups of `simd_pixels` pixels per row (32 with the AVX2 build) and truncates to uint8; the
    leftover pixels at the end of a row go through the scalar code, which rounds to nearest even.
    Rows as wide as the recipe's 1024-pixel crops are all vector groups.
    """
    f32 = np.float32
    h = hsv[..., 0].astype(f32) * f32(6.0 / 180.0)
    s = hsv[..., 1].astype(f32) * f32(1.0 / 255.0)
    v = hsv[..., 2].astype(f32) * f32(1.0 / 255.0)
    sector = np.floor(h).astype(np.int64) % 6
    frac = h - sector.astype(f32)
    s64 = s.astype(np.float64)
    tab = np.stack(
        [v, v * (f32(1) - s), v * (1.0 - s64 * frac).astype(f32), v * (1.0 - s64 * (f32(1) - frac)).astype(f32)],
        axis=-1,
    )
    rgb = np.take_along_axis(tab, _SECTORS[sector], axis=-1)[..., ::-1] * f32(255)
    vector_end = hsv.shape[-2] - hsv.shape[-2] % simd_pixels
    out = np.empty(rgb.shape, np.uint8)
    out[..., :vector_end, :] = np.trunc(rgb[..., :vector_end, :]).clip(0, 255)
    out[..., vector_end:, :] = np.rint(rgb[..., vector_end:, :]).clip(0, 255)
    return out


def _scale_shift(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    # mmseg's `convert`: float multiply-add, clip, then truncate back to uint8.
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class PhotoMetricDistortion:
    brightness_delta: int = 32
    contrast_range: tuple[float, float] = (0.5, 1.5)
    saturation_range: tuple[float, float] = (0.5, 1.5)
    hue_delta: int = 18

    def __call__(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Each step with probability 0.5; contrast before or after the HSV steps at random."""
        img = rgb
        if rng.integers(2):
            img = _scale_shift(img, beta=rng.uniform(-self.brightness_delta, self.brightness_delta))
        contrast_first = bool(rng.integers(2))
        if contrast_first:
            img = self._contrast(img, rng)
        if rng.integers(2):
            hsv = rgb_to_hsv_u8(img)
            hsv[..., 1] = _scale_shift(hsv[..., 1], alpha=rng.uniform(*self.saturation_range))
            img = hsv_to_rgb_u8(hsv)
        if rng.integers(2):
            hsv = rgb_to_hsv_u8(img)
            hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.integers(-self.hue_delta, self.hue_delta)) % 180
            img = hsv_to_rgb_u8(hsv)
        if not contrast_first:
            img = self._contrast(img, rng)
        return img

    def _contrast(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.integers(2):
            return _scale_shift(img, alpha=rng.uniform(*self.contrast_range))
        return img


# -- the whole pipeline ------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainTransform:
    """RGB uint8 image + uint8 label -> (image, label, (h, w) valid) padded to `crop`.

    The image is padded with 0 and the label with 255; the caller zeroes the image padding after
    normalisation (mmseg pads the normalised image with 0).
    """

    crop: tuple[int, int] = (1024, 1024)  # (height, width)
    scale: tuple[int, int] = (2048, 1024)  # mmseg's (long, short) resize scale
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: PhotoMetricDistortion | None = PhotoMetricDistortion()

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        height, width = label.shape
        out_h, out_w = random_resize_size(height, width, self.scale, self.ratio_range, rng)
        resized_label = label[np.ix_(nearest_indices(height, out_h), nearest_indices(width, out_w))]
        y0, y1, x0, x1 = random_crop_bbox(resized_label, self.crop, self.cat_max_ratio, rng)
        label = resized_label[y0:y1, x0:x1]
        image = resize_window_bilinear(image, (out_h, out_w), (y0, y1, x0, x1))
        if rng.random() < self.flip_prob:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric is not None:
            image = self.photometric(image, rng)
        valid = label.shape
        pad_h, pad_w = self.crop[0] - valid[0], self.crop[1] - valid[1]
        if pad_h or pad_w:
            image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=0)
            label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX)
        return np.ascontiguousarray(image), np.ascontiguousarray(label), valid
