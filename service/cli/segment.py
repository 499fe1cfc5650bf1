"""`bisenet segment` and `bisenet models`: in this process with the model itself, or, with `--url`,
through a running service's REST API. Both ways write the same files: the label PNG (palette
indices are the train ids) and the overlay JPEG that `POST /segment` returns."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import httpx
import numpy as np

from ..api import imaging
from ..client import SegmentationClient, SegmentationError
from ..config import ALIASES, ConfigError, parse_models, parse_shape
from ..errors import ServiceError

URL_HELP = "a running service (default: BISENET_URL; without it the model runs in this process)"


def output_path(target: str | None, image: str, many: bool, suffix: str) -> Path | None:
    """One image: `target` is the file. Several: `target` is a folder, one file per image stem."""
    if not target:
        return None
    if not many:
        return Path(target)
    folder = Path(target)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / (Path(image).stem + suffix)


def summary(image: str, model: str, labels: np.ndarray, classes) -> str:
    stats = sorted(imaging.class_stats(labels, classes), key=lambda c: -c["pixels"])[:5]
    top = ", ".join(f"{c['name']} {c['fraction']:.1%}" for c in stats)
    return f"{image}: {model} {labels.shape[1]}x{labels.shape[0]}  {top}"


class LocalSegmenter:
    """The model in this process, after the service's own decode (so the labels are the service's)."""

    def __init__(self, model: str | None, device: str, dtype: str | None, resize_scale: str):
        from model import Segmenter

        (spec,) = parse_models([model or "bisenetv1_r18"])
        scale = parse_shape(resize_scale)
        self.segmenter = Segmenter(spec.name, weights=spec.weights, device=device, dtype=dtype, scale=scale)

    def run(self, image: bytes) -> tuple[str, np.ndarray, np.ndarray, tuple, tuple]:
        """(model, RGB image, labels, class names, palette)."""
        rgb = imaging.decode_image(image, max_pixels=1 << 31)
        seg = self.segmenter
        return seg.name, rgb, seg.predict(rgb), seg.classes, seg.palette


class RemoteSegmenter:
    """The same through `POST /segment`; class names and palettes from `GET /models`."""

    def __init__(self, url: str, api_key: str | None, model: str | None):
        self.client = SegmentationClient(url, api_key=api_key)
        self.model = model
        self.served = {m["name"]: m for m in self.client.models()["models"]}

    def run(self, image: bytes) -> tuple[str, np.ndarray | None, np.ndarray, tuple, tuple]:
        result = self.client.segment(image, model=self.model, format="png")
        info = self.served[result.model]
        return result.model, None, result.labels, tuple(info["classes"]), tuple(info["palette"])


def segment_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="bisenet segment",
        description="Segment images in this process, or through a running service with --url; write the "
        "label PNGs and overlays the service returns.",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG/PNG/WebP/BMP/TIFF files")
    p.add_argument("--url", default=os.environ.get("BISENET_URL"), help=URL_HELP)
    p.add_argument("--api-key", default=os.environ.get("BISENET_API_KEY"))
    p.add_argument(
        "--model",
        help="NAME[=WEIGHTS] in this process (as `bisenet serve --model`; default bisenetv1_r18), a served name with --url",
    )
    p.add_argument("--device", default="cpu", help="in this process: cpu, cuda, cuda:N")
    p.add_argument("--dtype", default=None, help="in this process: float32, float16, bfloat16")
    p.add_argument("--resize-scale", default="2048x1024", help="in this process: as `bisenet serve --resize-scale`")
    p.add_argument("-o", "--output", help="label PNG (a folder when several images)")
    p.add_argument("--overlay", help="overlay JPEG (a folder when several images)")
    p.add_argument("--json", action="store_true", help="print per-class statistics as JSON, one line per image")
    args = p.parse_args(argv)
    many = len(args.images) > 1
    try:
        if args.url:
            runner = RemoteSegmenter(args.url, args.api_key, args.model)
        else:
            runner = LocalSegmenter(args.model, args.device, args.dtype, args.resize_scale)
        for image in args.images:
            data = Path(image).read_bytes()
            model, rgb, labels, classes, palette = runner.run(data)
            if path := output_path(args.output, image, many, ".png"):
                path.write_bytes(imaging.encode_png(labels, palette))
            if path := output_path(args.overlay, image, many, ".jpg"):
                rgb = rgb if rgb is not None else imaging.decode_image(data, max_pixels=1 << 31)
                path.write_bytes(imaging.encode_overlay(rgb, labels, palette))
            if args.json:
                stats = {"image": image, "model": model, "height": labels.shape[0], "width": labels.shape[1]}
                print(json.dumps({**stats, "classes": imaging.class_stats(labels, classes)}))
            else:
                print(summary(image, model, labels, classes))
    except (SegmentationError, ServiceError, ConfigError, OSError, ValueError) as exc:
        print(f"bisenet segment: error: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"bisenet segment: error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    return 0


def models_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bisenet models", description="The model zoo, or what a running service serves.")
    p.add_argument("--url", default=os.environ.get("BISENET_URL"), help="list a running service's models (JSON)")
    p.add_argument("--api-key", default=os.environ.get("BISENET_API_KEY"))
    args = p.parse_args(argv)
    if args.url:
        try:
            with SegmentationClient(args.url, api_key=args.api_key) as client:
                print(json.dumps(client.models(), indent=2))
        except (SegmentationError, httpx.HTTPError) as exc:
            print(f"bisenet models: error: {exc}", file=sys.stderr)
            return 1
        return 0
    from model.checkpoint import cache_dir
    from model.zoo import DEFAULT_WEIGHTS, ZOO

    defaults = {entry: arch for arch, entry in DEFAULT_WEIGHTS.items()}
    aliases = {arch: alias for alias, arch in ALIASES.items()}
    print(f"{'name':<28} {'backbone':<10} {'mIoU':>6} {'ms+flip':>7}  {'default for':<26} cached")
    for entry in ZOO.values():
        arch = defaults.get(entry.name)
        default = f"{arch} ({aliases[arch]})" if arch else ""
        cached = "yes" if (cache_dir() / entry.filename).is_file() else "no"
        print(
            f"{entry.name:<28} {entry.arch:<10} {entry.miou:>6.2f} {entry.miou_ms_flip:>7.2f}  {default:<26} {cached}"
        )
    return 0
