"""Decoding in the worker (`--decode worker`): the front end read only the image header and put the
compressed bytes in the request's shared-memory slot; the worker turns them into pixels here, after
batching, just before the engine.

- On a CUDA device, JPEGs of a batch are decoded together on the GPU with nvJPEG
  (`torchvision.io.decode_jpeg`, imported only there: torchvision does not load beside the CPU
  build of torch). Other formats, JPEGs with an EXIF rotation (nvJPEG ignores it), JPEGs that do
  not end with the end-of-image marker (truncated ones, which the CPU decoder refuses while a GPU
  decoder may fill in the missing rows) and any JPEG nvJPEG refuses go through the front end's own
  decoder on the CPU.
- On the CPU, every image goes through the front end's decoder (`imaging.decode_image`), so labels
  are exactly what `--decode frontend` gives.
- An image that fails to decode fails alone (400 invalid_image); the rest of its batch runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..api import imaging
from ..errors import ServiceError
from .scheduler import Job
from .shm import SlotMaps

log = logging.getLogger("service.worker.decode")
JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"  # end-of-image marker


@dataclass
class BatchPixels:
    jobs: list[Job]  # the jobs whose pixels are in `images`, in order
    images: list  # per job an (H, W, 3) uint8 frame: a slot view, a decoded array, or a device tensor (nvJPEG)
    invalid: list[tuple[Job, str]]  # jobs whose image could not be decoded, with the reason


class FrameDecoder:
    """Pixels for a batch of same-shape jobs, from raw pixels or compressed bytes in their slots."""

    def __init__(self, device: str, max_pixels: int):
        self.device = device
        self.max_pixels = max_pixels
        self.on_cuda = device.startswith("cuda")
        self._decode_jpeg = None

    def load(self, batch: list[Job], maps: SlotMaps) -> BatchPixels:
        h, w = batch[0].height, batch[0].width
        if not any(j.encoded for j in batch):  # pixels decoded by the front end
            images = [maps.view(j.slot, h * w * 3).reshape(h, w, 3) for j in batch]  # views: no copies
            return BatchPixels(list(batch), images, [])
        blobs = [bytes(maps.view(j.slot, j.encoded)) if j.encoded else None for j in batch]
        frames = self._decode_all(batch, blobs, maps)
        good, images, invalid = [], [], []
        for job, frame in zip(batch, frames):
            if isinstance(frame, str):
                invalid.append((job, frame))
            elif tuple(frame.shape) != (h, w, 3):  # the header promised another size
                invalid.append((job, f"decoded image is {frame.shape[1]}x{frame.shape[0]}, its header says {w}x{h}"))
            else:
                good.append(job)
                images.append(frame)
        return BatchPixels(good, images, invalid)

    # -- decoding ---------------------------------------------------------------------------------
    def _decode_all(self, batch: list[Job], blobs: list[bytes | None], maps: SlotMaps) -> list:
        """One entry per job: an HxWx3 frame (numpy or device tensor) or the error message."""
        encoded = [i for i, b in enumerate(blobs) if b is not None]
        frames: list = [None] * len(batch)
        for i, frame in zip(encoded, self.decode([blobs[i] for i in encoded])):
            frames[i] = frame
        for i, job in enumerate(batch):
            if blobs[i] is None:  # a raw frame (gRPC RGB input) in a batch with encoded ones
                frames[i] = maps.view(job.slot, job.height * job.width * 3).reshape(job.height, job.width, 3)
        return frames

    def decode(self, blobs: list[bytes]) -> list:
        """Compressed images -> HxWx3 uint8 frames (numpy, or tensors on the CUDA device), or for
        each image that cannot be decoded the reason, as a string."""
        frames: list = [None] * len(blobs)
        jpegs = [i for i, b in enumerate(blobs) if self.on_cuda and self._for_nvjpeg(b)]
        if jpegs:
            for i, frame in zip(jpegs, self._nvjpeg([blobs[i] for i in jpegs])):
                frames[i] = frame
        return [frame if frame is not None else self._pillow(blob) for frame, blob in zip(frames, blobs)]

    def _for_nvjpeg(self, blob: bytes) -> bool:
        """A whole JPEG without an EXIF rotation. nvJPEG's path ignores EXIF orientation, so rotated
        photos (rare in video and camera streams) are decoded on the CPU, rotated as mmseg does; a
        JPEG cut short goes there too, to be refused as the front end would refuse it."""
        if not blob.startswith(JPEG_MAGIC) or not blob.rstrip(b"\x00").endswith(JPEG_END):
            return False
        try:
            return imaging.read_header(blob, self.max_pixels).orientation == 1
        except ServiceError:
            return False  # the CPU decode reports what is wrong with it

    def _pillow(self, blob: bytes):
        try:
            return imaging.decode_image(blob, self.max_pixels)
        except ServiceError as exc:
            return exc.message

    def _nvjpeg(self, blobs: list[bytes]) -> list:
        """GPU decode of a list of JPEGs; None for each one nvJPEG cannot take (the CPU retries it)."""
        import torch

        if self._decode_jpeg is None:
            from torchvision.io import ImageReadMode, decode_jpeg

            self._decode_jpeg = lambda data: decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        try:
            return [t.permute(1, 2, 0) for t in self._decode_jpeg(tensors)]
        except RuntimeError:
            pass  # one bad image fails the whole call: decode one by one to find it
        out = []
        for t in tensors:
            try:
                out.append(self._decode_jpeg(t).permute(1, 2, 0))
            except RuntimeError as exc:
                log.debug("nvJPEG refused an image (%s); decoding it on the CPU", exc)
                out.append(None)
        return out
