"""Model benchmark: `bisenet bench model` prints images/s and latency for R18 and R50.

Every row times the same work, the on-device inference path the service runs: a uint8
(N, H, W, 3) batch already on the device -> normalise -> network -> bilinear resize of the logits
-> argmax -> uint8 labels on the device (frames are at the network size, as Cityscapes frames
are, so there is no input resize). Rows, cumulative from the top:

  eager         fp32, batch 1, BN as separate layers, NCHW-contiguous input: how mmsegmentation
                measures its fps column
  fold          + BatchNorm folded into the convolutions (still NCHW)
  channels_last + NHWC memory format
  fp16, bf16    + reduced precision (CUDA; bf16 also on CPUs with native bf16, as autocast)
  graphs        + the whole path captured once as a CUDA graph and replayed (CUDA only, fp16)
  batch         + batches of --batches (graphs fp16 on CUDA; the faster fp32 layout on the CPU)
  compile       torch.compile of the plain network (fp16 channels_last on CUDA, fp32 on the CPU),
                the peer a user would try; 'reduce-overhead' mode too on CUDA. Compile time in notes
  engine        SegmentationEngine.segment as the service calls it: numpy batch in, numpy out

Random weights (speed does not depend on them). Each row runs --warmup calls, then up to --iters
calls or --max-seconds, whichever ends first (at least 2 calls). Defaults: 1024x2048 on CUDA,
256x512 on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .bisenet import build_model
from .devices import cpu_has_native_bf16, resolve_device
from .graph_policy import CaptureLimits
from .runtime import SegmentationEngine, fold_batchnorm
from .transforms import logits_to_labels, normalise

VARIANTS = ("eager", "fold", "channels_last", "fp16", "bf16", "graphs", "batch", "compile", "engine")


def short_dtype(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


@dataclass
class Row:
    model: str
    variant: str
    batch: int
    dtype: str
    images_per_s: float | None = None
    latency_ms: float | None = None
    p90_ms: float | None = None
    note: str = ""


def make_pipeline(net: nn.Module, dtype: torch.dtype, channels_last: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (N, H, W, 3) on the device -> uint8 (N, H, W) labels, as the engine computes it."""

    def run(images: torch.Tensor) -> torch.Tensor:
        size = tuple(images.shape[1:3])
        x = normalise(images, size, dtype)  # comes back with channels_last strides
        x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        return logits_to_labels(net(x), size, size)

    return run


def graphed(pipeline: Callable, images: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The pipeline captured as one CUDA graph for `images`' shape; calls copy in and replay."""
    static = images.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up (cudnn autotuning, allocations) on the capture stream
            pipeline(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = pipeline(static)

    def replay(batch: torch.Tensor) -> torch.Tensor:
        static.copy_(batch)
        graph.replay()
        return out

    return replay


def measure(fn: Callable, device: torch.device, warmup: int, iters: int, max_seconds: float) -> list[float]:
    """Seconds per call, synchronised, after `warmup` untimed calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        sync()
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < max(iters, 2) and (len(times) < 2 or time.perf_counter() - start < max_seconds):
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
    return times


def fill(row: Row, times: list[float]) -> Row:
    row.latency_ms = 1000 * statistics.median(times)
    row.p90_ms = 1000 * float(np.percentile(times, 90))
    row.images_per_s = row.batch / statistics.median(times)
    return row


class Bench:
    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args = args
        self.device = device
        self.cuda = device.type == "cuda"

    def time(self, row: Row, fn: Callable) -> Row:
        a = self.args
        try:
            return fill(row, measure(fn, self.device, a.warmup, a.iters, a.max_seconds))
        except Exception as exc:  # noqa: BLE001 - one failing variant must not end the table
            row.note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
            return row

    def model_rows(self, name: str) -> list[Row]:
        a, dev = self.args, self.device
        torch.manual_seed(0)
        plain = build_model(name, aux_heads=False).eval().to(dev)
        folded = fold_batchnorm(plain).to(dev)
        frames = torch.randint(0, 256, (max(a.batches), a.height, a.width, 3), dtype=torch.uint8, device=dev)
        one = frames[:1]
        short = name.replace("bisenetv1_", "").upper()
        rows: list[Row] = []
        want = set(a.variants)

        def add(variant, batch, dtype, fn, note=""):
            rows.append(self.time(Row(short, variant, batch, dtype, note=note), fn))
            self.print_row(rows[-1])

        def skip(variant, batch, dtype, why):
            rows.append(Row(short, variant, batch, dtype, note=f"skipped: {why}"))
            self.print_row(rows[-1])

        fp32 = torch.float32
        if "eager" in want:
            add("eager (mmseg-style)", 1, "fp32", lambda: make_pipeline(plain, fp32, False)(one))
        if "fold" in want:
            add("+ BN folding", 1, "fp32", lambda: make_pipeline(folded, fp32, False)(one))
        cl_net = folded.to(memory_format=torch.channels_last)
        if "channels_last" in want:
            add("+ channels_last", 1, "fp32", lambda: make_pipeline(cl_net, fp32, True)(one))
        half = {}
        for dtype_name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            if dtype_name not in want:
                continue
            if not self.cuda:
                if dtype_name == "bf16" and cpu_has_native_bf16():
                    add("+ bf16 (autocast)", 1, "bf16", lambda: self.cpu_bf16(cl_net)(one))
                else:
                    skip(f"+ {dtype_name}", 1, dtype_name, "CUDA only" if dtype_name == "fp16" else "no native bf16")
                continue
            half[dtype_name] = fold_batchnorm(plain).to(dev, dtype).to(memory_format=torch.channels_last)
            add(f"+ {dtype_name}", 1, dtype_name, lambda n=half[dtype_name], d=dtype: make_pipeline(n, d, True)(one))
        fp16_net = half.get("fp16") or fold_batchnorm(plain).to(dev, torch.float16).to(
            memory_format=torch.channels_last
        )
        if "graphs" in want:
            if self.cuda:
                with torch.inference_mode():
                    replay = graphed(make_pipeline(fp16_net, torch.float16, True), one)
                add("+ CUDA graphs", 1, "fp16", lambda: replay(one))
            else:
                skip("+ CUDA graphs", 1, "fp16", "CUDA only")
        if "batch" in want:
            for n in [b for b in a.batches if b > 1]:
                batch = frames[:n]
                if self.cuda:
                    with torch.inference_mode():
                        replay_n = graphed(make_pipeline(fp16_net, torch.float16, True), batch)
                    add("+ batching (graphs fp16)", n, "fp16", lambda r=replay_n, b=batch: r(b))
                    del replay_n
                else:
                    best_cl = self.faster_layout(rows)
                    net_n = cl_net if best_cl else folded
                    layout = "channels_last" if best_cl else "NCHW"
                    add(
                        f"+ batching (folded, {layout})",
                        n,
                        "fp32",
                        lambda b=batch, m=net_n, c=best_cl: make_pipeline(m, fp32, c)(b),
                    )
        if "compile" in want:
            rows += self.compile_rows(short, plain, frames)
        if "engine" in want:
            host = frames.cpu().numpy()
            sizes = tuple(sorted({1, max(a.batches)}))
            scale = (max(a.height, a.width), min(a.height, a.width))
            engine = SegmentationEngine(plain, dev, buckets=sizes, scale=scale)
            if engine.cuda_graphs:
                engine.warmup([(a.height, a.width)])
            for n in sizes:
                batch_np = np.ascontiguousarray(host[:n])
                add(
                    "engine.segment (host->host)",
                    n,
                    short_dtype(engine.dtype),
                    lambda b=batch_np, e=engine: e.segment(b),
                    note="graphs" if engine.cuda_graphs else "eager",
                )
        return rows

    @staticmethod
    def cpu_bf16(net: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """The fp32 channels_last pipeline with the network under CPU bf16 autocast (as the engine)."""
        pipeline = make_pipeline(net, torch.float32, True)

        def run(images: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return pipeline(images)

        return run

    def compile_rows(self, short: str, plain: nn.Module, frames: torch.Tensor) -> list[Row]:
        a = self.args
        rows = []
        dtype = torch.float16 if self.cuda else torch.float32
        modes = ("default", "reduce-overhead") if self.cuda else ("default",)
        base = copy.deepcopy(plain).to(dtype)  # Module.to works in place
        if self.cuda:
            base = base.to(memory_format=torch.channels_last)
        for mode in modes:
            for n in sorted({1, max(a.batches)}):
                torch._dynamo.reset()
                compiled = torch.compile(base, mode=mode, dynamic=False)
                fn = make_pipeline(compiled, dtype, self.cuda)
                batch = frames[:n]
                start = time.perf_counter()
                row = Row(short, f"torch.compile ({mode})", n, short_dtype(dtype))
                try:
                    with torch.inference_mode():
                        fn(batch)  # compiles
                        if self.cuda:
                            torch.cuda.synchronize()
                except Exception as exc:  # noqa: BLE001 - report and go on
                    row.note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
                    rows.append(row)
                    self.print_row(row)
                    continue
                row = self.time(row, lambda f=fn, b=batch: f(b))
                row.note = (row.note + f" compile {time.perf_counter() - start:.0f}s").strip()
                rows.append(row)
                self.print_row(row)
        return rows

    @staticmethod
    def faster_layout(rows: list[Row]) -> bool:
        """Whether channels_last beat NCHW at batch 1 in this run (CPU: it depends on the CPU)."""
        by = {r.variant: r.images_per_s for r in rows if r.images_per_s}
        return by.get("+ channels_last", 0) > by.get("+ BN folding", 0)

    def print_row(self, row: Row) -> None:
        if self.args.quiet:
            return
        print(format_row(row), flush=True)


def calibrated(name: str, device: torch.device) -> nn.Module:
    """Random weights with BN statistics measured on real photos and a wide classifier, so labels
    vary across an image like a trained network's (see tools/parity_mmseg.py)."""
    from skimage import data

    torch.manual_seed(0)
    net = build_model(name, aux_heads=False)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        nn.init.uniform_(m.weight, 0.5, 1.5)
        nn.init.normal_(m.bias, std=0.2)
    photos = [np.ascontiguousarray(im[::-1]) for im in (data.astronaut(), data.coffee(), data.rocket())]
    net.train()
    with torch.no_grad():
        net(torch.cat([normalise(torch.from_numpy(im)[None], (256, 512)) for im in photos]))
    nn.init.normal_(net.decode_head.conv_seg.weight, std=0.5)
    nn.init.normal_(net.decode_head.conv_seg.bias, std=0.5)
    return net.eval().to(device)


def agreement(models: list[str], device: torch.device) -> None:
    """Label agreement of each fast configuration with eager fp32 (BN unfolded) on real photos at
    the mmseg test size (astronaut 512x512 -> 1024x1024, coffee, chelsea, rocket upscaled)."""
    from skimage import data

    photos = {
        "astronaut": data.astronaut(),
        "coffee": data.coffee(),
        "chelsea": data.chelsea(),
        "rocket": data.rocket(),
    }
    configs = {"fold": {"dtype": "fp32"}, "fold+channels_last": {"dtype": "fp32", "channels_last": True}}
    if device.type == "cuda":
        configs |= {
            "fp16": {"dtype": "fp16", "cuda_graphs": False},
            "bf16": {"dtype": "bf16", "cuda_graphs": False},
            "fp16+graphs": {"dtype": "fp16", "cuda_graphs": True, "buckets": (1,)},
        }
    elif cpu_has_native_bf16():
        configs["bf16 (autocast)"] = {"dtype": "bf16"}
    print("| model | configuration | " + " | ".join(photos) + " |")
    print("|" + "---|" * (2 + len(photos)))
    for name in models:
        net = calibrated(name, device)
        ref_engine = SegmentationEngine(net, device, "fp32", fold_bn=False, cuda_graphs=False, channels_last=False)
        refs = {k: ref_engine.segment(im[None]) for k, im in photos.items()}
        for label, options in configs.items():
            engine = SegmentationEngine(net, device, capture_limits=CaptureLimits(max_lazy_shapes=0), **options)
            if engine.cuda_graphs:  # captured up front, so the labels compared are the replayed ones
                engine.warmup(sorted({im.shape[:2] for im in photos.values()}))
            cells = [f"{100 * float((engine.segment(im[None]) == refs[k]).mean()):.3f}%" for k, im in photos.items()]
            print(f"| {name.replace('bisenetv1_', '').upper()} | {label} | " + " | ".join(cells) + " |", flush=True)


HEADER = "| model | variant | batch | dtype | images/s | latency ms (median) | p90 ms | notes |"


def format_row(r: Row) -> str:
    def num(v, fmt):
        return format(v, fmt) if v is not None else "-"

    return (
        f"| {r.model} | {r.variant} | {r.batch} | {r.dtype} | {num(r.images_per_s, '.1f')} | "
        f"{num(r.latency_ms, '.1f')} | {num(r.p90_ms, '.1f')} | {r.note} |"
    )


def cpu_name() -> str:
    """The processor's model name (Linux /proc/cpuinfo), for benchmark tables."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bisenet bench model",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--models", nargs="+", default=["bisenetv1_r18", "bisenetv1_r50"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--height", type=int, help="frame height (default 1024 on CUDA, 256 on the CPU)")
    parser.add_argument("--width", type=int, help="frame width (default 2048 on CUDA, 512 on the CPU)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--warmup", type=int, help="untimed calls per row (default 10 on CUDA, 1 on the CPU)")
    parser.add_argument("--iters", type=int, help="timed calls per row at most (default 50 on CUDA, 5 on the CPU)")
    parser.add_argument("--max-seconds", type=float, default=None, help="time per row at most (default 5 / 3)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--quiet", action="store_true", help="print only the final table")
    parser.add_argument(
        "--agreement",
        action="store_true",
        help="also print label agreement of each fast configuration with eager fp32 on real photos",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        print(f"bisenet bench model: {exc}", file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    args.height = args.height or (1024 if cuda else 256)
    args.width = args.width or (2048 if cuda else 512)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    args.iters = args.iters or (50 if cuda else 5)
    args.max_seconds = args.max_seconds or (5.0 if cuda else 3.0)
    if cuda:
        torch.backends.cudnn.benchmark = True
    command = "bisenet bench model " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"# {device_name(device)}; torch {torch.__version__}; {args.height}x{args.width}; `{command.strip()}`")
    print(HEADER)
    print("|" + "---|" * 8)
    bench = Bench(args, device)
    rows = []
    start = time.perf_counter()
    for name in args.models:
        rows += bench.model_rows(name)
    if args.quiet:
        print("\n".join(format_row(r) for r in rows))
    print(f"# total {time.perf_counter() - start:.0f}s")
    if args.agreement:
        print("\n# label agreement with eager fp32 (random weights, BN calibrated on photos)")
        agreement(args.models, device)
    return 0
