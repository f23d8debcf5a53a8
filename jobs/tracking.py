"""Experiment tracking for jobs: a tracked MLflow run, its lineage tags, and registration."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jobs.config import LifecycleConfig, config_hash
from jobs.train_loop import REPORTED_METRICS
from serving import registry, tags

__all__ = ["flat_params", "git_sha", "lineage_tags", "register", "tracked_run"]


def git_sha() -> str:
    """The commit the code runs from, '+dirty' if it has local changes, 'unknown' outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}+dirty" if dirty else sha


def lineage_tags(config: LifecycleConfig, data_lineage: dict[str, str]) -> dict[str, str]:
    """The version's lineage: config, code, model, and the data tags of `PreparedData.lineage`."""
    return {
        tags.CONFIG_NAME: config.name,
        tags.CONFIG_HASH: config_hash(config),
        tags.GIT_SHA: git_sha(),
        tags.BASE_MODEL: config.model.base,
        tags.METHOD: config.model.method,
        tags.TASK: config.task.type,
        tags.VALIDATION_SPLIT: (
            f"fraction={config.data.validation.fraction},seed={config.data.validation.seed}"
        ),
        **data_lineage,
    }


@contextlib.contextmanager
def tracked_run(config: LifecycleConfig, run_tags: dict[str, str]) -> Iterator[str]:
    """An MLflow run with the config as params; marked FAILED if the body raises."""
    import mlflow

    experiment_id = registry.configure_tracking(
        config.registry.tracking_uri, config.registry.experiment
    )
    with mlflow.start_run(experiment_id=experiment_id, tags=run_tags) as run:
        mlflow.log_params(
            flat_params(config.model_dump(include={"model", "train", "data", "task"}))
        )
        yield run.info.run_id


def register(
    config: LifecycleConfig,
    run_id: str,
    checkpoint_dir: str | Path,
    version_tags: dict[str, str],
    metrics: dict[str, Any],
) -> str:
    """Register the checkpoint as a new version; its metrics ride along as version tags."""
    metric_tags = tags.metric_tags(metrics, REPORTED_METRICS)
    return registry.register_checkpoint(
        config.registry.model_name, run_id, checkpoint_dir, {**version_tags, **metric_tags}
    )


def flat_params(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: dotted keys, values as text cut to 500 characters."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_params(value, prefix=f"{name}."))
        else:
            flat[name] = str(value)[:500]
    return flat
