"""Bad training input fails early with a clear error and leaves the registry as it was."""

from __future__ import annotations

import csv

import pytest

from jobs import finetune, load
from jobs.config import validate_mapping
from tests.helpers import make_ticket_rows


def _config(root, tiny_bert, source, **model):
    return validate_mapping(
        {
            "name": "errors",
            "task": {"label_column": "category"},
            "model": {"base": tiny_bert, **model},
            "catalog": {"uri": f"sqlite:///{root}/catalog.db", "warehouse": str(root / "wh")},
            "data": {"source": str(source), "inbox_rows": 0},
            "registry": {
                "tracking_uri": f"sqlite:///{root}/mlflow.db",
                "model_name": "errs",
                "build_engines": False,
            },
        }
    )


def _write_rows(path, rows):
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "category"])
        writer.writeheader()
        writer.writerows(rows)


def _registered_versions(config) -> list:
    from mlflow import MlflowClient

    from serving.registry import configure_tracking

    configure_tracking(config.registry.tracking_uri)
    return MlflowClient().search_model_versions("name='errs'")


def test_null_labels_fail_before_training_and_register_nothing(ray_session, tmp_path, tiny_bert):
    rows = make_ticket_rows(40, ["a", "b"])
    rows[3]["category"] = None
    _write_rows(tmp_path / "t.csv", rows)
    config = _config(tmp_path, tiny_bert, tmp_path / "t.csv")
    load.main(config)
    with pytest.raises(ValueError, match=r"1 of 40 rows \(2.5%\) .* a null 'category'"):
        finetune.main(config)
    assert _registered_versions(config) == []


def test_streams_drop_the_rows_the_scan_refused(ray_session, tmp_path, tiny_bert):
    """Ray Data drops exactly the rows the driver counted: train + validation = usable rows."""
    from jobs.training_data import prepare_training_data

    rows = make_ticket_rows(60, ["a", "b", "c"])
    rows[4]["text"], rows[9]["text"], rows[17]["category"] = "", "  ", None
    _write_rows(tmp_path / "t.csv", rows)
    config = _config(tmp_path, tiny_bert, tmp_path / "t.csv")
    config.task.max_refused_share = 0.1
    load.main(config)
    data = prepare_training_data(config)
    assert data.rows_refused == 3
    assert data.train_rows + data.validation_rows == 57
    train = data.datasets["train"].take_all()
    validation = data.datasets["validation"].take_all()
    assert (len(train), len(validation)) == (data.train_rows, data.validation_rows)
    assert all(len(row["input_ids"]) > 2 for row in train + validation)  # [CLS] text [SEP]


def test_missing_table_and_missing_model(ray_session, tmp_path, tiny_bert):
    _write_rows(tmp_path / "t.csv", make_ticket_rows(20, ["a", "b"]))
    config = _config(tmp_path, tiny_bert, tmp_path / "t.csv")
    with pytest.raises(LookupError, match="raylift warehouse load"):
        finetune.main(config)
    missing_model = _config(tmp_path, str(tmp_path / "no-such-model"), tmp_path / "t.csv")
    with pytest.raises(FileNotFoundError, match="model.base="):
        finetune.main(missing_model)


def test_a_failing_worker_ends_the_mlflow_run_failed_and_leaves_it_resumable(
    ray_session, tmp_path, tiny_bert
):
    """A worker that raises (PEFT finds no such module) fails the run once train.max_failures
    restarts are spent: the error reaches the caller, the MLflow run is FAILED, not RUNNING,
    nothing is registered, and the run's state says it can be resumed."""
    import json
    from pathlib import Path

    from mlflow import MlflowClient

    # Few rows (one validation row per class): the worker fails while building the model,
    # before it reads any data.
    _write_rows(tmp_path / "t.csv", make_ticket_rows(20, ["a", "b"]))
    config = _config(
        tmp_path,
        tiny_bert,
        tmp_path / "t.csv",
        method="lora",
        lora={"target_modules": ["no_such_module"]},
    )
    config.train.num_workers, config.train.max_failures = 1, 0
    config.train.checkpoint_dir = str(tmp_path / "checkpoints")
    load.main(config)
    with pytest.raises(Exception, match="target_modules"):
        finetune.main(config)
    state = json.loads((Path(finetune._run_path(config)) / "raylift_finetune.json").read_text())
    assert state["finished"] is False
    assert MlflowClient(config.registry.tracking_uri).get_run(state["run_id"]).info.status == (
        "FAILED"
    )
    assert _registered_versions(config) == []
    with pytest.raises(ValueError, match="unfinished finetune .* --resume"):
        finetune.main(config)
