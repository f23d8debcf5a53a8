"""Storage URIs as every process of a cluster sees them."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any

__all__ = ["delete_folder", "read_json", "worker_visible_uri", "write_json"]

SQLITE_PREFIX = "sqlite:///"

# `s3://`, `gs://`, `abfs://`, `http://`, `postgresql://`, MLflow's `models:/` and `runs:/`.
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")


def worker_visible_uri(uri: str, key: str, *, create: bool = False, file_uri: bool = False) -> str:
    """`uri` as a Ray worker or Serve replica in another working directory must see it.

    Ray workers may run in another directory than the driver, so relative local paths would
    name other (empty) places there:
    - `sqlite:` URIs get an absolute path (see `_absolute_sqlite_uri`; `key` names the config
      key in its error);
    - local paths and `file://` URIs become absolute (`~` expanded); `create=True` makes the
      folder, for callers that write into it; `file_uri=True` returns `file:///...`;
    - any other scheme (`s3://`, `gs://`, `models:/`, `postgresql://`) is returned unchanged.
    """
    if uri.startswith("sqlite:"):
        return _absolute_sqlite_uri(uri, key=key)
    if _SCHEME.match(uri) and not uri.startswith("file://"):
        return uri  # object storage, a registry or a server: nothing local to resolve
    path = Path(uri.removeprefix("file://")).expanduser().resolve()
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path.as_uri() if file_uri else str(path)


def _absolute_sqlite_uri(uri: str, key: str) -> str:
    """A SQLite URI with an absolute path (its folder created); any other URI unchanged.

    Ray workers and Serve replicas may run in another directory than the driver, so a relative
    `sqlite:///.raylift/x.db` would name a different (empty) database in each of them; an
    in-memory database is private to one process, so it is refused with the key to fix.
    """
    if not uri.startswith("sqlite:"):
        return uri  # a database server (postgresql://...): nothing local to resolve
    path, sep, query = uri.removeprefix(SQLITE_PREFIX).partition("?")
    if not uri.startswith(SQLITE_PREFIX) or path in ("", ":memory:"):
        raise ValueError(
            f"{key}={uri!r} is an in-memory SQLite database, which every Ray worker "
            "would see empty; use a file, e.g. sqlite:///.raylift/state.db"
        )
    absolute = Path(path).expanduser().resolve()
    absolute.parent.mkdir(parents=True, exist_ok=True)
    return f"{SQLITE_PREFIX}{absolute}{sep}{query}"


# --- small JSON state files beside a run's checkpoints (local disk or object storage) ------


def read_json(folder: str, name: str) -> dict[str, Any] | None:
    """`folder/name` parsed, or None when there is no such file (pyarrow filesystems: a local
    path or an s3:// URI alike)."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(folder)
    target = f"{path}/{name}"
    if fs.get_file_info(target).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(target) as stream:
        return json.loads(stream.read())


def write_json(folder: str, name: str, body: dict[str, Any]) -> None:
    """Write `body` as `folder/name`, creating the folder."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(folder)
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{name}") as stream:
        stream.write(json.dumps(body).encode())


def delete_folder(folder: str) -> None:
    """Delete `folder` and everything in it; nothing when it does not exist."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(folder)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_dir(path)
