"""Training data as Ray Data streams: warehouse snapshot → split → shuffle → tokenize.

Only the key and label columns are ever scanned by the driver (to size the stratified split and
the label map); the text flows through Ray Data and is tokenized in a Ray Data stage, so no
process holds the table.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from jobs import warehouse
from jobs.config import LifecycleConfig
from jobs.modeling import load_tokenizer, resolve_base_model
from jobs.tasks import get_task
from jobs.train_loop import INPUT_IDS, TARGETS

__all__ = ["PreparedData", "prepare_training_data", "tokenize_batch"]


@dataclass
class PreparedData:
    table: str
    snapshot_id: int
    labels: list[str]
    train_rows: int
    validation_rows: int
    datasets: dict[str, Any]  # "train" / "validation" → ray.data.Dataset

    def lineage(self) -> dict[str, str]:
        """Registry tags naming the rows trained and evaluated on (names owned by serving.tags)."""
        from serving import tags

        return {
            tags.ICEBERG_TABLE: self.table,
            tags.ICEBERG_SNAPSHOT_ID: str(self.snapshot_id),
            tags.TRAIN_ROWS: str(self.train_rows),
            tags.VALIDATION_ROWS: str(self.validation_rows),
        }


@functools.lru_cache(maxsize=4)
def _tokenizer(base_model: str, trust_remote_code: bool):
    # Cached per worker process: Ray reuses task workers, so each loads the tokenizer once.
    return load_tokenizer(resolve_base_model(base_model), trust_remote_code)


def tokenize_batch(
    batch: pa.Table,
    *,
    base_model: str,
    trust_remote_code: bool,
    text_column: str,
    label_column: str,
    labels: list[str],
    max_length: int,
    task_name: str,
) -> pa.Table:
    """Ray Data stage: text → token ids (no padding: batches pad later), label → class id."""
    tokenizer = _tokenizer(base_model, trust_remote_code)
    texts = [t if isinstance(t, str) else "" for t in batch.column(text_column).to_pylist()]
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    label_to_id = {label: i for i, label in enumerate(labels)}
    targets = get_task(task_name).target_ids(
        np.asarray(batch.column(label_column).to_pylist(), dtype=object), label_to_id
    )
    return pa.table(
        {
            INPUT_IDS: pa.array(ids, type=pa.list_(pa.int32())),
            TARGETS: pa.array(targets, type=pa.int64()),
        }
    )


def prepare_training_data(config: LifecycleConfig) -> PreparedData:
    """Pin the snapshot, derive labels and the split, and build the two streams."""
    catalog, data, task = config.catalog, config.data, config.task
    snapshot = data.snapshot_id or warehouse.table_snapshot(catalog, data.table)
    keys = warehouse.scan_labels(
        catalog,
        data.table,
        snapshot_id=snapshot,
        key_column=task.key_column,
        label_column=task.label_column,
    )
    key_values = keys.column(task.key_column).to_numpy()
    label_values = np.asarray(keys.column(task.label_column).to_pylist(), dtype=object)
    labels = _label_set(config, label_values)
    thresholds = warehouse.split_thresholds(
        key_values, label_values, data.validation.fraction, data.validation.seed
    )

    def split(side: str) -> warehouse.SplitFilter:
        return warehouse.SplitFilter(
            thresholds, task.key_column, task.label_column, keep=side, seed=data.validation.seed
        )

    validation_rows = int(
        split("validation").mask(key_values, keys.column(task.label_column)).sum()
    )
    source = warehouse.read_table(
        catalog,
        data.table,
        snapshot_id=snapshot,
        columns=[task.key_column, task.text_column, task.label_column],
    )
    datasets = {
        side: _tokenized(config, labels, source.map_batches(split(side), batch_format="pyarrow"))
        for side in ("train", "validation")
    }
    return PreparedData(
        table=data.table,
        snapshot_id=snapshot,
        labels=labels,
        train_rows=len(key_values) - validation_rows,
        validation_rows=validation_rows,
        datasets=datasets,
    )


def _label_set(config: LifecycleConfig, values: np.ndarray) -> list[str]:
    found = sorted({str(v) for v in values})
    if config.task.labels is None:
        return found
    unknown = sorted(set(found) - set(config.task.labels))
    if unknown:
        raise ValueError(
            f"task.labels lacks {len(unknown)} label(s) present in {config.data.table}: "
            f"{', '.join(unknown[:5])}; add them to task.labels or remove task.labels"
        )
    return list(config.task.labels)


def _tokenized(config: LifecycleConfig, labels: list[str], ds):
    return ds.map_batches(
        tokenize_batch,
        fn_kwargs={
            "base_model": config.model.base,
            "trust_remote_code": config.model.trust_remote_code,
            "text_column": config.task.text_column,
            "label_column": config.task.label_column,
            "labels": labels,
            "max_length": config.task.max_length,
            "task_name": config.task.type,
        },
        batch_format="pyarrow",
        batch_size=1024,
        num_cpus=0.5,
    )
