"""The model registry (MLflow): tracked runs, registered versions with lineage, aliases.

A version is only ever created from artifacts already uploaded to its run, so the registry never
holds a version without its checkpoint. `resolve_model` turns `models:/name@alias`,
`models:/name/3`, a local checkpoint directory or one on object storage (`s3://bucket/ckpt`) into
a local path plus its registry identity. Artifacts go where the experiment says (its
artifact_location: registry.artifact_location, e.g. `s3://bucket/mlartifacts`).

A checkpoint that is not on local disk is downloaded once per node into cluster.storage's cache
(`cached_folder`) and reused by the next load: a registered version's artifacts never change, so
its artifact URI names the copy; a folder on object storage is named by its URI and listing.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from cluster.storage import (
    cache_dir,
    cached_folder,
    folder_digest,
    is_object_storage,
    is_remote,
    redact_credentials,
    worker_visible_uri,
)

__all__ = [
    "CHECKPOINT_ARTIFACT",
    "AliasMoveFailed",
    "RegistryUnavailable",
    "ResolvedModel",
    "ResolvedVersion",
    "alias_lock",
    "alias_versions",
    "check_aliases",
    "configure_tracking",
    "delete_alias",
    "get_alias_version",
    "move_alias",
    "previous_alias",
    "register_checkpoint",
    "resolve_model",
    "resolve_version",
    "set_alias",
]

CHECKPOINT_ARTIFACT = "checkpoint"
# MLflow's answers that mean "no such model, version or alias"; any other error (a server
# down, a database locked, a refused login) says nothing about the name.
_NOT_THERE = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


class RegistryUnavailable(RuntimeError):
    """The registry could not answer (unreachable, locked, refusing): not an answer about the
    name asked for. Serving answers 503 for it, where a LookupError is a 404."""


def _unavailable(exc: Any, asked: str) -> RegistryUnavailable:
    import mlflow

    return RegistryUnavailable(
        f"the model registry at {redact_credentials(mlflow.get_registry_uri())} could not be "
        f"read for {asked}: {exc.error_code}: {redact_credentials(exc.message)}"
    )


_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class ResolvedModel:
    path: str
    name: str | None
    version: str | None
    uri: str


@dataclass(frozen=True)
class ResolvedVersion:
    """A model version pinned in the registry, its artifacts not downloaded.

    `name` and `version` are None for a local checkpoint directory (`source` is then its
    absolute path)."""

    name: str | None
    version: str | None
    source: str

    @property
    def uri(self) -> str:
        """What workers load: `models:/name/N` (never an alias), or the checkpoint directory."""
        return f"models:/{self.name}/{self.version}" if self.version else self.source


def absolute_tracking_uri(tracking_uri: str) -> str:
    """The tracking URI as Ray workers and replicas must see it (absolute SQLite path)."""
    return worker_visible_uri(tracking_uri, key="registry.tracking_uri")


def configure_tracking(
    tracking_uri: str, experiment: str | None = None, artifact_location: str | None = None
) -> str | None:
    """Point MLflow at `tracking_uri`; create `experiment` if it is new, its artifacts at
    `artifact_location` (registry.artifact_location: a local path or s3:// URI), else beside a
    SQLite database (mlartifacts/), else where the tracking server puts them.

    An experiment keeps the location it was created with: a configured location that differs
    from an existing experiment's is refused, rather than writing elsewhere than configured."""
    import mlflow

    uri = absolute_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if experiment is None:
        return None
    location = _artifact_location(uri, artifact_location)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return mlflow.create_experiment(experiment, artifact_location=location)
    if artifact_location and found.artifact_location.rstrip("/") != location.rstrip("/"):
        raise ValueError(
            f"registry.artifact_location={artifact_location!r}, but MLflow experiment "
            f"{experiment!r} (registry.experiment) keeps its artifacts at "
            f"{found.artifact_location}; name a new experiment for the new location, or set "
            "registry.artifact_location to the existing one"
        )
    return found.experiment_id


def _artifact_location(tracking_uri: str, configured: str | None) -> str | None:
    if configured:
        return worker_visible_uri(
            configured, key="registry.artifact_location", create=True, file_uri=True
        )
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    return None


def register_checkpoint(
    model_name: str,
    run_id: str,
    checkpoint_dir: str | Path,
    tags: dict[str, str],
    *,
    engine_rows: Any | None = None,
    engines_off: str | None = None,
    trust_remote_code: bool = False,
) -> str:
    """Upload `checkpoint_dir` to the run, then create a model version from it; return it.

    With `engine_rows` (a `serving.engines.EngineRows` of labelled validation rows), the
    uploaded copy also holds inference engines built and checked on them, and the version's tags
    their figures (`serving.engines.stage_with_engines`); without, or with `engines_off` (the
    reason none are built, recorded as a tag), the version serves on torch.
    """
    import tempfile

    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from serving.engines import stage_with_engines

    client = MlflowClient()
    with tempfile.TemporaryDirectory(prefix="raylift-engines-") as staging:
        upload, engine_tags = stage_with_engines(
            checkpoint_dir,
            staging,
            engine_rows,
            engines_off=engines_off,
            trust_remote_code=trust_remote_code,
        )
        client.log_artifacts(run_id, str(upload), CHECKPOINT_ARTIFACT)
    try:
        client.create_registered_model(model_name)
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    source = f"{mlflow.get_run(run_id).info.artifact_uri}/{CHECKPOINT_ARTIFACT}"
    version = client.create_model_version(
        model_name, source=source, run_id=run_id, tags={**tags, **engine_tags}
    )
    return str(version.version)


def get_alias_version(model_name: str, alias: str) -> Any | None:
    """The ModelVersion behind `alias`, or None if the alias (or the model) is not set;
    RegistryUnavailable if the registry cannot say (never None for an outage: promotion
    would take a missing incumbent for no incumbent)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient().get_model_version_by_alias(model_name, alias)
    except MlflowException as exc:
        if exc.error_code in _NOT_THERE:
            return None
        raise _unavailable(exc, f"models:/{model_name}@{alias}") from None


def previous_alias(alias: str) -> str:
    """Where the old target of `alias` is kept: @previous for @production."""
    return "previous" if alias == "production" else f"{alias}-previous"


class AliasMoveFailed(RegistryUnavailable):
    """An alias write failed, or the aliases did not read back as written: the message says
    which write, what the aliases hold now and what to run."""


# How long a promote or rollback waits for another one of the same model to finish its alias
# move: that takes milliseconds to a second (a few SQLite writes and reads), so a minute means
# the holder hangs; its lock goes with its process.
_ALIAS_LOCK_WAIT_S = 60.0
_ALIAS_LOCK_POLL_S = 0.05


@contextlib.contextmanager
def alias_lock(model_name: str, wait_s: float = _ALIAS_LOCK_WAIT_S) -> Iterator[Path]:
    """Hold the lock on `model_name`'s aliases: promote and rollback hold it from the moment
    they read the alias to decide through their last alias write, so two of them never
    interleave (MLflow has no compare-and-set on aliases).

    A SQLite registry is locked by a file beside its database, which every process that writes
    the database sees. Any other registry (a tracking server) by a file in this node's cache
    folder: that serialises promotes started on this node only; two nodes promoting one model
    at once are caught afterwards, at best, by move_alias's read-back."""
    import fcntl

    path = _alias_lock_path(model_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    with path.open("a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RegistryUnavailable(
                        f"another promote or rollback of {model_name!r} has held {path} for "
                        f"{wait_s:.0f} s; if no such process is running anymore, run again"
                    ) from None
                time.sleep(_ALIAS_LOCK_POLL_S)
        try:
            yield path
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _alias_lock_path(model_name: str) -> Path:
    import mlflow

    uri = mlflow.get_registry_uri()
    digest = hashlib.sha256(f"{uri}\n{model_name}".encode()).hexdigest()[:16]
    readable = re.sub(r"[^A-Za-z0-9_.-]", "_", model_name)[:64]
    if uri.startswith("sqlite:///"):
        database = Path(uri[len("sqlite:///") :])
        return database.with_name(f"{database.name}.aliases-{readable}-{digest}.lock")
    return cache_dir() / "alias-locks" / f"{readable}-{digest}.lock"


def move_alias(model_name: str, alias: str, version: str, current: str | None) -> None:
    """Point `alias` at `version`, keeping `current` (the version the caller read at `alias`
    under alias_lock, and judged against) under previous_alias; then read both back.

    @previous is written first: a failure between the two writes leaves both aliases at
    `current`, still served and still named, and the same move run again completes it. Written
    the other way round, that failure would leave no alias naming `current`."""
    from mlflow import MlflowClient

    client = MlflowClient()
    written = {alias: str(version)}
    if current is not None and current != str(version):
        _write_alias(client, model_name, previous_alias(alias), current, written)
        written[previous_alias(alias)] = current
    _write_alias(client, model_name, alias, str(version), written)
    check_aliases(model_name, written)


def _write_alias(
    client: Any, model_name: str, alias: str, version: str, written: dict[str, str]
) -> None:
    try:
        client.set_registered_model_alias(model_name, alias, version)
    except Exception as exc:
        done = ", ".join(f"@{a}={v}" for a, v in written.items() if a != alias) or "nothing"
        raise AliasMoveFailed(
            f"writing @{alias}=version {version} of {model_name!r} failed ({exc}); written "
            f"before it: {done}; aliases now: {_aliases_or_unknown(model_name)}; run the same "
            "command again to complete the move"
        ) from exc


def _aliases_or_unknown(model_name: str) -> str:
    try:
        return str(alias_versions(model_name))
    except Exception as exc:  # the registry that refused the write may refuse the read too
        return f"unknown (reading them failed too: {exc})"


def alias_versions(model_name: str) -> dict[str, str]:
    """Every alias of the model and the version it names, as the registry holds them now ({}
    for a model not registered); RegistryUnavailable if the registry cannot say."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        model = MlflowClient().get_registered_model(model_name)
    except MlflowException as exc:
        if exc.error_code in _NOT_THERE:
            return {}
        raise _unavailable(exc, f"the aliases of {model_name!r}") from None
    return {alias: str(version) for alias, version in model.aliases.items()}


def check_aliases(model_name: str, expected: dict[str, str | None]) -> None:
    """AliasMoveFailed unless each alias names the version given (None: no version)."""
    found = alias_versions(model_name)
    wrong = {a: v for a, v in expected.items() if found.get(a) != v}
    if wrong:
        raise AliasMoveFailed(
            f"the aliases of {model_name!r} read back as {found}, not as just written "
            f"({', '.join(f'@{a}={v}' for a, v in wrong.items())}): another process moved them "
            "meanwhile (a promote or rollback on another node, or by hand); check them before "
            "promoting again"
        )


def set_alias(model_name: str, alias: str, version: str) -> str | None:
    """Point `alias` at `version`, keeping the old target under `previous_alias`; return it.
    (Unconditional: promote gates first, then uses alias_lock and move_alias itself.)"""
    with alias_lock(model_name):
        current = get_alias_version(model_name, alias)
        previous = str(current.version) if current is not None else None
        move_alias(model_name, alias, version, previous)
    return previous


def delete_alias(model_name: str, alias: str) -> None:
    """Remove `alias` from the model (the version itself stays)."""
    from mlflow import MlflowClient

    MlflowClient().delete_registered_model_alias(model_name, alias)


def resolve_model(
    uri: str, tracking_uri: str | None = None, source: str | None = None
) -> ResolvedModel:
    """A local checkpoint directory for `uri`, downloading registry artifacts, or a checkpoint
    folder on object storage, when needed.

    `source`: where a caller that pinned `uri` (models:/name/N) found its artifacts
    (`resolve_version(...).source`); a local folder there is used as it is, without asking the
    registry again, nor importing MLflow (1.4 CPU-s of each scoring actor's start, measured on 2
    AVX512-BF16 cores). Any other source is resolved through the registry as without it."""
    if Path(uri).is_dir():
        return ResolvedModel(path=str(Path(uri).resolve()), name=None, version=None, uri=uri)
    if is_object_storage(uri):
        return ResolvedModel(path=_download_checkpoint(uri), name=None, version=None, uri=uri)
    match = _parse_models_uri(uri)
    pinned = _local_folder(source) if source and match["version"] else None
    if pinned is not None:
        return ResolvedModel(path=pinned, name=match["name"], version=match["version"], uri=uri)
    import mlflow

    version = _registry_version(match, uri, tracking_uri)
    if is_remote(version.source):
        copy = cached_folder(
            version.source,
            "checkpoints",
            key="registry.artifact_location",
            fetch=_download_artifacts,
        )
        path = str(copy)
    else:  # MLflow hands back the file store's own folder: nothing is copied
        path = mlflow.artifacts.download_artifacts(artifact_uri=version.source)
    return ResolvedModel(path=path, name=match["name"], version=str(version.version), uri=uri)


def _local_folder(source: str) -> str | None:
    """The folder a local artifact `source` (a path or file:// URI) names, if it is one here."""
    if is_remote(source):
        return None
    path = Path(unquote(urlparse(source).path)) if source.startswith("file://") else Path(source)
    return str(path) if path.is_dir() else None


def resolve_version(uri: str, tracking_uri: str | None = None) -> ResolvedVersion:
    """The registry version `uri` names now (an alias is resolved to its number), asking only
    the registry: nothing is downloaded. A checkpoint directory is returned as it is."""
    if Path(uri).is_dir():
        return ResolvedVersion(name=None, version=None, source=str(Path(uri).resolve()))
    if is_object_storage(uri):
        return ResolvedVersion(name=None, version=None, source=uri)  # loaded where it is used
    version = _registry_version(_parse_models_uri(uri), uri, tracking_uri)
    return ResolvedVersion(name=version.name, version=str(version.version), source=version.source)


def _download_checkpoint(uri: str) -> str:
    """The cached local copy of the checkpoint folder at `uri`, in a folder named as the URI's
    last part (what a model without a registry name is called). Anyone may write new files
    under the same URI, so the copy is named by the URI and its listing (names, sizes, times):
    a changed folder is downloaded again."""
    listed = folder_digest(uri)
    if listed is None:
        raise FileNotFoundError(
            f"model URI {uri!r} holds no files: name a checkpoint folder (raylift.json and the "
            "weights), or a registry version models:/<name>/<version>"
        )
    return str(cached_folder(uri, "checkpoints", key="model URI", version=listed))


def _download_artifacts(source: str, target: Path) -> None:
    """MLflow's download of the artifact folder `source` (any store MLflow reaches: s3://,
    mlflow-artifacts:/ through a tracking server) into the new folder `target`."""
    import mlflow

    scratch = target.parent / ".mlflow"
    downloaded = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(scratch))
    Path(downloaded).rename(target)
    shutil.rmtree(scratch)


def _parse_models_uri(uri: str) -> re.Match[str]:
    match = _MODELS_URI.match(uri)
    if match is None:
        raise ValueError(
            f"model URI {uri!r} is neither a checkpoint directory (local or s3://...) nor "
            "models:/<name>@<alias> or models:/<name>/<version>"
        )
    return match


def _registry_version(match: re.Match[str], uri: str, tracking_uri: str | None) -> Any:
    """The MLflow ModelVersion `match` (a parsed models:/ URI) names; LookupError if none."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if tracking_uri:
        configure_tracking(tracking_uri)
    name = match["name"]
    try:
        if match["alias"]:
            return MlflowClient().get_model_version_by_alias(name, match["alias"])
        return MlflowClient().get_model_version(name, match["version"])
    except MlflowException as exc:
        if exc.error_code not in _NOT_THERE:
            raise _unavailable(exc, uri) from None
        raise LookupError(
            f"{uri} is not in the registry at {redact_credentials(mlflow.get_registry_uri())}: "
            f"{redact_credentials(exc.message)}; train and promote a model first (raylift "
            "finetune, raylift promote)"
        ) from None
