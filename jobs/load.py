"""Load a CSV or Parquet file into the Iceberg training table (and the demo's inbox table).

python -m jobs.load --config configs/banking77/minilm_lora.yaml [data.source=PATH]
"""

from __future__ import annotations

from dataclasses import dataclass

from jobs import warehouse
from jobs.config import LifecycleConfig
from jobs.datasets import banking77_path

__all__ = ["LoadResult", "main"]


@dataclass
class LoadResult:
    table: str
    snapshot_id: int
    inbox_table: str | None
    inbox_snapshot_id: int | None


def main(config: LifecycleConfig) -> LoadResult:
    task, data = config.task, config.data
    source = data.source or str(banking77_path())
    snapshot = warehouse.load_table_from_file(
        config.catalog,
        data.table,
        source,
        text_column=task.input_column,  # causal-lm: the prompt and response columns
        label_column=task.target_column,
        key_column=task.key_column,
        sample_rows=data.sample_rows,
        seed=data.validation.seed,
    )
    inbox_snapshot = None
    if data.inbox_rows:
        inbox_snapshot = warehouse.create_inbox_table(
            config.catalog,
            data.table,
            data.inbox_table,
            rows=data.inbox_rows,
            text_column=task.input_column,
            key_column=task.key_column,
            seed=data.validation.seed,
        )
    return LoadResult(
        table=data.table,
        snapshot_id=snapshot,
        inbox_table=data.inbox_table if data.inbox_rows else None,
        inbox_snapshot_id=inbox_snapshot,
    )


if __name__ == "__main__":
    from jobs.cli import run_job

    run_job(main, __doc__)
