"""What the tune driver does with a finished search, without Ray: each trial summarized and its
MLflow run tagged as it ended (stopped by its scheduler, cut short by the search's end, or ran
every epoch), and the winner registered once, in a real MLflow SQLite store."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow.fs
import pytest

from jobs import tune
from jobs.scheduler_stops import SchedulerStop, record_stop
from jobs.training_data import PreparedData
from serving import tags
from tests.helpers import make_lora_checkpoint, make_ticket_rows, tiny_lifecycle

LABELS = ["card_arrival", "lost_card"]
EPOCHS = 4
LOCAL = pyarrow.fs.LocalFileSystem()


@pytest.fixture
def config(tmp_path, tiny_bert):
    rows = make_ticket_rows(20, LABELS)
    return tiny_lifecycle(tmp_path, tiny_bert, rows, name="tune-unit", train={"epochs": EPOCHS})


def _setup(config, tmp_path: Path, parent: str = "search") -> tune._TrialSetup:
    from mlflow import MlflowClient

    experiment_id = tune.registry.configure_tracking(
        config.registry.tracking_uri, config.registry.experiment
    )
    client = MlflowClient(tune.registry.absolute_tracking_uri(config.registry.tracking_uri))
    parent_run_id = client.create_run(experiment_id, run_name=parent).info.run_id
    return tune._trial_setup(config, {}, parent_run_id, str(tmp_path / "experiment"))


def _result(tmp_path: Path, trial_id: str, losses: list[float], checkpoint: str | None = None):
    """A trial's Tune Result as the driver reads it: its reported epochs and its folder."""
    folder = tmp_path / "experiment" / trial_id
    folder.mkdir(parents=True)
    rows = [
        {"epoch": e, "val_accuracy": 1 - loss, "trial_id": trial_id, "checkpoint_path": checkpoint}
        for e, loss in enumerate(losses, start=1)
    ]
    frame = pd.DataFrame(rows) if rows else None
    return SimpleNamespace(
        metrics_dataframe=frame,
        metrics=rows[-1] if rows else {"trial_id": trial_id},
        path=str(folder),
        filesystem=LOCAL,
        error=None,
        config={"overrides": {"train.learning_rate": 0.01}},
    )


def _stopped_by_asha(result, epoch: int) -> None:
    """What jobs.asha.ResumableASHA writes as it stops a trial at a rung."""
    trial = SimpleNamespace(path=result.path, storage=SimpleNamespace(storage_filesystem=LOCAL))
    record_stop(trial, SchedulerStop("asha", epoch, "val_accuracy", 0.3))


def test_only_the_trials_the_scheduler_stopped_are_tagged_stopped_early(config, tmp_path):
    """A search with tune.time_budget_s: ASHA stopped one trial at its first rung; the budget
    cut one after 2 epochs and another before it reported; one ran every epoch."""
    from mlflow import MlflowClient

    setup = _setup(config, tmp_path)
    client = MlflowClient(setup.tracking_uri)
    grid = [
        _result(tmp_path, "stopped", [0.7]),
        _result(tmp_path, "cut", [0.6, 0.5]),
        _result(tmp_path, "unreported", []),
        _result(tmp_path, "full", [0.6, 0.5, 0.4, 0.3]),
    ]
    _stopped_by_asha(grid[0], epoch=1)
    runs = {
        r.metrics["trial_id"]: tune._start_trial_run(
            client, setup, r.metrics["trial_id"], config, {}
        )
        for r in grid
    }

    summaries = {s.trial_id: s for s in tune._summarize_trials(config, grid, setup)}

    ended = {t: (s.epochs, s.stopped_early, s.cut_short) for t, s in summaries.items()}
    assert ended == {
        "stopped": (1, True, False),
        "cut": (2, False, True),
        "unreported": (0, False, True),
        "full": (EPOCHS, False, False),
    }
    stopped_tags = {
        trial_id: client.get_run(run_id).data.tags[tags.TUNE_STOPPED_EARLY]
        for trial_id, run_id in runs.items()
    }
    assert stopped_tags == {
        "stopped": "true",
        "cut": "false",
        "unreported": "false",
        "full": "false",
    }


def _register(config, tmp_path, setup, checkpoint: str) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(setup.tracking_uri)
    grid = [_result(tmp_path / setup.parent_run_id, "t1", [0.4, 0.2], checkpoint=checkpoint)]
    run_id = tune._start_trial_run(client, setup, "t1", config, {})
    data = PreparedData(config.data.table, 7, LABELS, 16, 4, datasets={})
    trials = [tune._summary(config, grid[0], setup, {"t1": [client.get_run(run_id)]})]
    return tune._register_winner(config, data, grid, setup, trials).version


def test_a_resumed_search_whose_driver_died_registering_does_not_register_again(
    config, tmp_path, tiny_bert
):
    from mlflow import MlflowClient

    checkpoint = make_lora_checkpoint(tiny_bert, tmp_path / "epoch002-end", LABELS)
    setup = _setup(config, tmp_path)
    client = MlflowClient(setup.tracking_uri)
    first = _register(config, tmp_path, setup, checkpoint)
    trial_run = client.get_model_version(config.registry.model_name, first).run_id
    # The driver died after registering, before it marked the search finished; --resume
    # summarizes the same trials (same runs) and registers the winner again:
    again = tune._register_winner(
        config,
        PreparedData(config.data.table, 7, LABELS, 16, 4, datasets={}),
        [_result(tmp_path / "again", "t1", [0.4, 0.2], checkpoint=checkpoint)],
        setup,
        [tune.TrialSummary("t1", trial_run, "TERMINATED", 2, False, False, 0.8, {})],
    )
    assert again.version == first == "1"
    versions = client.search_model_versions(f"name='{config.registry.model_name}'")
    assert [str(v.version) for v in versions] == ["1"]
    assert versions[0].tags[tags.TUNE_PARENT_RUN_ID] == setup.parent_run_id
    # Another search (its own parent run) registers its own winner.
    other = _register(config, tmp_path, _setup(config, tmp_path, parent="other"), checkpoint)
    assert other == "2"
