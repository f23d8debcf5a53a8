"""Sequence classification under QLoRA (bf16, ZeRO-2) and frozen-base (fp32, ZeRO-0), in one
process (a one-rank gloo group, no Ray): the train loop's own engine, two epochs with an
evaluation between them (evaluating must not alter weights), the epoch-end checkpoint it would
report, loaded back by serving.predictor.Predictor. Full fine-tuning under ZeRO-3 with two
workers (the multi-rank gather) runs through Ray Train in
tests/integration/test_finetune_methods.py; LoRA under ZeRO-2 in tests/e2e.

Precision is forced, never left to `auto`: QLoRA trains in bf16 (autocast over a 4-bit base and
fp32 adapters) and skips, with the reason, on a CPU without native bf16 (AVX2 only), where
raylift refuses emulated bf16 and would silently train in fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cluster.hardware import cpu_has_native_bf16
from jobs.config import validate_mapping
from jobs.modeling import load_tokenizer, read_checkpoint_meta, save_checkpoint
from jobs.tasks import get_task
from jobs.train_loop import (
    INPUT_IDS,
    TARGETS,
    LoopInputs,
    TrainProgress,
    _checkpoint_meta,
    _evaluate,
    _setup_engine,
    _train_epoch,
)
from serving.predictor import Predictor
from tests.helpers import make_ticket_rows

LABELS = ["card_arrival", "lost_card", "refund"]
TRAIN_ROWS, VALIDATION_ROWS = 72, 18
NATIVE_BF16 = pytest.mark.skipif(
    not cpu_has_native_bf16(),
    reason="bf16 path not run: this CPU has no AVX512-BF16/AMX (bf16 would be emulated)",
)


class _Shard:
    """A worker's shard of tokenized ticket rows, as Ray Data hands it to the loop."""

    def __init__(self, tokenizer, rows: list[dict]):
        encoded = tokenizer([r["text"] for r in rows], truncation=True, max_length=32)
        self.ids = [np.array(ids, dtype=np.int32) for ids in encoded["input_ids"]]
        self.targets = np.array([LABELS.index(r["category"]) for r in rows], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def iter_batches(self, *, batch_size, **kwargs):
        for start in range(0, len(self.ids), batch_size):
            window = slice(start, start + batch_size)
            yield {
                INPUT_IDS: np.array(self.ids[window] + [None], dtype=object)[:-1],
                TARGETS: self.targets[window],
            }


def _config(base: str, method: str, stage: int, precision: str):
    return validate_mapping(
        {
            "name": f"methods-{method}",
            "task": {"label_column": "category", "max_length": 32},
            "model": {
                "base": base,
                "method": method,
                "lora": {"r": 4, "alpha": 8, "target_modules": ["query", "value"]},
            },
            "train": {
                "num_workers": 1,
                "batch_size": 8,
                "epochs": 2,
                "learning_rate": 2e-2,
                "zero_stage": stage,
                "precision": precision,
            },
        }
    )


def _trained(tiny_bert: str, directory: Path, method: str, stage: int, precision: str):
    """Two epochs (evaluated between them) as train_func runs them; the epoch-end checkpoint
    saved as _report saves it, and checked as the integration run checks a registered one.
    Returns the checkpoint folder and the trainable weights before training."""
    config = _config(tiny_bert, method, stage, precision)
    inputs = LoopInputs(config=config.model_dump(mode="json"), labels=LABELS, train_rows=TRAIN_ROWS)
    task = get_task(config.task.type)
    engine, trained_precision = _setup_engine(config, task, inputs, world_size=1)
    initial = {
        name: param.detach().clone()
        for name, param in engine.module.named_parameters()
        if param.requires_grad
    }
    tokenizer = load_tokenizer(tiny_bert)
    rows = make_ticket_rows(TRAIN_ROWS + VALIDATION_ROWS, LABELS, seed=5)
    train, validation = _Shard(tokenizer, rows[:TRAIN_ROWS]), _Shard(tokenizer, rows[TRAIN_ROWS:])
    pad, n = tokenizer.pad_token_id, len(LABELS)
    for epoch in (1, 2):  # epoch 2 trains after an evaluation: eval must not alter weights
        stats = _train_epoch(engine, train, config.train, pad, TrainProgress(epoch=epoch), print)
        evaluation = _evaluate(engine, validation, task, config.train, n, pad)
    assert stats["train_steps"] == TRAIN_ROWS // 8
    assert evaluation["val_rows"] == len(validation) > 0
    assert np.isfinite(evaluation["val_loss"]) and np.isfinite(stats["train_loss"])

    metrics = {"epoch": 2, **stats, **evaluation}
    meta = _checkpoint_meta(inputs, config, metrics, trained_precision, tokenizer)
    checkpoint = save_checkpoint(engine.module, tokenizer, directory / "ckpt", meta)
    saved_meta = read_checkpoint_meta(checkpoint)
    assert saved_meta.trained_precision == precision  # forced, and said so in the checkpoint
    assert saved_meta.saved_dtype == "float32"  # mixed precision never rounds what is saved
    predictor = Predictor(str(checkpoint), torch_threads=1)
    answers = predictor.predict_texts(["lost card stolen", "refund fee"])
    assert {a["label"] for a in answers} <= set(LABELS)
    return checkpoint, initial


@NATIVE_BF16
def test_qlora_trains_adapters_over_a_4bit_base_in_bf16(process_group, tiny_bert, tmp_path):
    checkpoint, _ = _trained(tiny_bert, tmp_path, "qlora", stage=2, precision="bf16")
    adapter = load_file(checkpoint / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # lora_B starts at zero
    assert any("classifier" in k for k in adapter)  # the new head is saved in full


def test_frozen_base_changes_only_the_head(process_group, tiny_bert, tmp_path):
    checkpoint, initial = _trained(tiny_bert, tmp_path, "frozen", stage=0, precision="fp32")
    saved = load_file(checkpoint / "model.safetensors")
    base = {f"bert.{k}": v for k, v in load_file(Path(tiny_bert) / "model.safetensors").items()}
    compared = [name for name in base if name in saved]
    assert compared, "no base weight in the saved checkpoint to compare"
    for name in compared:
        assert torch.equal(saved[name], base[name]), f"{name} changed under method=frozen"
    assert set(initial) == {"classifier.weight", "classifier.bias"}  # only the head trains
    head = saved["classifier.weight"]
    assert torch.isfinite(head).all() and head.shape == (len(LABELS), 32)
    assert not torch.equal(head, initial["classifier.weight"])  # the head itself trained
