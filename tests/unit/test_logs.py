"""Progress output: bars on a terminal, concise lines in a log (CI, `make demo > log`)."""

from __future__ import annotations

import io
import os

import pytest
from ray.data import DataContext

from cluster.runtime import configure_progress, progress_bars_wanted

QUIET_ENV = ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clean_progress_state(monkeypatch):
    """Undo what configure_progress changes: the DataContext and the driver's env."""
    context = DataContext.get_current()
    for attr in ("use_ray_tqdm", "enable_operator_progress_bars", "enable_progress_bars"):
        monkeypatch.setattr(context, attr, getattr(context, attr))
    for name in (*QUIET_ENV, "RAY_COLOR_PREFIX"):
        monkeypatch.setenv(name, "unset-by-test")  # recorded, so teardown restores the original
        monkeypatch.delenv(name)
    monkeypatch.delenv("RAYLIFT_PROGRESS_BARS", raising=False)
    return context


def test_bars_on_a_terminal_lines_in_a_log(clean_progress_state):
    assert progress_bars_wanted(_Terminal()) is True
    assert progress_bars_wanted(io.StringIO()) is False  # a file, a pipe, pytest's capture
    assert progress_bars_wanted(object()) is False  # a stream without isatty


@pytest.mark.parametrize("forced, expected", [("1", True), ("0", False)])
def test_the_choice_can_be_forced(forced, expected, clean_progress_state, monkeypatch):
    monkeypatch.setenv("RAYLIFT_PROGRESS_BARS", forced)
    assert progress_bars_wanted(_Terminal()) is expected
    assert progress_bars_wanted(io.StringIO()) is expected


def test_off_a_terminal_ray_data_logs_lines_and_workers_draw_no_bars(clean_progress_state):
    context = clean_progress_state
    env = configure_progress(bars=False)
    # use_ray_tqdm on is what makes a Ray worker (Train's split coordinator) draw bars that
    # the driver redraws into the log; with it off, Ray Data logs progress lines there.
    assert (context.use_ray_tqdm, context.enable_operator_progress_bars) == (False, False)
    assert context.enable_progress_bars  # the periodic progress lines stay
    assert env == {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    assert {name: os.environ[name] for name in QUIET_ENV} == env
    # the driver prints its workers' lines without terminal colours around their prefixes
    assert os.environ["RAY_COLOR_PREFIX"] == "0"


def test_a_colour_choice_of_the_user_is_kept(clean_progress_state, monkeypatch):
    monkeypatch.setenv("RAY_COLOR_PREFIX", "1")
    configure_progress(bars=False)
    assert os.environ["RAY_COLOR_PREFIX"] == "1"


def test_on_a_terminal_the_bars_stay(clean_progress_state):
    context = clean_progress_state
    context.use_ray_tqdm = context.enable_operator_progress_bars = False
    assert configure_progress(bars=True) == {}
    assert (context.use_ray_tqdm, context.enable_operator_progress_bars) == (True, True)
    assert not any(name in os.environ for name in (*QUIET_ENV, "RAY_COLOR_PREFIX"))


def _trial(trial_id: str, status: str, sample: dict):
    from ray.tune.experiment import Trial

    trial = Trial("__fake", config={"overrides": sample}, trial_id=trial_id, stub=True)
    trial.status = status
    return trial


def test_a_search_in_a_log_prints_one_line_per_trial_event(caplog, monkeypatch):
    """Off a terminal `raylift tune` replaces Tune's 30 s status tables with these lines."""
    from jobs import tune
    from jobs.scheduler_stops import SchedulerStop
    from jobs.tune import _OVERRIDES, _TrialLines

    stops = {}  # what the scheduler recorded in each trial's folder (jobs.scheduler_stops)
    monkeypatch.setattr(tune, "_scheduler_stop", lambda trial: stops.get(trial.trial_id))

    assert _OVERRIDES == "overrides"
    lines = _TrialLines("val_accuracy", epochs=5)
    sample = {"train.learning_rate": 0.000595103, "model.lora.r": 64}
    first = _trial("a_00000", "RUNNING", sample)
    trials = [
        first,
        _trial("a_00001", "PENDING", sample),
        _trial("a_00002", "PAUSED", sample),
        _trial("a_00003", "TERMINATED", sample),
        _trial("a_00004", "ERROR", sample),
    ]
    with caplog.at_level("INFO", logger="jobs.tune"):
        lines.on_trial_start(iteration=1, trials=trials, trial=first)
        lines.on_trial_result(
            iteration=2, trials=trials, trial=first, result={"epoch": 1, "val_accuracy": 0.81234}
        )
        first.update_last_result({"epoch": 1, "val_accuracy": 0.81234})
        stops["a_00000"] = SchedulerStop("asha", 1, "val_accuracy", 0.81234)
        lines.on_trial_complete(iteration=3, trials=trials, trial=first)
        stops.clear()
        lines.on_trial_complete(iteration=3, trials=trials, trial=first)  # not the scheduler
        first.update_last_result({"epoch": 5, "val_accuracy": 0.9})
        lines.on_trial_complete(iteration=4, trials=trials, trial=first)
        lines.on_trial_complete(iteration=5, trials=trials, trial=trials[1])  # no report yet
        lines.on_trial_error(iteration=6, trials=trials, trial=trials[4])
    assert [r.getMessage() for r in caplog.records] == [
        "tune: trial a_00000 started: train.learning_rate=0.0005951, model.lora.r=64 "
        "(others: 0 running, 2 waiting, 2 done (1 failed))",
        "tune: trial a_00000 epoch 1: val_accuracy 0.8123",
        "tune: trial a_00000 stopped early after epoch 1 by asha, val_accuracy 0.8123 "
        "(others: 0 running, 2 waiting, 2 done (1 failed))",
        "tune: trial a_00000 ended after epoch 1, not stopped by its scheduler, val_accuracy "
        "0.8123 (others: 0 running, 2 waiting, 2 done (1 failed))",
        "tune: trial a_00000 finished its 5 epochs, val_accuracy 0.9 "
        "(others: 0 running, 2 waiting, 2 done (1 failed))",
        "tune: trial a_00001 stopped before its first epoch, val_accuracy - "
        "(others: 1 running, 1 waiting, 2 done (1 failed))",
        "tune: trial a_00004 failed (others: 1 running, 2 waiting, 1 done)",
    ]
