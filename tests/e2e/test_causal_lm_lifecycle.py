"""The causal-LM lifecycle with a tiny random Llama: load an instruction table → finetune (QLoRA,
ZeRO-2, two Ray Train workers) → register → promote on val_perplexity (min) → serve, asked
through the official `openai` client (plain and streaming chat) → batch generation
(`raylift score`) into a completions table — real Ray, Iceberg, MLflow, DeepSpeed, peft.

Every file of the run is on object storage: a local S3 server (moto, tests/s3_server.py) holds
the base model (model.base=s3://...), the instruction file, the Iceberg warehouse, the Ray Train
checkpoints and the MLflow artifacts, reached through the standard AWS environment variables;
only the two SQLite databases (the catalog and MLflow's) are local files, besides the node's
download cache (RAYLIFT_CACHE_DIR) where the base is copied once for every process."""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

import numpy as np
import pytest

from jobs import finetune, load, promote, score, warehouse
from jobs.config import validate_mapping
from serving import tags
from tests.helpers import SERVE_PORT as PORT
from tests.helpers import load_prompts_table, make_ticket_rows, make_tiny_llama
from tests.s3_server import export_s3_env, running_s3_server

openai = pytest.importorskip("openai")

INTENTS = ["card_arrival", "lost_card", "refund"]
MODEL = "instruct-e2e"
RUN_DATE = "2026-11-25"
PROMPTS = "support.prompts"
COMPLETIONS = "support.completions"
QUARANTINE = "support.prompts_quarantine"
MESSAGES = [{"role": "user", "content": "card arrived late"}]
BUCKET = "raylift-e2e"
# Set now, at import: every Ray process of the session must start with it (tests/s3_server.py).
S3 = export_s3_env()
LOCAL_FILES = {"catalog.db", "mlflow.db"}  # all the run keeps on local disk (but the cache)


def _local_files(root) -> set[str]:
    """What the run left in its local folder, less the alias locks promote and rollback take
    beside a SQLite registry (serving.registry.alias_lock: empty files, no data)."""
    return {p.name for p in root.iterdir() if not p.name.endswith(".lock")}


def _instruction_table(server, key: str, rows: int) -> str:
    """A ticket as the prompt, its intent as the response (BANKING77 turned into instructions),
    uploaded as a CSV object; its s3:// URI."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["prompt", "response"])
    writer.writeheader()
    for row in make_ticket_rows(rows, INTENTS, seed=3):
        writer.writerow({"prompt": row["text"], "response": row["category"]})
    server.client().put_object(Bucket=BUCKET, Key=key, Body=text.getvalue().encode())
    return f"s3://{BUCKET}/{key}"


@pytest.fixture(scope="module")
def s3():
    with running_s3_server(S3) as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("causal-lm-lifecycle")


@pytest.fixture(scope="module")
def config(s3, root, tmp_path_factory):
    from cluster.storage import upload_folder

    base = f"s3://{BUCKET}/models/tiny-llama"
    upload_folder(make_tiny_llama(tmp_path_factory.mktemp("base") / "tiny-llama"), base)
    return validate_mapping(
        {
            "name": "instruct-e2e",
            "task": {"type": "causal-lm", "max_length": 32},
            "model": {
                "base": base,
                "method": "qlora",
                "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            },
            "catalog": {"uri": f"sqlite:///{root}/catalog.db", "warehouse": f"s3://{BUCKET}/wh"},
            "data": {"source": _instruction_table(s3, "data/instr.csv", 64), "inbox_rows": 0},
            "train": {
                "num_workers": 2,
                "epochs": 1,
                "batch_size": 8,
                "learning_rate": 2e-2,
                "zero_stage": 2,
                "precision": "fp32",
                "checkpoint_dir": f"s3://{BUCKET}/checkpoints",
            },
            "registry": {
                "tracking_uri": f"sqlite:///{root}/mlflow.db",
                "artifact_location": f"s3://{BUCKET}/mlartifacts",
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


def test_finetune_logs_perplexity_and_registers_a_loadable_version_with_lineage(
    trained, config, s3, root
):
    from mlflow import MlflowClient

    from jobs.modeling import load_checkpoint
    from serving.registry import resolve_model

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

    # Checkpoints, the run's state file, the registered copy and the tables are in the bucket.
    assert trained.checkpoint_path.startswith(f"s3://{BUCKET}/checkpoints/")
    best = trained.checkpoint_path.removeprefix(f"s3://{BUCKET}/")
    keys = s3.keys(BUCKET, f"{best}/")
    files = {key.removeprefix(f"{best}/") for key in keys} - {""}
    model_files = {name for name in files if "/" not in name}  # state/: what --resume needs
    assert {"adapter_model.safetensors", "adapter_config.json", "raylift.json"} <= model_files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in model_files)
    assert any(name.startswith("state/") for name in files)
    run_folder = best.rpartition("/")[0]
    assert f"{run_folder}/{finetune._STATE_FILE}" in s3.keys(BUCKET, run_folder)
    assert version.source.startswith(f"s3://{BUCKET}/mlartifacts/")
    registered = _names(s3.keys(BUCKET, f"{version.source.removeprefix(f's3://{BUCKET}/')}/"))
    assert {"adapter_model.safetensors", "raylift.json"} <= registered
    table = s3.keys(BUCKET, _table_prefix(config, config.data.table))
    assert any(k.endswith(".parquet") for k in table) and any(k.endswith(".avro") for k in table)
    assert _local_files(root) == LOCAL_FILES  # nothing else on local disk
    # The tokenizing tasks and both ranks shared one copy of the base (finetune's driver only
    # listed it): one folder, no half-written one left beside it.
    models = Path(os.environ["RAYLIFT_CACHE_DIR"]) / "models"
    assert [p.name for p in models.glob("*/tiny-llama")] == ["tiny-llama"]
    assert not [p for p in models.iterdir() if p.name.startswith(".")]

    loaded = load_checkpoint(resolve_model(trained.checkpoint_path).path)  # downloaded
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.meta.labels == [] and loaded.meta.instruct.template == "chat"
    assert loaded.meta.method == "qlora"


def test_promote_serve_through_openai_then_batch_generation(trained, config, s3, root, tmp_path):
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
        serve.delete(MODEL)  # Serve stays up for the next module (tests.helpers.SERVE_PORT)

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
    for written in (COMPLETIONS, QUARANTINE):  # the scoring job's data files are objects too
        data_files = s3.keys(BUCKET, f"{_table_prefix(config, written)}data/")
        assert any(key.endswith(".parquet") for key in data_files), written
    assert _local_files(root) == LOCAL_FILES


def _names(keys: list[str]) -> set[str]:
    return {key.rpartition("/")[2] for key in keys}


def _table_prefix(config, table: str) -> str:
    """The key prefix of `table`'s files in the bucket (its Iceberg location)."""
    location = warehouse.load_catalog(config.catalog).load_table(table).location()
    assert location.startswith(f"s3://{BUCKET}/wh/"), location
    return f"{location.removeprefix(f's3://{BUCKET}/')}/"
