"""The KServe v2 tensors of the segmentation model, shared by the v2 REST and gRPC doors.

Inputs (batch dimension first; send one of the two):
- `IMAGE` BYTES [N, 1]: one encoded JPEG/PNG/WebP/BMP/TIFF per batch item; items may differ in size.
- `RGB` UINT8 [N, H, W, 3]: decoded pixels.
Outputs:
- `LABELS` UINT8 [N, H, W]: Cityscapes train ids at the input's size. When IMAGE items differ in
  size, smaller ones are padded with 255 (the ignore index) and the output's `shapes` parameter
  lists each item's "HxW".
- `CLASS_PIXELS` INT64 [N, num_classes]: pixels per class (padding not counted).

Both doors turn their wire format into `InputTensor`s (raw bytes or decoded JSON / proto values)
and get back `OutputTensor`s holding numpy arrays; how those are written (JSON list, binary
section, raw_output_contents) is the door's business. Every problem is a ServiceError with the
API's usual codes: tensor structure `bad_request`, sizes `too_large`, undecodable images
`invalid_image` (at decode time, in the request path).
"""

from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import Settings
from ..errors import ServiceError

IMAGE, RGB = "IMAGE", "RGB"
LABELS, CLASS_PIXELS = "LABELS", "CLASS_PIXELS"
IGNORE_INDEX = 255  # fills the padding of LABELS when a batch's items differ in size
# name -> (datatype, shape without the batch dimension); -1 is any size
INPUT_SPECS = {IMAGE: ("BYTES", [1]), RGB: ("UINT8", [-1, -1, 3])}
OUTPUT_DATATYPES = {LABELS: "UINT8", CLASS_PIXELS: "INT64"}
CONFIG_TYPES = {"BYTES": "TYPE_STRING", "UINT8": "TYPE_UINT8", "INT64": "TYPE_INT64"}
LENGTH_PREFIX = struct.Struct("<I")  # BYTES elements on the wire: 4-byte little-endian length, then data


@dataclass
class InputTensor:
    name: str
    datatype: str
    shape: list[int]
    raw: bytes | None = None  # binary data (HTTP binary extension, gRPC raw_input_contents)
    values: Any = None  # JSON `data` or gRPC typed contents
    parameters: dict = field(default_factory=dict)


@dataclass
class OutputTensor:
    name: str
    array: np.ndarray
    parameters: dict = field(default_factory=dict)

    @property
    def datatype(self) -> str:
        return OUTPUT_DATATYPES[self.name]

    @property
    def shape(self) -> list[int]:
        return list(self.array.shape)


def output_shapes(num_classes: int) -> dict[str, list[int]]:
    """Output shapes without the batch dimension."""
    return {LABELS: [-1, -1], CLASS_PIXELS: [num_classes]}


def model_metadata(model: str, num_classes: int) -> dict:
    """The v2 model metadata (shapes with the batch dimension, -1)."""
    return {
        "name": model,
        "versions": ["1"],
        "platform": "pytorch",
        "inputs": [{"name": n, "datatype": d, "shape": [-1, *s]} for n, (d, s) in INPUT_SPECS.items()],
        "outputs": [
            {"name": n, "datatype": OUTPUT_DATATYPES[n], "shape": [-1, *s]}
            for n, s in output_shapes(num_classes).items()
        ],
    }


def model_config(model: str, num_classes: int, settings: Settings) -> dict:
    """Triton's model-configuration extension: what perf_analyzer and tritonclient read first."""
    return {
        "name": model,
        "platform": "pytorch",
        "backend": "bisenet-serve",
        "max_batch_size": settings.max_batch,
        "input": [
            {"name": n, "data_type": CONFIG_TYPES[d], "dims": s, "optional": True} for n, (d, s) in INPUT_SPECS.items()
        ],
        "output": [
            {"name": n, "data_type": CONFIG_TYPES[OUTPUT_DATATYPES[n]], "dims": s}
            for n, s in output_shapes(num_classes).items()
        ],
        "dynamic_batching": {
            "preferred_batch_size": list(settings.batch_buckets),
            "max_queue_delay_microseconds": int(settings.max_delay_ms * 1000),
            "preserve_ordering": True,
        },
    }


# -- inputs ------------------------------------------------------------------------------------------
def batch_items(inputs: list[InputTensor], settings: Settings) -> list[dict]:
    """The request's batch as keyword arguments for SegmentationService.segment, one per item
    (`data=` encoded bytes or `rgb=` an HxWx3 array). Raises ServiceError."""
    if not inputs:
        raise ServiceError("bad_request", "the request has no input: send IMAGE (BYTES [N,1]) or RGB (UINT8 [N,H,W,3])")
    names = [t.name for t in inputs]
    for name in names:
        if name not in INPUT_SPECS:
            raise ServiceError("bad_request", f"unknown input {name!r}; the inputs are IMAGE and RGB")
    if len(inputs) > 1:
        raise ServiceError("bad_request", f"send one input, IMAGE or RGB, not {', '.join(names)}")
    tensor = inputs[0]
    datatype, dims = INPUT_SPECS[tensor.name]
    if tensor.datatype != datatype:
        raise ServiceError("bad_request", f"input {tensor.name} must be {datatype}, not {tensor.datatype}")
    shape = list(tensor.shape)
    if len(shape) != len(dims) + 1:
        raise ServiceError(
            "bad_request",
            f"input {tensor.name} has shape {shape}; it must have rank {len(dims) + 1}: "
            f"[{', '.join(['N'] + ['H', 'W', '3'] if tensor.name == RGB else ['N', '1'])}]",
        )
    if any(d < 1 for d in shape) or any(want > 0 and d != want for d, want in zip(shape[1:], dims)):
        raise ServiceError("bad_request", f"input {tensor.name} has shape {shape}, which does not fit {['N', *dims]}")
    batch = shape[0]
    if batch > settings.max_batch:
        raise ServiceError("bad_request", f"batch of {batch} is over max_batch_size {settings.max_batch}")
    if tensor.name == IMAGE:
        return [{"data": item} for item in image_items(tensor, batch, settings)]
    return [{"rgb": frame} for frame in rgb_items(tensor, shape, settings)]


def image_items(tensor: InputTensor, batch: int, settings: Settings) -> list[bytes]:
    if tensor.raw is not None:
        items = split_bytes_elements(tensor.raw)
    elif tensor.values is not None:
        items = bytes_values(tensor.values)
    else:
        raise ServiceError("bad_request", "input IMAGE carries no data")
    if len(items) != batch:
        raise ServiceError("bad_request", f"input IMAGE has shape [{batch}, 1] but carries {len(items)} elements")
    for i, item in enumerate(items):
        if len(item) > settings.max_image_bytes:
            raise ServiceError(
                "too_large", f"IMAGE item {i} has {len(item)} bytes; the limit is {settings.max_image_bytes} bytes"
            )
    return items


def split_bytes_elements(raw: bytes) -> list[bytes]:
    """Triton's serialised BYTES tensor: per element, a 4-byte little-endian length, then the bytes."""
    items, offset, view = [], 0, memoryview(raw)
    while offset < len(raw):
        if offset + LENGTH_PREFIX.size > len(raw):
            raise ServiceError("bad_request", "BYTES tensor data ends inside an element's 4-byte length")
        (length,) = LENGTH_PREFIX.unpack_from(raw, offset)
        offset += LENGTH_PREFIX.size
        if offset + length > len(raw):
            raise ServiceError(
                "bad_request", f"BYTES element {len(items)} claims {length} bytes; only {len(raw) - offset} are left"
            )
        items.append(bytes(view[offset : offset + length]))
        offset += length
    return items


def bytes_values(values) -> list[bytes]:
    """IMAGE elements from JSON (base64 strings: JSON has no bytes) or gRPC bytes_contents."""
    flat = values
    while isinstance(flat, list) and flat and isinstance(flat[0], list):  # nested [[b64], [b64]]
        flat = [v for row in flat for v in (row if isinstance(row, list) else [row])]
    if not isinstance(flat, list):
        raise ServiceError("bad_request", "input IMAGE data must be a list")
    items = []
    for value in flat:
        if isinstance(value, bytes):
            items.append(value)
        elif isinstance(value, str):
            try:
                items.append(base64.b64decode(value, validate=True))
            except (binascii.Error, ValueError):
                raise ServiceError(
                    "bad_request", "IMAGE data in JSON must be base64 strings (or send it as binary data)"
                ) from None
        else:
            raise ServiceError("bad_request", f"IMAGE elements must be base64 strings, not {type(value).__name__}")
    return items


def rgb_items(tensor: InputTensor, shape: list[int], settings: Settings) -> list[np.ndarray]:
    batch, h, w, _ = shape
    if h * w > settings.max_pixels:
        raise ServiceError("too_large", f"RGB frames of {h}x{w} = {h * w} pixels; the limit is {settings.max_pixels}")
    need = batch * h * w * 3
    if tensor.raw is not None:
        if len(tensor.raw) != need:
            raise ServiceError(
                "bad_request", f"input RGB of shape {shape} needs {need} bytes; it carries {len(tensor.raw)}"
            )
        pixels = np.frombuffer(tensor.raw, np.uint8)
    elif tensor.values is not None:
        pixels = uint8_values(tensor.values, need, shape)
    else:
        raise ServiceError("bad_request", "input RGB carries no data")
    frames = pixels.reshape(batch, h, w, 3)
    return [frames[i] for i in range(batch)]


def uint8_values(values, need: int, shape: list[int]) -> np.ndarray:
    if isinstance(values, bytes):  # gRPC sends UINT8 contents as raw bytes only; kept for symmetry
        array = np.frombuffer(values, np.uint8)
    else:
        try:
            array = np.asarray(values, dtype=np.int64).ravel()
        except (ValueError, TypeError, OverflowError):
            raise ServiceError("bad_request", "input RGB data must be a flat or nested list of integers") from None
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ServiceError("bad_request", "input RGB values must be 0..255")
        array = array.astype(np.uint8)
    if array.size != need:
        raise ServiceError("bad_request", f"input RGB of shape {shape} needs {need} values; it carries {array.size}")
    return array


def requested_outputs(names: list[str]) -> list[str]:
    """The outputs to send, in request order; all of them when none are named."""
    for name in names:
        if name not in OUTPUT_DATATYPES:
            raise ServiceError("bad_request", f"unknown output {name!r}; the outputs are LABELS and CLASS_PIXELS")
    return list(dict.fromkeys(names)) or list(OUTPUT_DATATYPES)


# -- outputs -----------------------------------------------------------------------------------------
def output_tensors(labels: list[np.ndarray], num_classes: int, names: list[str]) -> list[OutputTensor]:
    """LABELS and/or CLASS_PIXELS for a batch of label maps (runs in the codec pool)."""
    outputs = []
    for name in names:
        if name == LABELS:
            outputs.append(stack_labels(labels))
        else:
            counts = np.stack([np.bincount(lab.ravel(), minlength=num_classes)[:num_classes] for lab in labels])
            outputs.append(OutputTensor(CLASS_PIXELS, counts.astype(np.int64)))
    return outputs


def stack_labels(labels: list[np.ndarray]) -> OutputTensor:
    sizes = {lab.shape for lab in labels}
    if len(sizes) == 1:
        return OutputTensor(LABELS, np.stack(labels))
    h = max(lab.shape[0] for lab in labels)
    w = max(lab.shape[1] for lab in labels)
    out = np.full((len(labels), h, w), IGNORE_INDEX, np.uint8)
    for i, lab in enumerate(labels):
        out[i, : lab.shape[0], : lab.shape[1]] = lab
    shapes = ",".join(f"{lab.shape[0]}x{lab.shape[1]}" for lab in labels)
    return OutputTensor(LABELS, out, {"shapes": shapes})
