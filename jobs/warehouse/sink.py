"""Predictions and quarantine tables, each written idempotently per run date.

Scoring a date replaces that date's rows in one Iceberg commit and one snapshot: re-running a
date leaves no duplicates and no partial day, other dates are untouched, and a failed run leaves
the table as it was (DESIGN.md, "Predictions table").
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from jobs.config import CatalogConfig
from jobs.warehouse._ray_internal import IcebergDatasink
from jobs.warehouse.catalog import (
    catalog_properties,
    require_columns,
    table_namespace,
    try_load_table,
)
from jobs.warehouse.reads import count_rows
from serving import tags

if TYPE_CHECKING:
    import ray.data
    from pyiceberg.catalog import Catalog
    from pyiceberg.manifest import DataFile

__all__ = [
    "PREDICTION_COLUMNS",
    "RunDateSink",
    "rows_on_date",
    "write_predictions",
    "write_quarantine",
]

# Columns the scorer adds to the input key columns (DESIGN.md, "Predictions table").
PREDICTION_COLUMNS = ("label", "score", "model_name", "model_version", "scored_at", "run_date")

_MIN_BYTES_PER_WRITE = 64 * 1024 * 1024

# A commit that lost a race with another writer (another scoring job on another date, or a rerun
# of this one) is redone on the table as it then is; a few tries cover jobs that end together.
_COMMIT_ATTEMPTS = 5
_COMMIT_RETRY_WAIT_S = 0.5

log = logging.getLogger(__name__)


class RunDateSink(IcebergDatasink):
    """Ray's IcebergDatasink made idempotent per run date.

    - creates the table from the first block's schema, partitioned by run_date, and drops it
      again if that first write fails;
    - replaces the date's rows in one commit AND one snapshot (Ray's overwrite commits a
      delete snapshot then an append snapshot: a reader pinned to the first sees no day);
    - an empty result still removes the date's old rows (Ray's sink commits nothing then);
    - the commit is computed on the table as it is when committing, and redone when another
      writer commits first (Ray's and pyiceberg's commit a transaction built on the table as
      it was when the write started: a commit of another date meanwhile failed the run);
    - with `defer_commit`, the write only stages its files: `commit()` commits them later,
      `discard()` drops them, so a job writing two tables commits neither if either fails.
    """

    def __init__(
        self,
        table: str,
        catalog_kwargs: dict[str, str],
        run_date: str,
        *,
        required_columns: tuple[str, ...],
        timestamp_column: str,
        properties: Mapping[str, str] | None = None,
        defer_commit: bool = False,
    ):
        from ray.data import SaveMode
        from ray.data.expressions import col

        super().__init__(
            table,
            catalog_kwargs=catalog_kwargs,
            mode=SaveMode.OVERWRITE,
            overwrite_filter=col("run_date") == run_date,
            snapshot_properties={**(properties or {}), tags.RUN_DATE_PROPERTY: run_date},
        )
        self._run_date = run_date
        self._required = (*required_columns, timestamp_column, "run_date")
        self._timestamp_column = timestamp_column
        self._created = False
        self._defer_commit = defer_commit
        self._staged: Any = None  # the write result a deferred write has yet to commit

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
        existing = try_load_table(catalog, self.table_identifier)
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
        if self._defer_commit:
            self._staged = write_result
            return
        self._commit(write_result)

    def on_write_failed(self, error: Exception) -> None:
        self._drop_if_created()
        super().on_write_failed(error)

    def commit(self) -> None:
        """Commit what a deferred write staged (see `defer_commit`); once."""
        if self._staged is None:
            raise RuntimeError(f"nothing staged for {self.table_identifier}: write it first")
        staged, self._staged = self._staged, None
        try:
            self._commit(staged)
        except BaseException:
            self._drop_if_created()
            raise

    def discard(self) -> None:
        """Drop what a deferred write staged: the table is left as it was (its data files
        stay unreferenced, as a failed write's do)."""
        self._staged = None
        self._drop_if_created()

    def _commit(self, write_result: Any) -> None:
        """Replace the date's rows with the written files, on the table as it is now; after a
        concurrent commit, again on the table as it then is (the other writer's rows of other
        dates stay; its rows of this date are replaced, as a rerun's would be)."""
        from pyiceberg.exceptions import CommitFailedException, ValidationException

        for attempt in range(1, _COMMIT_ATTEMPTS + 1):
            try:
                self._commit_once(write_result)
                return
            except (CommitFailedException, ValidationException) as error:
                if attempt == _COMMIT_ATTEMPTS:
                    raise
                log.warning(
                    "run_date=%s: %s changed while this run wrote (%s); committing again on "
                    "the table as it is now (%d/%d)",
                    self._run_date,
                    self.table_identifier,
                    error,
                    attempt,
                    _COMMIT_ATTEMPTS - 1,
                )
                time.sleep(_COMMIT_RETRY_WAIT_S * attempt)

    def _commit_once(self, write_result: Any) -> None:
        from pyiceberg.exceptions import NoSuchTableError

        try:
            self._reload_table()
        except NoSuchTableError:
            if self._staged_files(write_result):
                raise
            return  # nothing written and nothing stored: nothing to replace
        if self._staged_files(write_result):
            super().on_write_complete(write_result)  # reconciles schemas, calls _commit_overwrite
        else:
            self._commit_overwrite(self._table.transaction(), [])

    @staticmethod
    def _staged_files(write_result: Any) -> bool:
        return any(r and r.data_files for r in write_result.write_returns)

    def _drop_if_created(self) -> None:
        # Leave the catalog as it was: a table this write created goes with the write.
        if self._created:
            catalog = self._get_catalog()
            table = try_load_table(catalog, self.table_identifier)
            if table is not None and table.current_snapshot() is None:
                catalog.drop_table(self.table_identifier)
            self._created = False

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
        require_columns(
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
    ds: ray.data.Dataset,
    cfg: CatalogConfig,
    table: str,
    *,
    run_date: str,
    properties: Mapping[str, str] | None = None,
    defer_commit: bool = False,
) -> RunDateSink:
    """Write scored rows to `table`, replacing `run_date`'s rows in one commit; the sink.

    `ds` holds the input key columns plus PREDICTION_COLUMNS; every row's run_date must equal
    `run_date`. The table is created on first write. Re-running a date leaves no duplicates and
    no partial day; other dates are untouched; a failed run leaves the table as it was.
    `properties` go into the commit's snapshot summary (lineage: input snapshot, model).
    With `defer_commit`, nothing is committed until the sink's `commit()` (or `discard()`).
    """
    _check_run_date(run_date)
    table_namespace(table)
    required = tuple(c for c in PREDICTION_COLUMNS if c not in ("scored_at", "run_date"))
    sink = RunDateSink(
        table,
        catalog_properties(cfg),
        run_date,
        required_columns=required,
        timestamp_column="scored_at",
        properties=properties,
        defer_commit=defer_commit,
    )
    ds.write_datasink(sink)
    return sink


def write_quarantine(
    ds: ray.data.Dataset,
    cfg: CatalogConfig,
    table: str,
    *,
    run_date: str,
    reason: str,
    properties: Mapping[str, str] | None = None,
    defer_commit: bool = False,
) -> RunDateSink:
    """Write rows that could not be scored, with `reason`, replacing `run_date`'s rows; the
    sink. Same guarantees as write_predictions (`rows_on_date` counts them afterwards)."""
    _check_run_date(run_date)
    table_namespace(table)
    stamp = _QuarantineStamp(reason, run_date, dt.datetime.now(dt.UTC))
    sink = RunDateSink(
        table,
        catalog_properties(cfg),
        run_date,
        required_columns=("reason",),
        timestamp_column="quarantined_at",
        properties=properties,
        defer_commit=defer_commit,
    )
    ds.map_batches(stamp, batch_format="pyarrow").write_datasink(sink)
    return sink


def rows_on_date(cfg: CatalogConfig, table: str, run_date: str) -> int:
    """Rows `table` holds for `run_date`; 0 when no write ever created it (a first run with
    nothing to write)."""
    try:
        return count_rows(cfg, table, run_date=run_date)
    except LookupError:
        return 0


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

    catalog.create_namespace_if_not_exists(table_namespace(table))
    txn = catalog.create_table_transaction(table, schema)
    with txn.update_spec() as spec:
        spec.add_identity("run_date")
    try:
        txn.commit_transaction()
    except TableAlreadyExistsError:
        return False  # another writer created it first
    return True
