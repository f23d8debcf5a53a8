"""Nightly batch scoring: Iceberg table → Predictor actors (Ray Data) → predictions table.

    python -m jobs.score --config configs/banking77/minilm_lora.yaml [score.run_date=2026-11-22]

Two things are pinned once, in the driver, before any actor starts:
- the model version: the alias is resolved to `models:/name/N` by asking the registry only (the
  actors download the checkpoint, the driver never does), so every row of a run carries the
  same version even if the alias moves mid-run;
- the input snapshot: scoring and quarantine both come from one dataset read at that snapshot,
  so a commit to the input table during the run changes neither, and every row of the snapshot
  is either scored or quarantined. The snapshot id is in the result and in both tables' commits.

Writing replaces the run date's rows in one Iceberg commit per table: re-running a date never
duplicates it. Both tables are written before either is committed, so a run that fails while
writing leaves both as they were. Rows with no usable text (`serving.text`) go to the
quarantine table with the reason instead of failing the run.

A causal-lm version generates instead (batch generation, the same run): the input is
task.prompt_column, each prompt is one user turn through the version's prompt template,
generated as score.generation says (greedy by default, so a re-run writes the same text), and
the output table gets COMPLETION_COLUMNS instead of label and score. A prompt the generation
limits refuse (over score.generation.max_prompt_tokens) keeps its row, with a null completion
and `error` saying why, as a classifier's non-finite score keeps its row with a null label.
"""

from __future__ import annotations

import datetime
import json
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import ray

from cluster import init_ray
from jobs.config import LifecycleConfig
from serving import tags
from serving.text import UNUSABLE_REASON, usable_mask

if TYPE_CHECKING:
    import ray.data  # noqa: F401  (annotations)

    from jobs import warehouse
    from serving import registry

# Each Predictor actor imports this module (UsableRows and StampRun run in it), so the warehouse
# (pyiceberg: 0.2 s of an actor's start, measured) and the registry are imported where used.

__all__ = [
    "COMPLETION_COLUMNS",
    "ScoreResult",
    "actor_pool",
    "main",
    "predict_rows",
    "predictor_kwargs",
]

# Columns batch generation adds to the input key columns (besides scored_at and run_date).
COMPLETION_COLUMNS = (
    "completion",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "error",
    "model_name",
    "model_version",
)


@dataclass
class ScoreResult:
    input_table: str
    input_snapshot_id: int
    output_table: str
    run_date: str
    model_name: str
    model_version: str
    rows_scored: int
    rows_quarantined: int
    wall_s: float
    rows_per_s: float
    # What the Predictor actors actually ran: one {"engine", "precision", "threads"} per
    # distinct choice (engine=auto calibrates in each actor, so they may differ).
    runtime: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class _Pinned:
    """What one run reads and scores with, fixed before any work starts."""

    snapshot_id: int
    model: registry.ResolvedVersion
    run_date: str

    def lineage(self, input_table: str) -> dict[str, str]:
        """Snapshot-summary properties for the predictions and quarantine commits."""
        return {
            tags.INPUT_TABLE_PROPERTY: input_table,
            tags.INPUT_SNAPSHOT_ID_PROPERTY: str(self.snapshot_id),
            tags.MODEL_URI_PROPERTY: self.model.uri,
        }


class StampRun:
    """Adds run_date and scored_at to each predictions batch."""

    def __init__(self, run_date: str, scored_at: datetime.datetime):
        self._run_date = run_date
        self._scored_at = np.datetime64(scored_at.replace(tzinfo=None), "us")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["model_version"])
        batch["run_date"] = np.full(n, self._run_date, dtype=object)
        batch["scored_at"] = np.full(n, self._scored_at)
        return batch


class UsableRows:
    """Keeps the rows whose text is usable (keep=True) or the ones that are not (keep=False)."""

    def __init__(self, text_column: str, keep: bool):
        self._text = text_column
        self._keep = keep

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        usable = usable_mask(batch[self._text])
        mask = usable if self._keep else ~usable
        return {name: column[mask] for name, column in batch.items()}


def main(config: LifecycleConfig) -> ScoreResult:
    started = time.perf_counter()
    from jobs import warehouse

    _check_tables(config)
    init_ray()
    pinned = _pin(config)
    board = RuntimeBoard()
    try:
        _score_and_quarantine(config, pinned, board)
        score = config.score
        scored = warehouse.rows_on_date(config.catalog, score.output_table, pinned.run_date)
        quarantined = warehouse.rows_on_date(
            config.catalog, score.quarantine_table, pinned.run_date
        )
        result = _result(config, pinned, scored, quarantined, time.perf_counter() - started)
        result.runtime = board.seen()
    finally:
        board.clear()
    return result


def _check_tables(config: LifecycleConfig) -> None:
    """Refuse one table named twice in score.*: both writes replace the date's rows, so the
    quarantine commit would drop the predictions it shares a table with, and predictions
    written to the input table would land among the rows to score."""
    score = config.score
    keys = ("input_table", "output_table", "quarantine_table")
    for i, key in enumerate(keys):
        for other in keys[i + 1 :]:
            if getattr(score, key) == getattr(score, other):
                raise ValueError(
                    f"score.{key} and score.{other} are both {getattr(score, key)!r}; each "
                    "needs a table of its own: set score.output_table and "
                    "score.quarantine_table to two tables other than the input"
                )


def _score_and_quarantine(config: LifecycleConfig, pinned: _Pinned, board: Any) -> None:
    """Write the predictions and the quarantine rows, then commit both: a run that fails in
    either write leaves both tables as they were (each write only stages its files).

    The quarantine pass runs beside scoring, while the Predictor actors import and load (3-7 s
    of a run's start, measured): its read, filter and write (0.3 s here) leave the tail. Each
    branch reads the pinned snapshot through its own datasource (no SQLAlchemy engine shared
    across threads). Iceberg commits one table at a time, so the two commits come last, back to
    back, predictions first."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="raylift-quarantine") as pool:
        quarantine = pool.submit(_quarantine, config, _read_input(config, pinned), pinned)
        try:
            predictions = _score(config, _read_input(config, pinned), pinned, board)
        except BaseException:
            _discard_when_written(quarantine)
            raise
        try:
            quarantined = quarantine.result()
        except BaseException:
            predictions.discard()
            raise
    try:
        predictions.commit()
    except BaseException:
        quarantined.discard()
        raise
    try:
        quarantined.commit()
    except Exception as error:
        error.add_note(
            f"run_date={pinned.run_date}: {config.score.output_table} holds this run's "
            f"predictions but {config.score.quarantine_table} still holds the date's earlier "
            "quarantine rows; run the same date again, which replaces both"
        )
        raise


def _discard_when_written(staged: Future) -> None:
    """Discard the sink `staged` yields, once its write ends (a failed write left nothing)."""
    try:
        sink = staged.result()
    except Exception:  # noqa: BLE001  (the write failed: nothing staged, the caller's error wins)
        return
    sink.discard()


class RuntimeBoard:
    """Where each Predictor actor of a run posts what it runs (`Predictor.runtime`); the run's
    summary lists the distinct entries. The actors get a copy (it pickles) and post to Ray's
    key-value store in the GCS, under a prefix of the run's own.

    It was an actor. An actor is one more worker process to start, and the raylet starts as
    many at once as the machine has cores: on 2 cores the board took one of the two slots
    beside the scoring actors, so the second of them started a whole worker start later.
    Measured over 10 paired 10k-row runs (AVX512-BF16, 2 cores, a slow shared spell): the
    runs without it were faster in 8, by 2.1 s at the median."""

    _NAMESPACE = "raylift-score"

    def __init__(self) -> None:
        self._prefix = f"runtime/{uuid.uuid4().hex}/"

    def add(self, runtime: dict) -> None:
        from ray.experimental import internal_kv

        key = self._prefix + json.dumps(runtime, sort_keys=True)
        internal_kv._internal_kv_put(key, b"", overwrite=True, namespace=self._NAMESPACE)

    def seen(self) -> list[dict]:
        from ray.experimental import internal_kv

        keys = internal_kv._internal_kv_list(self._prefix, namespace=self._NAMESPACE)
        return [json.loads(key.decode()[len(self._prefix) :]) for key in sorted(keys)]

    def clear(self) -> None:
        from ray.experimental import internal_kv

        internal_kv._internal_kv_del(self._prefix, del_by_prefix=True, namespace=self._NAMESPACE)


def _pin(config: LifecycleConfig) -> _Pinned:
    from jobs import warehouse
    from serving import registry

    score = config.score
    run_date = score.run_date or datetime.datetime.now(datetime.UTC).date()
    model = registry.resolve_version(
        score.model_uri or config.production_uri, config.registry.tracking_uri
    )
    snapshot_id = warehouse.table_snapshot(config.catalog, score.input_table)
    return _Pinned(snapshot_id=snapshot_id, model=model, run_date=run_date.isoformat())


def _read_input(config: LifecycleConfig, pinned: _Pinned) -> ray.data.Dataset:
    """The input rows at the pinned snapshot (the key and text columns only).

    Ray Data has no way to send one stream to two sinks, so scoring and quarantine each read
    the table; both read the pinned snapshot, so they see the same rows. The quarantine pass is
    cheap: over 100k BANKING77 rows it took 0.3 s warm (3.9 s cold, 2-core box), where scoring
    them takes over a minute, and it runs while the scoring actors start. Materialising the
    table to read it once would hold it all in the object store; routing both outputs through
    one write would need a sink wrapping two RunDateSinks and more of Ray's internals.
    """
    from jobs import warehouse

    text_key = "task.prompt_column" if _generates(config) else "task.text_column"
    columns = {
        **dict.fromkeys(config.score.key_columns, "score.key_columns"),
        config.task.input_column: text_key,
    }
    return warehouse.read_table(
        config.catalog, config.score.input_table, snapshot_id=pinned.snapshot_id, columns=columns
    )


def _score(
    config: LifecycleConfig, rows: ray.data.Dataset, pinned: _Pinned, board: Any
) -> warehouse.RunDateSink:
    """Predictions of the usable rows, written and staged (main commits them)."""
    from jobs import warehouse

    usable = rows.map_batches(UsableRows(config.task.input_column, keep=True), batch_format="numpy")
    predictions = predict_rows(config, usable, pinned.model, runtime_board=board).map_batches(
        StampRun(pinned.run_date, datetime.datetime.now(datetime.UTC)), batch_format="numpy"
    )
    write = _write_completions if _generates(config) else warehouse.write_predictions
    return write(
        predictions,
        config.catalog,
        config.score.output_table,
        run_date=pinned.run_date,
        properties=pinned.lineage(config.score.input_table),
        defer_commit=True,
    )


def _generates(config: LifecycleConfig) -> bool:
    from jobs.tasks import is_generative  # already imported: validating task.type loads it

    return is_generative(config.task.type)


def _write_completions(
    ds: ray.data.Dataset,
    catalog: Any,
    table: str,
    *,
    run_date: str,
    properties: dict,
    defer_commit: bool = False,
) -> warehouse.RunDateSink:
    """warehouse.write_predictions for completions: the same sink, replacing the date."""
    from jobs.warehouse.catalog import catalog_properties, table_namespace
    from jobs.warehouse.sink import RunDateSink

    table_namespace(table)
    sink = RunDateSink(
        table,
        catalog_properties(catalog),
        run_date,
        required_columns=COMPLETION_COLUMNS,
        timestamp_column="scored_at",
        properties=properties,
        defer_commit=defer_commit,
    )
    ds.map_batches(_text_columns, batch_format="pyarrow").write_datasink(sink)
    return sink


# Completion columns that hold text. In a block where one is null on every row (`error` on most
# blocks), Ray's numpy round trip (StampRun) turns it into float NaN, which the table's string
# column refuses.
_TEXT_COLUMNS = ("completion", "finish_reason", "error", "model_name", "model_version")


def _text_columns(block: Any) -> Any:
    """`block` (a pyarrow Table) with the text columns typed as strings, nulls kept null."""
    import pyarrow as pa

    for name in _TEXT_COLUMNS:
        column = block.column(name)
        if not pa.types.is_string(column.type):
            values = [v if isinstance(v, str) else None for v in column.to_pylist()]
            block = block.set_column(
                block.column_names.index(name), name, pa.array(values, pa.string())
            )
    return block


def predict_rows(
    config: LifecycleConfig,
    source: ray.data.Dataset,
    model: registry.ResolvedVersion,
    runtime_board: Any = None,
) -> ray.data.Dataset:
    """`source` through the Predictor actors of `model`; each actor posts its
    `Predictor.runtime` to `runtime_board` (a RuntimeBoard) if given. Re-evaluation's
    VersionLabels actors take the same settings (`predictor_kwargs`, `actor_pool`)."""
    from serving.predictor import Predictor

    return source.map_batches(
        Predictor,
        fn_constructor_kwargs=predictor_kwargs(config, model, runtime_board=runtime_board),
        **actor_pool(config),
    )


def predictor_kwargs(
    config: LifecycleConfig, model: registry.ResolvedVersion, **overrides: Any
) -> dict[str, Any]:
    """The Predictor settings of the scoring job (score.*) for `model`, as its actors get them."""
    from serving import registry

    score = config.score
    return {
        "model_uri": model.uri,
        "model_source": model.source,  # the pinned version's artifacts: no registry query
        "tracking_uri": registry.absolute_tracking_uri(config.registry.tracking_uri),
        "precision": score.precision,
        "engine": score.engine,
        "torch_threads": score.torch_threads,
        "text_column": config.task.input_column,
        "passthrough_columns": tuple(score.key_columns),
        "trust_remote_code": config.model.trust_remote_code,
        "generation_config": score.generation,  # used by a causal-lm version only
        **overrides,
    }


def actor_pool(config: LifecycleConfig) -> dict[str, Any]:
    """map_batches arguments of the scoring job's actor pool (score.*): one output row per row."""
    import ray.data

    score = config.score
    return {
        "batch_size": score.batch_size,
        "batch_format": "numpy",
        "compute": ray.data.ActorPoolStrategy(size=score.concurrency),
        "num_cpus": score.num_cpus,
        "udf_modifying_row_count": False,
    }


def _quarantine(
    config: LifecycleConfig, rows: ray.data.Dataset, pinned: _Pinned
) -> warehouse.RunDateSink:
    """Rows whose text cannot be scored, with the reason; replaced per run date like
    predictions. Written and staged (main commits them)."""
    from jobs import warehouse

    text = config.task.input_column
    bad = rows.map_batches(UsableRows(text, keep=False), batch_format="numpy")
    return warehouse.write_quarantine(
        bad,
        config.catalog,
        config.score.quarantine_table,
        run_date=pinned.run_date,
        reason=UNUSABLE_REASON,
        properties=pinned.lineage(config.score.input_table),
        defer_commit=True,
    )


def _result(
    config: LifecycleConfig, pinned: _Pinned, scored: int, quarantined: int, wall: float
) -> ScoreResult:
    model = pinned.model
    return ScoreResult(
        input_table=config.score.input_table,
        input_snapshot_id=pinned.snapshot_id,
        output_table=config.score.output_table,
        run_date=pinned.run_date,
        # A checkpoint directory is tagged as the Predictor tags its rows: folder name, "local".
        model_name=model.name or Path(model.source).name,
        model_version=model.version or _local_version(),
        rows_scored=scored,
        rows_quarantined=quarantined,
        wall_s=wall,
        rows_per_s=scored / wall if wall else 0.0,
    )


def _local_version() -> str:
    """What the Predictor writes as the version of a checkpoint directory. Imported only for
    one: serving.predictor loads torch (1-2 s), the actors' import, not the driver's."""
    from serving.predictor import LOCAL_VERSION

    return LOCAL_VERSION


if __name__ == "__main__":
    from jobs.cli import run_job

    run_job(main, __doc__)
