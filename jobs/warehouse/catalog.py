"""The Iceberg catalog a config names, and the table lookups every other module shares."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from cluster.storage import iceberg_s3_properties, worker_visible_uri
from jobs.config import CatalogConfig

if TYPE_CHECKING:
    from pyiceberg.catalog import Catalog
    from pyiceberg.schema import Schema
    from pyiceberg.table import Table

__all__ = [
    "LOAD_HINT",
    "catalog_properties",
    "current_snapshot_id",
    "load_catalog",
    "load_table",
    "require_columns",
    "schema_at",
    "table_namespace",
    "try_load_table",
]

LOAD_HINT = "run `raylift warehouse load --config ...` first"


def catalog_properties(cfg: CatalogConfig) -> dict[str, str]:
    """Keyword arguments for `pyiceberg.catalog.load_catalog` and Ray's `catalog_kwargs`.

    For the embedded SqlCatalog, relative paths become absolute: Ray workers may run in another
    working directory, where a relative SQLite file would be a new, empty catalog. Table files
    on S3 get the endpoint and region of this process's AWS environment unless
    catalog.properties sets them (`cluster.storage.iceberg_s3_properties`).
    """
    props = {
        **iceberg_s3_properties(cfg.properties),
        **cfg.properties,
        "name": cfg.name,
        "type": cfg.type,
        "uri": cfg.uri,
    }
    props["warehouse"] = cfg.warehouse
    if cfg.type == "sql":
        # Only here: a REST catalog's `warehouse` is a name the server resolves, not a path.
        props["uri"] = worker_visible_uri(cfg.uri, key="catalog.uri")
        props["warehouse"] = worker_visible_uri(
            cfg.warehouse, key="catalog.warehouse", create=True, file_uri=True
        )
    return props


def load_catalog(cfg: CatalogConfig) -> Catalog:
    """The pyiceberg catalog `cfg` describes."""
    from pyiceberg.catalog import load_catalog as _pyiceberg_load_catalog

    props = catalog_properties(cfg)
    return _pyiceberg_load_catalog(props.pop("name"), **props)


def table_namespace(table: str) -> str:
    """The namespace of `namespace.table`; an error naming the fix for a bare table name."""
    namespace, dot, name = table.rpartition(".")
    if not dot or not namespace or not name:
        raise ValueError(f"table {table!r} needs a namespace: write it as <namespace>.<table>")
    return namespace


def load_table(catalog: Catalog, cfg: CatalogConfig, table: str) -> Table:
    """`table` from `catalog`; a LookupError saying how to create it if it is not there."""
    table_namespace(table)
    tbl = try_load_table(catalog, table)
    if tbl is None:
        raise LookupError(f"table {table!r} not found in catalog {cfg.name}; {LOAD_HINT}")
    return tbl


def try_load_table(catalog: Catalog, table: str) -> Table | None:
    """`table` from `catalog`, or None if it (or its namespace) does not exist."""
    from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError

    try:
        return catalog.load_table(table)
    except (NoSuchTableError, NoSuchNamespaceError):
        return None


def current_snapshot_id(tbl: Table, cfg: CatalogConfig, table: str) -> int:
    """The snapshot id `tbl` holds now; a LookupError if it was never written."""
    snapshot = tbl.current_snapshot()
    if snapshot is None:
        raise LookupError(
            f"table {table!r} in catalog {cfg.name} has no snapshot (it was never written); "
            f"{LOAD_HINT}"
        )
    return snapshot.snapshot_id


def schema_at(tbl: Table, table: str, snapshot_id: int) -> Schema:
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


def require_columns(
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
