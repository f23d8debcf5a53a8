"""Training data as Ray Data streams: warehouse snapshot → split → shuffle → tokenize.

Before Ray starts, the driver scans the pinned snapshot with pyiceberg, batch by batch: it keeps
the key and label columns (to size the stratified split and the label map) and one flag per row
saying whether the row can be trained on; the text itself is never held. A row with a null,
empty or blank text (`serving.text.usable_mask`) or a null label is dropped, counted, logged and
reported as `PreparedData.rows_refused`; a table with more such rows than
`task.max_refused_share`, or with fewer than two labels, is refused before Ray starts. The text
flows through Ray Data, which drops the same rows, and is tokenized in a Ray Data stage, so no
process holds the table.

A causal LM (task.type causal-lm) trains on instructions: the prompt and response columns (and
an optional system column) in place of text and label. A row needs a usable prompt and response.
There is no label set and the split is a plain seeded one by key (every row in one group, the
same rule as a stratified split of one class). The tokenize stage formats each row with
jobs.instruct and yields its token ids and its per-token labels (-100 on the prompt).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from ray.train import DataConfig

from jobs import warehouse
from jobs.config import LifecycleConfig
from jobs.warehouse.catalog import load_table, require_columns, schema_at
from serving.text import UNUSABLE_REASON, usable_mask

__all__ = [
    "EveryEvalRowConfig",
    "PreparedData",
    "SplitPlan",
    "TrainingRows",
    "plan_split",
    "prepare_training_data",
    "scan_training_rows",
    "tokenize_batch",
    "tokenize_instructions",
    "trainable_instructions",
    "trainable_rows",
]

log = logging.getLogger(__name__)

# Ray Data's processes import this module to run its stages (the split coordinator, the read
# and filter tasks): what needs torch (jobs.modeling, jobs.tasks, jobs.train_loop) is imported
# where it is used, so only the tokenize stage and the driver pay for it.


def _generative(task_type: str) -> bool:
    from jobs.tasks import is_generative

    return is_generative(task_type)


@dataclass
class PreparedData:
    table: str
    snapshot_id: int
    labels: list[str]
    train_rows: int
    validation_rows: int
    datasets: dict[str, Any]  # "train" / "validation" → ray.data.Dataset
    rows_refused: int = 0  # rows with no usable text or no label: dropped, never trained on

    def lineage(self) -> dict[str, str]:
        """Registry tags naming the rows trained and evaluated on (names owned by serving.tags)."""
        from serving import tags

        return {
            tags.ICEBERG_TABLE: self.table,
            tags.ICEBERG_SNAPSHOT_ID: str(self.snapshot_id),
            tags.TRAIN_ROWS: str(self.train_rows),
            tags.VALIDATION_ROWS: str(self.validation_rows),
            tags.ROWS_REFUSED: str(self.rows_refused),
        }


@functools.lru_cache(maxsize=4)
def _tokenizer(base_model: str, trust_remote_code: bool):
    # Cached per worker process: Ray reuses task workers, so each loads the tokenizer once.
    from jobs.modeling import load_tokenizer, resolve_base_model

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
    from jobs.tasks import get_task
    from jobs.train_loop import INPUT_IDS, TARGETS

    tokenizer = _tokenizer(base_model, trust_remote_code)
    texts = batch.column(text_column).to_pylist()
    unusable = int((~usable_mask(texts)).sum())
    if unusable:  # trainable_rows runs first; never train a missing text as ""
        raise ValueError(f"{unusable} row(s) reached tokenization with a {UNUSABLE_REASON}")
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    label_to_id = {label: i for i, label in enumerate(labels)}
    # Only the task's label mapping: no peft (2.6 CPU-s of each tokenize process, AVX512-BF16).
    targets = get_task(task_name, peft_needed=False).target_ids(
        np.asarray(batch.column(label_column).to_pylist(), dtype=object), label_to_id
    )
    return pa.table(
        {
            INPUT_IDS: pa.array(ids, type=pa.list_(pa.int32())),
            TARGETS: pa.array(targets, type=pa.int64()),
        }
    )


@dataclass(frozen=True)
class TrainingRows:
    """What the driver learns from scanning the pinned snapshot: the trainable rows' keys and
    labels, and how many rows were refused."""

    snapshot_id: int
    keys: np.ndarray  # int keys of the trainable rows
    labels: np.ndarray  # their labels (object)
    rows_refused: int


def trainable_rows(batch: pa.Table, *, text_column: str, label_column: str) -> pa.Table:
    """Ray Data stage: the rows of `batch` with a usable text and a label (the scan's rule)."""
    return batch.filter(pa.array(_trainable_mask(batch, text_column, label_column)))


def _trainable_mask(batch: pa.Table, text_column: str, label_column: str) -> np.ndarray:
    labels = batch.column(label_column)
    has_label = ~np.asarray(labels.is_null(), dtype=bool)
    return usable_mask(batch.column(text_column).to_pylist()) & has_label


def scan_training_rows(config: LifecycleConfig) -> TrainingRows:
    """Scan key, label and text usability at the pinned snapshot with pyiceberg only (no Ray).

    Raises ValueError when the table cannot train: too many refused rows, fewer than two labels.
    A causal LM's rows are scanned for a usable prompt and response; their `labels` are one
    split group (`_ONE_GROUP`) each.
    """
    catalog, data, task = config.catalog, config.data, config.task
    generative = _generative(task.type)
    snapshot = data.snapshot_id or warehouse.table_snapshot(catalog, data.table)
    where = f"{data.table}@{snapshot}"
    tbl = load_table(warehouse.load_catalog(catalog), catalog, data.table)
    columns = _scanned_columns(config)
    require_columns(schema_at(tbl, data.table, snapshot).column_names, columns, where)
    scan = tbl.scan(selected_fields=tuple(columns), snapshot_id=snapshot)
    keys, labels, keep = [], [], []
    for batch in scan.to_arrow_batch_reader():  # one batch of texts in memory at a time
        if batch.column(task.key_column).null_count:
            raise ValueError(f"key column {task.key_column!r} has null values in {where}")
        keys.append(batch.column(task.key_column).to_numpy())
        if generative:
            labels.extend([_ONE_GROUP] * batch.num_rows)
            keep.append(_usable_instructions(batch, task.prompt_column, task.response_column))
        else:
            labels.extend(batch.column(task.label_column).to_pylist())
            keep.append(_trainable_mask(batch, task.text_column, task.label_column))
    keep_all = np.concatenate(keep) if keep else np.zeros(0, dtype=bool)
    refused = _check_refused(config, where, len(keep_all), int((~keep_all).sum()))
    key_values = np.concatenate(keys)[keep_all] if keys else np.zeros(0, dtype=np.int64)
    label_values = np.asarray(labels, dtype=object)[keep_all]
    if not generative:
        _require_two_labels(config, where, label_values)
    elif len(key_values) < 2:
        raise ValueError(
            f"{where} has {len(key_values)} usable row(s); training and validation need at "
            "least two: load more instructions"
        )
    return TrainingRows(snapshot, key_values, label_values, refused)


def _scanned_columns(config: LifecycleConfig) -> dict[str, str]:
    task = config.task
    if not _generative(task.type):
        return {
            task.key_column: "task.key_column",
            task.label_column: "task.label_column",
            task.text_column: "task.text_column",
        }
    columns = {
        task.key_column: "task.key_column",
        task.prompt_column: "task.prompt_column",
        task.response_column: "task.response_column",
    }
    if task.system_column:
        columns[task.system_column] = "task.system_column"
    return columns


# The split group of every causal-LM row: the stratified split of one group is a plain seeded
# split by key.
_ONE_GROUP = "all"
_GROUP_COLUMN = "__raylift_split_group"


def _usable_instructions(batch: pa.Table, prompt_column: str, response_column: str) -> np.ndarray:
    prompts = usable_mask(batch.column(prompt_column).to_pylist())
    return prompts & usable_mask(batch.column(response_column).to_pylist())


def trainable_instructions(
    batch: pa.Table, *, prompt_column: str, response_column: str
) -> pa.Table:
    """Ray Data stage: the rows with a usable prompt and response, tagged with their split group
    (the scan's rule)."""
    kept = batch.filter(pa.array(_usable_instructions(batch, prompt_column, response_column)))
    return kept.append_column(_GROUP_COLUMN, pa.array([_ONE_GROUP] * kept.num_rows, pa.string()))


def _check_refused(config: LifecycleConfig, where: str, total: int, refused: int) -> int:
    task = config.task
    if total == 0:
        raise ValueError(f"{where} has no rows; load data first (raylift warehouse load)")
    if _generative(task.type):
        what = f"a null, empty or blank {task.prompt_column!r} or {task.response_column!r}"
    else:
        what = f"a null, empty or blank {task.text_column!r} or a null {task.label_column!r}"
    share = refused / total
    if share > task.max_refused_share:
        raise ValueError(
            f"{refused} of {total} rows ({share:.1%}) in {where} have {what}, more than "
            f"task.max_refused_share={task.max_refused_share}; clean the source and reload it "
            "(raylift warehouse load), or raise task.max_refused_share to train on the rest"
        )
    if refused:
        log.warning(
            "dropping %d of %d rows in %s with %s: not trained on", refused, total, where, what
        )
    return refused


def _require_two_labels(config: LifecycleConfig, where: str, labels: np.ndarray) -> None:
    found = sorted({str(v) for v in labels})
    if len(found) < 2:
        raise ValueError(
            f"{where} has {len(found)} distinct label(s) in {config.task.label_column!r} "
            f"({', '.join(found) or 'none'}) among its usable rows; a classifier needs at least "
            "two: load a table with more classes, or check task.label_column"
        )


@dataclass(frozen=True)
class SplitPlan:
    """The validation split of the scanned rows, sized before Ray starts."""

    thresholds: dict[str, int]  # per split group (warehouse.split_thresholds)
    train_rows: int
    validation_rows: int


def plan_split(config: LifecycleConfig, rows: TrainingRows) -> SplitPlan:
    """Size the split of the scanned rows (no Ray). Raises ValueError when the training side
    would leave a worker without rows: Ray Train gives each of train.num_workers workers
    train_rows // num_workers of them, and a worker with none trains nothing."""
    data = config.data
    thresholds = warehouse.split_thresholds(
        rows.keys, rows.labels, data.validation.fraction, data.validation.seed
    )
    held_out = _split_filter(config, thresholds, "validation").mask(
        rows.keys, pa.array(rows.labels.tolist())
    )
    validation_rows = int(held_out.sum())
    train_rows = len(rows.keys) - validation_rows
    workers = config.train.num_workers
    if train_rows < workers:
        raise ValueError(
            f"{data.table}@{rows.snapshot_id} leaves {train_rows} training row(s) after the "
            f"validation split ({validation_rows} held out), fewer than train.num_workers="
            f"{workers}: each worker trains on train_rows // num_workers rows, so a worker "
            "would train on none; load more rows or lower train.num_workers"
        )
    return SplitPlan(thresholds, train_rows, validation_rows)


def _split_filter(
    config: LifecycleConfig, thresholds: dict[str, int], side: str
) -> warehouse.SplitFilter:
    task = config.task
    group_column = _GROUP_COLUMN if _generative(task.type) else task.label_column
    return warehouse.SplitFilter(
        thresholds, task.key_column, group_column, keep=side, seed=config.data.validation.seed
    )


def prepare_training_data(
    config: LifecycleConfig, rows: TrainingRows | None = None, plan: SplitPlan | None = None
) -> PreparedData:
    """Derive labels and the split from the scanned rows, and build the two streams; `plan`:
    the split plan_split already made of these rows."""
    data, task = config.data, config.task
    if rows is None:
        rows = scan_training_rows(config)
    if plan is None:
        plan = plan_split(config, rows)
    generative = _generative(task.type)
    labels = [] if generative else _label_set(config, rows.labels)
    source = _trainable_source(config, rows.snapshot_id)
    tokenized = _tokenized_instructions if generative else _tokenized
    datasets = {}
    for side in ("train", "validation"):
        kept = source.map_batches(
            _split_filter(config, plan.thresholds, side), batch_format="pyarrow"
        )
        datasets[side] = tokenized(config, labels, kept)
    return PreparedData(
        table=data.table,
        snapshot_id=rows.snapshot_id,
        labels=labels,
        train_rows=plan.train_rows,
        validation_rows=plan.validation_rows,
        datasets=datasets,
        rows_refused=rows.rows_refused,
    )


def _trainable_source(config: LifecycleConfig, snapshot_id: int):
    """The pinned snapshot's trainable rows as a Ray Data stream (the scan's rule)."""
    catalog, data, task = config.catalog, config.data, config.task
    if not _generative(task.type):
        columns = [task.key_column, task.text_column, task.label_column]
        keep, kwargs = trainable_rows, {"text_column": task.text_column}
        kwargs["label_column"] = task.label_column
    else:
        columns = [task.key_column, task.prompt_column, task.response_column]
        columns += [task.system_column] if task.system_column else []
        keep = trainable_instructions
        kwargs = {"prompt_column": task.prompt_column, "response_column": task.response_column}
    source = warehouse.read_table(catalog, data.table, snapshot_id=snapshot_id, columns=columns)
    return source.map_batches(keep, fn_kwargs=kwargs, batch_format="pyarrow")


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


def tokenize_instructions(
    batch: pa.Table,
    *,
    base_model: str,
    trust_remote_code: bool,
    prompt_column: str,
    response_column: str,
    system_column: str | None,
    prompt_template: str,
    max_length: int,
) -> pa.Table:
    """Ray Data stage: instruction rows → token ids and per-token labels (-100 on the prompt)."""
    from jobs import instruct
    from jobs.train_loop import INPUT_IDS, TARGETS

    tokenizer = _tokenizer(base_model, trust_remote_code)
    template = instruct.resolve_template(tokenizer, prompt_template)
    prompts = batch.column(prompt_column).to_pylist()
    responses = batch.column(response_column).to_pylist()
    systems = batch.column(system_column).to_pylist() if system_column else [None] * len(prompts)
    unusable = int((~(usable_mask(prompts) & usable_mask(responses))).sum())
    if unusable:  # trainable_instructions runs first; never train a missing text as ""
        raise ValueError(f"{unusable} row(s) reached tokenization with a {UNUSABLE_REASON}")
    ids, labels = [], []
    for prompt, response, system in zip(prompts, responses, systems, strict=True):
        row_ids, row_labels = instruct.encode_example(
            tokenizer, prompt, response, system or None, template=template, max_length=max_length
        )
        ids.append(row_ids)
        labels.append(row_labels)
    return pa.table(
        {
            INPUT_IDS: pa.array(ids, type=pa.list_(pa.int32())),
            TARGETS: pa.array(labels, type=pa.list_(pa.int32())),
        }
    )


def _tokenized_instructions(config: LifecycleConfig, labels: list[str], ds):
    task = config.task
    return ds.map_batches(
        tokenize_instructions,
        fn_kwargs={
            "base_model": config.model.base,
            "trust_remote_code": config.model.trust_remote_code,
            "prompt_column": task.prompt_column,
            "response_column": task.response_column,
            "system_column": task.system_column,
            "prompt_template": task.prompt_template,
            "max_length": task.max_length,
        },
        batch_format="pyarrow",
        batch_size=1024,
        num_cpus=0.5,
    )


class EveryEvalRowConfig(DataConfig):
    """How the datasets reach the workers: train shards equal, evaluation shards whole.

    Ray Train splits every dataset with `streaming_split(equal=True)`, which drops up to
    world_size - 1 rows so that shards match: harmless for training, but an evaluation must see
    every validation row (2 workers over 9 rows evaluated 8). The train loop already keeps ranks
    in step on uneven shards, so the validation split is cut with equal=False.
    """

    def __init__(self, whole: tuple[str, ...] = ("validation",), execution_options=None):
        super().__init__(datasets_to_split="all", execution_options=execution_options)
        self._whole = set(whole)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        if world_size == 1:
            return [self._unsplit(datasets)]
        equal = {name: ds for name, ds in datasets.items() if name not in self._whole}
        output = super().configure(equal, world_size, worker_handles, worker_node_ids, **kwargs)
        for name in self._whole & set(datasets):
            ds = datasets[name].copy(datasets[name])
            ds.set_name(name)
            ds.context.execution_options = self._resolve_execution_options(name)
            shards = ds.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)
            for rank, shard in enumerate(shards):
                output[rank][name] = shard
        return output

    def _unsplit(self, datasets) -> dict:
        """One worker reads each dataset itself: nothing to split, so no split coordinator
        (one more actor per dataset, about 3 CPU-s of each run's start on 2 cores, AVX512-BF16),
        and every row reaches the one shard. The pass executes in the worker's process, with
        the same execution options (resource limits, order) a split would have had."""
        iterators = {}
        for name, ds in datasets.items():
            ds = ds.copy(ds)
            ds.set_name(name)
            ds.context.execution_options = self._resolve_execution_options(name)
            iterators[name] = ds.iterator()
        return iterators
