"""Device and precision checks made once, before a model is built.

`resolve_device` turns every spelling the CLI and the Python API accept (`cpu`, `cuda`, `cuda:N`)
into a concrete `torch.device`, refusing a CUDA device that does not exist with a clear message
instead of failing later inside `torch.cuda.set_device`. `check_cpu_bf16` allows bfloat16 on the
CPU only where the CPU computes it natively (avx512_bf16 or AMX); elsewhere PyTorch emulates it and
is slower than float32.
"""

from __future__ import annotations

import torch

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def resolve_device(device: str | torch.device) -> torch.device:
    """'cpu', 'cuda' (the current CUDA device) or 'cuda:N' -> a torch.device with an index for CUDA."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from exc
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ValueError(f"unsupported device {device!r}: use cpu, cuda or cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(f"device {device!r} asked for, but no CUDA device is available here; use cpu")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if not 0 <= index < count:
        raise ValueError(f"device {device!r} asked for, but this machine has {count} CUDA device(s) (0..{count - 1})")
    return torch.device("cuda", index)


def cpu_flags(cpuinfo_path: str = "/proc/cpuinfo") -> set[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open(cpuinfo_path, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16(flags: set[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def check_cpu_bf16(flags: set[str] | None = None) -> None:
    """Refuse bfloat16 on a CPU that would emulate it (slower than float32 and no gain)."""
    if not cpu_has_native_bf16(flags):
        raise ValueError(
            "bfloat16 on the CPU needs native bf16 instructions (avx512_bf16 or AMX in the flags of "
            "/proc/cpuinfo), which this CPU lacks; use --dtype float32 (or auto)"
        )
