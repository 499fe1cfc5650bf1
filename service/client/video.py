"""Frame sources and sinks for the streaming client: video files, image folders and cameras in;
an overlay video or a PNG sequence out. Video uses PyAV (`pip install bisenet-serve[video]`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
FOLDER_FPS = 30.0  # an image folder has no rate of its own


def _av():
    try:
        import av
    except ImportError:
        raise SystemExit("video files and cameras need PyAV: pip install 'bisenet-serve[video]' (or av)") from None
    return av


class FrameSource:
    """Iterates HxWx3 uint8 RGB frames; `fps` is the source's own rate (None: unknown)."""

    def __init__(self, spec: str, limit: int | None = None):
        self.spec = spec
        self.limit = limit
        self.fps: float | None = None
        self.live = False  # a camera paces itself
        path = Path(spec)
        if spec.isdigit():
            av = _av()
            self.container = av.open(f"/dev/video{spec}", format="v4l2")
            self.live = True
        elif path.is_dir():
            self.container = None
            self.files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not self.files:
                raise SystemExit(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {path}")
            self.fps = FOLDER_FPS
        elif path.is_file():
            self.container = _av().open(str(path))
        else:
            raise SystemExit(f"input {spec!r} is neither a video file, an image folder nor a camera index")
        if self.container is not None:
            stream = self.container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate
            self.fps = float(rate) if rate else None

    def __iter__(self) -> Iterator[np.ndarray]:
        count = 0
        if self.container is None:
            frames = (np.asarray(Image.open(p).convert("RGB")) for p in self.files)
        else:
            frames = (f.to_ndarray(format="rgb24") for f in self.container.decode(video=0))
        for frame in frames:
            if self.limit is not None and count >= self.limit:
                break
            count += 1
            yield frame

    def close(self) -> None:
        if self.container is not None:
            self.container.close()


def paced(frames, fps: float | None) -> Iterator[np.ndarray]:
    """Yield frames no faster than `fps` (None: as fast as they come)."""
    if not fps:
        yield from frames
        return
    period = 1.0 / fps
    next_at = time.perf_counter()
    for frame in frames:
        delay = next_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        next_at = max(next_at + period, time.perf_counter() - period)  # never burst to catch up
        yield frame


def blend(image: np.ndarray, labels: np.ndarray, palette, alpha: float = 0.5) -> np.ndarray:
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = np.asarray(palette, np.uint8)
    return (image.astype(np.float32) * (1 - alpha) + lut[labels] * alpha).astype(np.uint8)


class OverlaySink:
    """Writes overlays to a video file (by suffix: .mp4, .mkv, .avi, ...) or, for a folder, PNGs."""

    def __init__(self, target: str, fps: float | None):
        self.path = Path(target)
        self.fps = fps or FOLDER_FPS
        self.container = None
        self.stream = None
        self.written = 0
        if not self.path.suffix:
            self.path.mkdir(parents=True, exist_ok=True)

    def write(self, frame_id: int, overlay: np.ndarray) -> None:
        self.written += 1
        if not self.path.suffix:
            Image.fromarray(overlay).save(self.path / f"frame_{frame_id:06d}.png", compress_level=1)
            return
        av = _av()
        h, w = overlay.shape[0] // 2 * 2, overlay.shape[1] // 2 * 2  # yuv420p wants even sides
        if self.container is None:
            from fractions import Fraction

            self.container = av.open(str(self.path), "w")
            codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
            self.stream = self.container.add_stream(codec, rate=Fraction(self.fps).limit_denominator(1001))
            self.stream.width, self.stream.height, self.stream.pix_fmt = w, h, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(overlay[:h, :w]), format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        if self.container is not None:
            for packet in self.stream.encode():
                self.container.mux(packet)
            self.container.close()
