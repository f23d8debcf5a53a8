"""Warehouse I/O through Ray Data on the shared local Ray: pinned reads, the split, predictions."""

from __future__ import annotations

import csv
import datetime as dt
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from ray.data.expressions import col

from jobs import warehouse
from jobs.config import CatalogConfig
from serving import tags
from tests.helpers import make_ticket_rows

LABELS = ["card_arrival", "lost_card", "refund", "exchange_rate"]
LOAD = {"text_column": "text", "label_column": "category", "key_column": "ticket_id"}
ROWS = 240


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> CatalogConfig:
    root = tmp_path_factory.mktemp("warehouse")
    return CatalogConfig(uri=f"sqlite:///{root}/catalog.db", warehouse=str(root / "wh"))


@pytest.fixture(scope="module")
def tickets_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("source") / "tickets.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "category"])
        writer.writeheader()
        writer.writerows(make_ticket_rows(ROWS, LABELS))
    return path


@pytest.fixture(scope="module")
def tickets(cfg, tickets_csv) -> int:
    """support.tickets loaded once; the snapshot id."""
    return warehouse.load_table_from_file(cfg, "support.tickets", tickets_csv, **LOAD)


def to_arrow(ds) -> pa.Table:
    import ray

    return pa.concat_tables(ray.get(ds.to_arrow_refs()))


def test_read_table_returns_the_loaded_rows(ray_session, cfg, tickets):
    ds = warehouse.read_table(cfg, "support.tickets")
    assert ds.columns() == ["ticket_id", "text", "category"]
    rows = to_arrow(ds)
    assert sorted(rows["ticket_id"].to_pylist()) == list(range(ROWS))
    assert Counter(rows["category"].to_pylist()) == {label: ROWS // 4 for label in LABELS}
    narrow = warehouse.read_table(cfg, "support.tickets", columns=["ticket_id", "category"])
    assert narrow.columns() == ["ticket_id", "category"]
    with pytest.raises(ValueError, match="has no column 'label'"):
        warehouse.read_table(cfg, "support.tickets", columns=["label"])


def test_a_read_asks_for_no_more_tasks_than_the_table_has_files(ray_session, cfg, tickets):
    """Ray lowers a larger parallelism itself, but warned "Reducing the parallelism to 1, as
    that is the number of files" at each read of a small table (six times in `make demo`)."""
    import logging

    warned: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = warned.append  # type: ignore[method-assign]
    ray_data = logging.getLogger("ray.data")  # Ray's own handlers; it does not propagate
    ray_data.addHandler(handler)
    try:
        rows = to_arrow(warehouse.read_table(cfg, "support.tickets"))
    finally:
        ray_data.removeHandler(handler)
    assert rows.num_rows == ROWS
    assert [r.getMessage() for r in warned if "parallelism" in r.getMessage()] == []


def test_snapshot_read_sees_the_old_rows_after_a_reload(ray_session, cfg, tickets_csv):
    old = warehouse.load_table_from_file(cfg, "support.pinned", tickets_csv, **LOAD)
    pinned = warehouse.read_table(cfg, "support.pinned", snapshot_id=old)
    current_at_start = warehouse.read_table(cfg, "support.pinned")  # pinned when built
    new = warehouse.load_table_from_file(
        cfg, "support.pinned", tickets_csv, sample_rows=50, seed=1, **LOAD
    )
    assert warehouse.table_snapshot(cfg, "support.pinned") == new != old
    assert pinned.count() == ROWS and current_at_start.count() == ROWS
    assert warehouse.read_table(cfg, "support.pinned").count() == 50


def test_dataset_pickles_after_it_was_consumed(ray_session, cfg, tickets):
    import ray

    ds = warehouse.read_table(cfg, "support.tickets", snapshot_id=tickets)
    assert ds.count() == ROWS  # caches the pyiceberg table (and its SQLAlchemy engine)
    clone = ray.cloudpickle.loads(ray.cloudpickle.dumps(ds))
    assert clone.count() == ROWS
    assert sorted(to_arrow(clone)["ticket_id"].to_pylist()) == list(range(ROWS))

    # The trap IcebergTableSource exists for: Ray's own datasource does not survive this.
    plain = ray.data.read_iceberg(
        table_identifier="support.tickets", catalog_kwargs=warehouse.catalog_properties(cfg)
    )
    plain.count()
    with pytest.raises(TypeError, match="weakref"):
        ray.cloudpickle.dumps(plain)


def test_split_through_ray_data_gives_the_exact_counts(ray_session, cfg, tickets):
    labels = warehouse.scan_labels(
        cfg,
        "support.tickets",
        snapshot_id=tickets,
        key_column="ticket_id",
        label_column="category",
    )
    keys, values = labels["ticket_id"].to_numpy(), labels["category"].to_numpy()
    thresholds = warehouse.split_thresholds(keys, values, fraction=0.1, seed=17)
    held = warehouse.key_hash(keys, 17) < np.array([thresholds[v] for v in values])
    expected = Counter(values[held].tolist())
    assert expected == {label: 6 for label in LABELS}  # round(0.1 * 60)

    source = warehouse.read_table(cfg, "support.tickets", snapshot_id=tickets)
    sides = {}
    for keep in ("train", "validation"):
        split = warehouse.SplitFilter(thresholds, "ticket_id", "category", keep, seed=17)
        sides[keep] = to_arrow(source.map_batches(split, batch_format="pyarrow", batch_size=17))
    assert Counter(sides["validation"]["category"].to_pylist()) == expected
    assert sides["train"].num_rows == ROWS - sum(expected.values())
    train, held = (set(sides[k]["ticket_id"].to_pylist()) for k in ("train", "validation"))
    assert not train & held and train | held == set(range(ROWS))


def test_one_worker_reads_every_row_itself_and_two_get_whole_validation(ray_session):
    """jobs.training_data.EveryEvalRowConfig: one worker gets each dataset unsplit (no split
    coordinator) with the run's execution options; two workers get equal train shards and
    validation shards that hold every row between them."""
    import copy

    import ray
    from ray.data import DataContext

    from jobs.training_data import EveryEvalRowConfig

    datasets = {
        "train": ray.data.range(11, override_num_blocks=3),
        "validation": ray.data.range(9, override_num_blocks=3),
    }
    ordered = copy.deepcopy(DataContext.get_current().execution_options)
    ordered.preserve_order = True
    config = EveryEvalRowConfig(execution_options={"train": ordered})

    (alone,) = config.configure(datasets, 1, None, None)
    assert {name: type(it).__name__ for name, it in alone.items()} == {
        "train": "DataIteratorImpl",
        "validation": "DataIteratorImpl",
    }
    assert [row["id"] for row in alone["train"].iter_rows()] == list(range(11))  # in order
    assert sorted(row["id"] for row in alone["validation"].iter_rows()) == list(range(9))
    assert sorted(row["id"] for row in alone["train"].iter_rows()) == list(range(11))  # again

    pair = config.configure(datasets, 2, None, None)
    seen = {name: [[], []] for name in datasets}

    def consume(rank: int) -> None:
        for name in datasets:
            seen[name][rank] = [row["id"] for row in pair[rank][name].iter_rows()]

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:  # a split hands out blocks only while both ranks read
        list(pool.map(consume, [0, 1]))
    assert len(seen["train"][0]) == len(seen["train"][1])  # equal: at most one row dropped
    assert sorted(seen["validation"][0] + seen["validation"][1]) == list(range(9))


# --- predictions ----------------------------------------------------------------------------

SCORED_AT = dt.datetime(2024, 6, 1, 2, 30)


def predictions(keys: range, run_date: str, score: float, blocks: int = 1):
    import ray

    n = len(keys)
    table = pa.table(
        {
            "ticket_id": pa.array(keys, pa.int64()),
            "label": [LABELS[k % 4] for k in keys],
            "score": [score] * n,
            "model_name": ["ticket-router"] * n,
            "model_version": ["7"] * n,
            "scored_at": pa.array([SCORED_AT] * n, pa.timestamp("ns")),  # naive ns, as pandas makes
            "run_date": [run_date] * n,
        }
    )
    step = -(-n // blocks)
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, n, step)])


def stored(cfg, table: str) -> pa.Table:
    return warehouse.load_catalog(cfg).load_table(table).scan().to_arrow()


def per_date(cfg, table: str) -> dict[str, tuple[int, set[float]]]:
    rows = stored(cfg, table)
    out = {}
    for date in set(rows["run_date"].to_pylist()):
        day = rows.filter(pa.compute.equal(rows["run_date"], date))
        keys = day["ticket_id"].to_pylist()
        assert len(keys) == len(set(keys)), f"duplicate keys on {date}"
        out[date] = (len(keys), set(day["score"].to_pylist()))
    return out


def snapshots(cfg, table: str) -> list:
    return warehouse.load_catalog(cfg).load_table(table).snapshots()


def commits(cfg, table: str) -> int:
    """Catalog commits so far: each writes one metadata file."""
    return len(warehouse.load_catalog(cfg).load_table(table).metadata.metadata_log)


def test_rerunning_a_date_replaces_its_rows_in_one_snapshot(ray_session, cfg):
    table = "support.preds_rerun"
    warehouse.write_predictions(
        predictions(range(100), "2024-06-01", 0.1, blocks=3), cfg, table, run_date="2024-06-01"
    )
    warehouse.write_predictions(
        predictions(range(40), "2024-06-02", 0.2), cfg, table, run_date="2024-06-02"
    )
    before, commits_before = len(snapshots(cfg, table)), commits(cfg, table)
    warehouse.write_predictions(
        predictions(range(70), "2024-06-01", 0.3, blocks=2), cfg, table, run_date="2024-06-01"
    )
    assert commits(cfg, table) == commits_before + 1

    assert per_date(cfg, table) == {"2024-06-01": (70, {0.3}), "2024-06-02": (40, {0.2})}
    history = snapshots(cfg, table)
    assert len(history) == before + 1  # no intermediate "day deleted" snapshot
    assert history[-1].summary["deleted-records"] == "100"
    assert history[-1].summary[tags.RUN_DATE_PROPERTY] == "2024-06-01"
    rows = stored(cfg, table)
    assert rows.schema.field("scored_at").type == pa.timestamp("us", tz="UTC")
    assert rows["scored_at"][0].as_py() == SCORED_AT.replace(tzinfo=dt.UTC)
    assert warehouse.count_rows(cfg, table, run_date="2024-06-01") == 70


def test_a_file_mixing_dates_keeps_the_other_dates_rows(ray_session, cfg):
    # A table made elsewhere, unpartitioned, with two dates in one data file: the date's rows
    # cannot go by dropping files, so pyiceberg rewrites that file (still one commit).
    table = "support.preds_mixed"
    mixed = pa.concat_tables(
        to_arrow(predictions(range(n), date, 0.1))
        for n, date in ((10, "2024-06-01"), (5, "2024-06-02"))
    )
    mixed = mixed.set_column(5, "scored_at", mixed["scored_at"].cast(pa.timestamp("us", "UTC")))
    catalog = warehouse.load_catalog(cfg)
    catalog.create_namespace_if_not_exists("support")
    catalog.create_table(table, mixed.schema).append(mixed)
    commits_before = commits(cfg, table)

    warehouse.write_predictions(
        predictions(range(3), "2024-06-01", 0.9), cfg, table, run_date="2024-06-01"
    )
    assert per_date(cfg, table) == {"2024-06-01": (3, {0.9}), "2024-06-02": (5, {0.1})}
    assert commits(cfg, table) == commits_before + 1


def test_columns_added_by_the_last_map_reach_a_new_table(ray_session, cfg):
    import ray

    # The scorer's last step adds the prediction columns in a task that Ray would fuse with
    # the write; the new table must still be created with those columns.
    def stamp(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["ticket_id"])
        return {
            **batch,
            "label": np.array(["refund"] * n, dtype=object),
            "score": np.full(n, 0.75),
            "model_name": np.array(["ticket-router"] * n, dtype=object),
            "model_version": np.array(["7"] * n, dtype=object),
            "scored_at": np.full(n, np.datetime64("2024-06-01T02:30:00", "us")),
            "run_date": np.array(["2024-06-01"] * n, dtype=object),
        }

    keys = ray.data.from_arrow(pa.table({"ticket_id": pa.array(range(30), pa.int64())}))
    scored = keys.map_batches(stamp, batch_format="numpy")
    warehouse.write_predictions(scored, cfg, "support.preds_fused", run_date="2024-06-01")
    rows = stored(cfg, "support.preds_fused")
    assert rows.column_names == ["ticket_id", *warehouse.PREDICTION_COLUMNS]
    assert rows.num_rows == 30


def test_a_failed_write_leaves_the_table_as_it_was(ray_session, cfg):
    table = "support.preds_failed"
    warehouse.write_predictions(
        predictions(range(100), "2024-06-01", 0.1), cfg, table, run_date="2024-06-01"
    )
    before = warehouse.table_snapshot(cfg, table)

    def _fail_on_key(batch: pa.Table) -> pa.Table:  # nested: Ray workers cannot import tests
        if 150 in batch["ticket_id"].to_pylist():
            raise RuntimeError("scorer crashed midway")
        return batch

    crashing = predictions(range(200), "2024-06-01", 0.9, blocks=4).map_batches(
        _fail_on_key, batch_format="pyarrow"
    )
    with pytest.raises(Exception, match="scorer crashed midway"):
        warehouse.write_predictions(crashing, cfg, table, run_date="2024-06-01")
    wrong_date = predictions(range(10), "2024-06-02", 0.9)
    with pytest.raises(Exception, match="run_date other than '2024-06-01'"):
        warehouse.write_predictions(wrong_date, cfg, table, run_date="2024-06-01")

    assert warehouse.table_snapshot(cfg, table) == before
    assert per_date(cfg, table) == {"2024-06-01": (100, {0.1})}

    # A first write that fails does not leave an empty table behind.
    with pytest.raises(Exception, match="scorer crashed midway"):
        warehouse.write_predictions(crashing, cfg, "support.preds_never", run_date="2024-06-01")
    with pytest.raises(LookupError, match="not found"):
        warehouse.table_snapshot(cfg, "support.preds_never")


def test_an_empty_run_clears_its_date(ray_session, cfg):
    table = "support.preds_empty"
    for date in ("2024-06-01", "2024-06-02"):
        warehouse.write_predictions(predictions(range(20), date, 0.5), cfg, table, run_date=date)
    nothing = predictions(range(20), "2024-06-02", 0.5).filter(expr=col("ticket_id") < 0)
    warehouse.write_predictions(nothing, cfg, table, run_date="2024-06-02")
    assert per_date(cfg, table) == {"2024-06-01": (20, {0.5})}


def test_quarantine_rows_carry_their_reason_and_date(ray_session, cfg):
    import ray

    # All-None text arrives as pa.null(), which Iceberg cannot store: the table gets a string.
    bad = ray.data.from_items([{"ticket_id": 5, "text": None}, {"ticket_id": 9, "text": None}])
    for _ in range(2):  # idempotent like predictions
        warehouse.write_quarantine(
            bad, cfg, "support.quarantine", run_date="2024-06-01", reason="text is empty"
        )
        assert warehouse.rows_on_date(cfg, "support.quarantine", "2024-06-01") == 2
    rows = stored(cfg, "support.quarantine")
    assert sorted(rows["ticket_id"].to_pylist()) == [5, 9]
    assert set(rows["reason"].to_pylist()) == {"text is empty"}
    schema = warehouse.load_catalog(cfg).load_table("support.quarantine").schema()
    assert str(schema.find_field("text").field_type) == "string"

    # Blocks with no rows and no columns (what a row filter that keeps nothing yields).
    none = bad.map_batches(lambda batch: pa.table({}), batch_format="pyarrow")
    warehouse.write_quarantine(
        none, cfg, "support.quarantine_none", run_date="2024-06-01", reason="x"
    )
    assert warehouse.rows_on_date(cfg, "support.quarantine_none", "2024-06-01") == 0
    with pytest.raises(LookupError):  # no rows, no table
        warehouse.table_snapshot(cfg, "support.quarantine_none")


def _commit_rows(cfg, table: str, run_date: str, keys: range) -> None:
    """Commit `keys` for `run_date` to `table` as another scoring job would."""
    tbl = warehouse.load_catalog(cfg).load_table(table)
    n = len(keys)
    rows = {
        "ticket_id": list(keys),
        "label": ["refund"] * n,
        "score": [0.5] * n,
        "model_name": ["ticket-router"] * n,
        "model_version": ["6"] * n,
        "scored_at": [dt.datetime(2024, 6, 1, tzinfo=dt.UTC)] * n,
        "run_date": [run_date] * n,
    }
    tbl.append(pa.Table.from_pydict(rows, schema=tbl.schema().as_arrow()))


@pytest.mark.parametrize("other_date", ["2024-06-02", "2024-06-01"])
def test_a_commit_by_another_job_during_the_write_neither_fails_nor_duplicates(
    ray_session, cfg, other_date, monkeypatch
):
    """Two scoring jobs on one table (a backfill beside the nightly run, or the same date run
    twice): the other job commits after this one's write started, before its commit. This
    one's commit must be based on the table as it is then: another date's rows stay, the same
    date's are replaced (the last run's rows, none twice)."""
    table = f"support.preds_concurrent_{other_date[-1]}"
    warehouse.write_predictions(
        predictions(range(100), "2024-06-01", 0.1), cfg, table, run_date="2024-06-01"
    )
    real_start = warehouse.RunDateSink.on_write_start

    def start_then_other_job_commits(sink, schema=None):
        real_start(sink, schema)
        _commit_rows(cfg, table, other_date, range(1000, 1007))

    monkeypatch.setattr(warehouse.RunDateSink, "on_write_start", start_then_other_job_commits)
    ours = predictions(range(50), "2024-06-01", 0.3)
    warehouse.write_predictions(ours, cfg, table, run_date="2024-06-01")

    if other_date == "2024-06-01":
        assert per_date(cfg, table) == {"2024-06-01": (50, {0.3})}
    else:
        assert per_date(cfg, table) == {"2024-06-01": (50, {0.3}), "2024-06-02": (7, {0.5})}
    assert snapshots(cfg, table)[-1].summary[tags.RUN_DATE_PROPERTY] == "2024-06-01"


def test_a_deferred_write_changes_nothing_until_committed(ray_session, cfg):
    """What a job writing two tables relies on: a staged write is invisible until commit(),
    and discard() leaves the catalog as it was (a table the write created goes too)."""
    table = "support.preds_deferred"
    first = warehouse.write_predictions(
        predictions(range(10), "2024-06-01", 0.1),
        cfg,
        table,
        run_date="2024-06-01",
        defer_commit=True,
    )
    assert warehouse.rows_on_date(cfg, table, "2024-06-01") == 0  # created, nothing in it yet
    first.discard()
    with pytest.raises(LookupError, match="not found"):
        warehouse.table_snapshot(cfg, table)

    warehouse.write_predictions(
        predictions(range(10), "2024-06-01", 0.1), cfg, table, run_date="2024-06-01"
    )
    before = warehouse.table_snapshot(cfg, table)
    staged = warehouse.write_predictions(
        predictions(range(4), "2024-06-01", 0.2),
        cfg,
        table,
        run_date="2024-06-01",
        defer_commit=True,
    )
    assert warehouse.table_snapshot(cfg, table) == before
    staged.commit()
    assert per_date(cfg, table) == {"2024-06-01": (4, {0.2})}
    with pytest.raises(RuntimeError, match="nothing staged"):
        staged.commit()  # once
