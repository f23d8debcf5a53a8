"""Storage URIs as every process of a cluster sees them.

Object storage (S3 and S3-compatible servers such as MinIO) is named by URI (`s3://bucket/p`)
and reached through pyarrow with the standard AWS environment variables of each process:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), AWS_REGION, and
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL for a server other than AWS. Credentials never go in a
config: every node (or pod) holds them in its environment.

Folders whose content never changes (a base model on S3, a registered version's checkpoint) are
downloaded once per node into a cache (`cache_dir()`: RAYLIFT_CACHE_DIR, else
~/.cache/raylift) and reused by every process there (`cached_folder`). Each new download evicts
the least recently used entries that have been idle an hour while the cache holds more than
RAYLIFT_CACHE_MAX_GB (20 by default): every promotion brings another version's checkpoint and
engines, and a long-lived node would otherwise fill its disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "CACHE_DIR_ENV",
    "CACHE_MAX_GB_ENV",
    "ENGINE_PICKS_DIR",
    "OPENVINO_CACHE_DIR",
    "S3_ENDPOINT_ENV",
    "cache_dir",
    "cached_folder",
    "credentials_in_uri",
    "delete_folder",
    "download_folder",
    "evict_least_recently_used",
    "filesystem_uri",
    "folder_digest",
    "iceberg_s3_properties",
    "is_object_storage",
    "is_remote",
    "list_files",
    "read_json",
    "redact_credentials",
    "refuse_keys_in_uri",
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

CACHE_DIR_ENV = "RAYLIFT_CACHE_DIR"
_DEFAULT_CACHE_DIR = "~/.cache/raylift"
_SOURCE_FILE = "source.txt"  # beside each cached folder: the URI it was downloaded from
CACHE_MAX_GB_ENV = "RAYLIFT_CACHE_MAX_GB"
# Folders under the cache whose every file is one entry (serving.engines writes both): OpenVINO's
# compiled blobs, and the engine `auto` picked for a version on this node.
OPENVINO_CACHE_DIR = "openvino-cache"
ENGINE_PICKS_DIR = "engine-picks"
_DEFAULT_CACHE_MAX_GB = 20.0
# An entry used (or written) this recently is never evicted: a process may be reading it. Loads
# read a cached folder within seconds of asking for it; an hour leaves a wide margin.
_EVICT_IDLE_S = 3600.0

log = logging.getLogger(__name__)

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


def download_folder(uri: str, target: str | Path, exclude: tuple[str, ...] = ()) -> Path:
    """Copy the folder `uri` (object storage, or a local path) to the local `target`; return
    `target`. Files whose name ends with one of `exclude` are left out. A FileNotFoundError
    names the URI when there is nothing there."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    if fs.get_file_info(path).type != pyarrow.fs.FileType.Directory:
        # Object stores have no folders, only keys: a prefix with keys under it is one.
        listed = fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
        if not listed:
            raise FileNotFoundError(f"{uri} holds no files")
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    local = pyarrow.fs.LocalFileSystem()
    if not exclude:
        pyarrow.fs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=local)
        return target
    for name in _relative_files(fs, path):
        if not name.endswith(exclude):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            pyarrow.fs.copy_files(
                f"{path}/{name}",
                str(target / name),
                source_filesystem=fs,
                destination_filesystem=local,
            )
    return target


def list_files(uri: str) -> list[str]:
    """The files under the folder `uri` (object storage, or a local path), as sorted paths
    relative to it; empty when there is nothing there."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    return _relative_files(fs, path)


def folder_digest(uri: str) -> str | None:
    """A digest of the folder `uri`'s listing (each file's path, size and modification time):
    it changes when a file under it is written again. None when there is nothing there."""
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    selector = pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=True)
    listing = sorted(
        f"{info.path} {info.size} {info.mtime_ns}"
        for info in fs.get_file_info(selector)
        if info.type == pyarrow.fs.FileType.File
    )
    return hashlib.sha256("\n".join(listing).encode()).hexdigest() if listing else None


def _relative_files(fs: Any, path: str) -> list[str]:
    import pyarrow.fs

    selector = pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=True)
    prefix = path.rstrip("/") + "/"
    return sorted(
        info.path.removeprefix(prefix)
        for info in fs.get_file_info(selector)
        if info.type == pyarrow.fs.FileType.File
    )


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


# --- this node's cache of downloaded folders -----------------------------------------------------


def cache_dir() -> Path:
    """Where this node keeps downloaded folders: RAYLIFT_CACHE_DIR, else ~/.cache/raylift."""
    return Path(os.environ.get(CACHE_DIR_ENV) or _DEFAULT_CACHE_DIR).expanduser()


def cached_folder(
    uri: str,
    kind: str,
    *,
    key: str,
    fetch: Callable[[str, Path], Any] | None = None,
    version: str = "",
) -> Path:
    """A local copy of the folder `uri`, downloaded once per node and then reused.

    For folders whose content never changes under one name: a base model, a registered
    version's artifacts; `version` (e.g. a listing's sizes and times) goes into the name where
    the URI alone does not pin the content. The copy is `cache_dir()/kind/<hash>/<last part of
    uri>`. `fetch(uri, folder)` fills `folder` (default: `download_folder`). It runs into a
    temporary folder beside, renamed into place once complete, under a file lock: processes of
    one node (two training ranks, a replica and a batch actor) wait for one download and never
    see half a folder. `key` names the config key in errors.
    """
    refuse_keys_in_uri(uri, key)
    name = uri.rstrip("/").rpartition("/")[2] or "folder"
    digest = hashlib.sha256(f"{uri.rstrip('/')}\n{version}".encode()).hexdigest()[:20]
    entry = cache_dir() / kind / digest
    if (entry / name).is_dir():  # renamed into place only when complete: no lock to read
        _mark_used(entry)
        return entry / name
    entry.parent.mkdir(parents=True, exist_ok=True)
    with _entry_lock(entry):
        if not (entry / name).is_dir():
            shutil.rmtree(entry, ignore_errors=True)  # a copy someone emptied by hand
            _download_entry(uri, entry, name, fetch or download_folder)
    evict_least_recently_used(keep=entry)
    return entry / name


def _mark_used(entry: Path) -> None:
    """The entry's last use is its source file's time (eviction reads it)."""
    with contextlib.suppress(OSError):  # a read-only cache is used, not evicted
        os.utime(entry / _SOURCE_FILE)


def evict_least_recently_used(keep: Path | None = None) -> list[Path]:
    """Delete cached entries, least recently used first, until the cache holds at most
    RAYLIFT_CACHE_MAX_GB. Entries are downloaded folders (with their source file), OpenVINO's
    compiled blobs and engine picks; one used in the last hour, or `keep`, is never deleted.
    Returns the deleted."""
    limit = _cache_limit_bytes()
    entries = _cache_entries(cache_dir())
    total = sum(size for _, size, _ in entries)
    evicted: list[Path] = []
    now = time.time()
    for path, size, used in sorted(entries, key=lambda e: e[2]):
        if total <= limit:
            break
        if path == keep or now - used < _EVICT_IDLE_S:
            continue
        try:
            _delete_entry(path)
        except OSError as error:  # a read-only or shared cache: leave it as it is
            log.warning("cache: cannot evict %s: %s", path, error)
            continue
        log.info(
            "cache: evicted %s (%.1f MB, unused %.1f h)", path, size / 1e6, (now - used) / 3600
        )
        evicted.append(path)
        total -= size
    return evicted


def _cache_limit_bytes() -> float:
    raw = os.environ.get(CACHE_MAX_GB_ENV)
    try:
        gigabytes = float(raw) if raw else _DEFAULT_CACHE_MAX_GB
    except ValueError:
        gigabytes = -1.0
    if not gigabytes > 0:
        raise ValueError(
            f"{CACHE_MAX_GB_ENV}={raw!r}: give the most gigabytes this node's cache may hold, "
            f"a positive number (default {_DEFAULT_CACHE_MAX_GB:g})"
        )
    return gigabytes * 1e9


def _cache_entries(root: Path) -> list[tuple[Path, int, float]]:
    """(path, bytes, last used) of each evictable entry under the cache folder."""
    found = []
    for source in root.glob(f"*/*/{_SOURCE_FILE}"):  # kind/digest/source.txt
        entry = source.parent
        size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
        found.append((entry, size, source.stat().st_mtime))
    for folder in (OPENVINO_CACHE_DIR, ENGINE_PICKS_DIR):
        for file in (root / folder).glob("*"):
            if file.is_file() and not file.name.startswith("."):  # not a lock file
                stat = file.stat()
                found.append((file, stat.st_size, stat.st_mtime))
    return found


def _delete_entry(path: Path) -> None:
    if path.is_file():
        path.unlink(missing_ok=True)
        return
    with _entry_lock(path):  # not while it is being downloaded
        shutil.rmtree(path, ignore_errors=True)


def _entry_lock(entry: Path) -> contextlib.AbstractContextManager[None]:
    """The lock a cached entry is downloaded and evicted under (a file beside it)."""
    return _file_lock(entry.parent / f"{entry.name}.lock")


def _download_entry(uri: str, entry: Path, name: str, fetch: Callable[[str, Path], Any]) -> None:
    """Fill `entry/name` from `uri` through a temporary folder (the caller holds the lock)."""
    for stale in entry.parent.glob(f".{entry.name}.*"):  # left by a process that died
        shutil.rmtree(stale, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    started = time.perf_counter()
    try:
        fetch(uri, scratch / name)
        (scratch / _SOURCE_FILE).write_text(f"{uri}\n")
        os.rename(scratch, entry)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in (entry / name).rglob("*") if f.is_file())
    log.info(
        "cache: %s -> %s (%.1f MB in %.1f s)",
        uri,
        entry / name,
        size / 1e6,
        time.perf_counter() - started,
    )


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl

    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# Credentials in a URI's userinfo: `scheme://user:password@host`, and for http(s) a bare
# `https://token@host` too (requests sends it as basic auth; it is how tokens ride in URLs).
# `postgresql://user@host/db` stays allowed: a user name is no secret, the password comes from
# PGPASSWORD. A password runs to the URI's last `@` because it may hold `/` unescaped (an AWS
# secret key does about one time in two); `host:5000/path@x` is a port, not a password.
# Quotes, `<`, `>` and whitespace end a URI inside log lines, reprs and HTML.
_USERINFO = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://"
    r"(?P<user>[^\s/?#@:'\"<>`]*)(?::(?P<password>[^\s'\"<>`]*))?@"
)
_PORT_THEN_PATH = re.compile(r"\d*[/?#].*", re.DOTALL)
_TOKEN_AS_USER_SCHEMES = ("http", "https")
# MLflow's `models://profile@databricks/...` and `scope:prefix@databricks` name a Databricks
# CLI profile or a secret scope: references to credentials kept elsewhere, not credentials.
_DATABRICKS_PROFILE = re.compile(r"databricks(?:[/?#\s'\"<>`]|$)")
# Where each library reads what the URI held, by scheme.
_CREDENTIALS_GO = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN for temporary "
    "keys) on every node, or give the nodes an IAM role",
    "gs": "point GOOGLE_APPLICATION_CREDENTIALS at a service-account key file on every node",
    "http": "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) "
    "for an MLflow server, PYICEBERG_CATALOG__<NAME>__TOKEN (or __CREDENTIAL) for an Iceberg REST "
    "catalog named NAME",
    "postgresql": "set PGPASSWORD (or use ~/.pgpass) where the job runs; the user name may stay",
}
_SCHEME_FAMILY = {"s3a": "s3", "s3n": "s3", "gcs": "gs", "https": "http", "postgres": "postgresql"}


def _holds_credentials(match: re.Match[str]) -> bool:
    password = match["password"]
    if password is not None and _PORT_THEN_PATH.fullmatch(password):
        return False  # `host:5000/path@x`: no userinfo at all
    if _DATABRICKS_PROFILE.match(match.string, match.end()):
        return False
    if password:
        return True
    return bool(match["user"]) and match["scheme"].lower() in _TOKEN_AS_USER_SCHEMES


def redact_credentials(text: str) -> str:
    """`text` with the userinfo of every URI in it that holds credentials replaced by `***`.

    `s3://KEY:SECRET@bucket/p` becomes `s3://***@bucket/p`, `https://token@host` becomes
    `https://***@host`; `postgresql://user@db/x`, `models:/name@alias` and text without a URI
    are returned unchanged. For log lines, error messages and pages that echo a URI.
    """
    return _USERINFO.sub(lambda m: f"{m['scheme']}://***@" if _holds_credentials(m) else m[0], text)


def credentials_in_uri(uri: str) -> str | None:
    """Why `uri` may not be used, shown redacted and with where its credentials go instead;
    None when it holds none (the rule `redact_credentials` applies, at the URI's start)."""
    match = _USERINFO.match(uri)
    if match is None or not _holds_credentials(match):
        return None
    scheme = match["scheme"].lower()
    family = _SCHEME_FAMILY.get(scheme, scheme.partition("+")[0])
    fix = _CREDENTIALS_GO.get(
        family, "pass them through the environment variables or files its client library reads"
    )
    return f"{redact_credentials(uri)} holds credentials; remove them from the URI and {fix}"


def refuse_keys_in_uri(uri: str, key: str) -> None:
    """A URI with credentials in it would end up in cache paths, logs and checkpoint metadata."""
    problem = credentials_in_uri(uri)
    if problem:
        raise ValueError(f"{key}={problem}")
