"""Engines end to end on the shared Ray: a version registered from a real warehouse table gets
its engines checked on its own validation split, and the scoring job's Ray Data actors run each
engine, label like torch, and report what they ran in the run's summary."""

from __future__ import annotations

import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest
from ray.experimental import internal_kv

from jobs import score, tracking, warehouse
from jobs.config import validate_mapping
from serving import engines, tags
from tests.helpers import make_lora_checkpoint, make_ticket_rows

LABELS = ["card_arrival", "lost_card", "refund"]
MODEL = "engine-router"
TICKETS = "support.tickets"
INBOX = "support.inbox"
LOAD = {"text_column": "text", "label_column": "category", "key_column": "ticket_id"}


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    return validate_mapping(
        {
            "name": "engines-test",
            "task": {"label_column": "category"},
            "data": {"table": TICKETS, "validation": {"fraction": 0.25, "seed": 7}},
            "catalog": {"uri": f"sqlite:///{root}/catalog.db", "warehouse": str(root / "wh")},
            "registry": {
                "tracking_uri": f"sqlite:///{root}/mlflow.db",
                "experiment": "engines-test",
                "model_name": MODEL,
            },
            "score": {
                "input_table": INBOX,
                "output_table": "support.predictions",
                "quarantine_table": "support.quarantine",
                "concurrency": 1,
                "num_cpus": 0.5,
                "torch_threads": 1,
                "batch_size": 64,
            },
        }
    )


def _load(config, directory, table: str, rows: list[dict]) -> int:
    path = directory / f"{table}.parquet"
    pq.write_table(
        pa.table({"text": [r["text"] for r in rows], "category": [r["category"] for r in rows]}),
        path,
    )
    return warehouse.load_table_from_file(config.catalog, table, path, **LOAD)


@pytest.fixture(scope="module")
def registered(config, tiny_bert, tmp_path_factory) -> tuple[str, dict[str, str]]:
    """A version registered as finetune registers it: lineage naming the table, snapshot and
    split, so registration builds engines on those validation rows."""
    from mlflow import MlflowClient

    from serving import registry

    directory = tmp_path_factory.mktemp("data")
    snapshot = _load(config, directory, TICKETS, make_ticket_rows(160, LABELS, seed=11))
    _load(config, directory, INBOX, make_ticket_rows(300, LABELS, seed=12))
    checkpoint = make_lora_checkpoint(tiny_bert, directory / "ckpt", LABELS)
    lineage = tracking.lineage_tags(
        config, {tags.ICEBERG_TABLE: TICKETS, tags.ICEBERG_SNAPSHOT_ID: str(snapshot)}
    )
    with tracking.tracked_run(config, lineage) as run_id:
        version = tracking.register(config, run_id, checkpoint, lineage, {"val_accuracy": 0.5})
    registry.set_alias(MODEL, "production", version)
    return version, MlflowClient().get_model_version(MODEL, version).tags


def test_registration_checks_engines_on_the_versions_validation_split(config, registered):
    _, version_tags = registered
    rows = tracking.engine_rows(config, version_tags)
    assert len(rows.texts) == 40  # 25% of 160, stratified per label as training splits it
    assert "support.tickets@" in rows.source and "fraction=0.25,seed=7" in rows.source
    offered = version_tags[tags.ENGINES_OFFERED].split(",")
    assert {"torch-fp32", "onnxruntime-fp32", "openvino-fp32"} <= set(offered)
    assert version_tags[tags.ENGINE_FORMAT] == "1"


# Every variant labels like fp32 torch in tests/unit/test_engines.py; here, the scoring actors
# load a built engine: the quantized one (the likeliest to drift) and auto's measured pick (each
# run is a Ray Data scoring job, about 20 s here).
_RUNS = [("onnxruntime", "int8"), ("auto", "auto")]


@pytest.mark.parametrize(("engine", "precision"), _RUNS)
def test_scoring_actors_run_the_engine_and_label_like_torch(
    ray_session, config, registered, engine, precision
):
    reference = _score(config, "torch", "fp32", "2026-11-01")
    got = _score(config, engine, precision, f"2026-11-0{2 + _RUNS.index((engine, precision))}")

    runtime = got["result"].runtime
    assert len(runtime) == 1 and runtime[0]["threads"] == 1
    if engine != "auto":
        assert runtime[0] == {"engine": engine, "precision": precision, "threads": 1}
    assert reference["result"].runtime == [{"engine": "torch", "precision": "fp32", "threads": 1}]
    board = internal_kv._internal_kv_list("runtime/", namespace=score.RuntimeBoard._NAMESPACE)
    assert board == [], "the runs left their runtime posts in Ray's key-value store"
    assert got["labels"].keys() == reference["labels"].keys() and len(got["labels"]) == 300
    same = np.mean([got["labels"][k] == reference["labels"][k] for k in reference["labels"]])
    assert same >= engines.MIN_AGREEMENT


_CACHE: dict[tuple[str, str, str], dict] = {}


def _score(config, engine: str, precision: str, run_date: str) -> dict:
    """score.main with `engine`, once per (engine, precision, date): result and key → label."""
    key = (engine, precision, run_date)
    if key not in _CACHE:
        run = config.model_copy(
            update={
                "score": config.score.model_copy(
                    update={
                        "engine": engine,
                        "precision": precision,
                        "run_date": datetime.date.fromisoformat(run_date),
                    }
                )
            }
        )
        result = score.main(run)
        tbl = warehouse.load_catalog(config.catalog).load_table(config.score.output_table)
        arrow = tbl.scan().to_arrow()
        arrow = arrow.filter(pa.compute.equal(arrow["run_date"].cast(pa.string()), run_date))
        labels = dict(zip(arrow["ticket_id"].to_pylist(), arrow["label"].to_pylist(), strict=True))
        _CACHE[key] = {"result": result, "labels": labels}
    return _CACHE[key]
