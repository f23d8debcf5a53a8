"""raylift.json is one typed model: strict, versioned, formats 1 and 2 migrated, newer formats
refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from jobs.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointMeta,
    CheckpointMetaError,
    RemoteCodeRefused,
)
from jobs.modeling import load_checkpoint, read_checkpoint_meta
from tests.helpers import make_full_checkpoint, make_lora_checkpoint

LABELS = ["a", "b", "c"]


def _rewrite(directory: Path, **changes) -> None:
    path = directory / "raylift.json"
    meta = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({k: v for k, v in meta.items() if v is not ...}))


def test_written_and_read_as_one_model(tiny_bert, tmp_path):
    directory = Path(make_lora_checkpoint(tiny_bert, tmp_path / "ckpt", LABELS))
    meta = read_checkpoint_meta(directory)
    assert isinstance(meta, CheckpointMeta)
    assert meta.format_version == CHECKPOINT_FORMAT == 4
    assert meta.engine_format is None  # engines are built at registration, not by training
    assert (meta.labels, meta.method, meta.adapter.target_modules) == (
        LABELS,
        "lora",
        ["query", "value"],
    )
    assert json.loads((directory / "raylift.json").read_text())["format_version"] == 4
    assert load_checkpoint(directory).meta == meta


def test_saved_dtype_is_what_the_weights_hold(tiny_bert, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert, num_labels=2, use_safetensors=True
    ).to(torch.bfloat16)
    # The meta says float32 (the default); the file holds bf16: the written meta must say so.
    directory = make_full_checkpoint(tiny_bert, tmp_path / "ckpt", ["x", "y"], model=model)
    assert read_checkpoint_meta(directory).saved_dtype == "bfloat16"
    fp32 = make_full_checkpoint(tiny_bert, tmp_path / "fp32", ["x", "y"])
    assert read_checkpoint_meta(fp32).saved_dtype == "float32"


def test_unknown_key_is_refused_naming_it(tiny_bert, tmp_path):
    directory = make_full_checkpoint(tiny_bert, tmp_path / "ckpt", LABELS)
    _rewrite(directory, trust_remote_code=False)  # format 2 has no such key
    with pytest.raises(CheckpointMetaError, match="trust_remote_code: Extra inputs"):
        read_checkpoint_meta(directory)


def test_newer_format_is_refused_with_the_fix(tiny_bert, tmp_path):
    directory = make_full_checkpoint(tiny_bert, tmp_path / "ckpt", LABELS)
    _rewrite(directory, format_version=5)
    with pytest.raises(CheckpointMetaError, match="format 5, newer than the 4.*upgrade raylift"):
        read_checkpoint_meta(directory)
    _rewrite(directory, format_version=...)
    with pytest.raises(CheckpointMetaError, match="no integer format_version"):
        read_checkpoint_meta(directory)


def _format_1(directory: Path, **extra) -> None:
    """raylift.json as train_loop wrote it before CheckpointMeta (a free dict)."""
    meta = json.loads((directory / "raylift.json").read_text())
    for key in ("trained_precision", "saved_dtype"):
        meta.pop(key)
    meta.update({"format_version": 1, "trust_remote_code": False, **extra})
    (directory / "raylift.json").write_text(json.dumps(meta, sort_keys=True))


def test_format_1_checkpoint_still_loads_with_the_same_logits(tiny_bert, tmp_path):
    directory = Path(make_lora_checkpoint(tiny_bert, tmp_path / "ckpt", LABELS))
    current = load_checkpoint(directory)
    _format_1(directory, config={"train": {"precision": "auto"}})
    migrated = load_checkpoint(directory)
    assert migrated.meta.format_version == 4 and migrated.labels == LABELS
    # Format 1 never recorded what training ran in; "auto" does not say either.
    assert migrated.meta.trained_precision == "unknown"
    assert migrated.meta.saved_dtype == "float32"  # measured from the adapter file
    batch = current.tokenizer(["card arrived late"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(current.model(**batch).logits, migrated.model(**batch).logits)


def test_format_1_takes_an_explicit_precision_from_its_config(tiny_bert, tmp_path):
    directory = make_full_checkpoint(tiny_bert, tmp_path / "ckpt", LABELS)
    _format_1(directory, config={"train": {"precision": "bf16"}})
    assert read_checkpoint_meta(directory).trained_precision == "bf16"


def test_format_1_asking_for_remote_code_is_refused_unless_the_config_allows(tiny_bert, tmp_path):
    directory = make_full_checkpoint(tiny_bert, tmp_path / "ckpt", LABELS)
    _format_1(directory, trust_remote_code=True)
    with pytest.raises(RemoteCodeRefused, match=r"set model\.trust_remote_code=true"):
        read_checkpoint_meta(directory)
    assert read_checkpoint_meta(directory, trust_remote_code=True).labels == LABELS


def test_metrics_keep_ints_and_nan():
    meta = CheckpointMeta(
        task="sequence-classification",
        labels=["a", "b"],
        base_model="m",
        method="full",
        max_length=8,
        metrics={"epoch": 2, "val_loss": float("nan"), "val_accuracy": 0.5},
    )
    back = CheckpointMeta.model_validate(json.loads(meta.to_json()))
    assert back.metrics["epoch"] == 2 and isinstance(back.metrics["epoch"], int)
    assert math.isnan(back.metrics["val_loss"]) and back.metrics["val_accuracy"] == 0.5


def test_repeated_labels_are_refused():
    with pytest.raises(ValueError, match=r"labels repeat \['a'\]"):
        CheckpointMeta(
            task="sequence-classification",
            labels=["a", "b", "a"],
            base_model="m",
            method="full",
            max_length=8,
        )


@pytest.mark.parametrize("old", [2, 3])
def test_older_format_checkpoint_loads_with_no_engines(tiny_bert, tmp_path, old):
    """A version registered before engines (format 2) or causal LMs (3) still loads."""
    directory = Path(make_lora_checkpoint(tiny_bert, tmp_path / "ckpt", LABELS))
    current = load_checkpoint(directory)
    _rewrite(directory, format_version=old, engine_format=..., instruct=...)
    migrated = load_checkpoint(directory)
    assert migrated.meta.format_version == 4 and migrated.meta.engine_format is None
    assert migrated.meta.model_dump(exclude={"format_version"}) == current.meta.model_dump(
        exclude={"format_version"}
    )
