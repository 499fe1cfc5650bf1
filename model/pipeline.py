"""Moving batches between host memory and the device, overlapping copies with compute.

One `HostDevicePipeline` per device. `submit(run, inputs, outputs)` takes per-image host arrays
(the worker passes its shared-memory slot views, no `np.stack`) and:

1. copies each image on the *copy-in stream* into a device staging buffer (a ring of `depth`
   flat buffers, so batch N+1 is copied in while batch N computes);
2. runs `run(staging)` on the *compute stream* once the copy-in event fired;
3. copies each label map on the *copy-out stream* straight into its host output array, and
   records a blocking event that `InFlight.wait()` sleeps on (no spinning synchronise).

Copy-in of a ring buffer waits until the compute that last read it has been enqueued past it; the
compute of a batch waits for the copy-out of the previous one (CUDA-graph outputs are static and
would be overwritten otherwise). Host arrays must stay untouched until `wait()` returns; page-
locked host memory (`register_host`) makes the copies true DMA. On the CPU the same code runs with
no streams and no events: every step is synchronous and `wait()` returns at once.
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
        self._ring: list[torch.Tensor] = [torch.empty(0, dtype=torch.uint8, device=device) for _ in range(depth)]
        self._next = 0
        self.batches = 0
        if self.on_cuda:
            self.compute = compute_stream or torch.cuda.Stream(device)
            self.copy_in = torch.cuda.Stream(device)
            self.copy_out = torch.cuda.Stream(device)
            self._consumed: list[torch.cuda.Event | None] = [None] * depth
            self._last_out: torch.cuda.Event | None = None

    def _stream(self, stream) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(stream) if self.on_cuda else contextlib.nullcontext()

    def _staging(self, slot: int, shape: tuple[int, ...]) -> torch.Tensor:
        """A (N, H, W, 3) view of ring buffer `slot`, grown (rarely) when a batch needs more bytes."""
        nbytes = int(np.prod(shape))
        if self._ring[slot].numel() < nbytes:
            if self.on_cuda:
                torch.cuda.synchronize(self.device)  # the old buffer may still be read by a copy
            self._ring[slot] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return self._ring[slot][:nbytes].view(shape)

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
        staging = self._staging(slot, (len(inputs), height, width, 3))
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
                if self._last_out is not None:
                    self.compute.wait_event(self._last_out)
            labels = run(staging)
            if cuda:
                consumed = torch.cuda.Event()
                consumed.record(self.compute)
                self._consumed[slot] = consumed
        with self._stream(self.copy_out if cuda else None):
            if cuda:
                self.copy_out.wait_event(consumed)
                labels.record_stream(self.copy_out)  # eager outputs are freed only after this copy
            for i, out in enumerate(outputs):
                host_tensor(out).copy_(labels[i], non_blocking=True)
            done = torch.cuda.Event(blocking=True) if cuda else None
            if cuda:
                done.record(self.copy_out)
                self._last_out = done
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
