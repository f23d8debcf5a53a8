"""What the CPU can do, read without importing torch where the kernel says it, and the same
answer torch gives."""

from __future__ import annotations

import json
import socket
from pathlib import Path

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


# Each case: whether rank 0's and rank 1's CPU has native bf16.
_MIXED, _BOTH = (True, False), (True, True)
_REQUESTED = ("auto", "bf16", "fp32")


def _precisions_on_rank(rank: int, port: int, out: str) -> None:
    """One rank of a two-process gloo group (spawned): the precision it trains in, for each
    requested precision, on a mixed pair of CPUs and on a pair that both have native bf16."""
    import os

    import torch.distributed as dist

    from jobs.config import TrainConfig
    from jobs.train_loop import _agreed_precision

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    resolved = {}
    try:
        for name, natives in (("mixed", _MIXED), ("both", _BOTH)):
            os.environ[hardware.NATIVE_BF16_ENV] = "1" if natives[rank] else "0"
            hardware.cpu_has_native_bf16.cache_clear()
            for requested in _REQUESTED:
                key = f"{name} {requested}"
                resolved[key] = _agreed_precision(TrainConfig(precision=requested))
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(resolved))


def test_the_workers_of_a_mixed_cluster_train_in_one_precision(tmp_path):
    """Rank 0's CPU has native bf16 and rank 1's does not (an AVX512-BF16 node beside an
    AVX2-only one): both train in fp32, `auto` or bf16 asked, so their DeepSpeed configs
    match. Where both have it, both train in bf16."""
    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_precisions_on_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    expected = {
        "mixed auto": "fp32",
        "mixed bf16": "fp32",
        "mixed fp32": "fp32",
        "both auto": "bf16",
        "both bf16": "bf16",
        "both fp32": "fp32",
    }
    assert ranks == [expected, expected]


def test_precision_follows_the_native_bf16_it_is_given(monkeypatch):
    """Given `native` (what every worker agreed on), this CPU's own answer is not asked."""
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: pytest.fail("asked this CPU"))
    assert hardware.resolve_precision("auto", use_gpu=False, native=False) == "fp32"
    assert hardware.resolve_precision("bf16", use_gpu=False, native=False) == "fp32"
    assert hardware.resolve_precision("auto", use_gpu=False, native=True) == "bf16"
    assert hardware.resolve_precision("auto", use_gpu=True, native=False) == "fp16"
    assert hardware.resolve_precision("bf16", use_gpu=True, native=False) == "bf16"  # as asked
