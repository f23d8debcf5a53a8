"""The whole lifecycle on a small sample with a tiny random BERT: load → finetune → register →
promote → serve → batch score (twice, same date) — real Ray, Iceberg, MLflow, DeepSpeed, peft."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from jobs import finetune, load, promote, score
from serving import tags as tag_names
from tests.helpers import SERVE_PORT, make_ticket_rows, tiny_lifecycle

LABELS = ["card_arrival", "lost_card", "refund", "exchange_rate"]


@pytest.fixture(scope="module")
def lifecycle_config(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("lifecycle")
    rows = make_ticket_rows(240, LABELS, seed=3)
    rows[5]["text"] = ""  # the inbox will carry one row that cannot be scored
    return tiny_lifecycle(
        root,
        tiny_bert,
        rows,
        name="e2e",
        data={"inbox_rows": 120},
        # 6 epochs: on some random tiny bases 2 epochs left the model at chance; 6 learned on
        # every one of 8 bases tried (14 steps an epoch, about a second each)
        train={"num_workers": 2, "epochs": 6, "learning_rate": 2e-2, "zero_stage": 2},
        registry={"experiment": "e2e", "model_name": "e2e-router", "build_engines": True},
        promote={"min_value": 0.0},
        serve={
            "port": SERVE_PORT,
            "num_cpus": 0.5,
            "torch_threads": 1,
            "autoscaling": {"min_replicas": 1, "max_replicas": 1},
        },
        score={"run_date": "2026-11-21", "batch_size": 64, "num_cpus": 0.5, "torch_threads": 1},
    )


@pytest.fixture(scope="module")
def trained(ray_session, lifecycle_config):
    load.main(lifecycle_config)
    return finetune.main(lifecycle_config)


def test_finetune_registers_a_checkpoint_with_lineage(trained, lifecycle_config):
    from mlflow import MlflowClient

    # Each label has its own anchor word, twice per text: a model that learned anything is far
    # above chance (0.25 for 4 balanced labels). On the 24 validation rows, a model guessing at
    # chance reaches 0.5 with probability about 0.3% (binomial tail, n=24, p=0.25).
    assert trained.metrics["val_accuracy"] >= 2 / len(LABELS)
    files = {p.name for p in Path(trained.checkpoint_path).iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "raylift.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    meta = json.loads((Path(trained.checkpoint_path) / "raylift.json").read_text())
    assert meta["labels"] == sorted(LABELS) and meta["task"] == "sequence-classification"

    version = MlflowClient().get_model_version("e2e-router", trained.version)
    tags = version.tags
    assert tags["raylift.iceberg_table"] == "support.tickets"
    assert tags[tag_names.ROWS_REFUSED] == "1"  # the blank text was counted, never trained on
    assert int(tags["raylift.iceberg_snapshot_id"]) > 0
    assert tags["raylift.base_model"] == lifecycle_config.model.base
    assert len(tags["raylift.config_hash"]) == 12 and tags["raylift.git_sha"]
    assert float(tags["metric.val_accuracy"]) == pytest.approx(trained.metrics["val_accuracy"])
    run = MlflowClient().get_run(trained.run_id)
    assert run.info.status == "FINISHED"
    history = MlflowClient().get_metric_history(trained.run_id, "val_accuracy")
    by_epoch = {m.step: m.value for m in history}
    assert sorted(by_epoch) == list(range(1, lifecycle_config.train.epochs + 1))
    # the registered checkpoint is the epoch with the best val_accuracy in the run's history
    best = max(by_epoch.values())
    assert by_epoch[trained.metrics["epoch"]] == pytest.approx(best)
    assert trained.metrics["val_accuracy"] == pytest.approx(best)


def test_promote_serve_and_score(trained, lifecycle_config):
    from serving import app
    from serving.registry import get_alias_version

    promoted = promote.main(lifecycle_config, version=trained.version)
    assert promoted.version == trained.version
    assert str(get_alias_version("e2e-router", "production").version) == trained.version

    base_url = app.deploy(lifecycle_config)
    url = f"{base_url}/v1/models/e2e-router/predict"
    answer = httpx.post(url, json={"texts": ["card arrived late", "refund fee"]}, timeout=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model_version"] == trained.version
    assert [p["label"] in LABELS for p in body["predictions"]] == [True, True]
    assert httpx.post(url, json={"texts": []}, timeout=30).status_code == 422

    first = score.main(lifecycle_config)
    again = score.main(lifecycle_config)
    assert first.model_version == trained.version
    assert first.rows_scored + first.rows_quarantined == 120
    assert again.rows_scored == first.rows_scored  # same date replaced, never duplicated
    _assert_predictions_table(lifecycle_config, first)


def _assert_predictions_table(config, result):
    from jobs.warehouse import load_catalog

    table = load_catalog(config.catalog).load_table(config.score.output_table).scan().to_arrow()
    assert table.num_rows == result.rows_scored
    assert len(set(table.column("ticket_id").to_pylist())) == table.num_rows
    assert set(table.column("model_version").to_pylist()) == {result.model_version}
    assert set(table.column("model_name").to_pylist()) == {"e2e-router"}
    assert set(table.column("run_date").to_pylist()) == {"2026-11-21"}
    assert set(table.column("label").to_pylist()) <= set(LABELS)
