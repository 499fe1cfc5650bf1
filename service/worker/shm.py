"""The worker link's data plane: frames in POSIX shared memory, reused by size.

The front end creates and owns every segment (so they are unlinked when it exits, even after a
worker crash); the worker maps them by name. A slot holds one request: the front end writes the
HxWx3 pixels, the worker overwrites the first HxW bytes with the labels once it has read them.
Only small control tuples travel over the pipe (see process.py for the message list).
"""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import threading
from multiprocessing import shared_memory

import numpy as np

from ..errors import ServiceError

log = logging.getLogger("service.shm")
ALIGN = 64 * 1024
SHM_ROOT = "/dev/shm"
SHM_HEADROOM = 0.9  # of what /dev/shm has free: other processes (Ray, data loaders) use it too
_names = itertools.count()

SLOT_PREFIX = "bisenet_"  # frame slots in /dev/shm: bisenet_PID_N


def usable_shm_bytes(requested: int, root: str = SHM_ROOT) -> int:
    """The frame memory /dev/shm can really hold. A write past the end of a full tmpfs kills the
    writing process with SIGBUS (a container's /dev/shm is 64 MB unless told otherwise), so a
    budget larger than what is free there is cut down, with a warning: frames beyond it then get
    429, not a crash."""
    try:
        stat = os.statvfs(root)
    except OSError:
        return requested  # not Linux-like: nothing to go by
    free = int(stat.f_bavail * stat.f_frsize * SHM_HEADROOM)
    if free >= requested:
        return requested
    log.warning(
        "%s has %d MiB free, less than --shm-bytes (%d MiB): frames in flight are limited to %d MiB "
        "(give the container more shared memory, e.g. docker run --shm-size=2g)",
        root,
        stat.f_bavail * stat.f_frsize >> 20,
        requested >> 20,
        free >> 20,
    )
    return free


class Slot:
    __slots__ = ("shm", "capacity", "name")

    def __init__(self, shm: shared_memory.SharedMemory, capacity: int):
        self.shm = shm
        self.capacity = capacity
        self.name = shm.name

    def write_image(self, image: np.ndarray) -> None:
        np.frombuffer(self.shm.buf, np.uint8, image.size).reshape(image.shape)[...] = image

    def read_labels(self, height: int, width: int) -> np.ndarray:
        """A copy (the slot is reused at once) into a bytes object, read-only: a raw response sends
        that object as it is (`imaging.label_bytes`)."""
        return np.frombuffer(bytes(self.shm.buf[: height * width]), np.uint8).reshape(height, width)


class SlotPool:
    """Thread-safe pool of shared-memory slots, capped at `budget_bytes` in total.

    A free slot of at least the requested size (and at most twice it) is reused; otherwise a new
    one is created, unlinking idle ones if the budget requires. `on_forget(name)` is called for
    each unlinked segment so workers can drop their mappings.
    """

    def __init__(self, budget_bytes: int, on_forget=None):
        self.budget_bytes = budget_bytes
        self.on_forget = on_forget
        self._lock = threading.Lock()
        self._free: list[Slot] = []
        self._all: dict[str, Slot] = {}
        self.bytes_mapped = 0
        self.in_use = 0

    def acquire(self, nbytes: int) -> Slot:
        capacity = -(-nbytes // ALIGN) * ALIGN
        if capacity > self.budget_bytes:  # can never fit: retrying (429) would not help
            raise ServiceError(
                "too_large", f"a frame of {nbytes} bytes exceeds the frame memory of {self.budget_bytes} bytes"
            )
        forgotten = []
        with self._lock:
            for slot in sorted(self._free, key=lambda s: s.capacity):
                if capacity <= slot.capacity <= 2 * capacity:
                    self._free.remove(slot)
                    self.in_use += 1
                    return slot
            while self.bytes_mapped + capacity > self.budget_bytes and self._free:
                victim = max(self._free, key=lambda s: s.capacity)
                self._free.remove(victim)
                forgotten.append(self._destroy(victim))
            if self.bytes_mapped + capacity > self.budget_bytes:
                raise ServiceError("queue_full", "frame memory is exhausted; retry shortly", retry_after=1)
            name = f"{SLOT_PREFIX}{os.getpid()}_{next(_names)}"
            slot = Slot(shared_memory.SharedMemory(name=name, create=True, size=capacity), capacity)
            self._all[slot.name] = slot
            self.bytes_mapped += capacity
            self.in_use += 1
        for name in forgotten:
            self._notify(name)
        return slot

    def release(self, slot: Slot) -> None:
        with self._lock:
            if slot.name in self._all:
                self._free.append(slot)
                self.in_use -= 1

    def _destroy(self, slot: Slot) -> str:
        del self._all[slot.name]
        self.bytes_mapped -= slot.capacity
        slot.shm.close()
        slot.shm.unlink()
        return slot.name

    def _notify(self, name: str) -> None:
        if self.on_forget:
            self.on_forget(name)

    def close(self) -> None:
        with self._lock:
            for slot in list(self._all.values()):
                try:
                    self._destroy(slot)
                except (FileNotFoundError, BufferError):
                    pass
            self._free.clear()
            self.in_use = 0


class SlotMaps:
    """Worker side: segments mapped by name (Linux /dev/shm), without the resource tracker, whose
    bookkeeping belongs to the front end that created them."""

    def __init__(self, root: str = SHM_ROOT):
        self.root = root
        self._maps: dict[str, mmap.mmap] = {}

    def view(self, name: str, nbytes: int) -> np.ndarray:
        mm = self._maps.get(name)
        if mm is None:
            fd = os.open(os.path.join(self.root, name), os.O_RDWR)
            try:
                mm = mmap.mmap(fd, 0)
            finally:
                os.close(fd)
            self._maps[name] = mm
        return np.frombuffer(mm, np.uint8, nbytes)

    def forget(self, name: str) -> None:
        mm = self._maps.pop(name, None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a view is still alive; the mapping goes with it
                pass
