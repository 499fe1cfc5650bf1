"""Memory and time of turning one image's logits into labels (`model.transforms.logits_to_labels`):
all 19 channels at once against groups of channels, at full-size fp32 budgets of your choice.

    python tools/bench_labels.py [--size 4096x4096] [--budgets 4096,256,64] [--repeats 3] [--device cpu]

Each budget runs in a fresh process, so the peak is that of the labels step alone: on the CPU the
growth of the peak resident set over the process's size after warm-up, on CUDA
`torch.cuda.max_memory_allocated`. Logits are random, at 1/8 of the network input size (the
test-time resize of --size); every budget must give the same labels, which the table checks.
Prints a Markdown table: budget, channels per group, median ms, peak MB, and time and memory
relative to the first budget.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from model.transforms import channel_group, logits_to_labels, test_size


def measure(height: int, width: int, budget_mb: int, repeats: int, device: str) -> dict:
    """One budget, in this process: labels' checksum, median seconds and peak bytes."""
    size = test_size(height, width)
    torch.manual_seed(0)
    logits = torch.randn(1, 19, size[0] // 8, size[1] // 8, device=device)
    budget = budget_mb << 20

    def run() -> torch.Tensor:
        labels = logits_to_labels(logits, size, (height, width), chunk_bytes=budget)
        if cuda:
            torch.cuda.synchronize()
        return labels

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    checksum = int(run().sum(dtype=torch.int64))  # also the warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    top = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = top - base
    return {"checksum": checksum, "seconds": statistics.median(times), "peak": max(peak, 0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="4096x4096", help="output HxW (default 4096x4096)")
    parser.add_argument("--budgets", default="4096,256,64", help="chunk_bytes budgets in MB, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one budget, print JSON
    args = parser.parse_args(argv)
    height, width = (int(v) for v in args.size.lower().split("x"))
    if args.one is not None:
        print(json.dumps(measure(height, width, args.one, args.repeats, args.device)))
        return 0
    rows = []
    for budget in (int(b) for b in args.budgets.split(",")):
        cmd = [sys.executable, __file__, "--size", args.size, "--repeats", str(args.repeats)]
        out = subprocess.run([*cmd, "--device", args.device, "--one", str(budget)], capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            return out.returncode
        rows.append((budget, json.loads(out.stdout.splitlines()[-1])))
    first = rows[0][1]
    print(f"logits -> labels, one {height}x{width} image, 19 classes, on {args.device}\n")
    print("| budget MB | channels per group | median ms | peak MB | time vs first | peak vs first |")
    print("|---:|---:|---:|---:|---:|---:|")
    for budget, r in rows:
        group = channel_group(19, test_size(height, width), (height, width), budget << 20)
        print(
            f"| {budget} | {group} | {1000 * r['seconds']:.0f} | {r['peak'] / 2**20:.0f} "
            f"| {r['seconds'] / first['seconds']:.2f}x | {r['peak'] / max(first['peak'], 1):.2f}x |"
        )
    same = len({r["checksum"] for _, r in rows}) == 1
    print(f"\nlabels identical across budgets: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
