"""Registry tag names: the one owner of every tag a model version carries, and of metric values.

Writers (training lineage, registration, promotion gates) and readers (gates, reports, tests)
import these names; no tag name is written as a string literal anywhere else. The names on the
wire are those registries already hold, so versions registered before keep their meaning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = [
    "BASE_MODEL",
    "CONFIG_HASH",
    "CONFIG_NAME",
    "ENGINES_NOT_BUILT",
    "ENGINES_OFFERED",
    "ENGINE_FIELDS",
    "ENGINE_FORMAT",
    "EVAL_ROWS_TAGS",
    "GATE_FIELDS",
    "GIT_SHA",
    "ICEBERG_SNAPSHOT_ID",
    "ICEBERG_TABLE",
    "INPUT_SNAPSHOT_ID_PROPERTY",
    "INPUT_TABLE_PROPERTY",
    "METHOD",
    "METRIC_PREFIX",
    "MODEL_URI_PROPERTY",
    "ROWS_REFUSED",
    "RUN_DATE_PROPERTY",
    "TASK",
    "TRAIN_ROWS",
    "TUNE_EXPERIMENT",
    "TUNE_PARENT_RUN_ID",
    "TUNE_STOPPED_EARLY",
    "TUNE_TRIAL_EPOCHS",
    "TUNE_TRIAL_ID",
    "VALIDATION_ROWS",
    "VALIDATION_SPLIT",
    "format_metric",
    "engine_tag",
    "gate_check_tag",
    "gate_tag",
    "metric_tag",
    "metric_tags",
    "parse_metric",
    "read_metric",
    "reevaluated_tag",
    "rollback_tag",
]

_LINEAGE = "raylift."

# Lineage: where a version came from.
CONFIG_NAME = f"{_LINEAGE}config_name"
CONFIG_HASH = f"{_LINEAGE}config_hash"
GIT_SHA = f"{_LINEAGE}git_sha"
BASE_MODEL = f"{_LINEAGE}base_model"
METHOD = f"{_LINEAGE}method"
TASK = f"{_LINEAGE}task"
VALIDATION_SPLIT = f"{_LINEAGE}validation_split"
ICEBERG_TABLE = f"{_LINEAGE}iceberg_table"
ICEBERG_SNAPSHOT_ID = f"{_LINEAGE}iceberg_snapshot_id"
TRAIN_ROWS = f"{_LINEAGE}train_rows"
VALIDATION_ROWS = f"{_LINEAGE}validation_rows"
ROWS_REFUSED = f"{_LINEAGE}rows_refused"  # rows with no usable text or label, never trained on

# Tune: which search a version (or a trial's MLflow run) came from, and how its trial ended.
TUNE_EXPERIMENT = f"{_LINEAGE}tune.experiment"  # the Tune experiment's storage path
TUNE_PARENT_RUN_ID = f"{_LINEAGE}tune.parent_run_id"  # the search's MLflow parent run
TUNE_TRIAL_ID = f"{_LINEAGE}tune.trial_id"
TUNE_TRIAL_EPOCHS = f"{_LINEAGE}tune.trial_epochs"  # epochs the trial reported
TUNE_STOPPED_EARLY = f"{_LINEAGE}tune.stopped_early"  # "true" when the scheduler stopped it

# Two versions' metrics are comparable only when both were evaluated on these same rows.
EVAL_ROWS_TAGS = (ICEBERG_TABLE, ICEBERG_SNAPSHOT_ID, VALIDATION_SPLIT)

# Inference engines built at registration (serving.engines): their format, the variants offered
# (comma-separated names such as onnxruntime-fp32, or "none"), why none were built, and per
# variant the gate's figures (engine_tag).
ENGINE_FORMAT = f"{_LINEAGE}engines.format"
ENGINES_OFFERED = f"{_LINEAGE}engines.offered"
ENGINES_NOT_BUILT = f"{_LINEAGE}engines.not_built"
ENGINE_FIELDS = ("verdict", "agreement", "accuracy", "reason")
_ENGINE_PREFIX = f"{_LINEAGE}engine."

# Metrics: one tag per reported metric, e.g. metric.val_accuracy.
METRIC_PREFIX = "metric."

# Iceberg snapshot-summary properties raylift writes on its commits (not registry tags, but the
# same namespace and the same rule: one owner). Values on the wire as written before.
RUN_DATE_PROPERTY = f"{_LINEAGE}run-date"
INPUT_TABLE_PROPERTY = f"{_LINEAGE}input-table"
INPUT_SNAPSHOT_ID_PROPERTY = f"{_LINEAGE}input-snapshot-id"
MODEL_URI_PROPERTY = f"{_LINEAGE}model-uri"

_GATE_PREFIX = f"{_LINEAGE}gate."
_REEVALUATED_PREFIX = f"{_LINEAGE}reevaluated."
_ROLLBACK_PREFIX = f"{_LINEAGE}rollback."

# The fields each gate check records on the candidate (see gate_check_tag).
GATE_FIELDS = ("verdict", "value", "threshold", "at")
_METRIC_DIGITS = 6


def metric_tag(name: str) -> str:
    """The tag holding metric `name`: metric.val_accuracy for val_accuracy."""
    return f"{METRIC_PREFIX}{name}"


def engine_tag(variant: str, field: str) -> str:
    """The tag holding one field of one engine variant's registration check, e.g.
    raylift.engine.onnxruntime-int8.agreement; `field` is one of ENGINE_FIELDS."""
    if field not in ENGINE_FIELDS:
        raise ValueError(f"engine field {field!r}; known: {', '.join(ENGINE_FIELDS)}")
    return f"{_ENGINE_PREFIX}{variant}.{field}"


def gate_tag(alias: str) -> str:
    """The tag holding the promotion verdict ('passed' / 'refused') for `alias`."""
    return f"{_GATE_PREFIX}{alias}"


def gate_check_tag(alias: str, gate: str, field: str) -> str:
    """The tag holding one field of one gate's result for `alias`, e.g.
    raylift.gate.production.floor.value; `field` is one of GATE_FIELDS."""
    if field not in GATE_FIELDS:
        raise ValueError(f"gate field {field!r}; known: {', '.join(GATE_FIELDS)}")
    return f"{_GATE_PREFIX}{alias}.{gate}.{field}"


def reevaluated_tag(name: str) -> str:
    """The tag holding a figure promotion measured again on shared rows, e.g.
    raylift.reevaluated.val_accuracy, raylift.reevaluated.rows (which rows), .at (when)."""
    return f"{_REEVALUATED_PREFIX}{name}"


def rollback_tag(alias: str, field: str) -> str:
    """The tag recording a rollback of `alias` on a version: reason, at, role."""
    return f"{_ROLLBACK_PREFIX}{alias}.{field}"


def format_metric(value: float | int) -> str:
    """A metric as a tag value: integers exactly (epoch, rows), floats to 6 decimals."""
    if isinstance(value, bool):
        raise TypeError(f"metric value {value!r} is a bool, not a number")
    if isinstance(value, int):
        return str(value)
    value = float(value)
    return str(value) if not math.isfinite(value) else f"{value:.{_METRIC_DIGITS}f}"


def parse_metric(tag: str, raw: str) -> float:
    """A metric tag's value as a float; the error names the tag and the value found."""
    try:
        return float(raw)
    except (TypeError, ValueError):
        raise ValueError(
            f"registry tag {tag}={raw!r} is not a number; re-register the version from its "
            "training run (raylift finetune) or fix the tag in the registry"
        ) from None


def read_metric(tags: Mapping[str, str], name: str) -> float | None:
    """Metric `name` from a version's tags; None when the version has no such tag."""
    tag = metric_tag(name)
    raw = tags.get(tag)
    return None if raw is None else parse_metric(tag, raw)


def metric_tags(metrics: Mapping[str, float | int], names: tuple[str, ...]) -> dict[str, str]:
    """Tags for the metrics among `names` that `metrics` holds (others are left out)."""
    return {metric_tag(n): format_metric(metrics[n]) for n in names if n in metrics}
