"""Remote code runs only when the loading config allows it, never because a checkpoint asks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs.checkpoint import RemoteCodeRefused
from jobs.modeling import load_checkpoint, load_tokenizer
from tests.helpers import make_full_checkpoint

LABELS = ["a", "b"]
KEY = r"model\.trust_remote_code=true"

# Imported by transformers only if remote code runs: its import leaves a marker file behind.
_BAIT = """
import pathlib

pathlib.Path({marker!r}).write_text("remote code ran")

from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast


class BaitConfig(BertConfig):
    model_type = "bert"


class BaitModel(BertForSequenceClassification):
    config_class = BaitConfig


class BaitTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _baited_checkpoint(tiny_bert: str, directory: Path, marker: Path) -> Path:
    """A real checkpoint whose config and tokenizer config point at bait.py beside them."""
    make_full_checkpoint(tiny_bert, directory, LABELS)
    (directory / "bait.py").write_text(_BAIT.format(marker=str(marker)))
    _add_keys(
        directory / "config.json",
        auto_map={
            "AutoConfig": "bait.BaitConfig",
            "AutoModelForSequenceClassification": "bait.BaitModel",
        },
    )
    _add_keys(
        directory / "tokenizer_config.json",
        auto_map={"AutoTokenizer": [None, "bait.BaitTokenizer"]},
    )
    return directory


def _add_keys(path: Path, **keys) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **keys}))


def _as_format_1(directory: Path, **extra) -> None:
    """Rewrite raylift.json as format 1 wrote it (a free dict, remote code its own choice)."""
    meta = json.loads((directory / "raylift.json").read_text())
    meta = {k: v for k, v in meta.items() if k not in ("trained_precision", "saved_dtype")}
    (directory / "raylift.json").write_text(json.dumps({**meta, "format_version": 1, **extra}))


def test_auto_map_checkpoint_is_refused_naming_the_key_and_runs_nothing(tiny_bert, tmp_path):
    marker = tmp_path / "marker"
    directory = _baited_checkpoint(tiny_bert, tmp_path / "ckpt", marker)
    with pytest.raises(RemoteCodeRefused, match=KEY) as refused:
        load_checkpoint(directory)
    assert "auto_map" in str(refused.value)
    with pytest.raises(RemoteCodeRefused, match=KEY):
        load_tokenizer(str(directory))
    assert not marker.exists()


def test_a_checkpoint_cannot_turn_remote_code_on_itself(tiny_bert, tmp_path):
    # Format 1 let raylift.json say trust_remote_code: true, and loading obeyed it.
    marker = tmp_path / "marker"
    directory = _baited_checkpoint(tiny_bert, tmp_path / "ckpt", marker)
    _as_format_1(directory, trust_remote_code=True)
    with pytest.raises(RemoteCodeRefused, match=KEY):
        load_checkpoint(directory)
    assert not marker.exists()


def test_tokenizer_auto_map_alone_is_refused(tiny_bert, tmp_path):
    marker = tmp_path / "marker"
    directory = make_full_checkpoint(tiny_bert, tmp_path / "ckpt", LABELS)
    (directory / "bait.py").write_text(_BAIT.format(marker=str(marker)))
    _add_keys(
        directory / "tokenizer_config.json",
        auto_map={"AutoTokenizer": [None, "bait.BaitTokenizer"]},
    )
    with pytest.raises(RemoteCodeRefused, match=r"tokenizer_config\.json: auto_map"):
        load_tokenizer(str(directory))
    assert not marker.exists()


def test_unknown_model_type_is_refused(tiny_bert, tmp_path):
    directory = make_full_checkpoint(tiny_bert, tmp_path / "ckpt", LABELS)
    _add_keys(directory / "config.json", model_type="bait-bert")
    with pytest.raises(RemoteCodeRefused, match=r"model_type 'bait-bert' unknown to transformers"):
        load_checkpoint(directory)


def test_the_bait_is_live_when_the_config_allows_remote_code(tiny_bert, tmp_path):
    """Guards the tests above: with remote code allowed, the same load does import bait.py."""
    marker = tmp_path / "marker"
    directory = _baited_checkpoint(tiny_bert, tmp_path / "ckpt", marker)
    script = (
        "from jobs.modeling import load_checkpoint\n"
        f"load_checkpoint({str(directory)!r}, trust_remote_code=True)\n"
    )
    # A child process: the imported module and transformers' module cache stay out of this one.
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf-modules")}
    subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=300)
    assert marker.read_text() == "remote code ran"


def test_a_normal_checkpoint_loads_with_remote_code_off(tiny_bert, tmp_path):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert, num_labels=len(LABELS), use_safetensors=True
    ).eval()
    directory = make_full_checkpoint(tiny_bert, tmp_path / "ckpt", LABELS, model=model)
    loaded = load_checkpoint(directory, trust_remote_code=False)
    batch = loaded.tokenizer(["card arrived late"], return_tensors="pt")
    with torch.no_grad():
        before, after = model(**batch).logits, loaded.model(**batch).logits
    assert torch.equal(before, after) and loaded.labels == LABELS
