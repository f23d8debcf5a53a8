"""Every training method through the real path (Ray Train + DeepSpeed on CPU, registry, Predictor):
full fine-tuning under ZeRO-3, QLoRA (bitsandbytes 4-bit on CPU) under ZeRO-2, frozen-base under
ZeRO-0. LoRA under ZeRO-2 runs in tests/e2e.

Precision is forced, never left to `auto`, so both paths run wherever the CPU allows: full and
frozen run in fp32, QLoRA in bf16 (bf16 autocast over a 4-bit base and trained adapters). The
bf16 run skips, with the reason, on a CPU without native bf16 (AVX2 only), where raylift refuses
emulated bf16 and would silently train in fp32; QLoRA in fp32, under ZeRO-2 and ZeRO-3, runs in
one process in tests/unit/test_causal_lm_methods.py on any CPU. Each run here costs a Ray Train
start (about 15 s), hence one run per method."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cluster.hardware import cpu_has_native_bf16
from jobs import finetune, load
from jobs.modeling import read_checkpoint_meta
from serving import tags
from serving.predictor import Predictor
from tests.helpers import make_ticket_rows, tiny_lifecycle

LABELS = ["card_arrival", "lost_card", "refund"]
NATIVE_BF16 = pytest.mark.skipif(
    not cpu_has_native_bf16(),
    reason="bf16 path not run: this CPU has no AVX512-BF16/AMX (bf16 would be emulated)",
)


def _config(root: Path, tiny_bert: str, method: str, zero_stage: int, workers: int, precision: str):
    return tiny_lifecycle(
        root,
        tiny_bert,
        make_ticket_rows(90, LABELS, seed=5),
        name=f"methods-{method}",
        model={"method": method},
        train={
            "num_workers": workers,
            "epochs": 2,  # epoch 2 trains after an evaluation: eval must not alter weights
            "learning_rate": 2e-2,
            "zero_stage": zero_stage,
            "precision": precision,
        },
        registry={"experiment": "methods", "model_name": f"methods-{method}"},
    )


def _trained(
    root: Path, tiny_bert: str, method: str, zero_stage: int, workers: int, precision: str
):
    config = _config(root, tiny_bert, method, zero_stage, workers, precision)
    load.main(config)
    result = finetune.main(config)
    assert result.version == "1"
    # Every rank's evaluation adds up to the whole validation split the driver planned.
    planned = meta_of_version(config, result.version)[tags.VALIDATION_ROWS]
    assert result.metrics["val_rows"] == int(planned) > 0
    assert np.isfinite(result.metrics["val_loss"]) and np.isfinite(result.metrics["train_loss"])
    meta = read_checkpoint_meta(result.checkpoint_path)
    assert meta.trained_precision == precision  # forced, and said so in the checkpoint
    assert meta.saved_dtype == "float32"  # mixed precision never rounds what is saved
    predictor = Predictor(result.checkpoint_path, torch_threads=1)
    answers = predictor.predict_texts(["lost card stolen", "refund fee"])
    assert {a["label"] for a in answers} <= set(LABELS)
    return result


def meta_of_version(config, version: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return (
        MlflowClient(config.registry.tracking_uri)
        .get_model_version(config.registry.model_name, version)
        .tags
    )


def _base_weights(tiny_bert: str) -> dict[str, torch.Tensor]:
    # The tiny base is a BertModel; in a classification model its weights sit under "bert.".
    return {f"bert.{k}": v for k, v in load_file(Path(tiny_bert) / "model.safetensors").items()}


def test_full_finetune_under_zero3_saves_consolidated_trained_weights(
    ray_session, tmp_path, tiny_bert
):
    result = _trained(tmp_path, tiny_bert, "full", zero_stage=3, workers=2, precision="fp32")
    saved = load_file(Path(result.checkpoint_path) / "model.safetensors")
    base = _base_weights(tiny_bert)
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert saved[query].shape == base[query].shape  # gathered, not a ZeRO-3 shard
    assert not torch.equal(saved[query], base[query])  # the encoder itself trained
    assert {"classifier.weight", "classifier.bias"} <= set(saved)


@NATIVE_BF16
def test_qlora_trains_adapters_over_a_4bit_base_in_bf16(ray_session, tmp_path, tiny_bert):
    result = _trained(tmp_path, tiny_bert, "qlora", zero_stage=2, workers=1, precision="bf16")
    adapter = load_file(Path(result.checkpoint_path) / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # lora_B starts at zero
    assert any("classifier" in k for k in adapter)  # the new head is saved in full


def test_frozen_base_changes_only_the_head(ray_session, tmp_path, tiny_bert):
    result = _trained(tmp_path, tiny_bert, "frozen", zero_stage=0, workers=1, precision="fp32")
    saved = load_file(Path(result.checkpoint_path) / "model.safetensors")
    for name, weight in _base_weights(tiny_bert).items():
        if name in saved:
            assert torch.equal(saved[name], weight), f"{name} changed under method=frozen"
    head = saved["classifier.weight"].numpy()
    assert np.isfinite(head).all() and head.shape == (len(LABELS), 32)
