"""Storage URIs as every process of a cluster sees them.

Object storage (S3 and S3-compatible servers such as MinIO) is named by URI (`s3://bucket/p`)
and reached through pyarrow with the standard AWS environment variables of each process:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), AWS_REGION, and
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL for a server other than AWS. Credentials never go in a
config: every node (or pod) holds them in its environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any

__all__ = [
    "S3_ENDPOINT_ENV",
    "delete_folder",
    "download_folder",
    "filesystem_uri",
    "is_object_storage",
    "is_remote",
    "iceberg_s3_properties",
    "read_json",
    "upload_folder",
    "worker_visible_uri",
    "write_json",
]

# Read in this order by boto3 (MLflow's S3 artifacts) and by pyarrow's `FileSystem.from_uri`
# (Ray Train's storage); pyiceberg's FileIO builds its S3FileSystem without reading them, so
# `iceberg_s3_properties` hands them over as catalog properties.
S3_ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_REGION_ENV = ("AWS_REGION", "AWS_DEFAULT_REGION")
_OBJECT_STORAGE = ("s3://", "gs://", "gcs://", "abfs://", "abfss://", "hdfs://")

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


def is_remote(uri: str) -> bool:
    """True for a URI with a scheme other than `file://` (object storage, a registry)."""
    return bool(_SCHEME.match(uri)) and not uri.startswith("file://")


def is_object_storage(uri: str) -> bool:
    """True for a URI pyarrow opens as a file system of its own (S3, GCS, Azure, HDFS)."""
    return uri.startswith(_OBJECT_STORAGE)


def iceberg_s3_properties(properties: dict[str, str]) -> dict[str, str]:
    """pyiceberg's S3 endpoint and region from the AWS environment, where `properties` (the
    catalog's, from the config) does not set them.

    pyiceberg's FileIO passes its own `s3.endpoint` to pyarrow, which then ignores
    AWS_ENDPOINT_URL; without `s3.region` it asks AWS where the bucket is, which an
    S3-compatible server cannot answer. Neither value is a secret, so Ray workers get them with
    the catalog's properties; the keys stay in each process's environment.
    """
    found = {}
    endpoint = _first_env(S3_ENDPOINT_ENV)
    if endpoint and "s3.endpoint" not in properties:
        found["s3.endpoint"] = endpoint
    region = _first_env(_REGION_ENV)
    if region and not {"s3.region", "client.region"} & set(properties):
        found["s3.region"] = region
    return found


def _first_env(names: tuple[str, ...]) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


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


def filesystem_uri(filesystem: Any, path: str) -> str:
    """`path` inside a pyarrow `filesystem` as a URI others can open (`s3://bucket/key` for S3,
    the path itself on local disk), e.g. a Ray Train checkpoint's `filesystem` and `path`."""
    scheme = {"s3": "s3", "gcs": "gs", "abfs": "abfs", "hdfs": "hdfs"}.get(
        getattr(filesystem, "type_name", "local")
    )
    return f"{scheme}://{path.lstrip('/')}" if scheme else path


def download_folder(uri: str, target: str | Path) -> Path:
    """Copy the folder `uri` (object storage, or a local path) to the local `target`; return
    `target`. A FileNotFoundError names the URI when there is nothing there."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.Directory:
        # Object stores have no folders, only keys: a prefix with keys under it is one.
        listed = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
        if not listed:
            raise FileNotFoundError(f"{uri} holds no files")
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    pyarrow.fs.copy_files(
        path, str(target), source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem()
    )
    return target


def upload_folder(local: str | Path, uri: str) -> None:
    """Copy the local folder `local` and everything in it to `uri` (object storage, or a path)."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    fs.create_dir(path, recursive=True)
    pyarrow.fs.copy_files(
        str(Path(local).resolve()),
        path,
        source_filesystem=pyarrow.fs.LocalFileSystem(),
        destination_filesystem=fs,
    )
