"""Reads pinned to a snapshot id, so a run, its eval split and its registry tags name the same
rows, whatever is committed meanwhile."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from jobs.config import CatalogConfig
from jobs.warehouse._ray_internal import IcebergDatasource
from jobs.warehouse.catalog import (
    catalog_properties,
    current_snapshot_id,
    load_catalog,
    load_table,
    require_columns,
    schema_at,
)

if TYPE_CHECKING:
    import ray.data

__all__ = ["IcebergTableSource", "count_rows", "read_table", "scan_labels", "table_snapshot"]


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

    def get_read_tasks(self, parallelism: int, *args: Any, **kwargs: Any) -> list:
        """Ray's read tasks, asked for no more than one per data file. Ray lowers a larger
        parallelism to the file count itself, but warns "Reducing the parallelism to 1, as that
        is the number of files" each time: on every read of a table smaller than its default
        parallelism, six times in one `make demo`."""
        return super().get_read_tasks(min(parallelism, len(self.plan_files)), *args, **kwargs)


def read_table(
    cfg: CatalogConfig,
    table: str,
    *,
    snapshot_id: int | None = None,
    columns: Sequence[str] | Mapping[str, str] | None = None,
) -> ray.data.Dataset:
    """A Ray Dataset of `table` at `snapshot_id` (default: the current one, pinned now).

    Pinning at call time means a lazily executed dataset reads what the table held when the
    run started, whatever is committed meanwhile. `columns` may map each column to the config
    key naming it, which a missing column's error then names.
    """
    import ray.data

    tbl = load_table(load_catalog(cfg), cfg, table)
    if snapshot_id is None:
        snapshot_id = current_snapshot_id(tbl, cfg, table)
    schema = schema_at(tbl, table, snapshot_id)
    if columns:
        where = f"{table}@{snapshot_id}"
        if isinstance(columns, Mapping):
            require_columns(schema.column_names, columns, where)
        else:
            require_columns(schema.column_names, dict.fromkeys(columns), where, "Read one of them")
        columns = list(dict.fromkeys(columns))  # a column named twice is read once
    source = IcebergTableSource(
        table_identifier=table,
        selected_fields=tuple(columns) if columns else ("*",),
        snapshot_id=snapshot_id,
        catalog_kwargs=catalog_properties(cfg),
    )
    return ray.data.read_datasource(source)


def table_snapshot(cfg: CatalogConfig, table: str) -> int:
    """The current snapshot id of `table`."""
    tbl = load_table(load_catalog(cfg), cfg, table)
    return current_snapshot_id(tbl, cfg, table)


def scan_labels(
    cfg: CatalogConfig,
    table: str,
    *,
    snapshot_id: int,
    key_column: str,
    label_column: str,
) -> pa.Table:
    """The key and label columns of `table@snapshot_id` (only those two columns are read)."""
    tbl = load_table(load_catalog(cfg), cfg, table)
    where = f"{table}@{snapshot_id}"
    needed = {key_column: "task.key_column", label_column: "task.label_column"}
    require_columns(schema_at(tbl, table, snapshot_id).column_names, needed, where)
    scan = tbl.scan(selected_fields=(key_column, label_column), snapshot_id=snapshot_id)
    arrow = scan.to_arrow()
    for column, role in ((key_column, "key"), (label_column, "label")):
        nulls = arrow[column].null_count
        if nulls:
            raise ValueError(
                f"{role} column {column!r} has {nulls} null value(s) in {where}; fix or filter them"
            )
    return arrow


def count_rows(
    cfg: CatalogConfig,
    table: str,
    *,
    run_date: str | None = None,
    snapshot_id: int | None = None,
) -> int:
    """Rows of `table` (of one run date, at one snapshot if given), from manifests where
    possible."""
    from pyiceberg.expressions import AlwaysTrue, EqualTo

    tbl = load_table(load_catalog(cfg), cfg, table)
    row_filter = EqualTo("run_date", run_date) if run_date else AlwaysTrue()
    return tbl.scan(row_filter=row_filter, snapshot_id=snapshot_id).count()
