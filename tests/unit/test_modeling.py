import json

import pytest

from jobs.checkpoint import CHECKPOINT_FORMAT
from jobs.config import ModelConfig
from jobs.modeling import build_model, load_checkpoint, resolve_base_model
from jobs.tasks import get_task
from tests.helpers import make_lora_checkpoint

LABELS = ["a", "b", "c"]
TASK = get_task("sequence-classification")


def test_frozen_trains_only_the_head(tiny_bert):
    model = build_model(ModelConfig(base=tiny_bert, method="frozen"), TASK, LABELS)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier"}


def test_loading_refuses_anything_but_safetensors(tiny_bert, tmp_path):
    directory = tmp_path / "ckpt"
    make_lora_checkpoint(tiny_bert, directory, LABELS)
    (directory / "adapter_model.safetensors").rename(directory / "adapter_model.bin")
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        load_checkpoint(directory)
    (directory / "raylift.json").unlink()
    with pytest.raises(FileNotFoundError, match="raylift.json is missing"):
        load_checkpoint(directory)


def test_unknown_base_model_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.base='nope/nothing'"):
        resolve_base_model("nope/nothing")


def test_checkpoint_meta_is_json(tiny_bert, tmp_path):
    directory = make_lora_checkpoint(tiny_bert, tmp_path / "ckpt", LABELS)
    meta = json.loads((tmp_path / "ckpt" / "raylift.json").read_text())
    assert meta["format_version"] == CHECKPOINT_FORMAT and meta["labels"] == LABELS
    assert directory.endswith("ckpt")
