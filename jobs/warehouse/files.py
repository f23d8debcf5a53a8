"""Loading CSV or Parquet files into tables, and the demo's unlabelled inbox table.

Every load replaces the whole table in one Iceberg commit: a crash leaves it as it was.
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cluster.storage import is_remote
from jobs.config import CatalogConfig
from jobs.warehouse.catalog import load_catalog, load_table, require_columns, table_namespace

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog

__all__ = ["create_inbox_table", "load_table_from_file"]

log = logging.getLogger(__name__)


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
    """(Re)create `table` from a CSV or Parquet file (a local path or an s3:// URI) in one
    commit; return the new snapshot id.

    Rows get `key_column` = their position in the file (unless the file already has integer
    ids there), so loading the same file again gives every row the same id.
    """
    source = str(source)
    arrow = _read_file(source, text_column)
    needed = {text_column: "task.text_column", label_column: "task.label_column"}
    require_columns(arrow.column_names, needed, source)
    arrow = _with_key(arrow, key_column, source)
    if sample_rows is not None:
        arrow = _sample(arrow, sample_rows, seed)
    snapshot_id = _replace_table(load_catalog(cfg), table, arrow)
    log.info("loaded %d rows of %s into %s@%d", arrow.num_rows, source, table, snapshot_id)
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
    source = load_table(catalog, cfg, source_table)
    needed = {key_column: "task.key_column", text_column: "task.text_column"}
    require_columns(source.schema().column_names, needed, f"table {source_table!r}")
    arrow = source.scan(selected_fields=(key_column, text_column)).to_arrow()
    if rows > arrow.num_rows:
        log.info("%s has %d rows; the inbox gets all of them", source_table, arrow.num_rows)
    arrow = _sample(arrow, rows, seed)
    return _replace_table(catalog, inbox_table, arrow)


def _read_file(source: str, text_column: str) -> pa.Table:
    """The rows of a CSV or Parquet file: a local path or an object-storage URI (s3://...)."""
    import pyarrow.fs

    suffix = PurePosixPath(source).suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise ValueError(
            f"{source}: unsupported file type {suffix or '(none)'!r}; "
            "data.source must be a .csv or .parquet file"
        )
    if is_remote(source) or source.startswith("file://"):
        fs, path = pyarrow.fs.FileSystem.from_uri(source)
    else:
        fs, path = pyarrow.fs.LocalFileSystem(), str(Path(source).expanduser().resolve())
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        raise FileNotFoundError(f"data.source {source} does not exist; fix the path in the config")
    if suffix == ".csv":
        from pyarrow import csv

        # Text stays text even when a file's first rows look numeric; an empty label cell
        # becomes null, which scan_labels reports instead of training on a "" class.
        options = csv.ConvertOptions(
            column_types={text_column: pa.string()}, strings_can_be_null=True
        )
        with fs.open_input_stream(path) as stream:
            return csv.read_csv(stream, convert_options=options)
    import pyarrow.parquet as pq

    return pq.read_table(path, filesystem=fs)


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

    catalog.create_namespace_if_not_exists(table_namespace(table))
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
