"""Full fine-tuning under ZeRO-3 with two workers through the real path (Ray Train + DeepSpeed
on CPU, registry, Predictor): the point is the multi-rank gather, each rank holding a part of
every weight, gathered into one whole checkpoint that the registry takes and a Predictor loads.

The other methods run in one process, without Ray, through the train loop's own functions:
QLoRA (bf16, ZeRO-2) and frozen-base (ZeRO-0) classification in
tests/unit/test_classification_methods.py, causal-lm under each method and stage in
tests/unit/test_causal_lm_methods.py; LoRA under ZeRO-2 runs through Ray in tests/e2e.

Precision is forced to fp32, never left to `auto`, so the run is the same on every CPU. A Ray
Train run costs a start of about 15 s, hence one, of a few steps per epoch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from jobs import finetune, load
from jobs.modeling import read_checkpoint_meta
from serving import tags
from serving.predictor import Predictor
from tests.helpers import make_ticket_rows, tiny_lifecycle

LABELS = ["card_arrival", "lost_card", "refund"]
STEPS = 2  # optimizer steps per epoch (train.max_steps_per_epoch): training is not the point


def _config(root: Path, tiny_bert: str, method: str, zero_stage: int, workers: int, precision: str):
    return tiny_lifecycle(
        root,
        tiny_bert,
        make_ticket_rows(60, LABELS, seed=5),
        name=f"methods-{method}",
        model={"method": method},
        train={
            "num_workers": workers,
            "epochs": 2,  # epoch 2 trains after an evaluation: eval must not alter weights
            "max_steps_per_epoch": STEPS,
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
    # The registered epoch (the best by promote.metric) trained the capped steps, and no more.
    assert result.metrics["train_steps"] == STEPS
    assert result.metrics["global_step"] == STEPS * result.metrics["epoch"]
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
    ray_session, tmp_path, tiny_bert, capfd
):
    result = _trained(tmp_path, tiny_bert, "full", zero_stage=3, workers=2, precision="fp32")
    # Rank 0's progress lines reach the driver's output once each: Ray Train's print patch
    # wrote each one twice (to Ray's wrapped stdout and through the root logger to it).
    forwarded = capfd.readouterr()
    lines = (forwarded.out + forwarded.err).splitlines()
    assert sum("raylift.train: checkpoint at epoch 1 end" in line for line in lines) == 1
    saved = load_file(Path(result.checkpoint_path) / "model.safetensors")
    base = _base_weights(tiny_bert)
    # Every base weight saved whole: gathered from both ranks, not one rank's ZeRO-3 part.
    assert {k: v.shape for k, v in base.items()} == {k: saved[k].shape for k in base}
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(saved[query], base[query])  # the encoder itself trained
    assert {"classifier.weight", "classifier.bias"} <= set(saved)
