"""Evaluate registered versions again on the same rows, so promotion compares like with like.

Two versions trained on different snapshots carry metrics measured on different rows: 0.99 on
one validation split and 0.85 on another say nothing about which model is better. This module
rebuilds one pinned validation split (table, snapshot, fraction, seed: the candidate's lineage
tags) exactly as training built it, and runs every version over those rows through the same
`serving.predictor.Predictor`, as a Ray Data job:

    read_table(@snapshot) → trainable rows → SplitFilter(keep="validation")
      → map_batches(Predictor actors, models:/name/N) → (true label, prediction) pairs
      → accuracy, macro-F1, per-slice accuracy

The driver asks the registry for each version's number only; the actors download the artifacts.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from jobs import warehouse
from jobs.config import LifecycleConfig
from serving import registry, tags

if TYPE_CHECKING:
    import ray.data

__all__ = [
    "REEVALUATED_METRICS",
    "EvalRows",
    "Evaluation",
    "predictions",
    "reevaluate",
    "slice_accuracy",
]

log = logging.getLogger(__name__)

# What a re-evaluation measures; a promote.metric outside these cannot be compared on new rows.
REEVALUATED_METRICS = ("val_accuracy", "val_macro_f1")

# The true label travels beside the prediction under a name the Predictor never writes (it
# writes `label`, which is also a common name for the label column).
_TRUE_LABEL = "_raylift_true_label"
_SPLIT = re.compile(r"^fraction=(?P<fraction>[0-9.eE+-]+),seed=(?P<seed>-?\d+)$")


@dataclass(frozen=True)
class EvalRows:
    """One pinned validation split: the rows a version was evaluated on."""

    table: str
    snapshot_id: int
    fraction: float
    seed: int

    @classmethod
    def from_tags(cls, version_tags: Mapping[str, str]) -> EvalRows:
        """The split a version was evaluated on, from its lineage tags (tags.EVAL_ROWS_TAGS)."""
        missing = [t for t in tags.EVAL_ROWS_TAGS if not version_tags.get(t)]
        split = _SPLIT.match(version_tags.get(tags.VALIDATION_SPLIT, ""))
        if missing or split is None or not version_tags[tags.ICEBERG_SNAPSHOT_ID].isdigit():
            shown = {t: version_tags.get(t) for t in tags.EVAL_ROWS_TAGS}
            raise ValueError(
                f"cannot tell which rows the version was evaluated on: {shown}; re-register it "
                "from a training run (raylift finetune), which tags its table, snapshot and split"
            )
        return cls(
            table=version_tags[tags.ICEBERG_TABLE],
            snapshot_id=int(version_tags[tags.ICEBERG_SNAPSHOT_ID]),
            fraction=float(split["fraction"]),
            seed=int(split["seed"]),
        )

    def describe(self) -> str:
        return (
            f"{self.table}@{self.snapshot_id} validation fraction={self.fraction},seed={self.seed}"
        )


@dataclass(frozen=True)
class Evaluation:
    """One version's figures on one set of rows."""

    rows: int
    metrics: dict[str, float]  # val_accuracy, val_macro_f1
    slices: dict[str, float] = field(default_factory=dict)  # slice → accuracy
    slice_rows: dict[str, int] = field(default_factory=dict)


def reevaluate(
    config: LifecycleConfig, versions: list[str], rows: EvalRows
) -> dict[str, Evaluation]:
    """Evaluate each registered version of config.registry.model_name on `rows`."""
    from cluster import init_ray

    init_ray()
    name = config.registry.model_name
    pinned = [
        registry.resolve_version(f"models:/{name}/{v}", config.registry.tracking_uri)
        for v in versions
    ]
    validation = _validation_rows(config, rows)
    return {
        str(model.version): _evaluate(config, validation, model, config.promote.slices)
        for model in pinned
    }


def predictions(
    config: LifecycleConfig, version: str, rows: EvalRows
) -> tuple[np.ndarray, np.ndarray]:
    """(true labels, predicted labels) of one version on `rows`, by the same path as
    `reevaluate` (a report's confusion matrix is built from them)."""
    from cluster import init_ray

    init_ray()
    model = registry.resolve_version(
        f"models:/{config.registry.model_name}/{version}", config.registry.tracking_uri
    )
    return _predict(config, _validation_rows(config, rows), model)


def _validation_rows(config: LifecycleConfig, rows: EvalRows) -> ray.data.Dataset:
    """The validation side of `rows`, rebuilt the way jobs.training_data built it."""
    from jobs.training_data import scan_training_rows, trainable_rows

    task = config.task
    pinned = config.model_copy(
        update={
            "data": config.data.model_copy(
                update={"table": rows.table, "snapshot_id": rows.snapshot_id}
            )
        }
    )
    scanned = scan_training_rows(pinned)
    thresholds = warehouse.split_thresholds(scanned.keys, scanned.labels, rows.fraction, rows.seed)
    keep = warehouse.SplitFilter(
        thresholds, task.key_column, task.label_column, keep="validation", seed=rows.seed
    )
    columns = [task.key_column, task.text_column, task.label_column]
    return (
        warehouse.read_table(
            config.catalog, rows.table, snapshot_id=rows.snapshot_id, columns=columns
        )
        .map_batches(
            trainable_rows,
            fn_kwargs={"text_column": task.text_column, "label_column": task.label_column},
            batch_format="pyarrow",
        )
        .map_batches(keep, batch_format="pyarrow")
        .map_batches(
            _keep_true_label,
            fn_kwargs={"text_column": task.text_column, "label_column": task.label_column},
            batch_format="pyarrow",
        )
    )


def _keep_true_label(batch: pa.Table, *, text_column: str, label_column: str) -> pa.Table:
    labels = batch[label_column].cast(pa.string())
    return pa.table({text_column: batch[text_column], _TRUE_LABEL: labels})


def _evaluate(
    config: LifecycleConfig,
    rows: ray.data.Dataset,
    model: registry.ResolvedVersion,
    slices: Mapping[str, str],
) -> Evaluation:
    truth, predicted = _predict(config, rows, model)
    unseen = sorted(set(slices) - {str(t) for t in truth})
    if unseen:  # a typo in promote.slices would otherwise just shrink its slice
        log.warning(
            "promote.slices lists %d label(s) with no row in the evaluation: %s",
            len(unseen),
            ", ".join(unseen[:10]),
        )
    accuracy, slice_rows = slice_accuracy(truth, predicted, slices)
    return Evaluation(
        rows=len(truth),
        metrics=_metrics(truth, predicted),
        slices=accuracy,
        slice_rows=slice_rows,
    )


def _predict(
    config: LifecycleConfig, rows: ray.data.Dataset, model: registry.ResolvedVersion
) -> tuple[np.ndarray, np.ndarray]:
    """(true labels, predicted labels) of every row, gathered in the driver (validation only)."""
    from jobs import score

    # The scoring job's Predictor actors, settings and all (score.*): evaluation is batch
    # scoring whose one passthrough column is the true label.
    scoring = config.model_copy(
        update={"score": config.score.model_copy(update={"key_columns": [_TRUE_LABEL]})}
    )
    predicted = score.predict_rows(scoring, rows, model).select_columns([_TRUE_LABEL, "label"])
    truth, labels = [], []
    for batch in predicted.iter_batches(batch_format="numpy"):
        truth.append(batch[_TRUE_LABEL].astype(object))
        labels.append(batch["label"].astype(object))
    if not truth:
        return np.zeros(0, dtype=object), np.zeros(0, dtype=object)
    return np.concatenate(truth), np.concatenate(labels)


def _metrics(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 as training computes them (jobs.tasks.classification_metrics)."""
    from jobs.tasks import classification_metrics

    names = sorted({str(v) for v in truth} | {str(v) for v in predicted})
    index = {n: i for i, n in enumerate(names)}
    confusion = np.zeros((len(names), len(names)), dtype=np.int64)
    for t, p in zip(truth, predicted, strict=True):
        confusion[index[str(t)], index[str(p)]] += 1  # a None prediction is its own wrong class
    figures = classification_metrics(confusion)
    return {"val_accuracy": figures["accuracy"], "val_macro_f1": figures["macro_f1"]}


def slice_accuracy(
    truth: np.ndarray, predicted: np.ndarray, slices: Mapping[str, str]
) -> tuple[dict[str, float], dict[str, int]]:
    """Per slice (label → slice mapping), the accuracy on its rows and the row count; slices
    without rows here are left out. Labels not in the mapping count toward no slice."""
    groups = np.array([slices.get(str(t)) for t in truth], dtype=object)
    correct = np.array([str(t) == str(p) for t, p in zip(truth, predicted, strict=True)])
    accuracy, counts = {}, {}
    for group in sorted(set(slices.values())):
        mask = groups == group
        if mask.any():
            accuracy[group] = float(correct[mask].mean())
            counts[group] = int(mask.sum())
    return accuracy, counts
