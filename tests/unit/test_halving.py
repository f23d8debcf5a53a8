"""The synchronous successive-halving scheduler's decisions, driven the way Tune drives it.

The real search (paused trials continuing their Train runs) is tests/integration/test_tune.py;
here a stand-in for Tune's controller holds trials with the fields the scheduler reads.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from types import SimpleNamespace

import pyarrow.fs
import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from jobs.halving import SyncHalving, rungs
from jobs.scheduler_stops import SchedulerStop, recorded_stop

_FOLDERS = tempfile.TemporaryDirectory(prefix="halving-trials-")  # the experiment's storage


@dataclass(eq=False)
class _Trial:
    trial_id: str
    status: str = Trial.PENDING
    is_saving: bool = False
    last_result: dict = field(default_factory=dict)
    # where the scheduler records its stops (jobs.scheduler_stops): a folder per trial
    path: str = field(default_factory=lambda: tempfile.mkdtemp(dir=_FOLDERS.name))
    storage: SimpleNamespace = field(
        default_factory=lambda: SimpleNamespace(storage_filesystem=pyarrow.fs.LocalFileSystem())
    )

    def set_status(self, status):
        self.status = status


class _Controller:
    def __init__(self, trials):
        self.trials = trials
        self.stopped: list[str] = []
        self.asked: list[str] = []  # held trials asked for their next result

    def get_trials(self):
        return self.trials

    def stop_trial(self, trial):
        trial.status = Trial.TERMINATED
        self.stopped.append(trial.trial_id)

    def _schedule_trial_train(self, trial):  # what Tune does on CONTINUE: ask for a result
        assert trial.status == Trial.RUNNING
        self.asked.append(trial.trial_id)


def _scheduler(
    num_trials=4, max_running=1, factor=2, max_t=4, mode="max", gate_prefix=None
) -> SyncHalving:
    scheduler = SyncHalving(
        time_attr="epoch",
        max_t=max_t,
        grace_period=1,
        reduction_factor=factor,
        num_trials=num_trials,
        max_running=max_running,
        gate_prefix=gate_prefix,
    )
    scheduler.set_search_properties("val_accuracy", mode)
    return scheduler


def _add(scheduler, controller, trials):
    for trial in trials:
        scheduler.on_trial_add(controller, trial)
        assert trial.status in (Trial.PAUSED, Trial.TERMINATED)  # only started when chosen


def _report(scheduler, controller, trial, epoch, value):
    trial.status = Trial.RUNNING
    decision = scheduler.on_trial_result(controller, trial, {"epoch": epoch, "val_accuracy": value})
    trial.status = {TrialScheduler.PAUSE: Trial.PAUSED, TrialScheduler.STOP: Trial.TERMINATED}.get(
        decision, Trial.RUNNING
    )
    return decision


def test_rungs_are_grace_times_powers_of_the_factor_below_max_t():
    assert rungs(1, 3, 9) == [1, 3]
    assert rungs(1, 2, 4) == [1, 2]
    assert rungs(2, 3, 27) == [2, 6, 18]
    assert rungs(1, 1.5, 4) == [1, 2, 3]  # rounded, no rung twice
    assert rungs(4, 2, 4) == []


def test_each_rung_waits_for_every_trial_then_keeps_the_best_half():
    trials = [_Trial(f"t{i}") for i in range(4)]
    controller = _Controller(trials)
    scheduler = _scheduler()
    _add(scheduler, controller, trials)
    scores = {"t0": 0.2, "t1": 0.9, "t2": 0.5, "t3": 0.7}

    for trial in trials:  # one at a time, each paused at epoch 1 until all four are there
        assert scheduler.choose_trial_to_run(controller) is trial
        decision = _report(scheduler, controller, trial, 1, scores[trial.trial_id])
        if trial.trial_id != "t3":
            assert decision == TrialScheduler.PAUSE
    # the last to arrive decides: t1 and t3 go on, t0 and t2 (paused) are stopped
    assert decision == TrialScheduler.CONTINUE  # t3 is in the best half and keeps running
    assert sorted(controller.stopped) == ["t0", "t2"]
    assert scheduler.choose_trial_to_run(controller) is None  # t3 runs; one at a time

    assert _report(scheduler, controller, trials[3], 2, 0.8) == TrialScheduler.PAUSE
    assert scheduler.choose_trial_to_run(controller) is trials[1]  # the kept, paused one
    assert _report(scheduler, controller, trials[1], 2, 0.6) == TrialScheduler.STOP
    assert scheduler.choose_trial_to_run(controller) is trials[3]
    assert _report(scheduler, controller, trials[3], 3, 0.85) == TrialScheduler.CONTINUE
    assert scheduler.stopped == 3


def test_min_mode_keeps_the_lowest_and_a_failed_trial_does_not_block_a_rung():
    trials = [_Trial(f"t{i}") for i in range(3)]
    controller = _Controller(trials)
    scheduler = _scheduler(num_trials=3, factor=3, max_t=3, mode="min")
    _add(scheduler, controller, trials)
    _report(scheduler, controller, trials[0], 1, 2.0)
    trials[1].status = Trial.ERROR  # failed before epoch 1, retries spent
    scheduler.on_trial_error(controller, trials[1])
    assert scheduler.choose_trial_to_run(controller) is trials[2]
    assert _report(scheduler, controller, trials[2], 1, 1.0) == TrialScheduler.CONTINUE
    assert controller.stopped == ["t0"]


def test_nothing_is_decided_before_the_searcher_created_every_trial():
    trials = [_Trial("t0")]
    controller = _Controller(trials)
    scheduler = _scheduler(num_trials=2, factor=2, max_t=2)
    _add(scheduler, controller, trials)
    assert _report(scheduler, controller, trials[0], 1, 0.5) == TrialScheduler.PAUSE
    assert scheduler.choose_trial_to_run(controller) is None  # waits at its rung
    trials.append(_Trial("t1"))
    _add(scheduler, controller, trials[1:])
    assert scheduler.choose_trial_to_run(controller) is trials[1]
    assert _report(scheduler, controller, trials[1], 1, 0.4) == TrialScheduler.STOP
    assert scheduler.choose_trial_to_run(controller) is trials[0]


@pytest.mark.parametrize("restored_status", [Trial.PENDING, Trial.PAUSED])
def test_a_restored_search_rebuilds_its_rungs_from_the_trials_last_results(restored_status):
    # tune --resume after the driver died: rung 1 was decided (t0 went past it) and kept t0 and
    # t3 (t3 still waits there to be continued); t1 and t2 were stopped at it; t0 waits at
    # rung 2 for t3.
    trials = [
        _Trial("t0", restored_status, last_result={"epoch": 2, "val_accuracy": 0.7}),
        _Trial("t1", Trial.TERMINATED, last_result={"epoch": 1, "val_accuracy": 0.1}),
        _Trial("t2", Trial.TERMINATED, last_result={"epoch": 1, "val_accuracy": 0.2}),
        _Trial("t3", restored_status, last_result={"epoch": 1, "val_accuracy": 0.6}),
    ]
    controller = _Controller(trials)
    scheduler = _scheduler(num_trials=4, factor=2, max_t=4)  # rungs 1, 2
    _add(scheduler, controller, trials)
    assert scheduler.choose_trial_to_run(controller) is trials[3]  # t0 must wait for it
    assert _report(scheduler, controller, trials[3], 2, 0.9) == TrialScheduler.CONTINUE
    assert controller.stopped == ["t0"]
    assert scheduler.choose_trial_to_run(controller) is None  # t3 runs, nothing else is left


def _stop_of(trial: _Trial) -> SchedulerStop | None:
    return recorded_stop(trial.path, trial.storage.storage_filesystem)


def test_each_stop_is_recorded_beside_the_trial_it_stopped():
    """The paused trials a rung's decision stops, and the one stopped as it reports, each get
    the record that tells them from trials the time budget cut (jobs.scheduler_stops)."""
    trials = [_Trial(f"t{i}") for i in range(4)]
    controller = _Controller(trials)
    scheduler = _scheduler()
    _add(scheduler, controller, trials)
    for trial, score in zip(trials, [0.2, 0.9, 0.5, 0.7], strict=True):
        scheduler.choose_trial_to_run(controller)
        _report(scheduler, controller, trial, 1, score)
    _report(scheduler, controller, trials[3], 2, 0.8)
    scheduler.choose_trial_to_run(controller)
    _report(scheduler, controller, trials[1], 2, 0.6)  # stopped as it reports at rung 2
    _report(scheduler, controller, trials[3], 3, 0.85)
    _report(scheduler, controller, trials[3], 4, 0.9)  # its last epoch: no decision

    assert {t.trial_id: _stop_of(t) for t in trials} == {
        "t0": SchedulerStop("sha", 1, "val_accuracy", 0.2),
        "t1": SchedulerStop("sha", 2, "val_accuracy", 0.6),
        "t2": SchedulerStop("sha", 1, "val_accuracy", 0.5),
        "t3": None,
    }


@pytest.fixture
def gates(monkeypatch) -> list[tuple[str, str, int]]:
    """The rung gates the scheduler opens (jobs.rung_gate writes them to Ray's key-value store;
    the real gate is tests/integration/test_tune.py's sha search)."""
    opened: list[tuple[str, str, int]] = []
    monkeypatch.setattr(
        "jobs.halving.open_gate",
        lambda prefix, trial_id, epoch: opened.append((prefix, trial_id, epoch)),
    )
    return opened


def _gated(num_trials, max_running, factor=3, max_t=2) -> SyncHalving:
    return _scheduler(num_trials, max_running, factor, max_t, gate_prefix="parent")


@pytest.mark.parametrize("kept", ["t1", "t2"])
def test_a_trial_that_no_other_waits_for_is_held_and_goes_on_without_a_restart(gates, kept):
    """t0 arrives while t2 still waits for CPUs: paused. t1 arrives while the only trial not
    there yet (t2) runs: held. The rung then keeps `kept` and stops the others."""
    trials = [_Trial(f"t{i}") for i in range(3)]
    controller = _Controller(trials)
    scheduler = _gated(num_trials=3, max_running=2)
    _add(scheduler, controller, trials)
    for trial in trials[:2]:
        assert scheduler.choose_trial_to_run(controller) is trial
        trial.status = Trial.PENDING  # Tune starts it
    scores = {"t0": 0.1, "t1": 0.2, "t2": 0.3, kept: 0.9}

    assert _report(scheduler, controller, trials[0], 1, scores["t0"]) == TrialScheduler.PAUSE
    assert scheduler.choose_trial_to_run(controller) is trials[2]
    trials[2].status = Trial.PENDING
    assert _report(scheduler, controller, trials[1], 1, scores["t1"]) == TrialScheduler.NOOP
    assert trials[1].status == Trial.RUNNING  # held: it keeps its actors
    assert gates == []  # its workers wait at the gate
    assert scheduler.choose_trial_to_run(controller) is None  # t0 waits for the rung

    decision = _report(scheduler, controller, trials[2], 1, scores["t2"])
    assert decision == (TrialScheduler.CONTINUE if kept == "t2" else TrialScheduler.STOP)
    assert gates == [("parent", kept, 1)]  # the kept one goes on past the rung, in its run
    assert controller.asked == (["t1"] if kept == "t1" else [])  # Tune asks t1 for results
    assert sorted(controller.stopped) == sorted({"t0", "t1"} - {kept})
    assert trials[1].status == (Trial.RUNNING if kept == "t1" else Trial.TERMINATED)
    assert {t.trial_id: _stop_of(t) is not None for t in trials} == {
        t: t != kept for t in ("t0", "t1", "t2")
    }
    assert scheduler.choose_trial_to_run(controller) is None  # nothing is left to start


class _TuneWithoutTrain(_Controller):
    _schedule_trial_train = None  # a Tune whose controller lacks the call _go_on makes


@pytest.mark.parametrize("gated", [False, True])
def test_without_a_gate_every_early_arrival_is_paused(gates, gated):
    trials = [_Trial(f"t{i}") for i in range(2)]
    controller = _TuneWithoutTrain(trials) if gated else _Controller(trials)
    scheduler = (
        _gated(num_trials=2, max_running=2, factor=2)
        if gated
        else _scheduler(num_trials=2, max_running=2, factor=2, max_t=2)
    )
    _add(scheduler, controller, trials)
    for trial in trials:
        assert scheduler.choose_trial_to_run(controller) is trial
        trial.status = Trial.PENDING
    assert _report(scheduler, controller, trials[0], 1, 0.9) == TrialScheduler.PAUSE
    assert _report(scheduler, controller, trials[1], 1, 0.1) == TrialScheduler.STOP
    assert gates == []


def test_a_held_trial_goes_on_when_another_needs_its_cpus_and_the_rung_still_judges_it(gates):
    """Held trials keep their CPUs; if a trial waits for them after all (Tune put one back to
    wait), the held one trains on instead of blocking the search, and its rung still stops it."""
    trials = [_Trial(f"t{i}") for i in range(2)]
    controller = _Controller(trials)
    scheduler = _gated(num_trials=2, max_running=1, factor=2)
    _add(scheduler, controller, trials)
    assert scheduler.choose_trial_to_run(controller) is trials[0]
    trials[0].status = Trial.PENDING
    trials[1].status = Trial.RUNNING  # e.g. restarted after a failure
    assert _report(scheduler, controller, trials[0], 1, 0.1) == TrialScheduler.NOOP  # held
    trials[1].status = Trial.PAUSED  # now it waits for CPUs, which held t0 keeps
    assert scheduler.choose_trial_to_run(controller) is None
    assert gates == [("parent", "t0", 1)]  # released: it trains on rather than block t1
    assert controller.asked == ["t0"]
    trials[1].status = Trial.RUNNING
    assert _report(scheduler, controller, trials[1], 1, 0.9) == TrialScheduler.CONTINUE
    assert controller.stopped == ["t0"]  # the rung judged it all the same
    assert _stop_of(trials[0]) == SchedulerStop("sha", 1, "val_accuracy", 0.1)


# --- parking: contenders wait at a rung outside the running slots ----------------------------


class _PausingController(_Controller):
    def __init__(self, trials):
        super().__init__(trials)
        self.paused: list[str] = []

    def pause_trial(self, trial, should_checkpoint=True):
        trial.status = Trial.PAUSED
        self.paused.append(trial.trial_id)


def _parking(num_trials, max_held, factor=3, memory=True) -> SyncHalving:
    scheduler = SyncHalving(
        time_attr="epoch",
        max_t=2,
        grace_period=1,
        reduction_factor=factor,
        num_trials=num_trials,
        max_running=1,
        gate_prefix="parent",
        max_held=max_held,
        memory_allows=lambda: memory,
    )
    scheduler.set_search_properties("val_accuracy", "max")
    return scheduler


def _start(scheduler, controller, trial):
    assert scheduler.choose_trial_to_run(controller) is trial
    trial.status = Trial.PENDING  # Tune starts it


def _arrive(scheduler, controller, trial, score):
    """`trial` starts in the free slot and reports `score` at the rung after epoch 1."""
    _start(scheduler, controller, trial)
    return _report(scheduler, controller, trial, 1, score)


def _arrivals(scheduler, controller, trials, scores):
    """The decisions as the first len(scores) trials arrive, one after the other."""
    return [
        _arrive(scheduler, controller, trial, score)
        for trial, score in zip(trials[: len(scores)], scores, strict=True)
    ]


def _five_trials_one_slot():
    """5 trials, one slot, at most one parked; the rung keeps 2."""
    trials = [_Trial(f"t{i}") for i in range(5)]
    controller = _PausingController(trials)
    scheduler = _parking(num_trials=5, max_held=1, factor=2)
    _add(scheduler, controller, trials)
    return trials, controller, scheduler


def test_a_contender_is_parked_beside_the_next_trial_and_goes_on_without_a_restart(gates):
    """t0 leads when it arrives while t1 and t2 wait for the one slot: parked, not paused. t1
    starts beside it; t1 and t2 cannot be kept once they arrive behind t0 and stop at once; t0,
    kept, goes on in its own Train run as soon as the slot is free."""
    trials = [_Trial(f"t{i}") for i in range(3)]
    controller = _PausingController(trials)
    scheduler = _parking(num_trials=3, max_held=1)  # factor 3: the rung keeps 1
    _add(scheduler, controller, trials)
    assert _arrive(scheduler, controller, trials[0], 0.9) == TrialScheduler.NOOP
    assert trials[0].status == Trial.RUNNING and gates == []  # parked at the gate
    # the slot is free (parked trials are outside it); t1 arrives behind t0: stopped at once
    assert _arrive(scheduler, controller, trials[1], 0.5) == TrialScheduler.STOP
    assert _stop_of(trials[1]) == SchedulerStop("sha", 1, "val_accuracy", 0.5)
    assert _arrive(scheduler, controller, trials[2], 0.7) == TrialScheduler.STOP  # decided
    assert scheduler.choose_trial_to_run(controller) is None  # nothing to start: t0 goes on
    assert gates == [("parent", "t0", 1)] and controller.asked == ["t0"]
    assert controller.paused == [] and scheduler.stopped == 2
    assert _stop_of(trials[0]) is None


def test_a_contender_parks_near_the_decision_and_takes_the_place_of_a_weaker_one(gates):
    """The first two arrive while 3 or more trials are still to come, too early to wait:
    paused. t2 arrives with 2 to come and leads: parked. t3, better still, takes its place (t2,
    still second, is paused). The rung keeps t3 (no restart) and t2 (restarted)."""
    trials, controller, scheduler = _five_trials_one_slot()
    decisions = _arrivals(scheduler, controller, trials, [0.5, 0.4, 0.6, 0.8])
    assert decisions == [TrialScheduler.PAUSE] * 2 + [TrialScheduler.NOOP] * 2
    assert controller.paused == ["t2"] and controller.stopped == []
    assert _arrive(scheduler, controller, trials[4], 0.1) == TrialScheduler.STOP
    assert sorted(controller.stopped) == ["t0", "t1"]
    assert scheduler.choose_trial_to_run(controller) is None  # t3, parked and kept, goes on
    assert gates == [("parent", "t3", 1)] and controller.asked == ["t3"]
    trials[3].status = Trial.TERMINATED  # it finishes (max_t 2)
    assert scheduler.choose_trial_to_run(controller) is trials[2]  # kept, restarted
    assert scheduler.stopped == 3


def test_a_parked_trial_that_an_arrival_pushes_out_of_contention_is_stopped_at_once(gates):
    trials, controller, scheduler = _five_trials_one_slot()
    decisions = _arrivals(scheduler, controller, trials, [0.9, 0.5, 0.6, 0.8])
    assert decisions == [TrialScheduler.PAUSE] * 2 + [TrialScheduler.NOOP] * 2  # t2 was second
    assert controller.stopped == ["t2"]  # third now: it frees its CPUs and memory at once
    assert _stop_of(trials[2]) == SchedulerStop("sha", 1, "val_accuracy", 0.6)
    assert controller.paused == []


@pytest.mark.parametrize("max_held, memory", [(0, True), (1, False)])
def test_no_parking_without_room_or_memory(gates, max_held, memory):
    trials = [_Trial(f"t{i}") for i in range(3)]
    controller = _PausingController(trials)
    scheduler = _parking(num_trials=3, max_held=max_held, memory=memory)
    _add(scheduler, controller, trials)
    _start(scheduler, controller, trials[0])
    assert _report(scheduler, controller, trials[0], 1, 0.9) == TrialScheduler.PAUSE
