"""Triton's system shared-memory extension: a client on the same machine registers a POSIX
shared-memory object (`/dev/shm/KEY`, what `shm_open(KEY)` creates) under a name; its infer
requests then name the region, an offset and a size instead of carrying the tensor's bytes, and
may ask for outputs to be written into a region too. A 1024x2048 RGB frame is 6 MB that then
crosses no socket and no JSON or protobuf parser.

The regions live in the front end, which reads inputs out of them and writes outputs into them in
its event loop, so a region is never unmapped while a request uses it. Only objects directly in
/dev/shm can be registered (no paths), never the service's own frame slots, at most MAX_REGIONS
at a time, and the calls need the API key like inference does.
"""

from __future__ import annotations

import mmap
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ServiceError
from ..worker.shm import SHM_ROOT, SLOT_PREFIX

MAX_REGIONS = 64
KEY = re.compile(r"/?([A-Za-z0-9_.-]{1,255})")
# The tensor parameters that point into a region, on inputs and on requested outputs.
REGION, BYTE_SIZE, OFFSET = "shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"


@dataclass
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    mapping: mmap.mmap

    def status(self) -> dict:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ServiceError("bad_request", f"{what} must be a non-negative integer, not {value!r}")
    return value


@dataclass(frozen=True)
class Place:
    """Where in which region a tensor's bytes are: what an input or output's parameters say."""

    region: str
    offset: int
    byte_size: int


def place_of(parameters: dict, what: str) -> Place | None:
    """The region place a tensor's parameters name, checked; None when they name no region."""
    if REGION not in parameters:
        for key in (BYTE_SIZE, OFFSET):
            if key in parameters:
                raise ServiceError("bad_request", f"{what}: {key} needs {REGION}")
        return None
    region = parameters[REGION]
    if not isinstance(region, str) or not region:
        raise ServiceError("bad_request", f"{what}: {REGION} must be a region name")
    if BYTE_SIZE not in parameters:
        raise ServiceError("bad_request", f"{what}: {REGION} needs {BYTE_SIZE}")
    return Place(
        region,
        _count(parameters.get(OFFSET, 0), f"{what}: {OFFSET}"),
        _count(parameters[BYTE_SIZE], f"{what}: {BYTE_SIZE}"),
    )


def regions_of(service) -> SharedMemoryRegions:
    """The service's regions; a front end without them (the Ray ingress, which may run on another
    machine than its clients) refuses."""
    regions = getattr(service, "shared_memory", None)
    if regions is None:
        raise ServiceError("bad_request", "system shared memory is served by the single-host service only")
    return regions


def output_regions(service, places: dict[str, Place]) -> SharedMemoryRegions | None:
    """The regions that outputs will be written into, every place checked before any compute;
    None when no output goes to shared memory."""
    if not places:
        return None
    regions = regions_of(service)
    for place in places.values():
        regions.check(place)
    return regions


def written(place: Place, size: int) -> dict:
    """An output's parameters once written into a region: where, and how many bytes."""
    return {REGION: place.region, BYTE_SIZE: size, **({OFFSET: place.offset} if place.offset else {})}


class SharedMemoryRegions:
    def __init__(self, limit: int = MAX_REGIONS, folder: str = SHM_ROOT):
        self.limit = limit
        self.folder = folder
        self.regions: dict[str, Region] = {}

    def register(self, name: str, key: str, offset: Any, byte_size: Any) -> None:
        if not isinstance(name, str) or not name:
            raise ServiceError("bad_request", "a shared memory region needs a name")
        if name in self.regions:
            raise ServiceError(
                "bad_request", f"shared memory region {name!r} is already registered; unregister it first"
            )
        if len(self.regions) >= self.limit:
            raise ServiceError(
                "bad_request", f"{self.limit} shared memory regions are registered; unregister one first"
            )
        match = KEY.fullmatch(key) if isinstance(key, str) else None
        if match is None or match.group(1) in (".", ".."):
            raise ServiceError(
                "bad_request", f"shared memory key {key!r} must name an object in {self.folder}, no path"
            )
        if match.group(1).startswith(SLOT_PREFIX):  # the service's own frame slots hold other clients' images
            raise ServiceError("bad_request", f"shared memory key {key!r} is reserved for the service's frame slots")
        offset, byte_size = _count(offset, "offset"), _count(byte_size, "byte_size")
        if byte_size == 0:
            raise ServiceError("bad_request", "byte_size must be at least 1")
        try:
            fd = os.open(os.path.join(self.folder, match.group(1)), os.O_RDWR)
        except OSError as exc:
            raise ServiceError("bad_request", f"cannot open shared memory {key!r}: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if offset + byte_size > size:
                raise ServiceError(
                    "bad_request",
                    f"shared memory {key!r} has {size} bytes; offset {offset} + byte_size {byte_size} is beyond",
                )
            mapping = mmap.mmap(fd, offset + byte_size)
        finally:
            os.close(fd)
        self.regions[name] = Region(name, key, offset, byte_size, mapping)

    def unregister(self, name: str = "") -> None:
        """One region, or every region for an empty name; a name not registered is no error."""
        for each in [name] if name else list(self.regions):
            region = self.regions.pop(each, None)
            if region is not None:
                region.mapping.close()

    def status(self, name: str = "") -> list[dict]:
        if not name:
            return [region.status() for region in self.regions.values()]
        return [self._region(name, "not_found").status()]

    def read(self, place: Place) -> bytes:
        region = self._span(place)
        start = region.offset + place.offset
        return region.mapping[start : start + place.byte_size]

    def write(self, place: Place, array: np.ndarray, what: str) -> dict:
        """Write an output's bytes at its place; returns the output's parameters saying so."""
        region = self._span(place)
        data = memoryview(np.ascontiguousarray(array)).cast("B")
        if len(data) > place.byte_size:
            raise ServiceError("bad_request", f"{what} needs {len(data)} bytes; its {BYTE_SIZE} is {place.byte_size}")
        start = region.offset + place.offset
        region.mapping[start : start + len(data)] = data
        return written(place, len(data))

    def check(self, place: Place) -> None:
        """Refuse, before any compute, an output place that names no region or goes beyond one."""
        self._span(place)

    def close(self) -> None:
        self.unregister()

    def _region(self, name: str, code: str = "bad_request") -> Region:
        region = self.regions.get(name)
        if region is None:
            raise ServiceError(code, f"no shared memory region named {name!r} is registered")
        return region

    def _span(self, place: Place) -> Region:
        region = self._region(place.region)
        if place.offset + place.byte_size > region.byte_size:
            raise ServiceError(
                "bad_request",
                f"offset {place.offset} + {place.byte_size} bytes is beyond region {place.region!r} "
                f"({region.byte_size} bytes)",
            )
        return region
