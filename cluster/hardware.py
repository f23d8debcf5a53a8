"""What the hardware a process runs on can do, for choices made per worker, not per config."""

from __future__ import annotations

import functools
import logging
import os
from typing import Literal

__all__ = ["cpu_has_native_bf16", "cuda_has_native_bf16", "native_bf16", "resolve_precision"]

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]

NATIVE_BF16_ENV = "RAYLIFT_NATIVE_BF16"


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True where the CPU runs bf16 matmuls in hardware (AVX512-BF16 or AMX tiles).

    Elsewhere (AVX2-only CPUs) torch emulates bf16 and a matmul is tens of times slower than
    fp32 (measured here on an AVX2 EPYC: 65 GFLOP/s fp32 against 1 GFLOP/s bf16).

    `RAYLIFT_NATIVE_BF16=0` makes a bf16 CPU decide as an AVX2-only one would (precision
    `auto` → fp32, bf16 tests skipped), so both kinds' choices can be checked on one machine;
    it is inherited by Ray workers started from that environment.

    On Linux the kernel's CPU flags answer, without importing torch (1.5 CPU-s, which a
    scoring actor on an exported engine never needs otherwise); elsewhere torch's own checks.
    """
    forced = os.environ.get(NATIVE_BF16_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    flags = _linux_cpu_flags()
    if flags is not None:
        return bool(flags & {"avx512_bf16", "amx_tile"})
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def _linux_cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str] | None:
    """The first processor's flags in /proc/cpuinfo (the kernel lists only what it enables:
    amx_tile only where it saves the AMX state); None where there is no such file."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as lines:
            for line in lines:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        return None
    return None


def cuda_has_native_bf16() -> bool:
    """True where the current GPU computes bf16 natively (compute capability 8.0, Ampere, and
    later). torch's plain `is_bf16_supported()` also says True where bf16 is only emulated
    (a V100, a T4), which would make `auto` pick the slow path there."""
    import torch

    return torch.cuda.is_bf16_supported(including_emulation=False)


def native_bf16(use_gpu: bool) -> bool:
    """Whether this process's device computes bf16 natively: its GPU's, else its CPU's."""
    return cuda_has_native_bf16() if use_gpu else cpu_has_native_bf16()


def resolve_precision(requested: str, use_gpu: bool, native: bool | None = None) -> Precision:
    """'auto' → bf16 where the device does it natively, else fp32 on a CPU and fp16
    (DeepSpeed's loss-scaled mode) on a GPU; explicit values honoured, except bf16 on a CPU
    without native bf16, which falls back to fp32 with a warning.

    `native`: whether bf16 is native, when that is decided for more than this process (the
    workers of one training run agree on it: jobs.train_loop); this process's device if None.
    """
    if requested not in ("auto", "bf16"):
        return requested  # type: ignore[return-value]
    if native is None:
        native = native_bf16(use_gpu)
    if use_gpu:
        return "bf16" if native or requested == "bf16" else "fp16"
    if requested == "auto":
        return "bf16" if native else "fp32"
    if not native:
        log.warning("precision=bf16 asked where a CPU has no native bf16: using fp32")
        return "fp32"
    return "bf16"
