"""The train loop on a GPU, as a Ray Train worker with train.use_gpu runs it, without Ray: the
engine _setup_engine builds (build_model, deepspeed.initialize with deepspeed_config), epochs
of _train_epoch and _evaluate over an in-memory shard with the loop's collectives on NCCL, and
the engine state a checkpoint holds, saved and loaded into a fresh engine (CUDA RNG included).
One case per path a GPU worker takes: LoRA ZeRO-0 bf16 autocast, LoRA ZeRO-2 fp16 (DeepSpeed's
loss-scaled mode), full ZeRO-3 bf16, QLoRA ZeRO-0 bf16 (bitsandbytes' CUDA 4-bit kernels)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.config import LifecycleConfig
from jobs.tasks import get_task
from jobs.train_loop import (
    INPUT_IDS,
    STATE_DIR,
    TARGETS,
    BatchInputs,
    LoopInputs,
    TrainProgress,
    _evaluate,
    _load_rng,
    _rank_device,
    _setup_engine,
    _train_epoch,
    load_engine_state,
    save_engine_state,
)
from tests.helpers import WORDS

LABELS = ["card_arrival", "lost_card", "refund"]
PAD_ID, CLS_ID, SEP_ID = 0, 2, 3  # tests.helpers.make_tiny_bert's special tokens
FIRST_WORD = 5  # its words come after the 5 special tokens
TRAIN_ROWS, VAL_ROWS, EPOCHS = 128, 48, 4
_LEARNING_RATES = {"lora": 2e-2, "qlora": 2e-2, "full": 3e-3}

CASES = [
    pytest.param("lora", 0, "bf16", id="lora-zero0-bf16"),
    pytest.param("lora", 2, "fp16", id="lora-zero2-fp16"),
    pytest.param("full", 3, "bf16", id="full-zero3-bf16"),
    pytest.param("qlora", 0, "bf16", id="qlora-zero0-bf16"),
]


class _MemoryShard:
    """Rows held in memory, read as the loop reads a Ray Data shard: windows of numpy columns,
    through a seeded shuffle buffer when the loop asks for one."""

    def __init__(self, sequences: list[np.ndarray], targets: np.ndarray):
        self.sequences, self.targets = sequences, targets

    def iter_batches(
        self, *, batch_size, batch_format, local_shuffle_buffer_size=None, local_shuffle_seed=None
    ):
        assert batch_format == "numpy"
        order = np.arange(len(self.targets))
        if local_shuffle_buffer_size:
            order = np.random.default_rng(local_shuffle_seed).permutation(order)
        for start in range(0, len(order), batch_size):
            picked = order[start : start + batch_size]
            ids = np.empty(len(picked), dtype=object)
            for row, i in enumerate(picked):
                ids[row] = self.sequences[i]
            yield {INPUT_IDS: ids, TARGETS: self.targets[picked]}


def _shard(rows: int, seed: int) -> _MemoryShard:
    """A signal a few steps learn: each label's rows hold its own word twice, among 1-7 random
    filler words (so batches need padding)."""
    rng = np.random.default_rng(seed)
    targets = np.arange(rows) % len(LABELS)
    fillers = np.arange(FIRST_WORD + 3 * len(LABELS), FIRST_WORD + len(WORDS))
    sequences = []
    for label in targets:
        anchor = FIRST_WORD + 3 * int(label)
        middle = rng.choice(fillers, size=rng.integers(1, 8))
        sequences.append(np.array([CLS_ID, anchor, *middle, anchor, SEP_ID], dtype=np.int64))
    return _MemoryShard(sequences, targets)


def _config(
    base: str, method: str, stage: int, precision: str, use_gpu: bool = True
) -> LifecycleConfig:
    return LifecycleConfig.model_validate(
        {
            "name": "gpu-check",
            "model": {
                "base": base,
                "method": method,
                "lora": {"r": 8, "alpha": 16, "target_modules": ["query", "value"]},
            },
            "train": {
                "num_workers": 1,
                "use_gpu": use_gpu,
                "precision": precision,
                "zero_stage": stage,
                "batch_size": 8,
                "epochs": EPOCHS,
                "learning_rate": _LEARNING_RATES[method],
                "warmup_ratio": 0.0,
            },
        }
    )


def _engine(config: LifecycleConfig):
    inputs = LoopInputs(config={}, labels=LABELS, train_rows=TRAIN_ROWS)
    return _setup_engine(config, get_task(config.task.type), inputs, world_size=1)


def _train(engine, config: LifecycleConfig) -> tuple[dict, list[dict], dict]:
    """(validation figures before training, each epoch's figures, validation after)."""
    task = get_task(config.task.type)
    collate = BatchInputs(task, PAD_ID)
    train, val = _shard(TRAIN_ROWS, seed=0), _shard(VAL_ROWS, seed=1)

    def evaluate() -> dict:
        return _evaluate(engine, val, task, config.train, len(LABELS), PAD_ID, collate)

    before = evaluate()
    epochs = [
        _train_epoch(engine, train, config.train, PAD_ID, TrainProgress(epoch=e), print, collate)
        for e in range(1, EPOCHS + 1)
    ]
    return before, epochs, evaluate()


def _trainable(engine) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    return {
        name: (safe_get_full_fp32_param(p) if hasattr(p, "ds_id") else p.detach()).float().cpu()
        for name, p in engine.module.named_parameters()
        if p.requires_grad
    }


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)


@pytest.mark.parametrize(("method", "stage", "precision"), CASES)
def test_the_loop_trains_evaluates_and_resumes_on_the_gpu(
    nccl_group, tiny_bert, tmp_path: Path, method, stage, precision
):
    if method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("qlora needs bitsandbytes (its CUDA 4-bit kernels), not installed here")
    config = _config(tiny_bert, method, stage, precision)
    engine, resolved = _engine(config)
    assert resolved == precision
    assert engine.device == _rank_device() == torch.device("cuda", 0)
    assert engine.fp16_enabled() == (precision == "fp16")
    if method == "qlora":
        import bitsandbytes as bnb

        packed = [m for m in engine.module.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert packed and all(m.weight.device.type == "cuda" for m in packed)

    before, epochs, after = _train(engine, config)
    for figures in (before, *epochs, after):
        assert all(math.isfinite(value) for value in figures.values()), figures
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"], epochs
    assert after["val_loss"] < 0.8 * before["val_loss"], (before, after)
    assert after["val_rows"] == VAL_ROWS

    state = tmp_path / STATE_DIR
    progress = TrainProgress(epoch=EPOCHS, epoch_done=True, global_step=int(engine.global_steps))
    save_engine_state(engine, state, progress, rank=0)
    saved_rng = torch.cuda.get_rng_state()
    resumed, _ = _engine(config)
    assert not _same(_trainable(resumed), _trainable(engine))
    load_engine_state(resumed, state)
    torch.cuda.manual_seed(1234)  # moved on: loading must bring the saved state back
    _load_rng(state, rank=0)
    assert torch.equal(torch.cuda.get_rng_state(), saved_rng)
    assert _same(_trainable(resumed), _trainable(engine))
    assert resumed.global_steps == engine.global_steps
