"""`bisenet bench decode`: the worker's decoder (`--decode worker`) against the front end's (Pillow)
on photos: pixel differences, label agreement through the same engine, and decode time per image.

On a CUDA device the worker decodes JPEGs with nvJPEG, whose IDCT and chroma upsampling differ
slightly from libjpeg-turbo's: this measures what that does to the labels. On the CPU the worker
uses the front end's own decoder, so the table shows identical pixels and labels (a smoke run).

    bisenet bench decode --device cuda --model bisenetv1_r18 --size 1024x2048
    bisenet bench decode --device cpu --size 256x512 --resize-scale 512x256     # quick, anywhere
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from PIL import Image

from ..api import imaging
from ..config import parse_shape
from ..worker.decode import FrameDecoder

# scikit-image's bundled colour photos (no download needed)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


def photo_jpegs(size: tuple[int, int], quality: int, count: int) -> list[tuple[str, bytes]]:
    from skimage import data

    out = []
    for name in PHOTOS[:count]:
        img = Image.fromarray(getattr(data, name)()).convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        out.append((name, buf.getvalue()))
    return out


def _timed(fn, device: str, repeat: int) -> tuple[object, float]:
    """(result, seconds per call), synchronising CUDA so device work is counted."""
    sync = _cuda_sync(device)
    result = fn()  # first call: lazy imports, nvJPEG handles
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        result = fn()
    sync()
    return result, (time.perf_counter() - start) / repeat


def _cuda_sync(device: str):
    if not device.startswith("cuda"):
        return lambda: None
    import torch

    return lambda: torch.cuda.synchronize(device)


def _host(frame) -> np.ndarray:
    return frame if isinstance(frame, np.ndarray) else frame.cpu().numpy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bisenet bench decode",
        description="Worker-side decoding (nvJPEG on CUDA) against the front end's Pillow decode: pixels, "
        "labels and time per image, on photos.",
    )
    p.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    p.add_argument("--model", default="bisenetv1_r18", help="model (zoo name) whose labels are compared")
    p.add_argument("--weights", default=None, help="weights (default: the model's official ones; 'random' for none)")
    p.add_argument("--size", default="1024x2048", help="HxW the photos are resized to before JPEG encoding")
    p.add_argument("--resize-scale", default="2048x1024", help="the engine's test-time resize")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the photos")
    p.add_argument("--photos", type=int, default=len(PHOTOS), help=f"how many photos (at most {len(PHOTOS)})")
    p.add_argument("--repeat", type=int, default=5, help="timed decodes of the whole set")
    args = p.parse_args(argv)
    device = "cuda:0" if args.device == "cuda" else args.device

    import torch

    from model import Segmenter

    photos = photo_jpegs(parse_shape(args.size), args.quality, args.photos)
    blobs = [b for _, b in photos]
    decoder = FrameDecoder(device, max_pixels=1 << 62)
    front, front_s = _timed(lambda: [imaging.decode_image(b, 1 << 62) for b in blobs], "cpu", args.repeat)
    worker, worker_s = _timed(lambda: decoder.decode(blobs), device, args.repeat)
    failed = [name for (name, _), frame in zip(photos, worker) if isinstance(frame, str)]
    if failed:
        raise SystemExit(f"the worker's decoder refused {failed}: {[f for f in worker if isinstance(f, str)]}")

    torch.manual_seed(0)
    seg = Segmenter(args.model, weights=args.weights, device=device, scale=parse_shape(args.resize_scale))
    kind = "nvJPEG (GPU)" if decoder.on_cuda else "Pillow (same function as the front end)"
    print(f"\nworker decoder on {device}: {kind}; {args.model}, {len(photos)} photos at {args.size}, q{args.quality}\n")
    print("| photo | max abs pixel diff | mean abs pixel diff | label agreement |")
    print("|---|---|---|---|")
    agreements = []
    for (name, _), a, b in zip(photos, front, worker):
        b_host = _host(b)
        diff = np.abs(a.astype(np.int16) - b_host.astype(np.int16))
        labels_a = seg.engine.segment(a[None])[0]
        labels_b = seg.engine.segment(b[None] if isinstance(b, np.ndarray) else b.unsqueeze(0))[0]
        agreements.append(float(np.mean(labels_a == labels_b)))
        print(f"| {name} | {int(diff.max())} | {diff.mean():.3f} | {agreements[-1]:.4%} |")
    print(f"| **all** | | | {np.mean(agreements):.4%} |")
    n = len(blobs)
    print(
        f"\ndecode ms per image: front end (Pillow, one thread) {front_s * 1000 / n:.2f}; "
        f"worker ({kind}, batch of {n}) {worker_s * 1000 / n:.2f}"
    )
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
