"""What the CPU can do, read without importing torch where the kernel says it, and the same
answer torch gives."""

from __future__ import annotations

import pytest

from cluster import hardware


def _cpuinfo(tmp_path, flags: str) -> str:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    return str(path)


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        ("fpu sse2 avx2 fma", False),  # AVX2-only: bf16 is emulated
        ("avx2 avx512f avx512_bf16", True),
        ("avx2 avx512f amx_bf16 amx_tile", True),
    ],
)
def test_native_bf16_from_the_kernels_flags(tmp_path, monkeypatch, flags, native):
    monkeypatch.delenv(hardware.NATIVE_BF16_ENV, raising=False)
    read = hardware._linux_cpu_flags(_cpuinfo(tmp_path, flags))
    monkeypatch.setattr(hardware, "_linux_cpu_flags", lambda: read)
    hardware.cpu_has_native_bf16.cache_clear()
    try:
        assert hardware.cpu_has_native_bf16() is native
    finally:
        hardware.cpu_has_native_bf16.cache_clear()


def test_no_cpuinfo_is_none_and_this_machine_agrees_with_torch(tmp_path, monkeypatch):
    import torch

    assert hardware._linux_cpu_flags(str(tmp_path / "missing")) is None
    monkeypatch.delenv(hardware.NATIVE_BF16_ENV, raising=False)
    hardware.cpu_has_native_bf16.cache_clear()
    try:
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        assert hardware.cpu_has_native_bf16() is any(getattr(torch.cpu, c)() for c in checks)
    finally:
        hardware.cpu_has_native_bf16.cache_clear()
