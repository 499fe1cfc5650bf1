"""`bisenet stream SOURCE`: a video file, a folder of images or a camera, streamed over gRPC
(StreamSegment) at the source's rate; live fps, latency and drops on stderr, a JSON summary on
stdout, and optionally the overlay written as a video or a PNG sequence."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..client import SegmentationError
from ..client.grpc import GrpcSegmentationClient, StreamStats
from ..client.video import FrameSource, OverlaySink, blend, paced


def main(argv: list[str] | None = None) -> int:
    st = argparse.ArgumentParser(
        prog="bisenet stream",
        description="Stream a video file, a folder of images or a camera over gRPC (StreamSegment); live fps, latency and drops on stderr, a JSON summary on stdout.",
    )
    st.add_argument("input", help="video file, folder of images, or camera index (0 = /dev/video0)")
    st.add_argument("--grpc", default=os.environ.get("BISENET_GRPC", "localhost:50051"), help="gRPC host:port")
    st.add_argument("--api-key", default=os.environ.get("BISENET_API_KEY"))
    st.add_argument("--tls", action="store_true", help="connect with TLS (system roots, or --ca-cert)")
    st.add_argument("--ca-cert", help="PEM file of the CA that signed the service's certificate (implies --tls)")
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
    st.add_argument(
        "--priority", type=int, help="1 (the default) runs first; 2, ... let other traffic go first (background jobs)"
    )
    args = st.parse_args(argv)
    try:
        return stream(args)
    except SegmentationError as exc:
        print(f"bisenet stream: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def stream(args) -> int:
    """Stream a video, folder or camera over gRPC; live fps/latency/drops on stderr, summary on stdout."""
    source = FrameSource(args.input, limit=args.frames)
    rate = None if args.fast or source.live else (args.max_rate or source.fps)
    originals: dict[int, np.ndarray] = {}  # frames awaiting their result, for the overlay

    def frames():
        for frame_id, frame in enumerate(paced(source, rate)):
            if args.output:
                originals[frame_id] = frame
            yield _jpeg(frame, args.jpeg) if args.jpeg else frame

    stats, last_print = StreamStats(), 0.0
    root = Path(args.ca_cert).read_bytes() if args.ca_cert else None
    with GrpcSegmentationClient(args.grpc, api_key=args.api_key, tls=args.tls, root_certificates=root) as client:
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
                priority=args.priority,
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
