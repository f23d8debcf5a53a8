"""Batch scoring on the shared Ray: one pinned input snapshot, one pinned registry version.

Real Ray Data, Iceberg and MLflow; a tiny LoRA checkpoint registered in a temp registry.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import score, warehouse
from jobs.config import validate_mapping
from tests.helpers import TINY_SCORE, make_lora_checkpoint, make_ticket_rows

LABELS = ["card_arrival", "lost_card", "refund"]
MODEL = "pin-router"
INBOX = "support.inbox"
RUN_DATE = "2026-11-23"
LOAD = {"text_column": "text", "label_column": "category", "key_column": "ticket_id"}


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    return validate_mapping(
        {
            "name": "score-test",
            "task": {"label_column": "category"},
            "catalog": {"uri": f"sqlite:///{root}/catalog.db", "warehouse": str(root / "wh")},
            "registry": {
                "tracking_uri": f"sqlite:///{root}/mlflow.db",
                "experiment": "score-test",
                "model_name": MODEL,
            },
            "score": {
                "input_table": INBOX,
                "output_table": "support.predictions",
                "quarantine_table": "support.quarantine",
                **TINY_SCORE,
                "run_date": RUN_DATE,
            },
        }
    )


@pytest.fixture(scope="module")
def registered(config, tiny_bert, tmp_path_factory) -> str:
    """Version of MODEL that @production points at."""
    import mlflow

    from serving import registry

    checkpoint = make_lora_checkpoint(tiny_bert, tmp_path_factory.mktemp("ckpt") / "c", LABELS)
    registry.configure_tracking(config.registry.tracking_uri, config.registry.experiment)
    mlflow.set_experiment(config.registry.experiment)
    with mlflow.start_run() as run:
        version = registry.register_checkpoint(MODEL, run.info.run_id, checkpoint, tags={})
    registry.set_alias(MODEL, "production", version)
    return version


def load_inbox(config, directory: Path, texts: list[str | None]) -> int:
    """Replace the inbox with `texts` (keys 0..n-1); the new snapshot id."""
    path = directory / f"inbox-{len(texts)}.parquet"
    category = ["x"] * len(texts)
    columns = {"text": pa.array(texts, pa.string()), "category": pa.array(category, pa.string())}
    pq.write_table(pa.table(columns), path)
    return warehouse.load_table_from_file(config.catalog, INBOX, path, **LOAD)


def texts(n: int, unusable: dict[int, str | None], seed: int) -> list[str | None]:
    rows = [row["text"] for row in make_ticket_rows(n, LABELS, seed=seed)]
    for key, value in unusable.items():
        rows[key] = value
    return rows


def keys_of(config, table: str, snapshot_id: int | None = None) -> set[int]:
    tbl = warehouse.load_catalog(config.catalog).load_table(table)
    scan = tbl.scan(selected_fields=("ticket_id",), snapshot_id=snapshot_id)
    return set(scan.to_arrow()["ticket_id"].to_pylist())


def test_scoring_and_quarantine_read_the_snapshot_pinned_at_start(
    ray_session, config, registered, tmp_path, monkeypatch
):
    import mlflow

    pinned = load_inbox(config, tmp_path, texts(60, {3: None, 17: "   "}, seed=1))
    real_snapshot, real_write = warehouse.table_snapshot, warehouse.write_predictions

    def pin_then_commit(cfg, table):  # a loader commits right after the driver pinned
        snapshot = real_snapshot(cfg, table)
        load_inbox(config, tmp_path, texts(80, {}, seed=2))
        return snapshot

    def write_then_commit(*args, **kwargs):  # ... and again between scoring and quarantine
        sink = real_write(*args, **kwargs)
        load_inbox(config, tmp_path, texts(40, dict.fromkeys(range(10), ""), seed=3))
        return sink

    downloads = []
    real_download = mlflow.artifacts.download_artifacts

    def observe_download(*args, **kwargs):
        downloads.append(kwargs.get("artifact_uri", args))
        return real_download(*args, **kwargs)

    monkeypatch.setattr(warehouse, "table_snapshot", pin_then_commit)
    monkeypatch.setattr(warehouse, "write_predictions", write_then_commit)
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", observe_download)

    result = score.main(config)

    assert downloads == []  # the driver asked the registry; only the actors downloaded
    assert result.input_snapshot_id == pinned != real_snapshot(config.catalog, INBOX)
    assert (result.model_name, result.model_version) == (MODEL, registered)
    scored = keys_of(config, config.score.output_table)
    quarantined = keys_of(config, config.score.quarantine_table)
    assert quarantined == {3, 17}
    assert scored == set(range(60)) - {3, 17}
    assert (result.rows_scored, result.rows_quarantined) == (58, 2)
    input_rows = warehouse.count_rows(config.catalog, INBOX, snapshot_id=pinned)
    assert result.rows_scored + result.rows_quarantined == input_rows == 60
    _assert_lineage(config, config.score.output_table, pinned, registered)
    _assert_lineage(config, config.score.quarantine_table, pinned, registered)


def _assert_lineage(config, table: str, snapshot_id: int, version: str) -> None:
    tbl = warehouse.load_catalog(config.catalog).load_table(table)
    from serving import tags

    summary = tbl.current_snapshot().summary
    assert summary[tags.INPUT_SNAPSHOT_ID_PROPERTY] == str(snapshot_id)
    assert summary[tags.INPUT_TABLE_PROPERTY] == INBOX
    assert summary[tags.MODEL_URI_PROPERTY] == f"models:/{MODEL}/{version}"
    assert summary[tags.RUN_DATE_PROPERTY] == RUN_DATE


def test_every_prediction_row_names_the_pinned_version(ray_session, config, registered, tmp_path):
    load_inbox(config, tmp_path, texts(40, dict.fromkeys(range(10), ""), seed=3))
    result = score.main(config)  # on the date the previous test wrote: its rows are replaced
    table = warehouse.load_catalog(config.catalog).load_table(config.score.output_table)
    rows = table.scan().to_arrow()
    assert set(rows["model_version"].to_pylist()) == {registered}
    assert set(rows["model_name"].to_pylist()) == {MODEL}
    assert set(rows["label"].to_pylist()) <= set(LABELS)
    assert (result.rows_scored, result.rows_quarantined) == (30, 10)  # the date was replaced
    assert rows.num_rows == 30


def test_resolve_version_names_the_alias_target_without_downloading(
    config, registered, monkeypatch
):
    import mlflow

    from serving import registry

    def refuse(*args, **kwargs):
        raise AssertionError("resolve_version downloaded an artifact")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", refuse)
    pinned = registry.resolve_version(f"models:/{MODEL}@production", config.registry.tracking_uri)
    assert (pinned.name, pinned.version) == (MODEL, registered)
    assert pinned.uri == f"models:/{MODEL}/{registered}"
    assert pinned.source.endswith("/checkpoint")
    with pytest.raises(LookupError, match=r"models:/pin-router@staging is not in the registry"):
        registry.resolve_version(f"models:/{MODEL}@staging", config.registry.tracking_uri)


def _with_tables(config, suffix: str, **score):
    """`config` writing to tables of its own (support.predictions_<suffix>, ...)."""
    tables = {
        "output_table": f"support.predictions_{suffix}",
        "quarantine_table": f"support.quarantine_{suffix}",
    }
    return config.model_copy(update={"score": config.score.model_copy(update={**tables, **score})})


def _table_state(config, table: str) -> tuple[int | None, list[dict]]:
    """(current snapshot id, rows sorted by key) of `table`."""
    tbl = warehouse.load_catalog(config.catalog).load_table(table)
    snapshot = tbl.current_snapshot()
    rows = tbl.scan().to_arrow().sort_by("ticket_id").to_pylist()
    return (snapshot.snapshot_id if snapshot else None), rows


def _break_table(config, table: str, column: str) -> None:
    """Give `table` an int `column` where the scorer writes text: its next write fails."""
    catalog = warehouse.load_catalog(config.catalog)
    tbl = catalog.load_table(table)
    arrow = tbl.scan().to_arrow()
    catalog.drop_table(table)
    arrow = arrow.set_column(
        arrow.column_names.index(column), column, pa.array([1] * arrow.num_rows, pa.int64())
    )
    catalog.create_table(table, arrow.schema).append(arrow)


@pytest.mark.parametrize("failing", ["output_table", "quarantine_table"])
def test_a_run_that_fails_leaves_both_tables_as_they_were(
    ray_session, config, registered, tmp_path, failing
):
    """Scoring and quarantine are written side by side; when either write fails, neither
    table may have changed (before, the other one's commit had replaced the date already)."""
    cfg = _with_tables(config, f"fails_{failing[:6]}")
    load_inbox(config, tmp_path, texts(30, {2: None, 5: ""}, seed=4))
    first = score.main(cfg)
    assert (first.rows_scored, first.rows_quarantined) == (28, 2)
    broken = getattr(cfg.score, failing)
    _break_table(cfg, broken, "label" if failing == "output_table" else "reason")
    tables = (cfg.score.output_table, cfg.score.quarantine_table)
    before = {table: _table_state(cfg, table) for table in tables}

    load_inbox(config, tmp_path, texts(20, {1: "  ", 7: None, 9: ""}, seed=5))
    with pytest.raises(Exception, match="label|reason"):
        score.main(cfg)
    assert {table: _table_state(cfg, table) for table in tables} == before


def test_an_empty_inbox_scores_nothing_on_a_first_run(ray_session, config, registered, tmp_path):
    """An inbox with no rows (a quiet night) on a first run: nothing to write, no tables to
    count in; the run reports 0 and 0 instead of failing with 'run raylift warehouse load'."""
    cfg = _with_tables(config, "empty")
    load_inbox(config, tmp_path, [])
    result = score.main(cfg)
    assert (result.rows_scored, result.rows_quarantined) == (0, 0)

    # Every text unusable, on a first run of the predictions table: all of them quarantined.
    cfg = _with_tables(config, "unusable")
    load_inbox(config, tmp_path, [None, "", "   "])
    result = score.main(cfg)
    assert (result.rows_scored, result.rows_quarantined) == (0, 3)
    assert keys_of(cfg, cfg.score.quarantine_table) == {0, 1, 2}
