"""Inference runtime: the whole uint8-image -> uint8-labels path, optimised.

`SegmentationEngine` folds BatchNorm into the convolutions, runs under `torch.inference_mode`,
uses channels_last and fp16/bf16 on CUDA, and on CUDA replays one CUDA graph per
(batch bucket, H, W) that covers resize, normalisation, the network, the two logits resizes and
the argmax. Batches are padded up to the next bucket; graphs share one memory pool and are
captured (after eager warm-up on the same side stream) for warm shapes up front and lazily for
shapes seen repeatedly. On the CPU the same object runs eagerly.
"""

from __future__ import annotations

import bisect
import copy
import logging
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .transforms import TEST_SCALE, logits_to_labels, normalise, test_size
from .tta import check_mode, segment_tta

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16)
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None/'auto' -> fp16 on CUDA, fp32 on CPU. Reduced precision is refused on the CPU."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype in (None, "auto"):
        resolved = torch.float16 if device.type == "cuda" else torch.float32
    elif dtype in DTYPES:
        resolved = DTYPES[dtype]
    else:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    if device.type != "cuda" and resolved != torch.float32:
        log.warning("%s requested on %s: reduced precision is CUDA-only, using float32", resolved, device)
        resolved = torch.float32
    return resolved


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """A copy of `net` in eval mode with every conv->BN pair merged into the conv (BN -> Identity)."""
    net = copy.deepcopy(net).eval()
    for module in list(net.modules()):
        children = dict(module.named_children())
        for name, child in children.items():
            if not isinstance(child, nn.BatchNorm2d):
                continue
            conv_name = _conv_before(name, children)
            if conv_name is not None:
                setattr(module, conv_name, fuse_conv_bn_eval(children[conv_name], child))
                setattr(module, name, nn.Identity())
    return net


def _conv_before(bn_name: str, siblings: dict[str, nn.Module]) -> str | None:
    """The conv that feeds a BN: `bnK`->`convK`, `bn`->`conv`, Sequential index i -> i-1."""
    candidates = [bn_name.replace("bn", "conv", 1)] if bn_name.startswith("bn") else []
    if bn_name.isdigit():
        candidates.append(str(int(bn_name) - 1))
    for name in candidates:
        if isinstance(siblings.get(name), nn.Conv2d):
            return name
    return None


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    output: torch.Tensor  # (bucket, H, W) uint8, lives in the shared pool


class _ShapeBuffers:
    """Per (H, W): one static device input at the largest bucket (graphs use slices of it), and
    pinned host staging for the copies in and out."""

    def __init__(self, max_bucket: int, height: int, width: int, device: torch.device):
        self.input = torch.zeros((max_bucket, height, width, 3), dtype=torch.uint8, device=device)
        self.host_in = torch.empty((max_bucket, height, width, 3), dtype=torch.uint8).pin_memory()
        self.host_out = torch.empty((max_bucket, height, width), dtype=torch.uint8).pin_memory()


class SegmentationEngine:
    """uint8 (N, H, W, 3) RGB batches in, uint8 (N, H, W) train ids out, on one device."""

    def __init__(
        self,
        net: nn.Module,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        *,
        fold_bn: bool = True,
        channels_last: bool | None = None,
        cuda_graphs: bool | None = None,
        buckets: tuple[int, ...] = DEFAULT_BUCKETS,
        max_graph_shapes: int = 8,
        lazy_capture_after: int = 3,
        scale: tuple[int, int] = TEST_SCALE,
    ):
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        on_cuda = self.device.type == "cuda"
        self.channels_last = on_cuda if channels_last is None else channels_last
        self.cuda_graphs = on_cuda if cuda_graphs is None else (cuda_graphs and on_cuda)
        self.buckets = tuple(sorted(set(buckets)))
        self.max_graph_shapes = max_graph_shapes
        self.lazy_capture_after = lazy_capture_after
        self.scale = tuple(scale)  # mmseg Resize scale: long edge <= max, short edge <= min
        net = fold_batchnorm(net) if fold_bn else copy.deepcopy(net).eval()
        net = net.to(self.device, self.dtype)
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = net
        self.num_classes = int(getattr(net, "num_classes", 0))
        self.replays = 0
        self.misses = 0
        self.capture_seconds = 0.0
        self._graphs: OrderedDict[tuple[int, int], dict[int, _Graph]] = OrderedDict()
        self._buffers: dict[tuple[int, int], _ShapeBuffers] = {}
        self._shape_hits: Counter[tuple[int, int]] = Counter()
        self._pool = None
        self._stream = None
        if on_cuda:
            torch.cuda.set_device(self.device)  # graph replay and copies use the current device's stream
            torch.backends.cudnn.benchmark = True
            self._stream = torch.cuda.Stream(self.device)

    # -- the computation ---------------------------------------------------------------------
    def _pipeline(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[1:3]
        size = test_size(height, width, self.scale)
        x = normalise(images, size, self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return logits_to_labels(self.net(x), size, (height, width))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Decode-head logits for a uint8 NHWC batch (eager; for parity checks and TTA)."""
        with torch.inference_mode():
            size = test_size(*images.shape[1:3], self.scale)
            return self.net(normalise(images.to(self.device), size, self.dtype)).float()

    # -- public API --------------------------------------------------------------------------
    def segment(self, images: np.ndarray | torch.Tensor, tta: str = "none") -> np.ndarray:
        """Labels for a same-shape uint8 batch (N, H, W, 3); returns a numpy (N, H, W) uint8 array.

        `tta` is 'none', 'flip' or 'ms_flip' (model/tta.py); the augmented modes run eagerly.
        """
        if images.ndim != 4 or images.shape[3] != 3:
            raise ValueError(f"expected a uint8 batch (N, H, W, 3), got shape {tuple(images.shape)}")
        if check_mode(tta) != "none":
            return segment_tta(self, self._as_tensor(images).to(self.device), tta).cpu().numpy()
        n, height, width = images.shape[:3]
        if self.cuda_graphs and n <= self.buckets[-1]:
            key = (height, width)
            self._shape_hits[key] += 1
            if key not in self._graphs and self._shape_hits[key] >= self.lazy_capture_after:
                self.capture([key], buckets=(self.bucket_for(n),))
            bucket = self.bucket_for(n)
            if key in self._graphs and bucket in self._graphs[key]:
                self._graphs.move_to_end(key)
                return self._replay(key, bucket, images)
            self.misses += 1
        tensor = self._as_tensor(images)
        with torch.inference_mode():
            return self._pipeline(tensor.to(self.device, non_blocking=True)).cpu().numpy()

    @staticmethod
    def _as_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(images, np.ndarray) and not images.flags.writeable:
            images = images.copy()  # torch refuses to wrap read-only memory (e.g. np.asarray of a PIL image)
        return torch.as_tensor(images)

    def bucket_for(self, n: int) -> int:
        return self.buckets[min(bisect.bisect_left(self.buckets, n), len(self.buckets) - 1)]

    def warmup(self, shapes: list[tuple[int, int]], buckets: tuple[int, ...] | None = None) -> None:
        """Run (CPU) or capture (CUDA) every bucket for each shape, so first requests are fast."""
        if self.cuda_graphs:
            self.capture(shapes, buckets)
            return
        for height, width in shapes:
            for n in buckets or (1,):
                self.segment(np.zeros((n, height, width, 3), np.uint8))

    @property
    def stats(self) -> dict:
        return {
            "graph_replays": self.replays,
            "graph_misses": self.misses,
            "graphs": [{"height": h, "width": w, "buckets": sorted(graphs)} for (h, w), graphs in self._graphs.items()],
            "capture_seconds": round(self.capture_seconds, 3),
        }

    # -- CUDA graphs -------------------------------------------------------------------------
    def capture(self, shapes: list[tuple[int, int]], buckets: tuple[int, ...] | None = None) -> None:
        """Capture graphs for (bucket, H, W), largest bucket first so smaller ones reuse the pool."""
        if not self.cuda_graphs:
            return
        start = time.perf_counter()
        for key in shapes:
            key = (int(key[0]), int(key[1]))
            while key not in self._graphs and len(self._graphs) >= self.max_graph_shapes:
                self._evict_oldest()
            if key not in self._buffers:
                self._buffers[key] = _ShapeBuffers(self.buckets[-1], *key, self.device)
            graphs = self._graphs.setdefault(key, {})
            for bucket in sorted(buckets or self.buckets, reverse=True):
                if bucket not in graphs:
                    graphs[bucket] = self._capture_one(self._buffers[key].input[:bucket])
        torch.cuda.synchronize(self.device)
        self.capture_seconds += time.perf_counter() - start
        log.info("captured CUDA graphs for %s in %.1fs", shapes, time.perf_counter() - start)

    def _capture_one(self, static_in: torch.Tensor) -> _Graph:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode():
            # Warm up on the capture stream: cudnn.benchmark autotunes and allocates workspaces
            # per stream, which must not happen during capture.
            with torch.cuda.stream(stream):
                for _ in range(3):
                    self._pipeline(static_in)
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                output = self._pipeline(static_in)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph.replay()  # replay once so a broken graph fails at start-up, not on a request
        return _Graph(graph, output)

    def _replay(self, key: tuple[int, int], bucket: int, images) -> np.ndarray:
        n = images.shape[0]
        buffers = self._buffers[key]
        host_in = buffers.host_in[:n]
        host_in.copy_(torch.as_tensor(images))
        buffers.input[:n].copy_(host_in, non_blocking=True)
        entry = self._graphs[key][bucket]
        entry.graph.replay()
        out = buffers.host_out[:n]
        out.copy_(entry.output[:n], non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        self.replays += 1
        return out.numpy().copy()

    def _evict_oldest(self) -> None:
        key, _ = self._graphs.popitem(last=False)
        self._buffers.pop(key, None)
        log.info("evicted CUDA graphs for %s (cache holds %d shapes)", key, self.max_graph_shapes)
