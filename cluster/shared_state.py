"""State that only one machine sees: refused on a Ray cluster of several nodes unless allowed.

The embedded catalog (SQLite), the MLflow store (SQLite) and local folders for table files and
checkpoints are files on one machine. A Ray worker, Serve replica or job driver on another node
would open a different, empty copy there (SQLite creates one silently), so a run "succeeds" into
state nobody else can read. `cluster.allow_local_state: true` says every node sees those paths
(one machine running several nodes, or a shared file system mounted at the same path).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cluster.storage import SQLITE_PREFIX

if TYPE_CHECKING:
    from jobs.config import LifecycleConfig

__all__ = [
    "ALLOW_KEY",
    "LocalStateError",
    "absolute_local_state",
    "check_local_state",
    "local_state",
]

ALLOW_KEY = "cluster.allow_local_state"
_REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "az://", "hdfs://", "http://", "https://")


class LocalStateError(ValueError):
    """A job's state is on one machine's disk, and the cluster has several nodes."""


def local_state(config: LifecycleConfig) -> dict[str, str]:
    """The config's keys whose state is a file or folder on one machine: key → value."""
    candidates = {
        "catalog.uri": config.catalog.uri if config.catalog.type == "sql" else None,
        "catalog.warehouse": config.catalog.warehouse,
        "registry.tracking_uri": config.registry.tracking_uri,
        "registry.artifact_location": config.registry.artifact_location,
        "train.checkpoint_dir": config.train.checkpoint_dir,
    }
    return {key: value for key, value in candidates.items() if value and _is_local(value)}


def absolute_local_state(config: LifecycleConfig, base: Path) -> dict[str, str]:
    """Overrides that make each relative local path absolute against `base` (key → value).

    A submitted job runs in Ray's unpacked copy of the repository, a new folder for every upload
    of changed code: a relative `sqlite:///.raylift/mlflow.db` would be a new, empty database
    there. Made absolute as the submitting machine sees it, the job uses the same files as a
    local run when the cluster sees this path (a cluster on this machine, a shared mount).
    """
    absolute = {}
    for key, value in local_state(config).items():
        path = value.removeprefix(SQLITE_PREFIX) if value.startswith("sqlite:") else value
        path = path.removeprefix("file://")
        if path.startswith(("/", "~")):
            continue
        resolved = str((base / path).resolve())
        absolute[key] = SQLITE_PREFIX + resolved if value.startswith("sqlite:") else resolved
    return absolute


def check_local_state(local: dict[str, str], nodes: int, allowed: bool) -> None:
    """Raise LocalStateError when `nodes` > 1 and some state is local, unless `allowed`."""
    if nodes <= 1 or allowed or not local:
        return
    keys = "\n".join(f"  {key}={value!r}" for key, value in local.items())
    raise LocalStateError(
        f"the Ray cluster has {nodes} nodes, and this job keeps state in files on one machine, "
        f"which a task on another node cannot see (SQLite would open a new, empty database "
        f"there):\n{keys}\n"
        "Fix: point these keys at shared services and storage (catalog.type=rest "
        "catalog.uri=http://... catalog.warehouse=s3://..., registry.tracking_uri=http://..., "
        f"train.checkpoint_dir=s3://...), or, when every node sees these paths (nodes on one "
        f"machine, a shared file system at the same path), set {ALLOW_KEY}=true."
    )


def _is_local(value: str) -> bool:
    if value.startswith("sqlite:"):
        return True
    if value.startswith(_REMOTE_SCHEMES) or "://" in value.removeprefix("file://"):
        return False  # object storage, a server, a database other than SQLite
    return not value.startswith(("models:/", "runs:/", "databricks"))
