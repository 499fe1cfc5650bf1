"""Telling errors a worker can survive from those that poison the CUDA context.

After an illegal address, a device-side assert, an ECC error or a lost GPU (Xid events), every
later CUDA call in the process fails: the only recovery is a new process. Out-of-memory and
shape errors are per batch. PyTorch raises both kinds as RuntimeError, so the message decides.
"""

from __future__ import annotations

# Substrings (lower case) of CUDA/cuBLAS/cuDNN messages after which the context is unusable.
_STICKY = (
    ("illegal memory access", "illegal_address"),
    ("illegal address", "illegal_address"),
    ("illegal instruction", "illegal_instruction"),
    ("misaligned address", "misaligned_address"),
    ("device-side assert", "device_assert"),
    ("unspecified launch failure", "launch_failure"),
    ("launch timed out", "launch_timeout"),
    ("uncorrectable ecc", "ecc_error"),
    ("ecc error", "ecc_error"),
    ("gpu is lost", "gpu_lost"),
    ("fallen off the bus", "gpu_lost"),
    ("xid", "xid"),
    ("cuda driver error: unknown error", "driver_error"),
    ("cublas_status_execution_failed", "execution_failed"),
    ("cudnn_status_execution_failed", "execution_failed"),
    ("cudaerrorlaunchfailure", "launch_failure"),
    ("hardware stack error", "hardware_error"),
)

RESTART_REASONS = ("device_error", "crashed")


def fatal_device_error(exc: BaseException) -> str | None:
    """A short reason when `exc` leaves the CUDA context unusable, else None (out of memory: None)."""
    text = f"{type(exc).__name__}: {exc}".lower()
    if "out of memory" in text:
        return None
    for needle, reason in _STICKY:
        if needle in text:
            return reason
    return None


def is_out_of_memory(exc: BaseException) -> bool:
    return "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"
