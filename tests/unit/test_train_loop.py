import random

import numpy as np

from jobs.config import TrainConfig
from jobs.train_loop import INPUT_IDS, TARGETS, deepspeed_config, pad_batch, windowed_batches


def test_pad_batch_pads_to_longest_in_batch_only():
    out = pad_batch([np.array([5, 6, 7]), np.array([8])], pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_windowed_batches_bucket_by_length_and_keep_pairs():
    lengths = [5, 1, 4, 2, 3, 6]
    window = {
        INPUT_IDS: np.array([np.full(n, n) for n in lengths], dtype=object),
        TARGETS: np.array(lengths),
    }
    batches = list(windowed_batches(window, batch_size=2, rng=random.Random(0)))
    assert sorted(len(b[0]) for b in batches) == [2, 2, 2]
    seen = []
    for sequences, targets in batches:
        assert [len(s) for s in sequences] == list(targets)  # row and target stay together
        assert max(targets) - min(targets) == 1  # neighbours in length share a batch
        seen.extend(targets)
    assert sorted(seen) == sorted(lengths)


def test_deepspeed_config_follows_train_settings():
    config = deepspeed_config(TrainConfig(zero_stage=3, batch_size=8), "fp32")
    assert config["zero_optimization"]["stage"] == 3
    assert config["train_micro_batch_size_per_gpu"] == 8
    assert not config["torch_autocast"]["enabled"] and not config["fp16"]["enabled"]
    # bf16 is autocast over fp32 weights, never DeepSpeed's bf16 mode (which casts the weights).
    bf16 = deepspeed_config(TrainConfig(), "bf16")
    assert bf16["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "bf16" not in bf16 and not bf16["fp16"]["enabled"]


def test_precision_resolves_per_cpu_kind(monkeypatch):
    from cluster import hardware

    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    assert hardware.resolve_precision("auto", use_gpu=False) == "bf16"
    assert hardware.resolve_precision("fp32", use_gpu=False) == "fp32"
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    assert hardware.resolve_precision("auto", use_gpu=False) == "fp32"
    assert hardware.resolve_precision("bf16", use_gpu=False) == "fp32"  # emulated: refused


def test_native_bf16_can_be_forced_off_to_check_the_avx2_choices(monkeypatch):
    from cluster import hardware

    for forced, native in (("0", False), ("1", True)):
        monkeypatch.setenv(hardware.NATIVE_BF16_ENV, forced)
        hardware.cpu_has_native_bf16.cache_clear()
        assert hardware.cpu_has_native_bf16() is native
        assert hardware.resolve_precision("auto", use_gpu=False) == ("bf16" if native else "fp32")
    hardware.cpu_has_native_bf16.cache_clear()
