"""The causal-LM lifecycle with a tiny random Llama: load an instruction table → finetune (QLoRA,
ZeRO-2, two Ray Train workers) → register → promote on val_perplexity (min) → serve, asked
through the official `openai` client (plain and streaming chat) → batch generation
(`raylift score`) into a completions table — real Ray, Iceberg, MLflow, DeepSpeed, peft."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from jobs import finetune, load, promote, score, warehouse
from jobs.config import validate_mapping
from serving import tags
from tests.helpers import load_prompts_table, make_ticket_rows, make_tiny_llama

openai = pytest.importorskip("openai")

INTENTS = ["card_arrival", "lost_card", "refund"]
MODEL = "instruct-e2e"
PORT = 8141
RUN_DATE = "2026-11-25"
PROMPTS = "support.prompts"
COMPLETIONS = "support.completions"
QUARANTINE = "support.prompts_quarantine"
MESSAGES = [{"role": "user", "content": "card arrived late"}]


def _instruction_table(path: Path, rows: int) -> Path:
    """A ticket as the prompt, its intent as the response (BANKING77 turned into instructions)."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "response"])
        writer.writeheader()
        for row in make_ticket_rows(rows, INTENTS, seed=3):
            writer.writerow({"prompt": row["text"], "response": row["category"]})
    return path


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal-lm-lifecycle")
    base = make_tiny_llama(root / "tiny-llama")
    return validate_mapping(
        {
            "name": "instruct-e2e",
            "task": {"type": "causal-lm", "max_length": 32},
            "model": {
                "base": base,
                "method": "qlora",
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
            },
            "registry": {
                "tracking_uri": f"sqlite:///{root}/mlflow.db",
                "experiment": "instruct-e2e",
                "model_name": MODEL,
                "build_engines": False,
            },
            # A ceiling far above a random 60-token vocabulary's perplexity: the gate is
            # exercised in mode min without depending on how much one epoch learned.
            "promote": {"metric": "val_perplexity", "mode": "min", "max_value": 1e4},
            "serve": {
                "port": PORT,
                "num_cpus": 0.5,
                "torch_threads": 1,
                "precision": "fp32",
                "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                "generation": {"max_new_tokens": 6, "temperature": 0.0},
            },
            "score": {
                "input_table": PROMPTS,
                "output_table": COMPLETIONS,
                "quarantine_table": QUARANTINE,
                "concurrency": 1,
                "num_cpus": 0.5,
                "torch_threads": 1,
                "batch_size": 8,
                "precision": "fp32",
                "run_date": RUN_DATE,
                "generation": {"max_new_tokens": 4},
            },
        }
    )


@pytest.fixture(scope="module")
def trained(ray_session, config):
    load.main(config)
    return finetune.main(config)


def test_finetune_logs_perplexity_and_registers_a_loadable_version_with_lineage(trained, config):
    from mlflow import MlflowClient

    from jobs.modeling import load_checkpoint

    assert trained.version == "1"
    client = MlflowClient(config.registry.tracking_uri)
    history = client.get_metric_history(trained.run_id, "val_perplexity")
    assert [m.step for m in history] == [1]  # one value per epoch
    perplexity = history[0].value
    val_loss = client.get_metric_history(trained.run_id, "val_loss")[0].value
    assert math.isclose(perplexity, math.exp(val_loss), rel_tol=1e-6)  # token-weighted pair
    assert 1.0 < perplexity < 1e4
    assert trained.metrics["train_tokens_per_s"] > 0

    version = client.get_model_version(MODEL, trained.version)
    assert float(version.tags[tags.metric_tag("val_perplexity")]) == pytest.approx(perplexity)
    assert int(version.tags[tags.VALIDATION_ROWS]) == trained.metrics["val_rows"] > 0
    assert version.tags[tags.ICEBERG_TABLE] == config.data.table
    assert int(version.tags[tags.ICEBERG_SNAPSHOT_ID]) > 0
    assert version.tags[tags.BASE_MODEL] == config.model.base
    assert version.tags[tags.METHOD] == "qlora" and version.tags[tags.TASK] == "causal-lm"
    assert len(version.tags[tags.CONFIG_HASH]) == 12 and version.tags[tags.GIT_SHA]

    files = {p.name for p in Path(trained.checkpoint_path).iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "raylift.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    loaded = load_checkpoint(trained.checkpoint_path)
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.meta.labels == [] and loaded.meta.instruct.template == "chat"
    assert loaded.meta.method == "qlora"


def test_promote_serve_through_openai_then_batch_generation(trained, config, tmp_path):
    from ray import serve

    from serving import app
    from serving.generation import SamplingParams
    from serving.predictor import Predictor
    from serving.registry import get_alias_version

    promoted = promote.main(config, version=trained.version)
    assert (promoted.version, promoted.metric) == (trained.version, "val_perplexity")
    assert str(get_alias_version(MODEL, "production").version) == trained.version

    # What the served and batch answers must be: the registered checkpoint, generated here.
    local = Predictor(
        trained.checkpoint_path, precision="fp32", generation_config=config.score.generation
    )
    expected = local.generate([MESSAGES], SamplingParams(max_new_tokens=5, temperature=0.0))[0]

    base_url = app.deploy(config)
    try:
        with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as api:
            answer = api.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5)
            chunks = list(
                api.chat.completions.create(
                    model=MODEL, messages=MESSAGES, max_tokens=5, stream=True
                )
            )
    finally:
        serve.delete(MODEL)
        serve.shutdown()

    assert answer.model == MODEL and answer.system_fingerprint == f"version-{trained.version}"
    assert answer.choices[0].message.content == expected.text
    assert answer.choices[0].finish_reason == expected.finish_reason
    assert answer.usage.prompt_tokens == expected.prompt_tokens > 0
    assert answer.usage.completion_tokens == expected.completion_tokens >= 1
    assert answer.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == expected.text
    assert {c.system_fingerprint for c in chunks} == {f"version-{trained.version}"}
    assert chunks[-1].choices == [] and chunks[-1].usage == answer.usage

    prompts = ["card arrived late", "   ", "refund fee pending", "lost card stolen pin"]
    load_prompts_table(config, PROMPTS, tmp_path, prompts)
    result = score.main(config)  # the production alias: the promoted version

    assert (result.model_name, result.model_version) == (MODEL, trained.version)
    assert (result.rows_scored, result.rows_quarantined) == (3, 1)
    catalog = warehouse.load_catalog(config.catalog)
    table = catalog.load_table(COMPLETIONS).scan().to_arrow()
    rows = {row["ticket_id"]: row for row in table.to_pylist()}
    assert sorted(rows) == [0, 2, 3]
    want = local({"prompt": np.array(prompts, dtype=object)})  # each prompt as one user turn
    for key, row in rows.items():
        assert (row["model_name"], row["model_version"]) == (MODEL, trained.version)
        assert str(row["run_date"]) == RUN_DATE and row["error"] is None
        assert row["completion"] == want["completion"][key]
        assert row["completion_tokens"] == want["completion_tokens"][key] >= 1
        assert row["prompt_tokens"] == want["prompt_tokens"][key]
    quarantined = catalog.load_table(QUARANTINE).scan().to_arrow()
    assert quarantined["ticket_id"].to_pylist() == [1]
