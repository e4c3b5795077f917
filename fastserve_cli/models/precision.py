"""Compute precision for inference: fp32 (default) or bf16 where the hardware runs it natively.

bf16 halves the bytes every decode step streams (weights and KV cache), which is what bounds batch-1
decode on a CPU. It only pays where the CPU has bf16 dot products (avx512_bf16, or AMX); elsewhere
torch emulates it and it is slower than fp32, so asking for it there is a user error rather than a
silent slowdown. On a GPU it needs compute capability >= 8.0 (Ampere).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from fastserve_cli.core.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    import torch

DTYPE_NAMES = ("fp32", "bf16")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo does not exist)."""
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return frozenset()
    for line in path.read_text(encoding="utf-8", errors="ignore").splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_supports_bf16() -> bool:
    """True when this CPU computes bf16 dot products natively (avx512_bf16 or AMX)."""
    if any(flag in cpu_flags() for flag in BF16_CPU_FLAGS):
        return True
    import torch

    return "AMX" in str(torch.backends.cpu.get_cpu_capability()).upper()


def resolve_dtype(name: str, device: str, field: str = "serve.dtype") -> "torch.dtype":
    """`fp32`/`bf16` -> a torch dtype for `device`; bf16 where it would be emulated is a UserError."""
    import torch

    if name == "fp32":
        return torch.float32
    if name != "bf16":
        raise UserError(f"{field} {name!r}: unknown; choose one of: {', '.join(DTYPE_NAMES)}")
    if device.startswith("cuda"):
        if not torch.cuda.is_bf16_supported():
            raise UserError(f"{field} bf16: this GPU has no native bf16 (needs compute capability 8.0+); use fp32")
        return torch.bfloat16
    if not cpu_supports_bf16():
        raise UserError(
            f"{field} bf16: this CPU lacks avx512_bf16/AMX (bf16 would be emulated, slower than fp32); use fp32"
        )
    return torch.bfloat16
