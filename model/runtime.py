"""Inference runtime: the whole uint8-image -> uint8-labels path, optimised.

`SegmentationEngine` folds BatchNorm into the convolutions, runs under `torch.inference_mode`,
uses channels_last and fp16/bf16 on CUDA (bf16 autocast on CPUs with native bf16), and on CUDA
replays one CUDA graph per (batch bucket, H, W, tta) that covers resize, normalisation, the network,
the two logits resizes and the argmax (for `flip`: both passes and the softmax average too; `ms_flip`
runs eagerly, see GRAPH_TTA). Batches are padded up to the next bucket. Which shapes get
graphs, and when, is decided by `graph_policy.CapturePolicy`; host<->device copies go through
`pipeline.HostDevicePipeline`. Everything per device (graph pool, static inputs, streams, the
pipeline) lives in one `DeviceResources` shared by every model of the process: batches never
overlap, so they need one copy only. On the CPU the same object runs eagerly through the same
pipeline code.

Logits are turned into labels one image at a time, and for images above 256 MB of full-size fp32
logits (19 x H x W x 4 bytes: 160 MB at 1024x2048, 1.3 GB at 4096x4096) a group of channels at a
time, never a whole batch's (`transforms.logits_to_labels`).
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import functools
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .device_errors import fatal_device_error
from .devices import check_cpu_bf16, resolve_device
from .graph_policy import CaptureLimits, CapturePolicy
from .pipeline import HostDevicePipeline
from .transforms import TEST_SCALE, logits_to_labels, normalise, test_size
from .tta import check_mode, segment_tta

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16)
# TTA modes that get graphs. ms_flip does not: six network input sizes and a full-size fp32
# probability sum per image would hold gigabytes of graph pool per shape at 1024x2048, for 12
# compute-bound passes whose kernel launches graphs would barely shorten.
GRAPH_TTA = ("none", "flip")
GraphKey = tuple[int, int, str]  # (H, W, tta)
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None/'auto' -> fp16 on CUDA, fp32 on CPU. On the CPU float16 falls back to float32 (with a
    warning) and bfloat16 is allowed only where the CPU computes it natively (else ValueError)."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype in (None, "auto"):
        resolved = torch.float16 if device.type == "cuda" else torch.float32
    elif dtype in DTYPES:
        resolved = DTYPES[dtype]
    else:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    if device.type != "cuda" and resolved == torch.bfloat16:
        check_cpu_bf16()
    elif device.type != "cuda" and resolved != torch.float32:
        log.warning("%s requested on %s: float16 is CUDA-only, using float32", resolved, device)
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
    input: torch.Tensor  # (bucket, H, W, 3) uint8: the rows of the device's static input it reads
    output: torch.Tensor  # (bucket, H, W) uint8, lives in the shared pool
    nbytes: int  # pool growth when it was captured (later, smaller buckets reuse the largest's memory)


@dataclass
class DeviceResources:
    """Per device, shared by every engine (model) of the process: batches never overlap."""

    device: torch.device
    pipeline: HostDevicePipeline
    stream: "torch.cuda.Stream | None" = None  # compute, warm-up and capture all on this one
    pool: object = None
    inputs: dict[tuple[int, int, int], torch.Tensor] = field(default_factory=dict)  # static graph inputs
    # (engine id, tta) of the graphs reading each input
    users: dict[tuple[int, int, int], set[tuple[int, str]]] = field(default_factory=dict)

    def static_input(self, shape: tuple[int, int], max_bucket: int, user: tuple[int, str]) -> torch.Tensor:
        """The (max_bucket, H, W, 3) input graphs of this shape read (whatever their tta); never
        replaced while used, since captured graphs keep reading its address (engines with other
        buckets get their own)."""
        key = (*shape, max_bucket)
        buf = self.inputs.get(key)
        if buf is None:
            buf = torch.zeros((max_bucket, *shape, 3), dtype=torch.uint8, device=self.device)
            self.inputs[key] = buf
        self.users.setdefault(key, set()).add(user)
        return buf

    def release_input(self, shape: tuple[int, int], max_bucket: int, user: tuple[int, str]) -> None:
        """`user` dropped its graphs of `shape`: free the input once no graphs read it."""
        key = (*shape, max_bucket)
        users = self.users.get(key, set())
        users.discard(user)
        if not users:
            self.users.pop(key, None)
            self.inputs.pop(key, None)

    def release_user(self, engine: int) -> None:
        """An engine is gone: release every input its graphs used."""
        for key, users in list(self.users.items()):
            for user in [u for u in users if u[0] == engine]:
                self.release_input(key[:2], key[2], user)


_RESOURCES: dict[torch.device, DeviceResources] = {}


def device_resources(device: torch.device) -> DeviceResources:
    res = _RESOURCES.get(device)
    if res is None:
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        res = DeviceResources(device, HostDevicePipeline(device, stream), stream)
        _RESOURCES[device] = res
    return res


class SegmentationEngine:
    """uint8 (N, H, W, 3) RGB batches in, uint8 (N, H, W) train ids out, on one device.

    `capture_inline=True` (the Python API) captures queued shapes right after the batch that
    queued them; the service passes False and calls `capture_pending()` when its queue is empty.
    """

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
        capture_limits: CaptureLimits | None = None,
        capture_inline: bool = True,
        scale: tuple[int, int] = TEST_SCALE,
    ):
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        on_cuda = self.device.type == "cuda"
        # bf16 on the CPU: fp32 weights under autocast (convs in bf16, the rest fp32).
        self.cpu_autocast = not on_cuda and self.dtype == torch.bfloat16
        self.channels_last = (on_cuda or self.cpu_autocast) if channels_last is None else channels_last
        self.cuda_graphs = on_cuda if cuda_graphs is None else (cuda_graphs and on_cuda)
        self.buckets = tuple(sorted(set(buckets)))
        self.policy = CapturePolicy(capture_limits)
        self.capture_inline = capture_inline
        self.scale = tuple(scale)  # mmseg Resize scale: long edge <= max, short edge <= min
        net = fold_batchnorm(net) if fold_bn else copy.deepcopy(net).eval()
        net = net.to(self.device, torch.float32 if self.cpu_autocast else self.dtype)
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = net
        self.num_classes = int(getattr(net, "num_classes", 0))
        self.replays = 0
        self.misses = 0
        self.capture_seconds = 0.0
        self.capture_failures = 0
        self._graphs: dict[GraphKey, dict[int, _Graph]] = {}
        if on_cuda:
            torch.cuda.set_device(self.device)  # graph replay and copies use the current device's stream
            torch.backends.cudnn.benchmark = True
        self.resources = device_resources(self.device)
        weakref.finalize(self, self.resources.release_user, id(self))

    # -- the computation ---------------------------------------------------------------------
    def network_input(self, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> the network's normalised input at `size`, in its dtype and layout
        (fp32 under CPU bf16 autocast: the weights stay fp32 and autocast casts for the convs)."""
        x = normalise(images, size, torch.float32 if self.cpu_autocast else self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def network(self, x: torch.Tensor) -> torch.Tensor:
        """Decode-head logits of a `network_input` batch (under bf16 autocast on CPUs that have it)."""
        with torch.autocast("cpu", dtype=torch.bfloat16) if self.cpu_autocast else contextlib.nullcontext():
            return self.net(x)

    def _pipeline(self, images: torch.Tensor, tta: str = "none") -> torch.Tensor:
        if tta != "none":
            return segment_tta(self, images, tta)
        height, width = images.shape[1:3]
        size = test_size(height, width, self.scale)
        return logits_to_labels(self.network(self.network_input(images, size)), size, (height, width))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Decode-head logits for a uint8 NHWC batch (eager; for parity checks)."""
        with torch.inference_mode():
            size = test_size(*images.shape[1:3], self.scale)
            return self.network(self.network_input(images.to(self.device), size)).float()

    def run_device(self, images: torch.Tensor, tta: str = "none") -> torch.Tensor:
        """uint8 (N, H, W, 3) on the device -> uint8 (N, H, W) labels on the device.

        Replays a graph when (shape, tta) has them; otherwise runs eagerly (counted as a miss while
        graphs are on, unless the tta mode never gets graphs) and lets the policy queue the key for
        a later capture.
        """
        n, height, width = images.shape[:3]
        key = (int(height), int(width), tta)
        if self.cuda_graphs and tta in GRAPH_TTA:
            if self.policy.route(key) and n <= self.buckets[-1] and key in self._graphs:
                entry = self._graphs[key][self.bucket_for(n)]
                entry.input[:n].copy_(images)
                entry.graph.replay()
                self.replays += 1
                return entry.output[:n]
            self.misses += 1
        with torch.inference_mode():
            return self._pipeline(images, tta)

    # -- public API --------------------------------------------------------------------------
    def segment(self, images: np.ndarray | torch.Tensor, tta: str = "none") -> np.ndarray:
        """Labels for a same-shape uint8 batch (N, H, W, 3); returns a numpy (N, H, W) uint8 array.

        `tta` is 'none', 'flip' or 'ms_flip' (model/tta.py); 'ms_flip' runs eagerly.
        """
        if images.ndim != 4 or images.shape[3] != 3:
            raise ValueError(f"expected a uint8 batch (N, H, W, 3), got shape {tuple(images.shape)}")
        tta = check_mode(tta)
        if isinstance(images, torch.Tensor):
            images = images.cpu().numpy()
        labels = np.empty(images.shape[:3], np.uint8)
        self.submit(list(images), list(labels), tta).wait()
        if self.capture_inline:
            self.capture_pending()
        return labels

    def submit(self, inputs: list[np.ndarray], outputs: list[np.ndarray], tta: str = "none"):
        """Start one batch (per-image host arrays in and out); returns a handle to `wait()` on."""
        return self.resources.pipeline.submit(functools.partial(self.run_device, tta=tta), inputs, outputs)

    def bucket_for(self, n: int) -> int:
        return self.buckets[min(bisect.bisect_left(self.buckets, n), len(self.buckets) - 1)]

    def warmup(self, shapes: list[tuple[int, int]], buckets: tuple[int, ...] | None = None) -> None:
        """Capture (CUDA) or run (CPU) every bucket for each shape, so first requests are fast.
        Warm graphs are for `tta=none`; `flip` graphs of a shape are captured once it is used."""
        if self.cuda_graphs:
            for shape in shapes:
                self.capture_shape((int(shape[0]), int(shape[1]), "none"), warm=True)
            return
        for height, width in shapes:
            for n in buckets or (1,):
                self.segment(np.zeros((n, height, width, 3), np.uint8))

    @property
    def stats(self) -> dict:
        return {
            "graph_replays": self.replays,
            "graph_misses": self.misses,
            "graphs": [
                {
                    "height": h,
                    "width": w,
                    "tta": tta,
                    "warm": (h, w, tta) in self.policy.warm,
                    "buckets": sorted(graphs),
                    "bytes": {str(b): g.nbytes for b, g in sorted(graphs.items())},
                }
                for (h, w, tta), graphs in self._graphs.items()
                if self.policy.is_captured((h, w, tta))
            ],
            "capture_seconds": round(self.capture_seconds, 3),
            "capture_failures": self.capture_failures,
        }

    # -- CUDA graphs -------------------------------------------------------------------------
    def capture_pending(self, should_stop: Callable[[], bool] | None = None) -> bool:
        """Capture the next queued (shape, tta) (between batches); True when one was captured."""
        shape = self.policy.next_queued() if self.cuda_graphs else None
        return shape is not None and self.capture_shape(shape, warm=False, should_stop=should_stop)

    def capture_shape(self, key: GraphKey, warm: bool, should_stop: Callable[[], bool] | None = None) -> bool:
        """Capture every bucket of `key` (H, W, tta), largest first so smaller ones reuse the pool.

        `should_stop` is asked between buckets (the worker: "has a request arrived?"); what was
        captured is kept and the rest follows at the next idle moment. A failed capture (out of
        memory...) leaves the shape eager for good, with a log line; errors that poison the CUDA
        context are re-raised for the worker to exit on.
        """
        if not self.cuda_graphs:
            return False
        start = time.perf_counter()
        graphs = self._graphs.setdefault(key, {})
        static = self.resources.static_input(key[:2], self.buckets[-1], self._input_user(key))
        try:
            for bucket in sorted(self.buckets, reverse=True):
                if bucket in graphs:
                    continue
                if should_stop is not None and should_stop():
                    return False
                graphs[bucket] = self._capture_one(static[:bucket], key[2])
        except Exception as exc:
            if fatal_device_error(exc):
                raise
            self._drop_graphs(key)
            self.policy.capture_failed(key, f"{type(exc).__name__}: {exc}")
            self.capture_failures += 1
            log.warning("CUDA graph capture for %dx%d tta=%s failed, that runs eagerly: %s", *key, exc)
            return False
        finally:
            self.capture_seconds += time.perf_counter() - start
        for evicted in self.policy.captured(key, warm=warm):
            self._drop_graphs(evicted)
            log.info("evicted the CUDA graphs of %dx%d tta=%s (lazy shapes are bounded)", *evicted)
        log.info("captured CUDA graphs for %dx%d tta=%s %s in %.1fs", *key, self.buckets, time.perf_counter() - start)
        return True

    def _drop_graphs(self, key: GraphKey) -> None:
        self._graphs.pop(key, None)
        self.resources.release_input(key[:2], self.buckets[-1], self._input_user(key))

    def _input_user(self, key: GraphKey) -> tuple[int, str]:
        """Who reads a shape's static input: this engine's graphs of one tta mode."""
        return id(self), key[2]

    def _capture_one(self, static_in: torch.Tensor, tta: str = "none") -> _Graph:
        if self.resources.pool is None:
            self.resources.pool = torch.cuda.graph_pool_handle()
        stream = self.resources.stream
        reserved = torch.cuda.memory_reserved(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode():
            # Warm up on the capture stream: cudnn.benchmark autotunes and allocates workspaces
            # per stream, which must not happen during capture.
            with torch.cuda.stream(stream):
                for _ in range(3):
                    self._pipeline(static_in, tta)
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.resources.pool, stream=stream):
                output = self._pipeline(static_in, tta)
        with torch.cuda.stream(stream):
            graph.replay()  # replay once so a broken graph fails at capture, not on a request
        stream.synchronize()
        return _Graph(graph, static_in, output, max(0, torch.cuda.memory_reserved(self.device) - reserved))
