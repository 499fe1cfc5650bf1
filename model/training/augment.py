"""The training augmentation of mmsegmentation's Cityscapes recipe, with OpenCV as mmseg calls it.

RandomResize(scale=(2048, 1024), ratio_range=(0.5, 2.0), keep_ratio=True) -> RandomCrop(crop,
cat_max_ratio=0.75) -> RandomFlip(0.5) -> PhotoMetricDistortion -> pad to the crop
(mmsegmentation's configs/_base_/datasets/cityscapes_1024x1024.py and
mmseg/datasets/transforms/transforms.py in the open-mmlab/mmsegmentation repository).

As in mmseg, the whole image is resized with cv2.resize (INTER_LINEAR; the label INTER_NEAREST,
what mmcv.imrescale calls) and then cropped, and the HSV steps use cv2.cvtColor (mmcv.bgr2hsv /
hsv2bgr). mmseg works on BGR, this pipeline on RGB: COLOR_RGB2HSV / COLOR_HSV2RGB on the RGB image
give the same HSV values and the same pixels, channels reversed, as mmseg's BGR calls.
Random draws come from a per-sample numpy Generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..transforms import test_size as rescale_size

try:
    import cv2
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "the training augmentation calls OpenCV as mmsegmentation does: pip install -e '.[train]' "
        "(opencv-python-headless)"
    ) from exc

IGNORE_INDEX = 255


# -- resizing (what mmcv.imrescale calls) -------------------------------------------------------
def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 HxWxC image to size (h, w): cv2.resize INTER_LINEAR, as mmcv.imresize(..., 'bilinear')."""
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 HxW label to size (h, w): cv2.resize INTER_NEAREST, as mmcv.imresize(..., 'nearest')."""
    return cv2.resize(label, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)


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


# -- photometric distortion (mmcv.bgr2hsv / hsv2bgr are cv2.cvtColor) -----------------------------
def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB -> OpenCV 8-bit HSV (H in 0-179); equals COLOR_BGR2HSV of the BGR image."""
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """OpenCV 8-bit HSV -> uint8 RGB; equals COLOR_HSV2BGR with the channels reversed."""
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


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
            hsv = rgb_to_hsv(img)
            hsv[..., 1] = _scale_shift(hsv[..., 1], alpha=rng.uniform(*self.saturation_range))
            img = hsv_to_rgb(hsv)
        if rng.integers(2):
            hsv = rgb_to_hsv(img)
            hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.integers(-self.hue_delta, self.hue_delta)) % 180
            img = hsv_to_rgb(hsv)
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
        resized_label = resize_label(label, (out_h, out_w))
        y0, y1, x0, x1 = random_crop_bbox(resized_label, self.crop, self.cat_max_ratio, rng)
        label = resized_label[y0:y1, x0:x1]
        image = self.resize_and_crop(image, (out_h, out_w), (y0, y1, x0, x1))
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

    @staticmethod
    def resize_and_crop(image: np.ndarray, size: tuple[int, int], bbox: tuple[int, int, int, int]) -> np.ndarray:
        """The (y0, y1, x0, x1) window of the image resized to `size`: mmseg's Resize then RandomCrop.

        The whole image is resized (tools/bench_augment.py measured this faster than computing only
        the window with a numpy re-implementation of OpenCV's fixed-point bilinear resize).
        """
        y0, y1, x0, x1 = bbox
        return resize_image(image, size)[y0:y1, x0:x1]
