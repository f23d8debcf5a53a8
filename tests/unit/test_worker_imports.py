"""What a training worker imports to build its model: a LoRA model (and a LoRA checkpoint merged
for scoring) does not import bitsandbytes, which peft would otherwise import whenever it is
installed (1.0-1.3 CPU-s of each Ray Train worker's start, and of every Tune trial's, on the
2-core AVX512-BF16 box, measured); a QLoRA model built afterwards in the same process still
imports it and is 4-bit, which shows the check below can see the import.

Also what a Tune trial's Train run starts: no preemption watcher actor on the local one-node Ray
(1.3 CPU-s of each trial's start), Ray Train's default elsewhere."""

from __future__ import annotations

import pytest
import ray

from cluster.hardware import cpu_has_native_bf16
from jobs import finetune
from tests.helpers import make_lora_checkpoint, run_in_fresh_process

LABELS = ["card_arrival", "lost_card", "refund"]

# A child process: this one may have imported peft and bitsandbytes already (other tests).
_SCRIPT = """
import json, sys
import torch
from jobs.config import ModelConfig
from jobs.modeling import build_model, load_checkpoint
from jobs.tasks import get_task

def loaded():
    return sorted(m for m in ("peft", "bitsandbytes") if sys.modules.get(m) is not None)

base, checkpoint, precision = sys.argv[1:4]
labels = ["card_arrival", "lost_card", "refund"]
task = get_task("sequence-classification")  # the worker's first import of peft
seen = {"task": loaded()}
lora = ModelConfig(base=base, method="lora", lora={"target_modules": ["query", "value"]})
model = build_model(lora, task, labels, precision, zero_stage=2)
model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([1])).loss.backward()
load_checkpoint(checkpoint)
seen["lora"] = loaded()
seen["blocked_after"] = "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None
if precision == "bf16":
    qlora = ModelConfig(base=base, method="qlora", lora={"target_modules": ["query", "value"]})
    model = build_model(qlora, task, labels, precision, zero_stage=2)
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([1])).loss.backward()
    import bitsandbytes as bnb

    seen["qlora"] = loaded()
    seen["qlora_4bit"] = any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
print(json.dumps(seen))
"""


def _run(tiny_bert, checkpoint, precision: str) -> dict:
    return run_in_fresh_process(_SCRIPT, tiny_bert, checkpoint, precision)


@pytest.mark.skipif(
    not cpu_has_native_bf16(),
    reason="QLoRA control not run: this CPU has no AVX512-BF16/AMX (QLoRA trains in bf16)",
)
def test_lora_leaves_bitsandbytes_out_and_qlora_still_imports_it(tiny_bert, tmp_path):
    checkpoint = make_lora_checkpoint(tiny_bert, tmp_path / "lora", LABELS)
    seen = _run(tiny_bert, checkpoint, "bf16")
    assert seen == {
        "task": ["peft"],
        "lora": ["peft"],
        "blocked_after": False,  # taken out again: not a lasting change to the process
        "qlora": ["bitsandbytes", "peft"],
        "qlora_4bit": True,
    }


@pytest.mark.parametrize(
    ("env", "alive_nodes", "expected"),
    [
        ({}, 1, {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}),  # the local Ray
        ({}, 2, {}),
        ({"RAY_ADDRESS": "ray://head:10001"}, 1, {}),  # a cluster that may grow
        ({"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1"}, 1, {}),  # the user's own choice
    ],
)
def test_runs_skip_the_preemption_watcher_on_the_local_ray_only(
    monkeypatch, env, alive_nodes, expected
):
    for name in ("RAY_ADDRESS", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    nodes = [{"Alive": True}] * alive_nodes + [{"Alive": False}]
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    assert finetune.train_env() == expected
