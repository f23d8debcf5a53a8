"""Experiment tracking for jobs: a tracked MLflow run, its lineage tags, and registration."""

from __future__ import annotations

import contextlib
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jobs.config import LifecycleConfig, config_hash
from jobs.train_loop import REPORTED_METRICS
from serving import registry, tags

__all__ = [
    "ENGINE_GATE_ROWS",
    "engine_rows",
    "flat_params",
    "git_sha",
    "lineage_tags",
    "register",
    "tracked_run",
]

log = logging.getLogger(__name__)

# Validation rows the engine gate checks each variant on at registration: at most this many,
# a seeded sample beyond. 99.5% agreement on 2,048 rows allows 10 changed labels. Exporting and
# checking every variant of the quality model (MiniLM-L6) on its 1,003 validation rows took
# 27 s at registration on 2 AVX512-BF16 cores shared with a running search (load ~5).
ENGINE_GATE_ROWS = 2048


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
        config.registry.tracking_uri,
        config.registry.experiment,
        artifact_location=config.registry.artifact_location,
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
    """Register the checkpoint as a new version; its metrics ride along as version tags.

    Inference engines are built with it, checked on the validation rows its lineage tags name
    (`engine_rows`); when those cannot be read, or `registry.build_engines` is false, the
    version is registered without engines.
    """
    from jobs.modeling import CHECKPOINT_META

    metric_tags = tags.metric_tags(metrics, REPORTED_METRICS)
    is_checkpoint = (Path(checkpoint_dir) / CHECKPOINT_META).is_file()
    with_engines = is_checkpoint and config.registry.build_engines
    return registry.register_checkpoint(
        config.registry.model_name,
        run_id,
        checkpoint_dir,
        {**version_tags, **metric_tags},
        engine_rows=engine_rows(config, version_tags) if with_engines else None,
        engines_off=None if config.registry.build_engines else "registry.build_engines is false",
        trust_remote_code=config.model.trust_remote_code,
    )


def engine_rows(
    config: LifecycleConfig, version_tags: dict[str, str], limit: int = ENGINE_GATE_ROWS
):
    """The validation rows of the version's lineage (table, snapshot, split), read with pyiceberg
    (no Ray), at most `limit` of them; None when the tags name no rows or they cannot be read."""
    from jobs.reevaluate import EvalRows

    try:
        rows = EvalRows.from_tags(version_tags)
    except ValueError:
        return None
    try:
        texts, labels = _validation_texts(config, rows)
    except Exception as exc:  # engines are optional: the version registers without them
        log.warning("validation rows %s not readable for the engine gate: %s", rows.describe(), exc)
        return None
    return _sampled(texts, labels, rows.describe(), limit)


def _validation_texts(config: LifecycleConfig, rows: Any) -> tuple[list[str], list[str]]:
    """Texts and labels of `rows`' validation side, split exactly as training split them."""
    import pyarrow as pa

    from jobs import warehouse
    from jobs.training_data import trainable_rows
    from jobs.warehouse.catalog import load_table

    task = config.task
    table = load_table(warehouse.load_catalog(config.catalog), config.catalog, rows.table)
    columns = (task.key_column, task.text_column, task.label_column)
    arrow = table.scan(selected_fields=columns, snapshot_id=rows.snapshot_id).to_arrow()
    arrow = trainable_rows(arrow, text_column=task.text_column, label_column=task.label_column)
    keys = arrow[task.key_column].to_numpy()
    labels = arrow[task.label_column].cast(pa.string())
    thresholds = warehouse.split_thresholds(keys, labels.to_numpy(), rows.fraction, rows.seed)
    keep = warehouse.SplitFilter(
        thresholds, task.key_column, task.label_column, keep="validation", seed=rows.seed
    )
    held_out = arrow.filter(pa.array(keep.mask(keys, labels)))
    return (
        held_out[task.text_column].to_pylist(),
        held_out[task.label_column].cast(pa.string()).to_pylist(),
    )


def _sampled(texts: list[str], labels: list[str], source: str, limit: int):
    from serving.engines import EngineRows

    if len(texts) > limit:
        import numpy as np

        picked = np.sort(np.random.default_rng(0).choice(len(texts), size=limit, replace=False))
        texts, labels = [texts[i] for i in picked], [labels[i] for i in picked]
        source = f"{source} (seeded sample of {limit})"
    return EngineRows(texts=texts, labels=labels, source=source)


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
