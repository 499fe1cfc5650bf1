"""Decode and validate uploaded images; encode label maps as PNG, overlay, JSON stats or raw bytes.

Decoding follows mmsegmentation's loader where it matters for labels: EXIF orientation is applied,
alpha is dropped (not composited), 16-bit images are reduced to 8 bits, CMYK/palette/grayscale
become RGB.
"""

from __future__ import annotations

import base64
import contextlib
import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ServiceError

FORMATS = {"JPEG", "PNG", "WEBP", "BMP", "TIFF", "MPO"}
CONTENT_TYPES = {
    "image/jpeg",
    "image/png",
    "image/webp",
    "image/bmp",
    "image/tiff",
    "image/x-ms-bmp",
    "application/octet-stream",
}
OUTPUT_FORMATS = ("png", "overlay", "json", "raw")


# EXIF orientations 5-8 turn the image by 90 degrees: its displayed height is the stored width.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class ImageHeader:
    """What the header alone tells: enough to admit, batch and size a request without decoding."""

    format: str
    height: int  # after EXIF orientation, i.e. the size of the label map
    width: int
    orientation: int  # EXIF orientation tag, 1 when absent


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Bytes -> HxWx3 uint8 RGB, refusing non-images (400) and oversized images before decoding (413)."""
    with _image_errors():
        img = _open_checked(data, max_pixels)
        img = ImageOps.exif_transpose(img)  # decodes; rotates as mmseg's loader does
        rgb = _to_rgb(img)
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ServiceError("invalid_image", "image has zero size")
    return rgb


def read_header(data: bytes, max_pixels: int) -> ImageHeader:
    """The checks of `decode_image` that need no pixels (format, pixel limit, EXIF orientation), from
    Pillow's lazy open: the header and EXIF block are parsed, the image data is not decoded."""
    with _image_errors():
        img = _open_checked(data, max_pixels)
        orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1)
        width, height = img.size
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    if width == 0 or height == 0:
        raise ServiceError("invalid_image", "image has zero size")
    return ImageHeader(img.format, height, width, orientation)


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Lazy open (header only), refusing empty bodies, unknown formats and images over the pixel limit."""
    if not data:
        raise ServiceError("invalid_image", "empty image: the request carried no bytes")
    img = Image.open(io.BytesIO(data))
    width, height = img.size
    if width * height > max_pixels:
        raise ServiceError(
            "too_large", f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} pixels"
        )
    if img.format not in FORMATS:
        raise ServiceError("invalid_image", f"unsupported image format {img.format}; send JPEG, PNG, WebP, BMP or TIFF")
    return img


@contextlib.contextmanager
def _image_errors():
    """Pillow's many ways of saying 'not an image' become 400 invalid_image, bombs 413 too_large."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ServiceError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ServiceError("too_large", f"image refused as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise ServiceError("invalid_image", "cannot decode image: not a JPEG, PNG, WebP, BMP or TIFF file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ServiceError("invalid_image", f"cannot decode image: {describe(exc)}") from None


OBJECT_REPR = re.compile(r"\s*<[^<>]* (?:object )?at 0x[0-9a-fA-F]+>")


def describe(exc: Exception) -> str:
    """The decoder's complaint without Python object reprs (`<_io.BytesIO object at 0x7f...>`)."""
    text = OBJECT_REPR.sub("", str(exc)).strip(" :")
    return text or "corrupt or truncated data"


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: keep the high byte, as OpenCV's 8-bit colour loading does.
        arr = np.asarray(img, dtype=np.uint32) >> 8
        return np.ascontiguousarray(np.repeat(arr.clip(0, 255).astype(np.uint8)[:, :, None], 3, axis=2))
    if img.mode == "PA":  # PIL has no direct PA -> RGB
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")  # drops alpha, as OpenCV's colour loader does
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def palette_bytes(palette) -> bytes:
    flat = [v for colour in palette for v in colour]
    return bytes(flat + [0] * (768 - len(flat)))


def label_bytes(labels: np.ndarray) -> bytes:
    """Raw labels as bytes: the bytes object under them when there is one (labels read out of a
    worker's slot are), so a 2 MB label map is not copied once more for the response."""
    owner = labels
    while isinstance(owner, np.ndarray):
        owner = owner.base
    if isinstance(owner, bytes) and labels.flags.c_contiguous and labels.nbytes == len(owner):
        return owner
    return labels.tobytes()


def encode_png(labels: np.ndarray, palette) -> bytes:
    """Palette PNG: pixel values are the train ids, colours are the dataset palette."""
    img = Image.fromarray(labels, mode="P")
    img.putpalette(palette_bytes(palette))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # fast: label maps compress well anyway
    return buf.getvalue()


def colourise(labels: np.ndarray, palette) -> np.ndarray:
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = np.asarray(palette, np.uint8)
    return lut[labels]


def encode_overlay(image: np.ndarray, labels: np.ndarray, palette, alpha: float = 0.5, quality: int = 90) -> bytes:
    """The image blended with the class colours, as JPEG."""
    blend = (image.astype(np.float32) * (1 - alpha) + colourise(labels, palette) * alpha).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(blend).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def class_stats(labels: np.ndarray, classes) -> list[dict]:
    counts = np.bincount(labels.ravel(), minlength=len(classes))[: len(classes)]
    total = max(int(labels.size), 1)
    return [
        {"id": i, "name": name, "pixels": int(c), "fraction": round(int(c) / total, 6)}
        for i, (name, c) in enumerate(zip(classes, counts))
        if c
    ]


def encode_json(labels: np.ndarray, model: str, classes, palette, timings: dict) -> dict:
    return {
        "model": model,
        "height": int(labels.shape[0]),
        "width": int(labels.shape[1]),
        "classes": class_stats(labels, classes),
        "timings_ms": {k: round(v * 1000, 3) for k, v in timings.items()},
        "labels_png": base64.b64encode(encode_png(labels, palette)).decode("ascii"),
    }
