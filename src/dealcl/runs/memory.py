"""Peak memory of a run (efficiency.json): per stage on a CPU from the kernel's VmHWM, which
can be reset, and from CUDA's allocator statistics on a GPU."""
from __future__ import annotations

import contextlib
import resource
from pathlib import Path

import torch


def reset_peak_memory(device: torch.device) -> bool:
    """Start the peak-memory count afresh (per run: `dealcl compare` runs many in one process;
    per stage: each stage's efficiency.json entry shows its own peak). False where it cannot
    be reset (no writable /proc/self/clear_refs): the count then runs on over the process."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    # The reset starts from the current RSS, which still holds what earlier runs freed (glibc
    # keeps freed heap): collect it and hand it back first, where the C library allows.
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:  # Linux: "5" resets the peak RSS (VmHWM) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
