"""Segmenter: the simple in-process API (`Segmenter('bisenetv1_r18').predict(image)`)."""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
import torch

from .bisenet import build_model
from .checkpoint import load_state, num_classes_of, read_state_dict
from .runtime import SegmentationEngine
from .transforms import as_rgb_uint8
from .zoo import ARCHS, CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, ZOO, default_entry, resolve_arch


def resolve_weights(name: str, weights: str | os.PathLike | None) -> str | None:
    """The path/URL to load for (name, weights); None means random initialisation."""
    if weights is None:
        return default_entry(name).url
    weights = str(weights)
    if weights == "random":
        return None
    if weights in ZOO:
        if is_known(name) and ZOO[weights].arch != resolve_arch(name):
            raise ValueError(f"zoo entry {weights!r} is a {ZOO[weights].arch}, not a {resolve_arch(name)}")
        return ZOO[weights].url
    return weights


def is_known(name: str) -> bool:
    return name in ARCHS or name in ZOO


def infer_arch(state: dict) -> str:
    """R18 or R50 from a state_dict's keys (R50's Bottleneck blocks have a conv3)."""
    return "bisenetv1_r50" if "backbone.context_path.backbone.layer1.0.conv3.weight" in state else "bisenetv1_r18"


class Segmenter:
    """BiSeNetV1 inference with mmsegmentation's exact test-time pipeline.

    `name` is an architecture (`bisenetv1_r18`/`bisenetv1_r50`), a zoo entry, or any name of your
    own when `weights` is a checkpoint (the architecture is then read off its keys).
    `weights`: a zoo entry name (default: the best row for `name`), a path, an http(s) URL, or
    'random'. The class count, names and palette follow the checkpoint (its `meta` when present).
    """

    def __init__(
        self,
        name: str = "bisenetv1_r18",
        weights: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        num_classes: int | None = None,
        **engine_options,
    ):
        self.name = name
        self.weights = resolve_weights(name, weights)
        meta: dict = {}
        state_classes = None
        state: dict = {}
        if self.weights is not None:
            state, meta = read_state_dict(self.weights)
            state_classes = num_classes_of(state) if "decode_head.conv_seg.bias" in state else None
        self.arch = resolve_arch(name) if is_known(name) or not state else infer_arch(state)
        self.num_classes = num_classes or state_classes or 19
        net = build_model(self.arch, num_classes=self.num_classes, aux_heads=False)
        if self.weights is not None:
            load_state(net, state, self.weights)
        self.classes, self.palette = class_info(meta, self.num_classes)
        self.engine = SegmentationEngine(net, device, dtype, **engine_options)
        self.device = self.engine.device

    def predict(self, image, tta: str = "none") -> np.ndarray:
        """An RGB image (HxWx3 uint8 array or PIL image) -> HxW uint8 train ids.

        `tta`: 'none', 'flip' (mirror averaged) or 'ms_flip' (mmseg's multi-scale + flip).
        """
        rgb = as_rgb_uint8(image)
        return self.engine.segment(rgb[None], tta)[0]

    def predict_batch(self, images: Iterable) -> list[np.ndarray]:
        """Many images at once; same-size images run as one batch."""
        arrays = [as_rgb_uint8(im) for im in images]
        results: list[np.ndarray | None] = [None] * len(arrays)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, arr in enumerate(arrays):
            by_shape.setdefault(arr.shape[:2], []).append(i)
        for indices in by_shape.values():
            labels = self.engine.segment(np.stack([arrays[i] for i in indices]))
            for i, lab in zip(indices, labels):
                results[i] = lab
        return results  # type: ignore[return-value]


def class_info(meta: dict, num_classes: int) -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]]:
    """Class names and palette from a checkpoint's meta, else Cityscapes (19) or generated ones."""
    classes, palette = meta.get("CLASSES"), meta.get("PALETTE")
    if classes is not None and len(classes) == num_classes:
        classes = tuple(str(c) for c in classes)
    elif num_classes == len(CITYSCAPES_CLASSES):
        classes = CITYSCAPES_CLASSES
    else:
        classes = tuple(f"class_{i}" for i in range(num_classes))
    if palette is not None and len(palette) == num_classes:
        palette = tuple(tuple(int(v) for v in c) for c in palette)
    elif num_classes == len(CITYSCAPES_PALETTE):
        palette = CITYSCAPES_PALETTE
    else:
        rng = np.random.default_rng(0)
        palette = tuple(tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(num_classes))
    return classes, palette
