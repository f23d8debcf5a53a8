"""Nightly batch scoring: Iceberg table → Predictor actors (Ray Data) → predictions table.

    python -m jobs.score --config configs/banking77/minilm_lora.yaml [score.run_date=2026-11-22]

The alias is resolved once, before any actor starts, so every row of a run carries the same
model version even if the alias moves mid-run. Writing replaces the run date's rows in one
Iceberg commit: re-running a date never duplicates it. Rows with no usable text go to the
quarantine table with the reason instead of failing the run.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass

import numpy as np

from cluster import init_ray
from jobs import warehouse
from jobs.config import LifecycleConfig
from serving import registry

__all__ = ["ScoreResult", "main"]


@dataclass
class ScoreResult:
    input_table: str
    output_table: str
    run_date: str
    model_name: str
    model_version: str
    rows_scored: int
    rows_quarantined: int
    wall_s: float
    rows_per_s: float


class StampRun:
    """Adds run_date and scored_at to each predictions batch."""

    def __init__(self, run_date: str, scored_at: datetime.datetime):
        self._run_date = run_date
        self._scored_at = np.datetime64(scored_at.replace(tzinfo=None), "us")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["label"])
        batch["run_date"] = np.full(n, self._run_date, dtype=object)
        batch["scored_at"] = np.full(n, self._scored_at)
        return batch


class RowsWithText:
    """Keeps (keep=True) or drops the rows whose text is a non-blank string."""

    def __init__(self, text_column: str, keep: bool):
        self._text = text_column
        self._keep = keep

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        usable = np.fromiter(
            (isinstance(t, str) and bool(t.strip()) for t in batch[self._text]),
            dtype=bool,
            count=len(batch[self._text]),
        )
        mask = usable if self._keep else ~usable
        return {name: column[mask] for name, column in batch.items()}


def main(config: LifecycleConfig) -> ScoreResult:
    started = time.perf_counter()
    init_ray()
    score = config.score
    run_date = (score.run_date or datetime.datetime.now(datetime.UTC).date()).isoformat()
    pinned = _pin_version(config)
    source = warehouse.read_table(
        config.catalog,
        score.input_table,
        columns=[*score.key_columns, config.task.text_column],
    ).map_batches(RowsWithText(config.task.text_column, keep=True), batch_format="numpy")
    predictions = _predict(config, source, pinned).map_batches(
        StampRun(run_date, datetime.datetime.now(datetime.UTC)), batch_format="numpy"
    )
    warehouse.write_predictions(predictions, config.catalog, score.output_table, run_date=run_date)
    quarantined = _quarantine(config, run_date)
    scored = warehouse.count_rows(config.catalog, score.output_table, run_date=run_date)
    wall = time.perf_counter() - started
    return ScoreResult(
        input_table=score.input_table,
        output_table=score.output_table,
        run_date=run_date,
        model_name=pinned.name or "",
        model_version=pinned.version or "",
        rows_scored=scored,
        rows_quarantined=quarantined,
        wall_s=wall,
        rows_per_s=scored / wall if wall else 0.0,
    )


def _pin_version(config: LifecycleConfig) -> registry.ResolvedModel:
    uri = config.score.model_uri or config.production_uri
    return registry.resolve_model(uri, config.registry.tracking_uri)


def _predict(config: LifecycleConfig, source, pinned: registry.ResolvedModel):
    import ray.data

    from serving.predictor import Predictor

    score = config.score
    model_uri = f"models:/{pinned.name}/{pinned.version}" if pinned.version else pinned.path
    return source.map_batches(
        Predictor,
        fn_constructor_kwargs={
            "model_uri": model_uri,
            "tracking_uri": registry.absolute_tracking_uri(config.registry.tracking_uri),
            "precision": score.precision,
            "torch_threads": score.torch_threads,
            "text_column": config.task.text_column,
            "passthrough_columns": tuple(score.key_columns),
        },
        batch_size=score.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=score.concurrency),
        num_cpus=score.num_cpus,
        udf_modifying_row_count=False,  # one prediction per input row
    )


def _quarantine(config: LifecycleConfig, run_date: str) -> int:
    """Rows whose text cannot be scored, with the reason; replaced per run date like predictions."""
    score, text = config.score, config.task.text_column
    bad = warehouse.read_table(
        config.catalog, score.input_table, columns=[*score.key_columns, text]
    ).map_batches(RowsWithText(text, keep=False), batch_format="numpy")
    return warehouse.write_quarantine(
        bad,
        config.catalog,
        score.quarantine_table,
        run_date=run_date,
        reason=f"{text} is null or empty",
    )


if __name__ == "__main__":
    from jobs.cli import run_job

    run_job(main, __doc__)
