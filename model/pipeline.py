"""Moving batches between host memory and the device, overlapping copies with compute.

One `HostDevicePipeline` per device. `submit(run, inputs, outputs)` takes per-image host arrays
(the worker passes its shared-memory slot views, no `np.stack`) and:

1. copies each image on the *copy-in stream* into a device staging buffer (a ring of `depth`
   flat buffers, so batch N+1 is copied in while batch N computes);
2. runs `run(staging)` on the *compute stream* once the copy-in event fired, then copies the labels
   (device to device, a small fraction of the compute) into that ring slot's label buffer;
3. copies each label map from there on the *copy-out stream* straight into its host output array,
   and records a blocking event that `InFlight.wait()` sleeps on (no spinning synchronise).

A ring slot's buffers are reused only once the batch that last used them is past them: its
staging buffer after the compute that read it, its label buffer after the copy-out that read it.
The label buffer is what lets batch N+1 compute while batch N's labels go to the host: a CUDA
graph's output is static, and its next replay would overwrite labels still being copied out. Host
arrays must stay untouched until `wait()` returns; page-locked host memory (`register_host`) makes
the copies true DMA. On the CPU the same code runs with no streams and no events: every step is
synchronous and `wait()` returns at once.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)


def host_tensor(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A tensor sharing `array`'s memory (read-only arrays too: they are only ever read). A tensor
    (an image decoded on the device) is used as it is."""
    if isinstance(array, torch.Tensor):
        return array
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        return torch.from_numpy(array)


class InFlight:
    """A submitted batch; `wait()` returns once its labels are in the host output arrays."""

    def __init__(self, done: torch.cuda.Event | None, count: int):
        self._done = done
        self.count = count

    def ready(self) -> bool:
        return self._done is None or self._done.query()

    def wait(self) -> None:
        if self._done is not None:
            self._done.synchronize()  # a blocking-sync event: the thread sleeps, the core is free


class HostDevicePipeline:
    def __init__(self, device: torch.device, compute_stream=None, depth: int = 2):
        self.device = device
        self.on_cuda = device.type == "cuda"
        self.depth = depth
        self._staging = self._ring()  # (N, H, W, 3) pixels per ring slot
        self._labels = self._ring()  # (N, H, W) labels per ring slot
        self._next = 0
        self.batches = 0
        if self.on_cuda:
            self.compute = compute_stream or torch.cuda.Stream(device)
            self.copy_in = torch.cuda.Stream(device)
            self.copy_out = torch.cuda.Stream(device)
            self._consumed: list[torch.cuda.Event | None] = [None] * depth  # compute done with the slot
            self._copied_out: list[torch.cuda.Event | None] = [None] * depth  # copy-out done with it

    def _ring(self) -> list[torch.Tensor]:
        return [torch.empty(0, dtype=torch.uint8, device=self.device) for _ in range(self.depth)]

    def _stream(self, stream) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(stream) if self.on_cuda else contextlib.nullcontext()

    def _buffer(self, ring: list[torch.Tensor], slot: int, shape: tuple[int, ...]) -> torch.Tensor:
        """A `shape` view of ring buffer `slot`, grown (rarely) when a batch needs more bytes."""
        nbytes = int(np.prod(shape))
        if ring[slot].numel() < nbytes:
            if self.on_cuda:
                torch.cuda.synchronize(self.device)  # the old buffer may still be read by a copy
            ring[slot] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return ring[slot][:nbytes].view(shape)

    def submit(
        self,
        run: Callable[[torch.Tensor], torch.Tensor],
        inputs: Sequence[np.ndarray | torch.Tensor],
        outputs: Sequence[np.ndarray],
    ) -> InFlight:
        """Same-shape (H, W, 3) uint8 `inputs` -> `run` -> (H, W) uint8 labels into `outputs`."""
        if not inputs or len(inputs) != len(outputs):
            raise ValueError(f"need as many outputs as inputs, got {len(inputs)} and {len(outputs)}")
        height, width = inputs[0].shape[:2]
        slot = self._next
        self._next = (slot + 1) % self.depth
        staging = self._buffer(self._staging, slot, (len(inputs), height, width, 3))
        held = self._buffer(self._labels, slot, (len(inputs), height, width))
        cuda = self.on_cuda
        with self._stream(self.copy_in if cuda else None):
            if cuda and self._consumed[slot] is not None:
                self.copy_in.wait_event(self._consumed[slot])
            if cuda and any(isinstance(image, torch.Tensor) for image in inputs):
                self.copy_in.wait_stream(torch.cuda.current_stream(self.device))  # decoded there (nvJPEG)
            for i, image in enumerate(inputs):
                staging[i].copy_(host_tensor(image), non_blocking=True)
            copied_in = torch.cuda.Event() if cuda else None
            if cuda:
                copied_in.record(self.copy_in)
        with self._stream(self.compute if cuda else None):
            if cuda:
                self.compute.wait_event(copied_in)
            labels = run(staging)
            if cuda and self._copied_out[slot] is not None:
                self.compute.wait_event(self._copied_out[slot])
            held.copy_(labels)  # out of the graph's static output before the next replay
            if cuda:
                consumed = torch.cuda.Event()
                consumed.record(self.compute)
                self._consumed[slot] = consumed
        with self._stream(self.copy_out if cuda else None):
            if cuda:
                self.copy_out.wait_event(consumed)
            for i, out in enumerate(outputs):
                host_tensor(out).copy_(held[i], non_blocking=True)
            done = torch.cuda.Event(blocking=True) if cuda else None
            if cuda:
                done.record(self.copy_out)
                self._copied_out[slot] = done
        self.batches += 1
        return InFlight(done, len(inputs))


def register_host(array: np.ndarray) -> bool:
    """Page-lock `array`'s memory for the GPU's DMA engines (cudaHostRegister); False if refused."""
    if not torch.cuda.is_available() or array.nbytes == 0:
        return False
    ptr = array.__array_interface__["data"][0]
    err = torch.cuda.cudart().cudaHostRegister(ptr, array.nbytes, 0)
    ok = int(getattr(err, "value", err)) == 0
    if not ok:
        log.warning("cudaHostRegister of %d bytes failed (%s): copies of this slot are not DMA", array.nbytes, err)
    return ok


def unregister_host(array: np.ndarray) -> None:
    if torch.cuda.is_available() and array.nbytes:
        torch.cuda.cudart().cudaHostUnregister(array.__array_interface__["data"][0])
