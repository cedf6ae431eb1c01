"""Which precision the trainer computes in: `auto` picks bfloat16 only on a CPU that has it natively.

Emulated bfloat16 (a CPU without AVX512-BF16 or AMX) is slower than float32, and so, measured, is
bfloat16 autocast on a GPU for the embedded model; `auto` keeps float32 there.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

_NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache  # the CPU does not change under a running process; train_block asks per batch
def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU computes bfloat16 natively (Linux flags; other systems answer False)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return any(f in flags for f in _NATIVE_BF16_CPU_FLAGS)
    return False


def training_dtype(setting: str, device: torch.device, weights: torch.dtype) -> torch.dtype | None:
    """The autocast dtype for training on `device` (None: compute in the weights' own dtype).

    Weights already in a 16-bit dtype train as they are: autocast only ever lowers float32 compute."""
    if weights != torch.float32 or setting == "float32":
        return None
    if setting == "bfloat16":
        return torch.bfloat16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    # a GPU: on an H100 with the embedded 135M model float32 trained 1.4-1.6x faster than bf16
    # autocast (its steps are bound by kernel launches, which the casts only add to)
    return None
