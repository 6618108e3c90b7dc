"""What this machine computes fast: the CPU's vector units, and the precision `auto` picks."""
from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=1)
def cpu_capability() -> tuple[str, str]:
    """(CPU model name, best of AMX / AVX512_BF16 / AVX512 / AVX2 / "no AVX2")."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU", "unknown"
    lines = info.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    for name, flag in (("AMX", "amx_bf16"), ("AVX512_BF16", "avx512_bf16"), ("AVX512", "avx512f"), ("AVX2", "avx2")):
        if flag in flags:
            return model, name
    return model, "no AVX2"


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls in hardware (avx512_bf16 or AMX) and oneDNN may use
    them. Without, bf16 is emulated: 0.8 GFLOP/s against 59 in fp32, measured with oneDNN held
    to AVX2 (`ONEDNN_MAX_CPU_ISA=AVX2`, which this check honours, as it does
    `ATEN_CPU_CAPABILITY` below avx512)."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa and isa not in ("ALL", "DEFAULT") and "BF16" not in isa and "AMX" not in isa:
        return False
    if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("default", "avx2"):
        return False
    return cpu_capability()[1] in ("AMX", "AVX512_BF16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` picks bf16 autocast where the hardware runs it fast, else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def host_description() -> str:
    model, capability = cpu_capability()
    return f"{model}, {capability}, {torch.get_num_threads()} threads"
