"""ASHA's rungs after `raylift tune --resume`: rebuilt from what the restored trials reported.

Tune restores trials with their storage and last result, and calls the scheduler's
on_trial_add for each; here stand-ins carry those fields, and each trial's result.json is
written where Tune keeps it (one JSON line per reported result, in the trial's folder).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs
import pytest
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from jobs.asha import ResumableASHA


@dataclass(eq=False)
class _Trial:
    trial_id: str
    path: str
    last_result: dict = field(default_factory=dict)
    storage: SimpleNamespace = field(
        default_factory=lambda: SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem())
    )


def _restored(tmp_path: Path, trial_id: str, accuracies: list[float], history=True) -> _Trial:
    """A trial that reported `accuracies` at epochs 1, 2, ... before the driver died."""
    folder = tmp_path / trial_id
    folder.mkdir()
    results = [{"epoch": e, "val_accuracy": a} for e, a in enumerate(accuracies, start=1)]
    if history:
        (folder / "result.json").write_text("".join(json.dumps(r) + "\n" for r in results))
    return _Trial(trial_id, str(folder), last_result=results[-1])


def _asha(cls=ResumableASHA, mode="max"):
    scheduler = cls(time_attr="epoch", max_t=9, grace_period=1, reduction_factor=3)
    scheduler.set_search_properties("val_accuracy", mode)
    return scheduler


def _restore(scheduler, trials) -> None:
    for trial in trials:
        scheduler.on_trial_add(None, trial)


@pytest.mark.parametrize("cls", [ResumableASHA, ASHAScheduler])
def test_a_resumed_search_judges_new_arrivals_against_the_rungs_before_the_restart(tmp_path, cls):
    # before the kill: t0 went on to epoch 4 (0.5 at rung 1, 0.7 at rung 3), t1 and t2 were
    # stopped at rung 1 (0.2, 0.4); t3 starts after the restart and reaches rung 1 with 0.3.
    restored = [
        _restored(tmp_path, "t0", [0.5, 0.6, 0.7, 0.8]),
        _restored(tmp_path, "t1", [0.2]),
        _restored(tmp_path, "t2", [0.4]),
    ]
    scheduler = _asha(cls)
    _restore(scheduler, restored)
    new = _Trial("t3", str(tmp_path / "t3"))
    scheduler.on_trial_add(None, new)

    decision = scheduler.on_trial_result(None, new, {"epoch": 1, "val_accuracy": 0.3})

    if cls is ResumableASHA:  # below the top third of 0.5, 0.2, 0.4 (and itself)
        assert decision == TrialScheduler.STOP
    else:  # the check can fail: Ray's ASHA restores empty rungs, and lets it through
        assert decision == TrialScheduler.CONTINUE


def test_rungs_hold_each_trials_value_where_it_first_reached_them(tmp_path):
    scheduler = _asha(mode="min")  # e.g. val_loss: ASHA keeps negated values
    _restore(scheduler, [_restored(tmp_path, "t0", [3.0, 2.0, 1.5, 1.2])])
    rungs = dict(scheduler._trial_info["t0"]._rungs)
    assert rungs[1] == {"t0": -3.0}
    assert rungs[3] == {"t0": -1.5}
    assert rungs[9] == {}  # not reached


def test_a_trial_without_readable_history_keeps_its_last_result(tmp_path, caplog):
    scheduler = _asha()
    trial = _restored(tmp_path, "t0", [0.5, 0.6, 0.7], history=False)
    _restore(scheduler, [trial])
    rungs = dict(scheduler._trial_info["t0"]._rungs)
    assert rungs[3] == {"t0": 0.7}  # its last result stood at rung 3
    assert rungs[1] == {}  # what it had at rung 1 is lost with the file
    assert "no result history for trial t0" in caplog.text


class _FreshTrial:
    """A trial the searcher just created: Tune's last result holds only its id, and its
    storage has no trial folder yet (Ray raises on `trial.path`)."""

    def __init__(self, trial_id: str):
        self.trial_id = trial_id
        self.last_result = {"trial_id": trial_id}

    @property
    def path(self):
        raise RuntimeError("Should not access `trial_fs_path` without setting `trial_dir_name`")


def test_a_fresh_trial_adds_nothing_to_the_rungs_and_reads_no_history():
    scheduler = _asha()
    scheduler.on_trial_add(None, _FreshTrial("t0"))
    assert all(recorded == {} for _, recorded in scheduler._trial_info["t0"]._rungs)


def _stop_of(trial: _Trial):
    from jobs.scheduler_stops import recorded_stop

    return recorded_stop(trial.path, trial.storage.storage_filesystem)


def test_a_stop_at_a_rung_is_recorded_beside_the_trial_and_the_end_of_training_is_not(tmp_path):
    """What tells a trial ASHA stopped from one the time budget cut (jobs.scheduler_stops)."""
    from jobs.scheduler_stops import SchedulerStop

    scheduler = _asha()
    trials = [_Trial(f"t{i}", str(tmp_path / f"t{i}")) for i in range(3)]
    for trial in trials:
        scheduler.on_trial_add(None, trial)

    assert (
        scheduler.on_trial_result(None, trials[0], {"epoch": 1, "val_accuracy": 0.9}) == "CONTINUE"
    )
    assert scheduler.on_trial_result(None, trials[1], {"epoch": 1, "val_accuracy": 0.2}) == "STOP"
    assert scheduler.on_trial_result(None, trials[0], {"epoch": 9, "val_accuracy": 0.95}) == "STOP"

    assert _stop_of(trials[1]) == SchedulerStop("asha", 1, "val_accuracy", 0.2)
    assert _stop_of(trials[0]) is None  # ASHA's STOP at max_t: it ran every epoch
    assert _stop_of(trials[2]) is None  # never judged (the time budget, say, ended it)
