"""The task owns its specifics: head module names and how evaluation accumulates."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from jobs.config import ModelConfig, TrainConfig
from jobs.modeling import build_model
from jobs.tasks import get_task, register_task, task_names
from jobs.train_loop import _param_groups

TASK = get_task("sequence-classification")
LABELS = ["a", "b", "c"]


def test_sequence_classification_heads():
    assert TASK.head_modules == ("classifier", "score")
    assert TASK.is_head_parameter("base_model.model.classifier.modules_to_save.default.weight")
    assert TASK.is_head_parameter("score.weight")
    # A substring is not a module name: "subclassifier." was a head under the old check.
    assert not TASK.is_head_parameter("bert.subclassifier.weight")
    assert not TASK.is_head_parameter("bert.encoder.layer.0.attention.self.query.weight")


def test_head_learning_rate_goes_to_the_task_head(tiny_bert):
    cfg = ModelConfig(base=tiny_bert, method="lora", lora={"target_modules": ["query"]})
    model = build_model(cfg, TASK, LABELS)
    train = TrainConfig(learning_rate=1e-4, head_learning_rate=5e-3)
    groups = _param_groups(model, train, TASK)
    head = [g for g in groups if g.get("lr") == 5e-3]
    names = {id(p): n for n, p in model.named_parameters()}
    head_names = sorted(names[id(p)] for p in head[0]["params"])
    assert head_names and all(".classifier.modules_to_save." in n for n in head_names)
    other = [names[id(p)] for g in groups if g.get("lr") != 5e-3 for p in g["params"]]
    assert other and all("lora_" in n for n in other)


def test_frozen_needs_one_of_the_task_heads(tiny_bert):
    headless = dataclasses.replace(TASK, head_modules=("lm_head",))
    with pytest.raises(
        ValueError, match=r"none of the .* heads \('lm_head',\).*model\.method=full"
    ):
        build_model(ModelConfig(base=tiny_bert, method="frozen"), headless, LABELS)


def test_evaluation_state_accumulates_and_sums_across_ranks():
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0]])
    targets = torch.tensor([0, 1, 1, 0])
    whole = TASK.eval_state(3)
    TASK.accumulate(whole, logits, targets)
    # Two ranks each see half the rows; the loop all-reduces their states as a sum.
    rank0, rank1 = TASK.eval_state(3), TASK.eval_state(3)
    TASK.accumulate(rank0, logits[:2], targets[:2])
    TASK.accumulate(rank1, logits[2:], targets[2:])
    assert torch.equal(rank0 + rank1, whole)
    expected = np.array([[2, 0, 0], [0, 1, 1], [0, 0, 0]], dtype=np.float64)
    np.testing.assert_array_equal(whole.numpy(), expected)
    assert TASK.metrics(whole.numpy())["accuracy"] == pytest.approx(3 / 4)


def test_bf16_logits_accumulate_like_fp32():
    logits = torch.tensor([[0.1, 2.0], [3.0, -1.0]])
    fp32, bf16 = TASK.eval_state(2), TASK.eval_state(2)
    TASK.accumulate(fp32, logits, torch.tensor([1, 1]))
    TASK.accumulate(bf16, logits.to(torch.bfloat16), torch.tensor([1, 1]))
    assert torch.equal(fp32, bf16) and fp32.dtype == torch.float64


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"head_modules": ()}, "head_modules must be a non-empty tuple"),
        ({"head_modules": ["classifier"]}, "head_modules must be a non-empty tuple"),
        ({"head_modules": ("classifier.dense",)}, r"\['classifier\.dense'\] are not attribute"),
        ({"eval_state": lambda n: torch.zeros(n, dtype=torch.int64)}, "float64 torch.Tensor"),
        ({"eval_state": lambda n: np.zeros(n)}, "got ndarray"),
        ({"eval_state": lambda n: torch.ones(n, dtype=torch.float64)}, "must start at zero"),
        ({"accumulate": None}, "accumulate must be callable"),
    ],
)
def test_registration_checks_the_task_contract(change, message):
    bad = dataclasses.replace(TASK, name="bad-task", **change)
    with pytest.raises(ValueError, match=message):
        register_task(bad)
    with pytest.raises(ValueError, match="unknown task 'bad-task'"):
        get_task("bad-task")  # a refused task is not registered


def test_a_task_name_registers_once():
    with pytest.raises(ValueError, match="already registered"):
        register_task(TASK)


@pytest.mark.parametrize("name", task_names())
def test_every_built_in_task_builds_a_zeroed_float64_state(name):
    """The built-in tasks are registered without building their state (that imports torch,
    which a Predictor on an exported engine never needs): their contract is checked here."""
    from jobs.tasks import _check_eval_state

    _check_eval_state(get_task(name, check_libraries=False))
