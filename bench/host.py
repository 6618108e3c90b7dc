"""The machine a figure was measured on: CPU model, its vector capability, threads, and (on
request) its measured fp32 and bf16 matmul rates. Every bench prints `host_line()` first."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from dealcl.train.hardware import cpu_capability  # noqa: E402


def matmul_gflops(dtype: torch.dtype, size: int = 2048, seconds: float = 1.0) -> float:
    """Sustained GFLOP/s of a size² matmul in `dtype` on this machine's threads."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b  # warm up
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        runs += 1
    return 2 * size**3 * runs / (time.perf_counter() - started) / 1e9


def host_line(rates: bool = False) -> str:
    model, capability = cpu_capability()
    line = f"host: {model}, {capability}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if rates:
        line += f", matmul fp32 {matmul_gflops(torch.float32):.0f} GFLOP/s, bf16 {matmul_gflops(torch.bfloat16):.0f} GFLOP/s"
    return line


if __name__ == "__main__":
    print(host_line(rates=True))
