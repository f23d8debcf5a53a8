"""The finetune driver's run state without Ray: a stable run name, the MLflow run ended FAILED
when training fails, a fresh start refused while a run is unfinished, --resume continuing the
same folder and MLflow run, and registration that never takes the resume state."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray.train import Checkpoint

from jobs import finetune, load, tracking
from jobs.train_loop import STATE_DIR
from jobs.training_data import PreparedData
from tests.helpers import make_lora_checkpoint, make_ticket_rows, tiny_lifecycle

LABELS = ["card_arrival", "lost_card"]


@pytest.fixture
def config(tmp_path, tiny_bert, monkeypatch):
    config = tiny_lifecycle(tmp_path, tiny_bert, make_ticket_rows(20, LABELS), name="resume-unit")
    load.main(config)
    monkeypatch.setattr(finetune, "init_ray", lambda: None)
    monkeypatch.setattr(finetune, "prepare_training_data", _prepared)
    monkeypatch.setattr(tracking, "engine_rows", lambda *args, **kwargs: None)
    return config


def _prepared(config, rows, split) -> PreparedData:
    """prepare_training_data without Ray: the split the driver planned, no streams."""
    return PreparedData(
        config.data.table,
        rows.snapshot_id,
        LABELS,
        split.train_rows,
        split.validation_rows,
        datasets={},
    )


def _client(config):
    from mlflow import MlflowClient

    from serving.registry import absolute_tracking_uri

    return MlflowClient(absolute_tracking_uri(config.registry.tracking_uri))


def _state(config) -> dict:
    return json.loads((Path(finetune._run_path(config)) / "raylift_finetune.json").read_text())


def _trained_checkpoint(root: Path, tiny_bert: str) -> Checkpoint:
    """A finished epoch's checkpoint as train_func leaves it: model files plus state/."""
    directory = Path(make_lora_checkpoint(tiny_bert, root / "epoch002-end", LABELS))
    (directory / STATE_DIR).mkdir()
    (directory / STATE_DIR / "progress.json").write_text("{}")
    return Checkpoint.from_directory(str(directory))


def test_run_name_is_stable_and_names_the_config(config):
    from jobs.config import config_hash, with_overrides

    assert finetune.run_name(config) == f"resume-unit-{config_hash(config)}"
    assert finetune.run_name(config) == finetune.run_name(config.model_copy(deep=True))
    other = with_overrides(config, {"train.learning_rate": 1e-3})
    assert finetune.run_name(other) != finetune.run_name(config)


def test_a_failed_run_ends_failed_and_resume_continues_it(config, tmp_path, tiny_bert, monkeypatch):
    def dies(config, data, tags, run_id, run_path):
        raise RuntimeError("the worker group died more than train.max_failures times")

    monkeypatch.setattr(finetune, "_train", dies)
    with pytest.raises(RuntimeError, match="max_failures"):
        finetune.main(config)
    first = _state(config)
    assert first["finished"] is False
    assert _client(config).get_run(first["run_id"]).info.status == "FAILED"

    with pytest.raises(ValueError, match="unfinished finetune .* --resume"):
        finetune.main(config)  # a fresh start would drop the run's checkpoints

    checkpoint = _trained_checkpoint(tmp_path, tiny_bert)
    seen = {}

    def resumes(config, data, tags, run_id, run_path):
        seen.update(run_id=run_id, run_path=run_path, snapshot=data.snapshot_id)
        assert _client(config).get_run(run_id).info.status == "RUNNING"  # reopened
        mid_epoch = Checkpoint.from_directory(str(tmp_path))
        return SimpleNamespace(
            best_checkpoints=[
                (mid_epoch, {"val_accuracy": -1e300, "checkpoint_batches": 4}),  # state only
                (checkpoint, {"val_accuracy": 0.75, "epoch": 2}),
            ]
        )

    monkeypatch.setattr(finetune, "_train", resumes)
    result = finetune.main(config, resume=True)

    assert seen == {
        "run_id": first["run_id"],
        "run_path": finetune._run_path(config),
        "snapshot": first["snapshot_id"],
    }
    assert result.run_id == first["run_id"] and result.version == "1"
    assert result.metrics["val_accuracy"] == 0.75
    assert _client(config).get_run(first["run_id"]).info.status == "FINISHED"
    assert _state(config)["finished"] is True
    artifacts = {a.path for a in _client(config).list_artifacts(first["run_id"], "checkpoint")}
    assert "checkpoint/adapter_model.safetensors" in artifacts
    assert f"checkpoint/{STATE_DIR}" not in artifacts  # the resume state stays out of the registry

    with pytest.raises(ValueError, match="nothing to resume"):
        finetune.main(config, resume=True)


def test_a_resumed_driver_that_had_registered_does_not_register_again(
    config, tmp_path, tiny_bert, monkeypatch
):
    checkpoint = _trained_checkpoint(tmp_path, tiny_bert)
    result = SimpleNamespace(best_checkpoints=[(checkpoint, {"val_accuracy": 0.8, "epoch": 2})])
    monkeypatch.setattr(finetune, "_train", lambda *args: result)
    first = finetune.main(config)
    # The driver died after registering, before it recorded the run as finished:
    state = _state(config)
    finetune._write_state(finetune._run_path(config), state["run_id"], state["snapshot_id"], False)
    again = finetune.main(config, resume=True)
    assert again.version == first.version == "1"
    assert len(_client(config).search_model_versions("name='ticket-router'")) == 1


def test_a_finished_runs_folder_is_cleared_by_a_fresh_start(
    config, tmp_path, tiny_bert, monkeypatch
):
    checkpoint = _trained_checkpoint(tmp_path, tiny_bert)
    result = SimpleNamespace(best_checkpoints=[(checkpoint, {"val_accuracy": 0.8, "epoch": 2})])
    monkeypatch.setattr(finetune, "_train", lambda *args: result)
    first = finetune.main(config)
    leftover = Path(finetune._run_path(config)) / "epoch001-end"
    leftover.mkdir()
    second = finetune.main(config)
    assert second.run_id != first.run_id and second.version == "2"
    assert not leftover.exists()


def test_only_checkpoints_with_the_metric_are_candidates():
    result = SimpleNamespace(
        best_checkpoints=[
            ("mid", {"val_accuracy": -1e300, "checkpoint_batches": 4}),
            ("nan", {"val_accuracy": math.nan, "epoch": 1}),
            ("end", {"val_accuracy": 0.5, "epoch": 2}),
        ]
    )
    assert finetune._best_checkpoint(result, "val_accuracy")[0] == "end"
    with pytest.raises(RuntimeError, match="no checkpoint with metric"):
        finetune._best_checkpoint(
            SimpleNamespace(best_checkpoints=result.best_checkpoints[:2]), "val_accuracy"
        )


def test_trainer_retries_failures_and_orders_the_training_stream(config):
    from jobs.config import with_overrides
    from jobs.train_loop import LoopInputs

    data = PreparedData("t", 1, LABELS, 16, 4, datasets={})
    inputs = LoopInputs(config={}, labels=LABELS, train_rows=16)
    plain = finetune.build_trainer(config, data, inputs, name="n", storage_path="/tmp")
    assert plain.run_config.failure_config.max_failures == 1
    assert plain.train_loop_config["checkpoint_metric"] == "val_accuracy"
    assert plain.data_config._get_user_execution_options("train").preserve_order  # the default
    unordered = with_overrides(config, {"train.preserve_order": False})
    trainer = finetune.build_trainer(unordered, data, inputs, name="n", storage_path="/tmp")
    assert trainer.data_config._get_user_execution_options("train") is None
    with pytest.raises(ValueError, match="checkpoint_every_steps needs train.preserve_order"):
        with_overrides(unordered, {"train.checkpoint_every_steps": 5})

    every = with_overrides(config, {"train.checkpoint_every_steps": 5, "train.max_failures": 3})
    trainer = finetune.build_trainer(
        every, data, inputs, name="n", storage_path="/tmp", metric="val_loss", mode="min"
    )
    assert trainer.run_config.failure_config.max_failures == 3
    assert trainer.train_loop_config["checkpoint_metric"] == "val_loss"
    assert trainer.train_loop_config["checkpoint_mode"] == "min"
    assert trainer.data_config._get_user_execution_options("train").preserve_order
    assert trainer.data_config._get_user_execution_options("validation") is None
