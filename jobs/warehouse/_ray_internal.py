"""The one door to `ray.data._internal`: the Iceberg datasource and datasink raylift subclasses.

Ray's public `read_iceberg` / `write_iceberg` cannot do two things raylift needs, so
`jobs.warehouse.reads.IcebergTableSource` and `jobs.warehouse.sink.RunDateSink` subclass Ray's
internal classes. Those are not a public API: any Ray release may rename or re-plumb them. This
module is the only one in the repository that imports `ray.data._internal` (a unit test checks
it), and it names every member raylift overrides or relies on:

IcebergDatasource (subclassed by IcebergTableSource, so a dataset pickles after a read):
    overrides   `__getstate__`; `get_read_tasks(parallelism, ...)`, to ask for no more tasks
                than `plan_files` holds
    relies on   `__init__(table_identifier, selected_fields, snapshot_id, catalog_kwargs)`;
                `_table` and `_plan_files` are lazy caches rebuilt by `table` / `plan_files`
                when None (dropping them on pickling is therefore safe).

IcebergDatasink (subclassed by RunDateSink, idempotent per run date in one commit):
    overrides   `on_write_start`, `write`, `on_write_complete`, `on_write_failed`,
                `_commit_overwrite`, `min_bytes_per_write`
    relies on   `__init__(table_identifier, catalog_kwargs, snapshot_properties, mode,
                overwrite_filter)`; `_get_catalog`, `_reload_table`, `_with_retry`;
                attributes `table_identifier`, `_table`, `_table_metadata`,
                `_snapshot_properties`; `write` returning results with `.data_files`;
                `on_write_complete` calling `_commit_overwrite(txn, data_files)` once in
                OVERWRITE mode, with `txn` a transaction of `_table` (RunDateSink reloads the
                table before each commit attempt, so a commit that lost a race is redone on
                the table as it then is).

Ray Data's stats actor (`start_data_stats_actor`, called by `raylift tune` before a search):
    relies on   `ray.data._internal.stats.get_or_create_stats_actor()`, which creates the
                cluster's one detached `_StatsActor` the first time a dataset executes, from
                whichever process executes it. Inside a Tune trial that is a descendant of the
                trial's actor, which Tune schedules with placement_group_capture_child_tasks:
                the stats actor joins the trial's placement group and dies when the trial ends,
                and the next trial starts another (1.7 CPU-s each, measured on an AVX2-only
                AMD EPYC, 2 cores; and Ray Data's statistics are lost with it). Created from the
                driver first, outside any placement group, it lives for the whole search. Where
                a Ray release lacks the function, the search runs as before (a warning says so).

Importing this module checks that every named member still exists (an ImportError names the
missing ones) and warns when the installed Ray is not the release this was verified against.
"""

from __future__ import annotations

import inspect
import warnings

import ray
from ray.data._internal.datasource.iceberg_datasink import IcebergDatasink
from ray.data._internal.datasource.iceberg_datasource import IcebergDatasource

try:
    from ray.data._internal.stats import get_or_create_stats_actor
except ImportError:  # a Ray release that moved it: start_data_stats_actor warns and does nothing
    get_or_create_stats_actor = None

__all__ = [
    "INIT_PARAMETERS",
    "OVERRIDDEN",
    "RELIED_ON",
    "RELIED_ON_ATTRIBUTES",
    "VERIFIED_RAY",
    "IcebergDatasink",
    "IcebergDatasource",
    "check_members",
    "check_ray",
    "start_data_stats_actor",
]

# The Ray release (major.minor) whose Iceberg internals were read and tested against.
VERIFIED_RAY = "2.60"

OVERRIDDEN: dict[str, tuple[str, ...]] = {
    "IcebergDatasource": ("__getstate__", "get_read_tasks"),
    "IcebergDatasink": (
        "on_write_start",
        "write",
        "on_write_complete",
        "on_write_failed",
        "_commit_overwrite",
        "min_bytes_per_write",
    ),
}
RELIED_ON: dict[str, tuple[str, ...]] = {
    "IcebergDatasource": ("table", "plan_files"),
    "IcebergDatasink": ("_get_catalog", "_reload_table", "_with_retry"),
}
# Set in __init__, so only an instance shows them (tests/unit/test_warehouse.py builds one).
RELIED_ON_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "IcebergDatasource": ("table_identifier", "_table", "_plan_files"),
    "IcebergDatasink": ("table_identifier", "_table", "_table_metadata", "_snapshot_properties"),
}
INIT_PARAMETERS: dict[str, tuple[str, ...]] = {
    "IcebergDatasource": ("table_identifier", "selected_fields", "snapshot_id", "catalog_kwargs"),
    "IcebergDatasink": (
        "table_identifier",
        "catalog_kwargs",
        "snapshot_properties",
        "mode",
        "overwrite_filter",
    ),
}

_CLASSES = {"IcebergDatasource": IcebergDatasource, "IcebergDatasink": IcebergDatasink}


def check_members() -> list[str]:
    """The overridden or relied-on members missing from the installed Ray ("Class.name")."""
    missing = []
    for class_name, cls in _CLASSES.items():
        names = (*OVERRIDDEN[class_name], *RELIED_ON[class_name])
        missing += [f"{class_name}.{n}" for n in names if not hasattr(cls, n)]
        params = inspect.signature(cls.__init__).parameters
        missing += [
            f"{class_name}.__init__({p}=...)"
            for p in INIT_PARAMETERS[class_name]
            if p not in params
        ]
    return missing


def check_ray(version: str = ray.__version__) -> None:
    """Raise if a member raylift needs is gone; warn if `version` is not the verified one."""
    missing = check_members()
    if missing:
        raise ImportError(
            f"ray {version} changed the Iceberg internals raylift subclasses: "
            f"{', '.join(missing)} no longer exist. Install ray=={VERIFIED_RAY}.* or port "
            "IcebergTableSource and RunDateSink (jobs/warehouse/_ray_internal.py lists what "
            "they override)"
        )
    if not version.startswith(f"{VERIFIED_RAY}."):
        # A warning, not an error: raising would stop every raylift command, even `validate`,
        # on a Ray upgrade that may well keep these members working. The members exist (checked
        # above); what a new release can silently change is their behaviour, which
        # tests/integration/test_warehouse.py exercises (one commit per run date, pickling).
        warnings.warn(
            f"raylift's Iceberg reader and run-date sink were verified on ray {VERIFIED_RAY}.x, "
            f"this is ray {version}: re-verify IcebergDatasource.__getstate__ and "
            "IcebergDatasink.on_write_start/write/on_write_complete/_commit_overwrite "
            "(run tests/integration/test_warehouse.py), then update VERIFIED_RAY in "
            "jobs/warehouse/_ray_internal.py",
            RuntimeWarning,
            stacklevel=3,
        )


def start_data_stats_actor() -> None:
    """Start Ray Data's stats actor from this process (a driver), outside any placement group,
    unless it runs already (see the module doc). Named-actor creation registers the name with
    the GCS before returning, so the datasets executed after this find it."""
    if get_or_create_stats_actor is None:
        warnings.warn(
            f"ray {ray.__version__} has no ray.data._internal.stats.get_or_create_stats_actor: "
            "each Tune trial will start Ray Data's stats actor again (about 1.7 CPU-s a trial)",
            RuntimeWarning,
            stacklevel=2,
        )
        return
    get_or_create_stats_actor()


check_ray()
