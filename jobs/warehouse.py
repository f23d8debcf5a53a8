"""Raylift's Iceberg I/O: catalog, file loading, pinned reads, validation split, predictions.

Every read is pinned to a snapshot id, so a training run, its eval split and its registry tags
all name the same rows. Every write replaces what it owns in one Iceberg commit: loading a file
replaces the whole table, scoring a date replaces that date's rows. A crash leaves the table as
it was.

The embedded default is pyiceberg's SqlCatalog on SQLite with files under `.raylift/warehouse`;
any other pyiceberg catalog (REST, Glue, Hive) works through the same `CatalogConfig`.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ray.data._internal.datasource.iceberg_datasink import IcebergDatasink
from ray.data._internal.datasource.iceberg_datasource import IcebergDatasource

from cluster.storage import absolute_sqlite_uri
from jobs.config import CatalogConfig

if TYPE_CHECKING:
    import ray.data
    from pyiceberg.catalog import Catalog
    from pyiceberg.manifest import DataFile
    from pyiceberg.schema import Schema
    from pyiceberg.table import Table

__all__ = [
    "PREDICTION_COLUMNS",
    "IcebergTableSource",
    "RunDateSink",
    "SplitFilter",
    "catalog_properties",
    "count_rows",
    "create_inbox_table",
    "key_hash",
    "load_catalog",
    "load_table_from_file",
    "read_table",
    "scan_labels",
    "split_thresholds",
    "table_snapshot",
    "write_predictions",
    "write_quarantine",
]

log = logging.getLogger(__name__)

# Columns the scorer adds to the input key columns (DESIGN.md, "Predictions table").
PREDICTION_COLUMNS = ("label", "score", "model_name", "model_version", "scored_at", "run_date")

_LOAD_HINT = "run `raylift warehouse load --config ...` first"


# --------------------------------------------------------------------------------------------
# Catalog
# --------------------------------------------------------------------------------------------


def catalog_properties(cfg: CatalogConfig) -> dict[str, str]:
    """Keyword arguments for `pyiceberg.catalog.load_catalog` and Ray's `catalog_kwargs`.

    For the embedded SqlCatalog, relative paths become absolute: Ray workers may run in another
    working directory, where a relative SQLite file would be a new, empty catalog.
    """
    props = {**cfg.properties, "name": cfg.name, "type": cfg.type, "uri": cfg.uri}
    props["warehouse"] = cfg.warehouse
    if cfg.type == "sql":
        # Only here: a REST catalog's `warehouse` is a name the server resolves, not a path.
        props["uri"] = absolute_sqlite_uri(cfg.uri, key="catalog.uri")
        props["warehouse"] = _local_warehouse_uri(cfg.warehouse)
    return props


def load_catalog(cfg: CatalogConfig) -> Catalog:
    """The pyiceberg catalog `cfg` describes."""
    from pyiceberg.catalog import load_catalog as _pyiceberg_load_catalog

    props = catalog_properties(cfg)
    return _pyiceberg_load_catalog(props.pop("name"), **props)


def _local_warehouse_uri(warehouse: str) -> str:
    if "://" in warehouse and not warehouse.startswith("file://"):
        return warehouse  # object storage: s3://, gs://, abfs://
    path = Path(warehouse.removeprefix("file://")).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path.as_uri()


def _namespace(table: str) -> str:
    namespace, dot, name = table.rpartition(".")
    if not dot or not namespace or not name:
        raise ValueError(f"table {table!r} needs a namespace: write it as <namespace>.<table>")
    return namespace


def _missing_table(cfg: CatalogConfig, table: str) -> LookupError:
    return LookupError(f"table {table!r} not found in catalog {cfg.name}; {_LOAD_HINT}")


def _load_table(catalog: Catalog, cfg: CatalogConfig, table: str) -> Table:
    _namespace(table)
    tbl = _try_load_table(catalog, table)
    if tbl is None:
        raise _missing_table(cfg, table)
    return tbl


def _try_load_table(catalog: Catalog, table: str) -> Table | None:
    from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError

    try:
        return catalog.load_table(table)
    except (NoSuchTableError, NoSuchNamespaceError):
        return None


def _current_snapshot_id(tbl: Table, cfg: CatalogConfig, table: str) -> int:
    snapshot = tbl.current_snapshot()
    if snapshot is None:
        raise LookupError(
            f"table {table!r} in catalog {cfg.name} has no snapshot (it was never written); "
            f"{_LOAD_HINT}"
        )
    return snapshot.snapshot_id


def _schema_at(tbl: Table, table: str, snapshot_id: int) -> Schema:
    """The schema rows of `snapshot_id` were written with (a later one may differ)."""
    snapshot = tbl.snapshot_by_id(snapshot_id)
    if snapshot is None:
        recent = [s.snapshot_id for s in tbl.snapshots()][-5:]
        raise LookupError(
            f"snapshot {snapshot_id} not found in table {table!r} (most recent: {recent}); "
            "set data.snapshot_id to one of them, or leave it unset for the current snapshot"
        )
    schemas = {s.schema_id: s for s in tbl.metadata.schemas}
    return schemas.get(snapshot.schema_id, tbl.schema())


def _require_columns(
    have: Iterable[str], needed: Mapping[str, str | None], where: str, fix: str = ""
) -> None:
    """`needed` maps column -> the config key naming it, so the error says what to change."""
    have = list(have)
    missing = [
        f"{column!r} ({key})" if key else repr(column)
        for column, key in needed.items()
        if column not in have
    ]
    if missing:
        raise ValueError(
            f"{where} has no column {', '.join(missing)}; its columns: {', '.join(have)}. "
            f"{fix or 'Set the config key to one of them'}"
        )


# --------------------------------------------------------------------------------------------
# Loading files and creating tables
# --------------------------------------------------------------------------------------------


def load_table_from_file(
    cfg: CatalogConfig,
    table: str,
    source: str | Path,
    *,
    text_column: str,
    label_column: str,
    key_column: str,
    sample_rows: int | None = None,
    seed: int = 0,
) -> int:
    """(Re)create `table` from a CSV or Parquet file in one commit; return the new snapshot id.

    Rows get `key_column` = their position in the file (unless the file already has integer
    ids there), so loading the same file again gives every row the same id.
    """
    path = Path(source)
    arrow = _read_file(path, text_column)
    needed = {text_column: "task.text_column", label_column: "task.label_column"}
    _require_columns(arrow.column_names, needed, str(path))
    arrow = _with_key(arrow, key_column, str(path))
    if sample_rows is not None:
        arrow = _sample(arrow, sample_rows, seed)
    snapshot_id = _replace_table(load_catalog(cfg), table, arrow)
    log.info("loaded %d rows of %s into %s@%d", arrow.num_rows, path, table, snapshot_id)
    return snapshot_id


def create_inbox_table(
    cfg: CatalogConfig,
    source_table: str,
    inbox_table: str,
    *,
    rows: int,
    text_column: str,
    key_column: str,
    seed: int = 0,
) -> int:
    """Fill `inbox_table` with `rows` unlabelled rows (key + text) sampled from `source_table`.

    This is the demo's nightly feed for batch scoring. Returns the inbox's new snapshot id.
    """
    catalog = load_catalog(cfg)
    source = _load_table(catalog, cfg, source_table)
    needed = {key_column: "task.key_column", text_column: "task.text_column"}
    _require_columns(source.schema().column_names, needed, f"table {source_table!r}")
    arrow = source.scan(selected_fields=(key_column, text_column)).to_arrow()
    if rows > arrow.num_rows:
        log.info("%s has %d rows; the inbox gets all of them", source_table, arrow.num_rows)
    arrow = _sample(arrow, rows, seed)
    return _replace_table(catalog, inbox_table, arrow)


def _read_file(path: Path, text_column: str) -> pa.Table:
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise ValueError(
            f"{path}: unsupported file type {suffix or '(none)'!r}; "
            "data.source must be a .csv or .parquet file"
        )
    if not path.is_file():
        raise FileNotFoundError(f"data.source {path} does not exist; fix the path in the config")
    if suffix == ".csv":
        from pyarrow import csv

        # Text stays text even when a file's first rows look numeric; an empty label cell
        # becomes null, which scan_labels reports instead of training on a "" class.
        options = csv.ConvertOptions(
            column_types={text_column: pa.string()}, strings_can_be_null=True
        )
        return csv.read_csv(path, convert_options=options)
    import pyarrow.parquet as pq

    return pq.read_table(path)


def _with_key(arrow: pa.Table, key_column: str, where: str) -> pa.Table:
    field = pa.field(key_column, pa.int64(), nullable=False)
    if key_column not in arrow.column_names:
        keys = pa.array(np.arange(arrow.num_rows, dtype=np.int64))
        return arrow.add_column(0, field, keys)
    # The file brings its own ids (e.g. real ticket ids): keep them if they can be keys.
    keys = arrow[key_column]
    if not pa.types.is_integer(keys.type) or keys.null_count:
        raise ValueError(
            f"{where}: column {key_column!r} (task.key_column) must hold integers without "
            f"nulls (got {keys.type}, {keys.null_count} null(s)); rename or drop that column "
            "and raylift numbers the rows itself"
        )
    if pc.count_distinct(keys).as_py() != arrow.num_rows:
        raise ValueError(f"{where}: column {key_column!r} (task.key_column) has duplicate ids")
    index = arrow.column_names.index(key_column)
    return arrow.set_column(index, field, keys.cast(pa.int64()))


def _sample(arrow: pa.Table, rows: int, seed: int) -> pa.Table:
    """A seeded sample of `rows` rows kept in file order (their keys are unchanged)."""
    if rows >= arrow.num_rows:
        return arrow
    picked = np.random.default_rng(seed).choice(arrow.num_rows, size=rows, replace=False)
    return arrow.take(np.sort(picked))


def _replace_table(catalog: Catalog, table: str, arrow: pa.Table) -> int:
    """Make `arrow` the whole content of `table` in one catalog commit; return the snapshot id."""
    from pyiceberg.exceptions import NoSuchTableError

    catalog.create_namespace_if_not_exists(_namespace(table))
    try:
        existing = catalog.load_table(table)
    except NoSuchTableError:
        # Creating the table and writing its rows commit together: no empty table in between.
        txn = catalog.create_table_transaction(table, arrow.schema)
        txn.append(arrow)
        txn.commit_transaction()
    else:
        with existing.transaction() as txn:
            # A file with new columns widens the schema in the same commit as the new rows.
            with txn.update_schema() as update:
                update.union_by_name(arrow.schema)
            txn.overwrite(arrow)
    return catalog.load_table(table).current_snapshot().snapshot_id


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class IcebergTableSource(IcebergDatasource):
    """Ray's IcebergDatasource, picklable after use.

    Once the datasource has read (even `ds.count()`), it caches the pyiceberg table, whose
    catalog holds a SQLAlchemy engine: pickling the dataset into a TorchTrainer then fails with
    "cannot pickle 'weakref.ReferenceType'". Workers reload both from `catalog_kwargs`.
    """

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_table"] = None
        state["_plan_files"] = None
        return state


def read_table(
    cfg: CatalogConfig,
    table: str,
    *,
    snapshot_id: int | None = None,
    columns: list[str] | None = None,
) -> ray.data.Dataset:
    """A Ray Dataset of `table` at `snapshot_id` (default: the current one, pinned now).

    Pinning at call time means a lazily executed dataset reads what the table held when the
    run started, whatever is committed meanwhile.
    """
    import ray.data

    tbl = _load_table(load_catalog(cfg), cfg, table)
    if snapshot_id is None:
        snapshot_id = _current_snapshot_id(tbl, cfg, table)
    schema = _schema_at(tbl, table, snapshot_id)
    if columns:
        where = f"{table}@{snapshot_id}"
        _require_columns(schema.column_names, dict.fromkeys(columns), where, "Read one of them")
    source = IcebergTableSource(
        table_identifier=table,
        selected_fields=tuple(columns) if columns else ("*",),
        snapshot_id=snapshot_id,
        catalog_kwargs=catalog_properties(cfg),
    )
    return ray.data.read_datasource(source)


def table_snapshot(cfg: CatalogConfig, table: str) -> int:
    """The current snapshot id of `table`."""
    tbl = _load_table(load_catalog(cfg), cfg, table)
    return _current_snapshot_id(tbl, cfg, table)


def scan_labels(
    cfg: CatalogConfig,
    table: str,
    *,
    snapshot_id: int,
    key_column: str,
    label_column: str,
) -> pa.Table:
    """The key and label columns of `table@snapshot_id` (only those two columns are read)."""
    tbl = _load_table(load_catalog(cfg), cfg, table)
    where = f"{table}@{snapshot_id}"
    needed = {key_column: "task.key_column", label_column: "task.label_column"}
    _require_columns(_schema_at(tbl, table, snapshot_id).column_names, needed, where)
    scan = tbl.scan(selected_fields=(key_column, label_column), snapshot_id=snapshot_id)
    arrow = scan.to_arrow()
    for column, role in ((key_column, "key"), (label_column, "label")):
        nulls = arrow[column].null_count
        if nulls:
            raise ValueError(
                f"{role} column {column!r} has {nulls} null value(s) in {where}; fix or filter them"
            )
    return arrow


# --------------------------------------------------------------------------------------------
# Stratified validation split, decided per row from (seed, key): no shuffle, no pandas
# --------------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    # A bijection on uint64 with full avalanche; uint64 arrays wrap, which is the intent.
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def key_hash(keys: np.ndarray, seed: int) -> np.ndarray:
    """A 63-bit hash of each (seed, key) as non-negative int64, identical in every process.

    Distinct keys get distinct 64-bit states (an odd multiplier is a bijection), so the split
    of a row depends only on its key and the seed, never on which batch or worker sees it.
    """
    keys = np.asarray(keys)
    if keys.dtype.kind not in "iu":
        raise ValueError(f"split keys must be integers, got dtype {keys.dtype}")
    salt = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))
    with np.errstate(over="ignore"):
        state = salt + (keys.astype(np.int64).view(np.uint64) + np.uint64(1)) * _GOLDEN
        return (_splitmix64(state) >> np.uint64(1)).astype(np.int64)


def split_thresholds(
    keys: np.ndarray, labels: np.ndarray, fraction: float, seed: int
) -> dict[str, int]:
    """Per label, the hash below which a row is held out for validation.

    Exactly round(fraction * n) rows of a class of n rows have key_hash < threshold: at least
    one when n >= 2 (every class is evaluated), none when n == 1, never all of them (every
    class is trained on). Labels are keyed by str(label).
    """
    keys = np.asarray(keys)
    labels = np.asarray(labels).astype(str)
    if len(np.unique(keys)) != len(keys):
        raise ValueError("the key column has duplicate values; keys must be unique per row")
    hashes = key_hash(keys, seed)
    classes, inverse = np.unique(labels, return_inverse=True)
    order = np.lexsort((hashes, inverse))  # by class, then by hash
    starts = np.searchsorted(inverse[order], np.arange(len(classes) + 1))
    thresholds = {}
    for i, label in enumerate(classes):
        ranked = hashes[order[starts[i] : starts[i + 1]]]
        thresholds[str(label)] = _class_threshold(ranked, fraction)
    return thresholds


def _class_threshold(ranked: np.ndarray, fraction: float) -> int:
    n = len(ranked)
    held_out = 0 if n < 2 else min(max(1, round(fraction * n)), n - 1)
    if held_out == 0:
        return 0  # every hash is >= 0
    if ranked[held_out - 1] == ranked[held_out]:
        raise ValueError("63-bit hash collision at a split boundary; pick another split seed")
    return int(ranked[held_out])


@dataclass(frozen=True)
class SplitFilter:
    """Keeps one side of the split: `ds.map_batches(SplitFilter(...), batch_format="pyarrow")`.

    A plain picklable object, so Ray runs it as a stateless task fused with the read; each
    batch is decided on its own (vectorised over its rows), so any batching gives the same rows.
    """

    thresholds: Mapping[str, int]
    key_column: str
    label_column: str
    keep: Literal["train", "validation"]
    seed: int

    def __post_init__(self) -> None:
        if self.keep not in ("train", "validation"):
            raise ValueError(f"keep={self.keep!r}; use 'train' or 'validation'")

    def __call__(self, batch: pa.Table) -> pa.Table:
        keys = batch[self.key_column]
        if keys.null_count:
            raise ValueError(f"key column {self.key_column!r} has null values; fix or filter them")
        return batch.filter(pa.array(self.mask(keys.to_numpy(), batch[self.label_column])))

    def mask(self, keys: np.ndarray, labels: pa.ChunkedArray | pa.Array) -> np.ndarray:
        """True for the rows this filter keeps."""
        if isinstance(labels, pa.ChunkedArray):
            labels = labels.combine_chunks()
        encoded = pc.dictionary_encode(labels.cast(pa.string()))
        unknown = [v for v in encoded.dictionary.to_pylist() if v not in self.thresholds]
        if unknown or encoded.null_count:
            raise ValueError(
                f"label(s) {unknown or [None]} in {self.label_column!r} are not in the split "
                "thresholds; compute them from the same table snapshot the batches come from"
            )
        per_label = [self.thresholds[v] for v in encoded.dictionary.to_pylist()]
        threshold = np.array(per_label, dtype=np.int64)[encoded.indices.to_numpy()]
        held_out = key_hash(keys, self.seed) < threshold
        return held_out if self.keep == "validation" else ~held_out


# --------------------------------------------------------------------------------------------
# Predictions and quarantine: idempotent per run date
# --------------------------------------------------------------------------------------------


_MIN_BYTES_PER_WRITE = 64 * 1024 * 1024


class RunDateSink(IcebergDatasink):
    """Ray's IcebergDatasink made idempotent per run date.

    - creates the table from the first block's schema, partitioned by run_date, and drops it
      again if that first write fails;
    - replaces the date's rows in one commit AND one snapshot (Ray's overwrite commits a
      delete snapshot then an append snapshot: a reader pinned to the first sees no day);
    - an empty result still removes the date's old rows (Ray's sink commits nothing then).
    """

    def __init__(
        self,
        table: str,
        catalog_kwargs: dict[str, str],
        run_date: str,
        *,
        required_columns: tuple[str, ...],
        timestamp_column: str,
    ):
        from ray.data import SaveMode
        from ray.data.expressions import col

        super().__init__(
            table,
            catalog_kwargs=catalog_kwargs,
            mode=SaveMode.OVERWRITE,
            overwrite_filter=col("run_date") == run_date,
            snapshot_properties={"raylift.run-date": run_date},
        )
        self._run_date = run_date
        self._required = (*required_columns, timestamp_column, "run_date")
        self._timestamp_column = timestamp_column
        self._created = False

    @property
    def min_bytes_per_write(self) -> int:
        # Setting this stops Ray fusing Write with the map before it. Fused, on_write_start
        # gets the schema of the fused task's *input* (before the scorer adds its columns),
        # and the table would be created without them. Bigger writes also mean fewer files.
        return _MIN_BYTES_PER_WRITE

    def on_write_start(self, schema: pa.Schema | None = None) -> None:
        # Ray passes the first non-empty schema among the first write's blocks; None or no
        # columns means every block so far is empty (e.g. a filter that kept nothing).
        catalog = self._get_catalog()
        existing = _try_load_table(catalog, self.table_identifier)
        if schema is not None and len(schema) > 0:
            known = _arrow_schema(existing.metadata) if existing else None
            schema = self._normalise(schema.empty_table(), known).schema
            if existing is None:
                self._created = _create_run_date_table(catalog, self.table_identifier, schema)
        elif existing is None:
            return  # nothing to write and no table: on_write_complete has nothing to do
        else:
            schema = None
        super().on_write_start(schema)

    def write(self, blocks: Iterable[Any], ctx: Any) -> Any:
        from ray.data.block import BlockAccessor

        known = _arrow_schema(self._table_metadata) if self._table_metadata else None
        arrow = (BlockAccessor.for_block(block).to_arrow() for block in blocks)
        return super().write((self._normalise(block, known) for block in arrow), ctx)

    def on_write_complete(self, write_result: Any) -> None:
        if any(r and r.data_files for r in write_result.write_returns):
            super().on_write_complete(write_result)  # reconciles schemas, calls _commit_overwrite
            return
        from pyiceberg.exceptions import NoSuchTableError

        try:
            self._reload_table()
        except NoSuchTableError:
            return  # nothing written and nothing stored: nothing to replace
        self._commit_overwrite(self._table.transaction(), [])

    def on_write_failed(self, error: Exception) -> None:
        # Leave the catalog as it was: a table this write created goes with the write.
        if self._created:
            catalog = self._get_catalog()
            if catalog.load_table(self.table_identifier).current_snapshot() is None:
                catalog.drop_table(self.table_identifier)
        super().on_write_failed(error)

    def _commit_overwrite(self, txn: Any, data_files: list[DataFile]) -> None:
        old_files = self._date_files()
        if old_files is None:
            # Some file mixes dates: let pyiceberg rewrite it (still one commit).
            super()._commit_overwrite(txn, data_files)
            return
        if not old_files and not data_files:
            return
        props = self._snapshot_properties
        with txn.update_snapshot(snapshot_properties=props).overwrite() as snapshot:
            for data_file in old_files:
                snapshot.delete_data_file(data_file)
            for data_file in data_files:
                snapshot.append_data_file(data_file)
        description = f"commit run_date={self._run_date} to {self.table_identifier}"
        self._with_retry(txn.commit_transaction, description=description)

    def _date_files(self) -> list[DataFile] | None:
        """The data files holding this date's rows, or None if one also holds other dates."""
        from pyiceberg.conversions import from_bytes
        from pyiceberg.expressions import EqualTo

        field = self._table.schema().find_field("run_date")
        scan = self._table.scan(row_filter=EqualTo("run_date", self._run_date))
        files = [task.file for task in scan.plan_files()]
        for data_file in files:
            bounds = (data_file.lower_bounds or {}, data_file.upper_bounds or {})
            values = {from_bytes(field.field_type, b.get(field.field_id, b"")) for b in bounds}
            no_nulls = (data_file.null_value_counts or {}).get(field.field_id) == 0
            if values != {self._run_date} or not no_nulls:
                return None
        return files

    def _normalise(self, block: pa.Table, known: pa.Schema | None) -> pa.Table:
        """Give every block the table's types; refuse rows that belong to another date."""
        if block.num_columns == 0:
            return block  # an empty block from a filter: nothing to write
        _require_columns(
            block.column_names,
            dict.fromkeys(self._required),
            f"the dataset written to {self.table_identifier}",
            fix="Add the missing columns in the step before the write",
        )
        block = _concrete_types(block, known)
        # Iceberg stores microseconds; naive times are taken as UTC.
        stamp = block[self._timestamp_column].cast(pa.timestamp("us", tz="UTC"), safe=False)
        dates = block["run_date"].cast(pa.string())
        matching = pc.sum(pc.equal(dates, self._run_date)).as_py() or 0
        if matching != block.num_rows:
            raise ValueError(
                f"{block.num_rows - matching} row(s) have a run_date other than "
                f"{self._run_date!r}; one write holds one run date (set it on every row)"
            )
        block = block.set_column(block.column_names.index("run_date"), "run_date", dates)
        index = block.column_names.index(self._timestamp_column)
        return block.set_column(index, self._timestamp_column, stamp)


def write_predictions(
    ds: ray.data.Dataset, cfg: CatalogConfig, table: str, *, run_date: str
) -> None:
    """Write scored rows to `table`, replacing `run_date`'s rows in one commit.

    `ds` holds the input key columns plus PREDICTION_COLUMNS; every row's run_date must equal
    `run_date`. The table is created on first write. Re-running a date leaves no duplicates and
    no partial day; other dates are untouched; a failed run leaves the table as it was.
    """
    _check_run_date(run_date)
    _namespace(table)
    required = tuple(c for c in PREDICTION_COLUMNS if c not in ("scored_at", "run_date"))
    sink = RunDateSink(
        table,
        catalog_properties(cfg),
        run_date,
        required_columns=required,
        timestamp_column="scored_at",
    )
    ds.write_datasink(sink)


def write_quarantine(
    ds: ray.data.Dataset, cfg: CatalogConfig, table: str, *, run_date: str, reason: str
) -> int:
    """Write rows that could not be scored, with `reason`, replacing `run_date`'s rows.

    Same guarantees as write_predictions; returns how many rows `run_date` now has there.
    """
    _check_run_date(run_date)
    _namespace(table)
    stamp = _QuarantineStamp(reason, run_date, dt.datetime.now(dt.timezone.utc))
    sink = RunDateSink(
        table,
        catalog_properties(cfg),
        run_date,
        required_columns=("reason",),
        timestamp_column="quarantined_at",
    )
    ds.map_batches(stamp, batch_format="pyarrow").write_datasink(sink)
    try:
        return count_rows(cfg, table, run_date=run_date)
    except LookupError:
        return 0  # no bad rows on the first run: the table was never created


@dataclass(frozen=True)
class _QuarantineStamp:
    reason: str
    run_date: str
    quarantined_at: dt.datetime

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        batch = batch.append_column("reason", pa.array([self.reason] * n, pa.string()))
        batch = batch.append_column("run_date", pa.array([self.run_date] * n, pa.string()))
        stamp = pa.array([self.quarantined_at] * n, pa.timestamp("us", tz="UTC"))
        return batch.append_column("quarantined_at", stamp)


def count_rows(cfg: CatalogConfig, table: str, *, run_date: str | None = None) -> int:
    """Rows of `table` (of one run date if given), counted from manifests where possible."""
    from pyiceberg.expressions import AlwaysTrue, EqualTo

    tbl = _load_table(load_catalog(cfg), cfg, table)
    row_filter = EqualTo("run_date", run_date) if run_date else AlwaysTrue()
    return tbl.scan(row_filter=row_filter).count()


def _arrow_schema(metadata: Any) -> pa.Schema:
    from pyiceberg.io.pyarrow import schema_to_pyarrow

    return schema_to_pyarrow(metadata.schema(), include_field_ids=False)


def _concrete_types(block: pa.Table, known: pa.Schema | None) -> pa.Table:
    """Type all-null columns (numpy object arrays of None arrive as pa.null(), which Iceberg
    v2 cannot store): as the table has them, or as strings for a new table."""
    for index, field in enumerate(block.schema):
        if pa.types.is_null(field.type):
            in_table = known is not None and field.name in known.names
            target = known.field(field.name).type if in_table else pa.string()
            block = block.set_column(index, field.name, block.column(index).cast(target))
    return block


def _check_run_date(run_date: str) -> None:
    try:
        dt.date.fromisoformat(run_date)
    except (TypeError, ValueError):
        raise ValueError(f"run_date={run_date!r}: use YYYY-MM-DD, e.g. 2024-06-01") from None


def _create_run_date_table(catalog: Catalog, table: str, schema: pa.Schema) -> bool:
    """Create `table` partitioned by run_date, so a date's rows sit in files of their own."""
    from pyiceberg.exceptions import TableAlreadyExistsError

    catalog.create_namespace_if_not_exists(_namespace(table))
    txn = catalog.create_table_transaction(table, schema)
    with txn.update_spec() as spec:
        spec.add_identity("run_date")
    try:
        txn.commit_transaction()
    except TableAlreadyExistsError:
        return False  # another writer created it first
    return True
