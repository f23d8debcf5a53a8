"""Evaluate registered versions again on the same rows, so promotion compares like with like.

Two versions trained on different snapshots carry metrics measured on different rows: 0.99 on
one validation split and 0.85 on another say nothing about which model is better. This module
rebuilds one pinned validation split (table, snapshot, fraction, seed: the candidate's lineage
tags) exactly as training built it, and runs every version over those rows through the same
`serving.predictor.Predictor`, as one Ray Data job:

    read_table(@snapshot) → trainable rows → SplitFilter(keep="validation")
      → map_batches(VersionLabels actors: a Predictor per version) → (true label, each
        version's prediction) per row → accuracy, macro-F1, per-slice accuracy per version

Every version labels the very same rows in one pass: the split is read once and one actor pool
starts (each actor holds every version: two for a promotion), where a job per version read the
rows again and started a pool again (10-30 s of a tiny promotion's test on 2 AVX512-BF16
cores, measured).

A causal LM (task.type causal-lm) is scored instead of asked: its validation instructions
(prompt, response, optional system column; the same usable-row rule and seeded split by key as
training) go through `ResponseScorer` actors, each a Predictor whose `score_responses` formats,
masks and pads every row as training's eval does and returns its response tokens' summed
negative log-likelihood and their count; the driver sums both over the rows:

    read_table(@snapshot) → usable instructions → SplitFilter(keep="validation")
      → map_batches(ResponseScorer actors, models:/name/N) → (nll, tokens) per row
      → val_loss = Σnll / Σtokens, val_perplexity = exp(val_loss)

so a version re-evaluated on its own split gets the val_loss and val_perplexity its training
reported for that epoch (same rows, template, truncation and loss mask; tested). A QLoRA version
is measured as it is served, its adapter merged into the unquantized base, so its figure is not
the one its training measured on the 4-bit base; both versions are still measured alike.

The driver asks the registry for each version's number and artifact folder only; the actors
load the artifacts (from that folder where it is local, else through the registry).

Rows the incumbent trained on are left out (`comparison_rows`): the candidate's split is drawn
from its own snapshot, fraction and seed, so some of its validation rows were on the training
side of the incumbent's split (3% for a retrain on a grown snapshot with the same fraction and
seed, 83% with another seed: measured on 77 classes, 10,000 then 11,000 rows), and the
incumbent would be credited for rows it memorised. The driver rebuilds both splits from the
scans (pyiceberg, no Ray) and drops those keys; the comparison is refused when under half of
the candidate's validation rows are left.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs import warehouse
from jobs.config import LifecycleConfig
from serving import registry, tags

if TYPE_CHECKING:
    import ray.data

    from jobs.training_data import TrainingRows

__all__ = [
    "CAUSAL_LM_METRICS",
    "MIN_KEPT_SHARE",
    "REEVALUATED_METRICS",
    "EvalRows",
    "Evaluation",
    "RowSelection",
    "TooFewRows",
    "ResponseScorer",
    "VersionLabels",
    "alike_predictor_kwargs",
    "comparison_rows",
    "predictions",
    "reevaluate",
    "reevaluated_metrics",
    "select_comparison_keys",
    "slice_accuracy",
    "split_keys",
]

log = logging.getLogger(__name__)

# What a re-evaluation measures (classifiers, causal LMs); a promote.metric outside these cannot
# be compared on new rows.
REEVALUATED_METRICS = ("val_accuracy", "val_macro_f1")
CAUSAL_LM_METRICS = ("val_loss", "val_perplexity")

# The true label travels beside the prediction under a name the Predictor never writes (it
# writes `label`, which is also a common name for the label column).
_TRUE_LABEL = "_raylift_true_label"
_SPLIT = re.compile(r"^fraction=(?P<fraction>[0-9.eE+-]+),seed=(?P<seed>-?\d+)$")
# A causal LM's rows all belong to one split group (jobs.training_data), carried in this column.
_SPLIT_GROUP = "_raylift_split_group"
# The share of the candidate's validation rows that must be left once the incumbent's training
# rows are dropped. The gates' thresholds (max_regression, max_slice_drop) were set for a whole
# validation split; on under half of it a slice of a few dozen rows shrinks to a handful, where
# one row moves its accuracy by more than max_slice_drop. Under it, the splits differ too much
# (another seed or fraction) to compare the versions on the candidate's rows.
MIN_KEPT_SHARE = 0.5
_NO_KEYS = np.zeros(0, dtype=np.int64)


def reevaluated_metrics(task_type: str) -> tuple[str, ...]:
    """The metrics a re-evaluation measures for a task."""
    from jobs.tasks import is_generative  # imports torch: not at module import

    return CAUSAL_LM_METRICS if is_generative(task_type) else REEVALUATED_METRICS


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
    metrics: dict[str, float]  # val_accuracy, val_macro_f1; causal-lm: val_loss, val_perplexity
    slices: dict[str, float] = field(default_factory=dict)  # slice → accuracy
    slice_rows: dict[str, int] = field(default_factory=dict)
    tokens: int | None = None  # causal-lm: the response tokens scored
    dropped_rows: int = 0  # validation rows left out: the incumbent trained on them


class TooFewRows(ValueError):
    """Too few of the candidate's validation rows are left once the rows the incumbent trained
    on are dropped: the versions cannot be compared on them."""


@dataclass(frozen=True)
class RowSelection:
    """The candidate's validation keys, and those of them the incumbent trained on."""

    validation_keys: np.ndarray
    dropped_keys: np.ndarray

    @property
    def kept(self) -> int:
        return len(self.validation_keys) - len(self.dropped_keys)


def split_keys(
    scanned: TrainingRows, rows: EvalRows, keep: Literal["train", "validation"]
) -> np.ndarray:
    """The keys on one side of the split training built from `scanned` (the trainable rows of
    rows.snapshot_id) with rows.fraction and rows.seed."""
    thresholds = warehouse.split_thresholds(scanned.keys, scanned.labels, rows.fraction, rows.seed)
    side = warehouse.SplitFilter(thresholds, "key", "label", keep=keep, seed=rows.seed)
    labels = pa.array([str(label) for label in scanned.labels], pa.string())
    return scanned.keys[side.mask(scanned.keys, labels)]


def select_comparison_keys(
    candidate: TrainingRows, rows: EvalRows, incumbent: TrainingRows, trained_on: EvalRows
) -> RowSelection:
    """The candidate's validation keys (`rows`), and which of them the incumbent trained on
    (the training side of its own split, `trained_on`). Rows are matched by key, which the
    warehouse keeps for a row across snapshots."""
    validation = split_keys(candidate, rows, "validation")
    trained = split_keys(incumbent, trained_on, "train")
    return RowSelection(validation, validation[np.isin(validation, trained)])


def comparison_rows(config: LifecycleConfig, rows: EvalRows, trained_on: EvalRows) -> RowSelection:
    """select_comparison_keys on both pinned snapshots, scanned in the driver (no Ray);
    TooFewRows when under MIN_KEPT_SHARE of the validation rows are left."""
    from jobs.training_data import scan_training_rows

    candidate = scan_training_rows(_pinned(config, rows))
    incumbent = scan_training_rows(_pinned(config, trained_on))
    selection = select_comparison_keys(candidate, rows, incumbent, trained_on)
    total = len(selection.validation_keys)
    if total == 0 or selection.kept < MIN_KEPT_SHARE * total:
        raise TooFewRows(
            f"{len(selection.dropped_keys)} of the {total} validation rows of {rows.describe()} "
            f"were trained on by the version it is compared with ({trained_on.describe()}: "
            f"its training side); the {selection.kept} left are under {MIN_KEPT_SHARE:.0%}, too "
            "few to compare on; retrain the candidate with data.validation.fraction="
            f"{trained_on.fraction} and data.validation.seed={trained_on.seed}, so the splits "
            "line up"
        )
    return selection


def reevaluate(
    config: LifecycleConfig,
    versions: list[str],
    rows: EvalRows,
    trained_on: EvalRows | None = None,
) -> dict[str, Evaluation]:
    """Evaluate each registered version of config.registry.model_name on `rows`, less the rows
    on the training side of `trained_on` (the incumbent's split); TooFewRows, before Ray starts,
    when too few are left (comparison_rows)."""
    from cluster import init_ray

    drop = _NO_KEYS
    if trained_on is not None:
        drop = comparison_rows(config, rows, trained_on).dropped_keys
    init_ray()
    name = config.registry.model_name
    pinned = [
        registry.resolve_version(f"models:/{name}/{v}", config.registry.tracking_uri)
        for v in versions
    ]
    if reevaluated_metrics(config.task.type) == CAUSAL_LM_METRICS:
        instructions = _validation_instructions(config, rows, drop)
        found = {str(m.version): _score_responses(config, instructions, m) for m in pinned}
    else:
        truth, labels = _labels(config, _validation_rows(config, rows, drop), pinned)
        found = {
            str(model.version): _evaluate(truth, predicted, config.promote.slices)
            for model, predicted in zip(pinned, labels, strict=True)
        }
    return {version: replace(e, dropped_rows=len(drop)) for version, e in found.items()}


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
    truth, (predicted,) = _labels(config, _validation_rows(config, rows), [model])
    return truth, predicted


def _pinned(config: LifecycleConfig, rows: EvalRows) -> LifecycleConfig:
    return config.model_copy(
        update={
            "data": config.data.model_copy(
                update={"table": rows.table, "snapshot_id": rows.snapshot_id}
            )
        }
    )


def _validation_rows(
    config: LifecycleConfig, rows: EvalRows, drop: np.ndarray = _NO_KEYS
) -> ray.data.Dataset:
    """The validation side of `rows`, rebuilt the way jobs.training_data built it, less the
    keys in `drop`."""
    from jobs.training_data import scan_training_rows, trainable_rows

    task = config.task
    scanned = scan_training_rows(_pinned(config, rows))
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
            _without_keys,
            fn_kwargs={"key_column": task.key_column, "keys": drop},
            batch_format="pyarrow",
        )
        .map_batches(
            _keep_true_label,
            fn_kwargs={"text_column": task.text_column, "label_column": task.label_column},
            batch_format="pyarrow",
        )
    )


def _validation_instructions(
    config: LifecycleConfig, rows: EvalRows, drop: np.ndarray = _NO_KEYS
) -> ray.data.Dataset:
    """The validation instructions of `rows` (key, prompt, response and system columns), rebuilt
    the way jobs.training_data built a causal LM's: the scan's usable rows, one split group;
    less the keys in `drop`."""
    from jobs.training_data import scan_training_rows

    task = config.task
    scanned = scan_training_rows(_pinned(config, rows))
    thresholds = warehouse.split_thresholds(scanned.keys, scanned.labels, rows.fraction, rows.seed)
    if len(thresholds) != 1:  # jobs.training_data puts every instruction in one group
        raise ValueError(f"expected one split group of instructions, found {sorted(thresholds)}")
    (group,) = thresholds
    keep = warehouse.SplitFilter(
        thresholds, task.key_column, _SPLIT_GROUP, keep="validation", seed=rows.seed
    )
    columns = [task.key_column, task.prompt_column, task.response_column]
    columns += [task.system_column] if task.system_column else []
    return (
        warehouse.read_table(
            config.catalog, rows.table, snapshot_id=rows.snapshot_id, columns=columns
        )
        .map_batches(
            _usable_instructions,
            fn_kwargs={
                "prompt_column": task.prompt_column,
                "response_column": task.response_column,
                "group": group,
            },
            batch_format="pyarrow",
        )
        .map_batches(keep, batch_format="pyarrow")
        .map_batches(
            _without_keys,
            fn_kwargs={"key_column": task.key_column, "keys": drop},
            batch_format="pyarrow",
        )
        .select_columns(columns)
    )


def _without_keys(batch: pa.Table, *, key_column: str, keys: np.ndarray) -> pa.Table:
    if not len(keys):
        return batch
    value_set = pa.array(keys).cast(batch[key_column].type)
    return batch.filter(pc.invert(pc.is_in(batch[key_column], value_set=value_set)))


def _usable_instructions(
    batch: pa.Table, *, prompt_column: str, response_column: str, group: str
) -> pa.Table:
    """Training's rule (jobs.training_data.trainable_instructions), each row in split `group`."""
    from jobs.training_data import trainable_instructions

    kept = trainable_instructions(
        batch, prompt_column=prompt_column, response_column=response_column
    ).select(batch.column_names)
    return kept.append_column(_SPLIT_GROUP, pa.array([group] * kept.num_rows, pa.string()))


class ResponseScorer:
    """Ray Data UDF: each instruction row's response NLL (nats) and token count, by a
    Predictor's `score_responses` (one Predictor per actor, loaded once)."""

    def __init__(
        self,
        *,
        prompt_column: str,
        response_column: str,
        system_column: str | None,
        **predictor: object,
    ):
        from serving.predictor import Predictor

        self._predictor = Predictor(**predictor)
        self._columns = (prompt_column, response_column, system_column)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompt, response, system = self._columns
        nll, tokens = self._predictor.score_responses(
            batch[prompt].tolist(),
            batch[response].tolist(),
            batch[system].tolist() if system else None,
        )
        return {"nll": nll, "tokens": tokens}


def _score_responses(
    config: LifecycleConfig, rows: ray.data.Dataset, model: registry.ResolvedVersion
) -> Evaluation:
    """val_loss and val_perplexity of `model` on `rows`, token-weighted as training's eval."""

    from jobs import score
    from jobs.instruct import perplexity_metrics

    task = config.task
    scored = rows.map_batches(
        ResponseScorer,
        fn_constructor_kwargs={
            "prompt_column": task.prompt_column,
            "response_column": task.response_column,
            "system_column": task.system_column,
            # The scoring job's Predictor settings (score.*), as the classifier path uses them.
            **score.predictor_kwargs(config, model),
        },
        **score.actor_pool(config),
    )
    nll, tokens, count = 0.0, 0, 0
    for batch in scored.iter_batches(batch_format="numpy"):
        nll += float(np.sum(batch["nll"], dtype=np.float64))
        tokens += int(np.sum(batch["tokens"]))
        count += len(batch["tokens"])
    figures = perplexity_metrics(nll, tokens)
    return Evaluation(
        rows=count,
        metrics={"val_loss": figures["loss"], "val_perplexity": figures["perplexity"]},
        tokens=tokens,
    )


def _keep_true_label(batch: pa.Table, *, text_column: str, label_column: str) -> pa.Table:
    labels = batch[label_column].cast(pa.string())
    return pa.table({text_column: batch[text_column], _TRUE_LABEL: labels})


def _evaluate(truth: np.ndarray, predicted: np.ndarray, slices: Mapping[str, str]) -> Evaluation:
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


class VersionLabels:
    """Ray Data UDF: each row's true label and every version's predicted label (None where the
    text cannot be scored), from one Predictor per version, each loaded once per actor."""

    def __init__(self, *, text_column: str, versions: list[dict[str, object]]):
        from serving.predictor import Predictor

        self._text_column = text_column
        self._predictors = [Predictor(**predictor) for predictor in versions]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = batch[self._text_column]
        out = {_TRUE_LABEL: batch[_TRUE_LABEL]}
        for i, predictor in enumerate(self._predictors):
            out[_predicted(i)] = predictor.predict_labels(texts)
        return out


def alike_predictor_kwargs(
    config: LifecycleConfig, model: registry.ResolvedVersion
) -> dict[str, object]:
    """The scoring job's Predictor settings (score.*) for `model`, with one runtime for every
    version. Where score.engine or score.precision is auto, each version's Predictor would pick
    its own fastest offered variant, by a timing in each actor (the demo's scoring actors picked
    onnxruntime in one and OpenVINO in the other): two versions could then be measured on two
    runtimes, each allowed 0.5% of rows off its own fp32 torch (engines.MIN_AGREEMENT), and a
    per-slice gate of a few dozen rows could move by points on that alone. They run the
    reference instead, fp32 torch, which every offered variant was gated against. An engine and
    precision named in the config are kept: both versions run them."""
    from jobs import score

    kwargs = score.predictor_kwargs(config, model)
    if config.score.engine == "auto" or config.score.precision == "auto":
        kwargs.update(engine="torch", precision="fp32")
    return kwargs


def _predicted(i: int) -> str:
    return f"_raylift_predicted_{i}"


def _labels(
    config: LifecycleConfig, rows: ray.data.Dataset, models: list[registry.ResolvedVersion]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """(true labels, each model's predicted labels) of every row, gathered in the driver
    (validation only), through the scoring job's Predictor settings on one runtime for every
    version (alike_predictor_kwargs)."""
    from jobs import score

    labelled = rows.map_batches(
        VersionLabels,
        fn_constructor_kwargs={
            "text_column": config.task.input_column,
            "versions": [alike_predictor_kwargs(config, model) for model in models],
        },
        **score.actor_pool(config),
    )
    truth: list[np.ndarray] = []
    predicted: list[list[np.ndarray]] = [[] for _ in models]
    for batch in labelled.iter_batches(batch_format="numpy"):
        truth.append(batch[_TRUE_LABEL].astype(object))
        for i, found in enumerate(predicted):
            found.append(batch[_predicted(i)].astype(object))
    if not truth:
        empty = np.zeros(0, dtype=object)
        return empty, [empty for _ in models]
    return np.concatenate(truth), [np.concatenate(found) for found in predicted]


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
