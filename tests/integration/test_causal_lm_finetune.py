"""causal-lm through `raylift finetune`'s main path: a tiny random Llama instruction-tuned with
LoRA under ZeRO-2 on two Ray Train workers, from a small Iceberg instruction table; perplexity
logged to MLflow each epoch, the version registered with it, and the checkpoint generates."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from jobs import finetune, instruct, load
from jobs.config import validate_mapping
from jobs.modeling import load_checkpoint
from serving import tags
from tests.helpers import make_ticket_rows, make_tiny_llama

INTENTS = ["card_arrival", "lost_card", "refund"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _instruction_table(path: Path, rows: int) -> Path:
    """A ticket as the prompt, its intent as the response (BANKING77 turned into instructions)."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "response"])
        writer.writeheader()
        for row in make_ticket_rows(rows, INTENTS, seed=3):
            writer.writerow({"prompt": row["text"], "response": row["category"]})
    return path


def _config(root: Path, base: str, **train):
    return validate_mapping(
        {
            "name": "instruct-lora",
            "task": {"type": "causal-lm", "max_length": 32},
            "model": {
                "base": base,
                "method": "lora",
                "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            },
            "catalog": {"uri": f"sqlite:///{root}/catalog.db", "warehouse": str(root / "wh")},
            "data": {"source": str(_instruction_table(root / "instr.csv", 64)), "inbox_rows": 0},
            "train": {
                "num_workers": 2,
                "epochs": 1,
                "batch_size": 8,
                "learning_rate": 2e-2,
                "zero_stage": 2,
                "precision": "fp32",
                "checkpoint_dir": str(root / "checkpoints"),
                **train,
            },
            "registry": {
                "tracking_uri": f"sqlite:///{root}/mlflow.db",
                "experiment": "instruct",
                "model_name": "instruct-lora",
                "build_engines": False,
            },
            "promote": {"metric": "val_perplexity", "mode": "min", "max_value": None},
        }
    )


def test_lora_zero2_instruction_tuning_logs_perplexity_and_registers(
    ray_session, tmp_path, tiny_llama
):
    from mlflow import MlflowClient

    config = _config(tmp_path, tiny_llama)
    load.main(config)
    result = finetune.main(config)
    assert result.version == "1"

    client = MlflowClient(config.registry.tracking_uri)
    history = client.get_metric_history(result.run_id, "val_perplexity")
    assert [m.step for m in history] == [1]
    perplexity = history[0].value
    val_loss = client.get_metric_history(result.run_id, "val_loss")[0].value
    assert math.isclose(perplexity, math.exp(val_loss), rel_tol=1e-6)  # token-weighted pair
    assert 1.0 < perplexity < 1e4
    assert result.metrics["train_tokens_per_s"] > 0

    version = client.get_model_version(config.registry.model_name, result.version)
    assert float(version.tags[tags.metric_tag("val_perplexity")]) == pytest.approx(perplexity)
    assert int(version.tags[tags.VALIDATION_ROWS]) == result.metrics["val_rows"] > 0

    loaded = load_checkpoint(result.checkpoint_path)
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.meta.labels == [] and loaded.meta.instruct.template == "chat"
    tokenizer = loaded.tokenizer
    prompt = instruct.prompt_text(tokenizer, "lost card stolen", template="chat")
    encoded = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = loaded.model.generate(**encoded, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > encoded["input_ids"].shape[1]
