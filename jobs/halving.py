"""Synchronous successive halving: a Ray Tune scheduler for searches that run few trials at once.

ASHA (Ray's ASHAScheduler) decides alone at each rung: a trial reaching epoch 1 continues if it
is in the top 1/reduction_factor of the trials that reached epoch 1 *so far*. When the cluster
runs trials one or two at a time, the first trials at a rung have no peers yet and always
continue: with 9 trials of 9 epochs (rungs 1 and 3, factor 3) ASHA trains about 45% of the
full-budget epochs on average, and the early, unlucky orders much more.

This scheduler waits instead. Every trial trains to the first rung and is PAUSED there; once
all of them have arrived, the best 1/reduction_factor continue to the next rung and the others
stop. The same 9 trials then train 9 + 3·2 + 1·6 = 21 epochs of 81 (26%), whatever the order.
A paused trial gives its CPUs back and is started again later: its trial function runs anew and
continues the same Train run from the checkpoint it saved at the rung (jobs.tune._run_trial).

A start costs CPU (about 1.5 epochs of the bench's sample on AVX512-BF16: Ray Train's actors,
imports, the model, the data pipeline), so a trial that reaches a rung when no other trial
waits for the CPUs (the last ones to arrive) is HELD, not paused: it keeps its actors, Tune asks
it for nothing (NOOP), and its workers wait after the rung's checkpoint (jobs.rung_gate) until
the rung is decided. If the rung keeps it, the gate opens and it goes on in the same Train run;
if not, it is stopped. Nothing is trained past an undecided rung either way.

Each STOP is recorded beside the trial's results (jobs.scheduler_stops), which tells the
trials halving stopped from those the time budget cut.

Decisions are derived from what trials reported, so a search restored by `raylift tune
--resume` rebuilds them from the restored trials' last results (on_trial_add). The running
trials are capped here (`max_running`), not by the search algorithm: a searcher's concurrency
cap counts paused trials as live, and would starve a rung that waits for every trial.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from jobs.rung_gate import open_gate
from jobs.scheduler_stops import SchedulerStop, record_stop

__all__ = ["SyncHalving", "rungs"]

log = logging.getLogger(__name__)


def rungs(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """Epochs at which trials are compared: grace_period · reduction_factor^k, below max_t."""
    found, t = [], float(grace_period)
    while round(t) < max_t:
        if not found or round(t) > found[-1]:
            found.append(round(t))
        t *= reduction_factor
    return found


class SyncHalving(TrialScheduler):
    """One bracket of successive halving over every trial of the search (see the module doc)."""

    def __init__(
        self,
        *,
        time_attr: str,
        max_t: int,
        grace_period: int,
        reduction_factor: float,
        num_trials: int,
        max_running: int,
        gate_prefix: str | None = None,
    ):
        """gate_prefix: where the trials' workers wait for rung verdicts (jobs.rung_gate: the
        search's parent run id); None holds no trial, every early arrival is paused."""
        super().__init__()
        self._time_attr = time_attr
        self._rungs = rungs(grace_period, reduction_factor, max_t)
        self._factor = reduction_factor
        self._num_trials = num_trials
        self._max_running = max_running
        self._mode: str | None = None
        self._at: dict[int, dict[str, float]] = {r: {} for r in self._rungs}
        self._kept: dict[int, set[str]] = {}  # rung → trials that go on (decided rungs only)
        self._passed: dict[int, set[str]] = {}  # rung → restored trials already past it
        self._gate_prefix = gate_prefix
        self._held: dict[int, set[str]] = {}  # rung → trials waiting there while running
        self.stopped = 0

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        if (self._metric and metric) or (self._mode and mode):
            return False
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        return True

    # --- what Tune tells the scheduler -----------------------------------------------------

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        # Tune starts every PENDING trial it has resources for, whatever choose_trial_to_run
        # says; a PAUSED one only when chosen. So each trial waits PAUSED until chosen.
        if trial.status == Trial.PENDING:
            trial.set_status(Trial.PAUSED)
        # A restored trial (tune --resume) brings its last result: where it stood.
        result = trial.last_result or {}
        epoch = result.get(self._time_attr)
        if epoch is None:
            return
        epoch = int(epoch)
        if epoch in self._at and self._metric in result:
            self._at[epoch][trial.trial_id] = float(result[self._metric])
        for rung in self._rungs:
            if epoch > rung:  # it went past the rung: the dead driver had decided the rung
                self._passed.setdefault(rung, set()).add(trial.trial_id)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        epoch = int(result.get(self._time_attr, 0))
        if epoch not in self._at:
            return TrialScheduler.CONTINUE
        self._decide(tune_controller, epoch)  # restored searches: a rung decided before
        if epoch in self._kept:
            return self._verdict(trial, epoch)
        self._at[epoch][trial.trial_id] = float(result[self._metric])
        self._decide(tune_controller, epoch, current=trial)
        if epoch in self._kept:
            return self._verdict(trial, epoch)
        waiting = f"{len(self._at[epoch])} of {self._num_trials} trials there"
        if self._may_hold(tune_controller, trial, epoch):
            self._held.setdefault(epoch, set()).add(trial.trial_id)
            log.info(
                "tune: trial %s held at the rung after epoch %d (%s; no trial waits for its "
                "CPUs): it goes on without a restart if the rung keeps it",
                trial.trial_id,
                epoch,
                waiting,
            )
            # NOOP: Tune asks the trial for no result until the rung is decided (_go_on), so
            # a trial the rung stops is stopped at once. Under CONTINUE, Tune's call for the
            # next result would block the trial's actor, and Tune's request to stop it would
            # wait behind that call (up to TUNE_FORCE_TRIAL_CLEANUP_S, 600 s).
            return TrialScheduler.NOOP  # its workers wait at the gate (jobs.rung_gate)
        log.info(
            "tune: trial %s paused at the rung after epoch %d (%s)", trial.trial_id, epoch, waiting
        )
        return TrialScheduler.PAUSE

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self._decide_waiting(tune_controller)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self._decide_waiting(tune_controller)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._decide_waiting(tune_controller)

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        trials = tune_controller.get_trials()
        self._decide_waiting(tune_controller)
        # Trials the last decision kept first (they finish the bracket), then fresh ones.
        parked = [t for t in trials if t.status == Trial.PAUSED and not t.is_saving]
        chosen = next(
            (t for t in parked if self._rung_of(t) is not None and self._may_go_on(t)), None
        ) or next((t for t in parked if self._rung_of(t) is None), None)
        # PENDING: chosen and starting (the others wait PAUSED), or restarted after a failure
        if sum(t.status in (Trial.RUNNING, Trial.PENDING) for t in trials) >= self._max_running:
            if chosen is not None:
                self._release_one_held(tune_controller)
            return None
        return chosen

    def debug_string(self) -> str:
        at = ", ".join(f"epoch {r}: {len(self._at[r])}" for r in self._rungs)
        return (
            f"Synchronous successive halving: rungs at epochs {self._rungs}, factor "
            f"{self._factor:g}; reached {at}; {self.stopped} stopped."
        )

    # --- decisions -----------------------------------------------------------------------

    def _rung_of(self, trial: Trial) -> int | None:
        """The rung the trial stands at (it reported there), if any."""
        for rung in reversed(self._rungs):
            if trial.trial_id in self._at[rung]:
                return rung
        return None

    def _may_go_on(self, trial: Trial) -> bool:
        rung = self._rung_of(trial)
        return rung is None or trial.trial_id in self._kept.get(rung, ())

    def _verdict(self, trial: Trial, rung: int) -> str:
        if trial.trial_id in self._kept[rung]:
            self._open_gate(trial.trial_id, rung)
            return TrialScheduler.CONTINUE
        self._record_stop(trial, rung)
        return TrialScheduler.STOP

    def _record_stop(self, trial: Trial, rung: int) -> None:
        value = self._at[rung].get(trial.trial_id)
        record_stop(trial, SchedulerStop("sha", rung, self._metric, value))

    def _may_hold(self, tune_controller, trial: Trial, rung: int) -> bool:
        """Whether `trial`, just arrived at the undecided `rung`, may keep its CPUs while it
        waits: no other trial waits for CPUs (every one still to reach the rung is running)."""
        if self._gate_prefix is None or not callable(
            getattr(tune_controller, "_schedule_trial_train", None)
        ):
            return False  # no gate, or a Tune that cannot be asked to go on (_go_on)
        trials = tune_controller.get_trials()
        if len(trials) < self._num_trials:  # the searcher has more to start
            return False
        for other in trials:
            if other is trial or other.trial_id in self._at[rung]:
                continue
            if other.status == Trial.PAUSED:
                return False  # it waits for CPUs to reach the rung
        return True

    def _release_one_held(self, tune_controller) -> None:
        """A trial waits for CPUs that held trials keep (a trial restarted after a failure,
        say): one held trial goes on training, as under ASHA, keeping its Train run; the
        rung's decision stops it later if it is not kept."""
        for rung in self._rungs:
            for trial in tune_controller.get_trials():
                if trial.trial_id in self._held.get(rung, ()) and trial.status == Trial.RUNNING:
                    log.warning(
                        "tune: trial %s, held at the rung after epoch %d, goes on before the "
                        "rung is decided: another trial waits for its CPUs",
                        trial.trial_id,
                        rung,
                    )
                    self._go_on(tune_controller, trial, rung)
                    return

    def _go_on(self, tune_controller, trial: Trial, rung: int) -> None:
        """A held trial trains on: its workers past the gate, Tune asking it for results."""
        self._open_gate(trial.trial_id, rung)
        # What Tune does on CONTINUE. A private call: _may_hold holds no trial without it.
        tune_controller._schedule_trial_train(trial)

    def _open_gate(self, trial_id: str, rung: int) -> None:
        self._held.get(rung, set()).discard(trial_id)
        if self._gate_prefix is not None:
            open_gate(self._gate_prefix, trial_id, rung)

    def _decide_waiting(self, tune_controller) -> None:
        for rung in self._rungs:
            if rung not in self._kept:
                self._decide(tune_controller, rung)

    def _decide(self, tune_controller, rung: int, current: Trial | None = None) -> None:
        """Halve at `rung` once every trial has reached it or ended before it."""
        if rung in self._kept:
            return
        trials = tune_controller.get_trials()
        if rung in self._passed:  # restored: kept were those past it and those not stopped at it
            waiting = {
                t.trial_id for t in trials if t.status not in (Trial.TERMINATED, Trial.ERROR)
            }
            self._kept[rung] = self._passed[rung] | (set(self._at[rung]) & waiting)
            return
        if len(trials) < self._num_trials:  # the searcher has not created them all yet
            return
        arrived = self._at[rung]
        for trial in trials:
            ended = trial.status in (Trial.TERMINATED, Trial.ERROR)
            if trial.trial_id not in arrived and not ended:
                return
        if not arrived:
            self._kept[rung] = set()
            return
        sign = 1.0 if self._mode == "max" else -1.0
        ranked = sorted(arrived, key=lambda tid: sign * arrived[tid], reverse=True)
        keep = max(1, math.floor(len(ranked) / self._factor))
        self._kept[rung] = set(ranked[:keep])
        held = self._held.pop(rung, set())
        for trial in trials:
            if trial.trial_id in arrived and trial.trial_id not in self._kept[rung]:
                # paused, pausing, held, or released from its hold (_release_one_held)
                ended = trial.status in (Trial.TERMINATED, Trial.ERROR)
                if trial is not current and not ended:
                    self._record_stop(trial, rung)  # the current one: in _verdict
                    tune_controller.stop_trial(trial)
                self.stopped += 1
            elif trial.trial_id in held and trial.status == Trial.RUNNING:
                self._go_on(tune_controller, trial, rung)  # kept: on in the same Train run
