"""causal-lm under each method and ZeRO stage, in one process (a one-rank gloo group, no Ray):
the train loop's own epoch and evaluation over instruction batches (packed), then the
checkpoint it would report, loaded back for generation. The two-worker run through Ray is
tests/e2e/test_causal_lm_lifecycle.py (QLoRA, ZeRO-2)."""

from __future__ import annotations

import math

import deepspeed.ops
import numpy as np
import pytest
import torch

from jobs import instruct
from jobs.config import validate_mapping
from jobs.modeling import load_checkpoint, load_tokenizer, save_checkpoint
from jobs.tasks import get_task
from jobs.train_loop import (
    INPUT_IDS,
    TARGETS,
    BatchInputs,
    LoopInputs,
    TrainProgress,
    _checkpoint_meta,
    _consolidated_weights,
    _evaluate,
    _setup_engine,
    _train_epoch,
)
from tests.helpers import make_ticket_rows, make_tiny_llama

INTENTS = ["card_arrival", "lost_card", "refund"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


class _Shard:
    """A worker's shard of tokenized instruction rows, as Ray Data hands it to the loop."""

    def __init__(self, tokenizer, rows: int):
        encoded = [
            instruct.encode_example(
                tokenizer, row["text"], row["category"], template="chat", max_length=32
            )
            for row in make_ticket_rows(rows, INTENTS, seed=1)
        ]
        self.ids = [e[0] for e in encoded]
        self.labels = [e[1] for e in encoded]

    def iter_batches(self, *, batch_size, **kwargs):
        for start in range(0, len(self.ids), batch_size):
            window = slice(start, start + batch_size)
            yield {
                INPUT_IDS: np.array(self.ids[window] + [None], dtype=object)[:-1],
                TARGETS: np.array(self.labels[window] + [None], dtype=object)[:-1],
            }


def _config(base: str, method: str, stage: int):
    return validate_mapping(
        {
            "name": "methods",
            "task": {"type": "causal-lm", "max_length": 32, "packing": True},
            "model": {
                "base": base,
                "method": method,
                "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            },
            "train": {
                "num_workers": 1,
                "batch_size": 6,
                "learning_rate": 2e-2,
                "zero_stage": stage,
                "precision": "fp32",
                "length_window": 2,
                "shuffle_buffer_rows": 0,
            },
            "promote": {"metric": "val_perplexity", "mode": "min", "max_value": None},
        }
    )


@pytest.mark.parametrize(
    ("method", "stage"), [("lora", 0), ("qlora", 2), ("qlora", 3), ("full", 3)]
)
def test_method_trains_evaluates_and_saves_a_loadable_checkpoint(
    process_group, tiny_llama, tmp_path, method, stage
):
    config = _config(tiny_llama, method, stage)
    inputs = LoopInputs(config=config.model_dump(mode="json"), labels=[], train_rows=24)
    task = get_task("causal-lm")
    engine, precision = _setup_engine(config, task, inputs, world_size=1)
    # train.shm_allreduce off: DeepSpeed's backend (made once per process) gets no shm op
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False
    tokenizer = instruct.prepare_tokenizer(load_tokenizer(tiny_llama))
    collate = BatchInputs(task, tokenizer.pad_token_id, packing=True, max_length=32)
    shard = _Shard(tokenizer, 24)

    pad = tokenizer.pad_token_id
    before = _evaluate(engine, shard, task, config.train, 0, pad, collate)
    stats = _train_epoch(engine, shard, config.train, pad, TrainProgress(), print, collate)
    after = _evaluate(engine, shard, task, config.train, 0, pad, collate)
    assert stats["train_steps"] == 4 and stats["train_tokens_per_s"] > 0
    assert math.isclose(after["val_perplexity"], math.exp(after["val_loss"]))
    # Three answers to learn: 4 steps at 2e-2 on the rows themselves cut perplexity (qlora: 18%).
    assert after["val_perplexity"] < 0.9 * before["val_perplexity"]
    if method == "qlora":
        import bitsandbytes as bnb

        quantized = [m for m in engine.module.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert quantized and all(m.weight.dtype == torch.uint8 for m in quantized) == (stage < 3)

    metrics = {"epoch": 1, **stats, **after}
    meta = _checkpoint_meta(inputs, config, metrics, precision, tokenizer)
    state_dict = _consolidated_weights(engine, config)  # what the epoch-end checkpoint saves
    save_checkpoint(engine.module, tokenizer, tmp_path / "ckpt", meta, state_dict=state_dict)
    if stage == 3 and method != "full":
        _check_adapter_gathered_alone(engine, state_dict, tokenizer, meta, tmp_path)
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.meta.instruct.packing and loaded.meta.method == method
    assert loaded.tokenizer.pad_token_id == tokenizer.pad_token_id  # saved with the checkpoint
    prompt = instruct.prompt_text(loaded.tokenizer, "lost card stolen", template="chat")
    encoded = loaded.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        reloaded = loaded.model(**encoded).logits[0, -1]
    assert torch.isfinite(reloaded).all()


def _check_adapter_gathered_alone(engine, state_dict, tokenizer, meta, tmp_path) -> None:
    """Under ZeRO-3 an adapter run's rank 0 kept the trainable weights only, not the frozen
    base, and saved the adapter that gathering every weight saves: the same tensors, and a
    model that loads from it and answers the same."""
    from safetensors.torch import load_file

    params = {name for name, _ in engine.module.named_parameters()}
    trainable = {name for name, p in engine.module.named_parameters() if p.requires_grad}
    assert trainable and set(state_dict) & params == trainable
    whole = engine._zero3_consolidated_16bit_state_dict()  # every weight, as it was gathered
    save_checkpoint(engine.module, tokenizer, tmp_path / "whole", meta, state_dict=whole)
    saved = load_file(tmp_path / "ckpt" / "adapter_model.safetensors")
    expected = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    ids = torch.tensor([[2, 7, 8, 9, 10]])
    with torch.no_grad():
        answers = [
            load_checkpoint(tmp_path / d).model(input_ids=ids).logits for d in ("ckpt", "whole")
        ]
    assert torch.equal(*answers)
