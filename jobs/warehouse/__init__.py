"""Raylift's Iceberg I/O: catalog, file loading, pinned reads, validation split, predictions.

Every read is pinned to a snapshot id, so a training run, its eval split and its registry tags
all name the same rows. Every write replaces what it owns in one Iceberg commit: loading a file
replaces the whole table, scoring a date replaces that date's rows. A crash leaves the table as
it was.

The embedded default is pyiceberg's SqlCatalog on SQLite with files under `.raylift/warehouse`;
any other pyiceberg catalog (REST, Glue, Hive) works through the same `CatalogConfig`.

Modules: `catalog` (the catalog and table lookups), `files` (CSV/Parquet loading), `reads`
(pinned reads), `split` (the validation split), `sink` (run-date writes); `_ray_internal` is the
only door to `ray.data._internal`.
"""

from jobs.warehouse.catalog import catalog_properties, load_catalog
from jobs.warehouse.files import create_inbox_table, load_table_from_file
from jobs.warehouse.reads import (
    IcebergTableSource,
    count_rows,
    read_table,
    scan_labels,
    table_snapshot,
)
from jobs.warehouse.sink import (
    PREDICTION_COLUMNS,
    RunDateSink,
    rows_on_date,
    write_predictions,
    write_quarantine,
)
from jobs.warehouse.split import SplitFilter, key_hash, split_thresholds

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
    "rows_on_date",
    "scan_labels",
    "split_thresholds",
    "table_snapshot",
    "write_predictions",
    "write_quarantine",
]
