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

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from cluster.storage import (
    cached_folder,
    folder_digest,
    is_object_storage,
    is_remote,
    worker_visible_uri,
)

__all__ = [
    "CHECKPOINT_ARTIFACT",
    "ResolvedModel",
    "ResolvedVersion",
    "configure_tracking",
    "delete_alias",
    "get_alias_version",
    "previous_alias",
    "register_checkpoint",
    "resolve_model",
    "resolve_version",
    "set_alias",
]

CHECKPOINT_ARTIFACT = "checkpoint"
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
    """The ModelVersion behind `alias`, or None if the alias (or the model) is not set."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient().get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


def previous_alias(alias: str) -> str:
    """Where the old target of `alias` is kept: @previous for @production."""
    return "previous" if alias == "production" else f"{alias}-previous"


def set_alias(model_name: str, alias: str, version: str) -> str | None:
    """Point `alias` at `version`, keeping the old target under `previous_alias`; return it."""
    from mlflow import MlflowClient

    client = MlflowClient()
    current = get_alias_version(model_name, alias)
    previous = str(current.version) if current is not None else None
    if previous is not None and previous != str(version):
        client.set_registered_model_alias(model_name, previous_alias(alias), previous)
    client.set_registered_model_alias(model_name, alias, str(version))
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
        raise LookupError(
            f"{uri} is not in the registry at {mlflow.get_registry_uri()}: {exc.message}; "
            "train and promote a model first (raylift finetune, raylift promote)"
        ) from None
