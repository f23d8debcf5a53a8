"""Warehouse I/O without Ray: catalog paths, file loading, snapshots, label scans, the split."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import warehouse
from jobs.config import CatalogConfig
from jobs.datasets import banking77_categories, banking77_path
from tests.helpers import make_ticket_rows

LABELS = ["card_arrival", "lost_card", "refund", "exchange_rate"]
LOAD = {"text_column": "text", "label_column": "category", "key_column": "ticket_id"}
SCAN = {"key_column": "ticket_id", "label_column": "category"}


@pytest.fixture
def cfg(tmp_path: Path) -> CatalogConfig:
    return CatalogConfig(uri=f"sqlite:///{tmp_path}/catalog.db", warehouse=str(tmp_path / "wh"))


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def tickets_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "tickets.csv", make_ticket_rows(60, LABELS))


def scan(cfg: CatalogConfig, table: str) -> pa.Table:
    return warehouse.load_catalog(cfg).load_table(table).scan().to_arrow()


# --- catalog --------------------------------------------------------------------------------


def test_catalog_properties_make_embedded_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    props = warehouse.catalog_properties(CatalogConfig(properties={"echo": "false"}))
    assert props["name"] == "raylift" and props["type"] == "sql" and props["echo"] == "false"
    assert props["uri"] == f"sqlite:///{tmp_path.resolve()}/.raylift/warehouse/catalog.db"
    assert props["warehouse"] == (tmp_path / ".raylift" / "warehouse").resolve().as_uri()
    assert (tmp_path / ".raylift" / "warehouse").is_dir()


def test_catalog_properties_leave_remote_catalogs_alone():
    rest = CatalogConfig(type="rest", uri="http://catalog:8181", warehouse="analytics")
    assert warehouse.catalog_properties(rest)["warehouse"] == "analytics"
    s3 = CatalogConfig(uri="postgresql://db/iceberg", warehouse="s3://bucket/wh")
    props = warehouse.catalog_properties(s3)
    assert props["uri"] == "postgresql://db/iceberg" and props["warehouse"] == "s3://bucket/wh"


def test_in_memory_sqlite_catalog_is_refused():
    with pytest.raises(ValueError, match="in-memory SQLite"):
        warehouse.catalog_properties(CatalogConfig(uri="sqlite:///:memory:"))


# --- loading files --------------------------------------------------------------------------


def test_load_csv_numbers_rows_and_reload_keeps_ids(cfg, tickets_csv):
    first = warehouse.load_table_from_file(cfg, "support.tickets", tickets_csv, **LOAD)
    assert warehouse.table_snapshot(cfg, "support.tickets") == first
    rows = scan(cfg, "support.tickets")
    assert rows.column_names == ["ticket_id", "text", "category"]
    assert rows["ticket_id"].to_pylist() == list(range(60))
    assert rows["category"].to_pylist() == [r["category"] for r in make_ticket_rows(60, LABELS)]

    second = warehouse.load_table_from_file(cfg, "support.tickets", tickets_csv, **LOAD)
    assert second != first
    assert scan(cfg, "support.tickets").equals(rows)  # replaced, not appended


def test_reload_widens_the_schema_in_the_same_single_commit(cfg, tickets_csv, tmp_path):
    warehouse.load_table_from_file(cfg, "support.tickets", tickets_csv, **LOAD)
    commits = len(warehouse.load_catalog(cfg).load_table("support.tickets").metadata.metadata_log)
    wider = pa.table({"text": ["a", "b"], "category": ["x", "y"], "priority": [1, 2]})
    pq.write_table(wider, tmp_path / "wider.parquet")
    warehouse.load_table_from_file(cfg, "support.tickets", tmp_path / "wider.parquet", **LOAD)
    table = warehouse.load_catalog(cfg).load_table("support.tickets")
    assert len(table.metadata.metadata_log) == commits + 1
    rows = table.scan().to_arrow()
    assert rows.num_rows == 2 and rows["priority"].to_pylist() == [1, 2]


def test_load_sample_is_seeded_and_keeps_file_ids(cfg, tickets_csv):
    def sampled(seed: int) -> list[int]:
        warehouse.load_table_from_file(
            cfg, "support.tickets", tickets_csv, sample_rows=20, seed=seed, **LOAD
        )
        return scan(cfg, "support.tickets")["ticket_id"].to_pylist()

    keys = sampled(3)
    assert len(keys) == 20 and keys == sorted(keys) and keys != list(range(20))
    assert sampled(3) == keys and sampled(4) != keys
    texts = {r["ticket_id"]: r["text"] for r in scan(cfg, "support.tickets").to_pylist()}
    source = make_ticket_rows(60, LABELS)
    assert all(source[key]["text"] == text for key, text in texts.items())


def test_load_parquet_keeps_integer_ids_it_brings(cfg, tmp_path):
    rows = pa.table({"ticket_id": [30, 10, 20], "text": ["a", "b", "c"], "category": list("xyx")})
    pq.write_table(rows, tmp_path / "t.parquet")
    warehouse.load_table_from_file(cfg, "support.tickets", tmp_path / "t.parquet", **LOAD)
    assert scan(cfg, "support.tickets")["ticket_id"].to_pylist() == [30, 10, 20]


def test_load_refuses_duplicate_ids(cfg, tmp_path):
    pq.write_table(
        pa.table({"ticket_id": [1, 1], "text": list("ab"), "category": list("xy")}),
        tmp_path / "t.parquet",
    )
    with pytest.raises(ValueError, match="duplicate ids"):
        warehouse.load_table_from_file(cfg, "support.tickets", tmp_path / "t.parquet", **LOAD)


def test_load_names_the_missing_label_column(cfg, tmp_path):
    path = write_csv(tmp_path / "t.csv", [{"text": "hi", "intent": "x"}])
    with pytest.raises(ValueError) as err:
        warehouse.load_table_from_file(cfg, "support.tickets", path, **LOAD)
    message = str(err.value)
    assert "'category' (task.label_column)" in message and "text, intent" in message


def test_load_refuses_other_file_types(cfg, tmp_path):
    (tmp_path / "t.json").write_text("{}")
    with pytest.raises(ValueError, match=r"\.csv or \.parquet"):
        warehouse.load_table_from_file(cfg, "support.tickets", tmp_path / "t.json", **LOAD)


def test_load_needs_a_namespace(cfg, tickets_csv):
    with pytest.raises(ValueError, match="<namespace>.<table>"):
        warehouse.load_table_from_file(cfg, "tickets", tickets_csv, **LOAD)


def test_inbox_is_an_unlabelled_sample(cfg, tickets_csv):
    warehouse.load_table_from_file(cfg, "support.tickets", tickets_csv, **LOAD)
    snapshot = warehouse.create_inbox_table(
        cfg,
        "support.tickets",
        "support.inbox",
        rows=25,
        text_column="text",
        key_column="ticket_id",
        seed=1,
    )
    inbox = scan(cfg, "support.inbox")
    assert warehouse.table_snapshot(cfg, "support.inbox") == snapshot
    assert inbox.column_names == ["ticket_id", "text"] and inbox.num_rows == 25
    assert set(inbox["ticket_id"].to_pylist()) <= set(range(60))


# --- snapshots and label scans --------------------------------------------------------------


def test_missing_table_says_how_to_create_it(cfg):
    hint = r"table 'support.tickets' not found in catalog raylift; run `raylift warehouse load"
    with pytest.raises(LookupError, match=hint):
        warehouse.table_snapshot(cfg, "support.tickets")
    with pytest.raises(LookupError, match=hint):
        warehouse.scan_labels(cfg, "support.tickets", snapshot_id=1, **SCAN)
    with pytest.raises(LookupError, match=hint):
        warehouse.read_table(cfg, "support.tickets")  # fails before Ray is touched


def test_scan_labels_reads_key_and_label_of_the_snapshot(cfg, tickets_csv, tmp_path):
    old = warehouse.load_table_from_file(cfg, "support.tickets", tickets_csv, **LOAD)
    warehouse.load_table_from_file(cfg, "support.tickets", tickets_csv, sample_rows=10, **LOAD)
    labels = warehouse.scan_labels(cfg, "support.tickets", snapshot_id=old, **SCAN)
    assert labels.column_names == ["ticket_id", "category"] and labels.num_rows == 60
    with pytest.raises(LookupError, match="snapshot 123 not found"):
        warehouse.scan_labels(cfg, "support.tickets", snapshot_id=123, **SCAN)


def test_scan_labels_names_a_missing_column(cfg, tickets_csv):
    snapshot = warehouse.load_table_from_file(cfg, "support.tickets", tickets_csv, **LOAD)
    with pytest.raises(ValueError) as err:
        warehouse.scan_labels(
            cfg,
            "support.tickets",
            snapshot_id=snapshot,
            key_column="ticket_id",
            label_column="label",
        )
    assert "'label' (task.label_column)" in str(err.value)
    assert "ticket_id, text, category" in str(err.value)


def test_scan_labels_refuses_null_labels(cfg, tmp_path):
    rows = make_ticket_rows(10, LABELS)
    for row in rows[:3]:
        row["category"] = ""  # an empty CSV cell is a missing label
    path = write_csv(tmp_path / "t.csv", rows)
    snapshot = warehouse.load_table_from_file(cfg, "support.tickets", path, **LOAD)
    expected = f"label column 'category' has 3 null value\\(s\\) in support.tickets@{snapshot}"
    with pytest.raises(ValueError, match=expected):
        warehouse.scan_labels(cfg, "support.tickets", snapshot_id=snapshot, **SCAN)


# --- split ----------------------------------------------------------------------------------


def _reference_hash(key: int, seed: int) -> int:
    """splitmix64 written with Python ints: what key_hash must equal on every machine."""
    mask = (1 << 64) - 1

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    state = (mix(seed & mask) + ((key & mask) + 1) * 0x9E3779B97F4A7C15) & mask
    return mix(state) >> 1


def test_key_hash_matches_the_reference_and_is_63_bit():
    keys = np.array([0, 1, 2, 10_002, -5, 2**62], dtype=np.int64)
    for seed in (0, 17, -3):
        hashes = warehouse.key_hash(keys, seed)
        assert hashes.dtype == np.int64 and (hashes >= 0).all()
        assert hashes.tolist() == [_reference_hash(int(k), seed) for k in keys]
    small = keys[:5]  # the same ids in a narrower integer type hash the same
    assert (warehouse.key_hash(small.astype(np.int32), 17) == warehouse.key_hash(small, 17)).all()
    with pytest.raises(ValueError, match="integers"):
        warehouse.key_hash(np.array([1.5]), 0)


def _dataset(sizes: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    labels = np.concatenate([[label] * n for label, n in sizes.items()])
    keys = np.random.default_rng(0).permutation(len(labels) * 3)[: len(labels)] + 1000
    return keys.astype(np.int64), labels


SIZES = {"one": 1, "two": 2, "three": 3, "ten": 10, "many": 101}


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.49])
def test_split_holds_out_exactly_the_rounded_share_of_each_class(fraction):
    keys, labels = _dataset(SIZES)
    thresholds = warehouse.split_thresholds(keys, labels, fraction, seed=17)
    held = warehouse.key_hash(keys, 17) < np.array([thresholds[v] for v in labels])
    for label, n in SIZES.items():
        expected = 0 if n == 1 else min(max(1, round(fraction * n)), n - 1)
        assert held[labels == label].sum() == expected, label


def _sides(keys, labels, seed, fraction=0.2) -> dict[str, set[int]]:
    thresholds = warehouse.split_thresholds(keys, labels, fraction, seed)
    batch = pa.table({"ticket_id": keys, "category": labels})
    return {
        keep: set(
            warehouse.SplitFilter(thresholds, "ticket_id", "category", keep, seed)(batch)[
                "ticket_id"
            ].to_pylist()
        )
        for keep in ("train", "validation")
    }


def test_split_sides_are_disjoint_covering_and_seeded():
    keys, labels = _dataset(SIZES)
    sides = _sides(keys, labels, seed=17)
    assert not sides["train"] & sides["validation"]
    assert sides["train"] | sides["validation"] == set(keys.tolist())
    assert _sides(keys, labels, seed=17) == sides
    assert _sides(keys, labels, seed=18)["validation"] != sides["validation"]


def test_split_filter_decides_each_batch_on_its_own():
    keys, labels = _dataset(SIZES)
    thresholds = warehouse.split_thresholds(keys, labels, 0.3, seed=5)
    split = warehouse.SplitFilter(thresholds, "ticket_id", "category", "validation", 5)
    table = pa.table({"ticket_id": keys, "category": labels})
    whole = split(table)["ticket_id"].to_pylist()
    pieces = [split(table.slice(start, 7)) for start in range(0, table.num_rows, 7)]
    assert [k for piece in pieces for k in piece["ticket_id"].to_pylist()] == whole
    chunked = pa.Table.from_batches(table.to_batches(max_chunksize=13))
    assert split(chunked)["ticket_id"].to_pylist() == whole
    assert split(table.slice(0, 0)).num_rows == 0


def test_split_refuses_labels_it_has_no_threshold_for_and_duplicate_keys():
    split = warehouse.SplitFilter({"a": 0}, "ticket_id", "category", "train", 0)
    with pytest.raises(ValueError, match=r"label\(s\) \['b'\]"):
        split(pa.table({"ticket_id": [1, 2], "category": ["a", "b"]}))
    with pytest.raises(ValueError, match="keep='test'"):
        warehouse.SplitFilter({}, "ticket_id", "category", "test", 0)
    with pytest.raises(ValueError, match="duplicate"):
        warehouse.split_thresholds(np.array([1, 1]), np.array(["a", "a"]), 0.1, 0)


def test_integer_labels_are_keyed_by_their_string():
    keys = np.arange(20)
    labels = np.array([3, 7] * 10)
    thresholds = warehouse.split_thresholds(keys, labels, 0.2, seed=1)
    assert set(thresholds) == {"3", "7"}
    kept = warehouse.SplitFilter(thresholds, "k", "y", "validation", 1)(
        pa.table({"k": keys, "y": labels})
    )
    assert kept.num_rows == 4


# --- predictions: the parts that need no Ray ------------------------------------------------


def test_write_predictions_checks_run_date_before_touching_the_dataset(cfg):
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        warehouse.write_predictions(None, cfg, "support.preds", run_date="06/01/2024")


# --- packaged demo data ---------------------------------------------------------------------


def test_packaged_banking77_has_all_rows_and_categories():
    path = banking77_path()
    assert path.is_file()
    table = pa.csv.read_csv(path)
    assert table.column_names == ["text", "category"] and table.num_rows == 10_003
    assert len(set(table["category"].to_pylist())) == 77
    assert sorted(set(table["category"].to_pylist())) == sorted(banking77_categories())
    assert json.loads((path.parent / "categories.json").read_text()) == banking77_categories()


# --- the fence around ray.data._internal -----------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def test_every_member_raylift_overrides_or_uses_exists_on_the_installed_ray():
    from jobs.warehouse import _ray_internal as fence

    assert fence.check_members() == []
    sink = fence.IcebergDatasink("ns.t", catalog_kwargs={"name": "x"})
    source = fence.IcebergDatasource("ns.t", catalog_kwargs={"name": "x"})
    for instance in (sink, source):
        attributes = fence.RELIED_ON_ATTRIBUTES[type(instance).__name__]
        assert [a for a in attributes if not hasattr(instance, a)] == []


@pytest.mark.parametrize(
    ("subclass", "parent"),
    [("RunDateSink", "IcebergDatasink"), ("IcebergTableSource", "IcebergDatasource")],
)
def test_the_fence_lists_exactly_what_the_subclasses_override(subclass, parent):
    from jobs.warehouse import _ray_internal as fence

    ray_class = getattr(fence, parent)
    # Constructors are listed in INIT_PARAMETERS; other dunders are on every class.
    own = [n for n in vars(getattr(warehouse, subclass)) if n == "__getstate__" or n[:2] != "__"]
    overridden = {name for name in own if hasattr(ray_class, name)}
    assert overridden == set(fence.OVERRIDDEN[parent])


def test_a_missing_ray_member_fails_naming_it(monkeypatch):
    from jobs.warehouse import _ray_internal as fence

    monkeypatch.delattr(fence.IcebergDatasink, "_reload_table")
    with pytest.raises(ImportError, match=r"IcebergDatasink\._reload_table no longer exist"):
        fence.check_ray()


def test_the_stats_actor_is_found_and_its_absence_only_warns(monkeypatch):
    import ray

    from jobs.warehouse import _ray_internal as fence

    assert not ray.is_initialized()  # unit tests start no Ray
    # The installed Ray's function is called: without a Ray to create the actor on, it refuses.
    with pytest.raises(RuntimeError, match="Ray is not initialized"):
        fence.start_data_stats_actor()
    monkeypatch.setattr(fence, "get_or_create_stats_actor", None)  # a Ray that moved it
    with pytest.warns(RuntimeWarning, match=r"each Tune trial will start Ray Data's stats actor"):
        fence.start_data_stats_actor()


def test_another_ray_release_warns_what_to_reverify(recwarn):
    from jobs.warehouse import _ray_internal as fence

    fence.check_ray("2.60.7")
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    with pytest.warns(RuntimeWarning, match=r"verified on ray 2\.60\.x, this is ray 2\.61\.0"):
        fence.check_ray("2.61.0")


def _imports_ray_internal(path: Path) -> bool:
    import ast

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        if any(name.startswith("ray.data._internal") for name in names):
            return True
    return False


def test_only_the_fence_imports_ray_data_internal():
    sources = [
        p for top in ("cluster", "jobs", "serving", "tests") for p in (REPO / top).rglob("*.py")
    ]
    importing = sorted(str(p.relative_to(REPO)) for p in sources if _imports_ray_internal(p))
    assert importing == ["jobs/warehouse/_ray_internal.py"]
