"""Python client and CLI for the segmentation service.

    from service.client import SegmentationClient
    client = SegmentationClient("http://localhost:8000")
    result = client.segment("frame.jpg")          # path, bytes, HxWx3 uint8 array or PIL image
    result.labels                                  # HxW uint8 train ids

CLI:  python -m service.client segment photo.jpg -o labels.png --overlay overlay.jpg
      python -m service.client models
      python -m service.client stream video.mp4 -o overlay.mp4    # gRPC; also an image folder or camera index

gRPC: GrpcSegmentationClient("localhost:50051") has segment(...), stream(frames) and models()
(service/grpc_client.py; imported on first use so REST-only users need no grpc).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

MEDIA_BY_SUFFIX = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
}


class SegmentationError(RuntimeError):
    """The service refused a request: HTTP status, error code, message and Retry-After (seconds)."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after

    @property
    def retryable(self) -> bool:
        return self.status in (429, 503)


@dataclass
class SegmentResult:
    model: str
    labels: np.ndarray | None = None  # HxW train ids (png, raw and json formats)
    overlay: bytes | None = None  # JPEG (overlay format)
    stats: dict | None = None  # per-class counts (json format)
    timings_ms: dict = field(default_factory=dict)  # from the Server-Timing header
    content: bytes = b""  # the response body as received

    def save_overlay(self, path: str | os.PathLike) -> None:
        Path(path).write_bytes(self.overlay or b"")


def encode_image(image) -> tuple[bytes, str]:
    """A path, bytes, ndarray or PIL image -> (body, content type). Arrays are sent as lossless PNG."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        return path.read_bytes(), MEDIA_BY_SUFFIX.get(path.suffix.lower(), "application/octet-stream")
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image), "application/octet-stream"
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=1)
        return buf.getvalue(), "image/png"
    raise TypeError(f"cannot send a {type(image).__name__} as an image")


def parse_server_timing(header: str) -> dict:
    out = {}
    for part in filter(None, (p.strip() for p in header.split(","))):
        name, _, dur = part.partition(";dur=")
        if dur:
            out[name] = float(dur)
    return out


def decode_labels_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img)  # palette indices are the train ids


def error_from(response: httpx.Response) -> SegmentationError:
    try:
        err = response.json()["error"]
        code, message = err.get("code", "error"), err.get("message", response.text)
    except (ValueError, KeyError, TypeError):
        code, message = "error", response.text
    retry = response.headers.get("retry-after")
    return SegmentationError(response.status_code, code, message, float(retry) if retry else None)


def result_from(response: httpx.Response, fmt: str) -> SegmentResult:
    result = SegmentResult(
        model=response.headers.get("x-model", ""),
        content=response.content,
        timings_ms=parse_server_timing(response.headers.get("server-timing", "")),
    )
    if fmt == "png":
        result.labels = decode_labels_png(response.content)
    elif fmt == "raw":
        h, w = int(response.headers["x-height"]), int(response.headers["x-width"])
        result.labels = np.frombuffer(response.content, np.uint8).reshape(h, w)
    elif fmt == "overlay":
        result.overlay = response.content
    else:
        result.stats = response.json()
        result.labels = decode_labels_png(base64.b64decode(result.stats["labels_png"]))
    return result


class SegmentationClient:
    """REST client; one keep-alive connection pool. Thread-safe (httpx.Client is)."""

    def __init__(self, url: str = "http://localhost:8000", api_key: str | None = None, timeout: float = 120.0):
        headers = {"X-API-Key": api_key} if api_key else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def segment(
        self, image, model: str | None = None, format: str = "png", deadline_ms: int | None = None
    ) -> SegmentResult:
        body, content_type = encode_image(image)
        params = {
            "format": format,
            **({"model": model} if model else {}),
            **({"deadline_ms": deadline_ms} if deadline_ms else {}),
        }
        response = self.http.post("/segment", content=body, params=params, headers={"Content-Type": content_type})
        if response.status_code != 200:
            raise error_from(response)
        return result_from(response, format)

    def models(self) -> dict:
        response = self.http.get("/models")
        if response.status_code != 200:
            raise error_from(response)
        return response.json()

    def ready(self) -> bool:
        try:
            return self.http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _cmd_segment(args) -> int:
    with SegmentationClient(args.url, api_key=args.api_key) as client:
        fmt = "json" if args.json else "png"
        result = client.segment(args.image, model=args.model, format=fmt)
        if args.output:
            png = result.content if fmt == "png" else base64.b64decode(result.stats["labels_png"])
            Path(args.output).write_bytes(png)
        if args.overlay:
            client.segment(args.image, model=args.model, format="overlay").save_overlay(args.overlay)
        if args.json:
            print(json.dumps({k: v for k, v in result.stats.items() if k != "labels_png"}, indent=2))
        else:
            counts = np.bincount(result.labels.ravel(), minlength=1)
            top = ", ".join(
                f"{i}:{c / result.labels.size:.1%}" for i, c in sorted(enumerate(counts), key=lambda x: -x[1])[:5] if c
            )
            print(
                f"{result.model} {result.labels.shape[1]}x{result.labels.shape[0]} {result.timings_ms} top classes {top}"
            )
    return 0


def _cmd_stream(args) -> int:
    """Stream a video, folder or camera over gRPC; live fps/latency/drops on stderr, summary on stdout."""
    from .grpc_client import GrpcSegmentationClient, StreamStats
    from .video import FrameSource, OverlaySink, blend, paced

    source = FrameSource(args.input, limit=args.frames)
    rate = None if args.fast or source.live else (args.max_rate or source.fps)
    originals: dict[int, np.ndarray] = {}  # frames awaiting their result, for the overlay

    def frames():
        for frame_id, frame in enumerate(paced(source, rate)):
            if args.output:
                originals[frame_id] = frame
            yield _jpeg(frame, args.jpeg) if args.jpeg else frame

    stats, last_print = StreamStats(), 0.0
    with GrpcSegmentationClient(args.grpc, api_key=args.api_key, tls=args.tls) as client:
        info = client.models()
        name = args.model or info["default"]
        palette = next((m["palette"] for m in info["models"] if m["name"] == name), info["models"][0]["palette"])
        sink = OverlaySink(args.output, rate or source.fps) if args.output else None
        try:
            for result in client.stream(
                frames(),
                model=args.model,
                format="raw" if sink else "stats",
                policy=args.policy,
                max_in_flight=args.max_in_flight,
                deadline_ms=args.deadline_ms,
            ):
                stats.add(result)
                for frame_id in result.dropped_ids:
                    originals.pop(frame_id, None)
                image = originals.pop(result.frame_id, None)
                if result.error:
                    print(f"\nframe {result.frame_id}: {result.error[0]}: {result.error[1]}", file=sys.stderr)
                elif sink is not None and image is not None:
                    sink.write(result.frame_id, blend(image, result.labels, palette))
                if time.perf_counter() - last_print >= 1.0:
                    last_print = time.perf_counter()
                    print(f"\r{stats.live()}", end="", file=sys.stderr, flush=True)
        finally:
            if sink is not None:
                sink.close()
            source.close()
    print(file=sys.stderr)
    print(
        json.dumps(
            {
                "input": args.input,
                "source_fps": source.fps,
                "send_fps": rate,
                "policy": args.policy,
                **stats.summary(),
                **({"output": args.output} if args.output else {}),
            }
        )
    )
    return 0


def _jpeg(frame: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.client", description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=os.environ.get("BISENET_URL", "http://localhost:8000"))
    parser.add_argument("--api-key", default=os.environ.get("BISENET_API_KEY"))
    sub = parser.add_subparsers(dest="command", required=True)
    seg = sub.add_parser("segment", help="segment one image")
    seg.add_argument("image")
    seg.add_argument("-o", "--output", help="write the label PNG here")
    seg.add_argument("--overlay", help="write an overlay JPEG here")
    seg.add_argument("--model")
    seg.add_argument("--json", action="store_true", help="print per-class statistics")
    sub.add_parser("models", help="list served models")
    st = sub.add_parser("stream", help="stream a video file, image folder or camera index over gRPC")
    st.add_argument("input", help="video file, folder of images, or camera index (0 = /dev/video0)")
    st.add_argument("--grpc", default=os.environ.get("BISENET_GRPC", "localhost:50051"), help="gRPC host:port")
    st.add_argument("--tls", action="store_true", help="connect with TLS (system roots)")
    st.add_argument("-o", "--output", help="overlay video (.mp4, .mkv, ...) or a folder for a PNG sequence")
    st.add_argument("--model")
    st.add_argument(
        "--policy",
        choices=["latest", "block"],
        default="latest",
        help="when the service falls behind: drop the oldest waiting frames, or hold the sender",
    )
    st.add_argument("--max-in-flight", type=int, help="frames being served at once (server default 2)")
    st.add_argument("--max-rate", type=float, help="send at this rate (default: the source's frame rate)")
    st.add_argument("--fast", action="store_true", help="send as fast as possible")
    st.add_argument("--frames", type=int, help="stop after this many frames")
    st.add_argument("--jpeg", type=int, metavar="QUALITY", help="send frames as JPEG (default: raw RGB)")
    st.add_argument("--deadline-ms", type=int, help="per-frame deadline")
    args = parser.parse_args(argv)
    try:
        if args.command == "segment":
            return _cmd_segment(args)
        if args.command == "stream":
            return _cmd_stream(args)
        with SegmentationClient(args.url, api_key=args.api_key) as client:
            print(json.dumps(client.models(), indent=2))
        return 0
    except SegmentationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"error: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1

    except KeyboardInterrupt:
        return 130


def __getattr__(name: str):
    if name in ("GrpcSegmentationClient", "StreamResult"):
        from . import grpc_client

        return getattr(grpc_client, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
