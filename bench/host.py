"""The machine a figure was measured on: CPU model, its vector capability, threads, and (on
request) its measured fp32 and bf16 matmul rates. Every bench prints `host_line()` first."""
from __future__ import annotations

import platform
import time
from pathlib import Path

import torch


def cpu_capability() -> tuple[str, str]:
    """(CPU model name, best of AMX / AVX512_BF16 / AVX512 / AVX2 / none)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU", "unknown"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 "unknown CPU")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    for name, flag in (("AMX", "amx_bf16"), ("AVX512_BF16", "avx512_bf16"), ("AVX512", "avx512f"), ("AVX2", "avx2")):
        if flag in flags:
            return model, name
    return model, "no AVX2"


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
