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

A trial that arrives early but near the rung's decision (the trials still to come fit in two
rounds of the running slots, _PARK_ROUNDS), and among the best the rung can keep so far (a
CONTENDER: fewer than the rung's keep have done better), may be PARKED: held the same way,
outside the running slots, so the next trial starts beside it. Parked trials keep their
workers' CPUs and memory, so their number is capped (`max_held`: what the cluster's CPUs leave
beside the running trials and one trial's data stages, jobs.tune) and a park is refused when
`memory_allows` says the node is short of memory. When the cap is reached, a better contender
takes the place of the weakest parked one, which is paused. A held or parked trial that later
arrivals push out of contention is stopped at once; so is an arrival that cannot be kept.

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
from collections.abc import Callable
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from jobs.rung_gate import open_gate
from jobs.scheduler_stops import SchedulerStop, record_stop

__all__ = ["SyncHalving", "rungs"]

log = logging.getLogger(__name__)

# A parked trial's seven Ray processes (its workers, Train's controller and helpers, Tune's trial
# actor) cost about 0.07 CPU-s per second while they wait, and a restart about 30 CPU-s (2 cores,
# AVX512-BF16, the bench's sample). Parking from a rung's first arrival on cost the bench about
# 36 CPU-s of waiting, most of it by trials that later arrivals displaced. So a contender is
# parked only when the trials still to reach the rung fit in this many rounds of the slots.
_PARK_ROUNDS = 2


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
        max_held: int = 0,
        memory_allows: Callable[[], bool] | None = None,
    ):
        """gate_prefix: where the trials' workers wait for rung verdicts (jobs.rung_gate: the
        search's parent run id); None holds no trial, every early arrival is paused.
        max_held: contenders that may be parked at rungs outside the running slots;
        memory_allows: asked before each park (None: always)."""
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
        self._parked: set[str] = set()  # held trials outside the running slots (contenders)
        self._max_held = max_held
        self._memory_allows = memory_allows
        self._stopped_ids: set[str] = set()
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
        self._stop_out_of_contention(tune_controller, epoch)
        waiting = f"{len(self._at[epoch])} of {self._num_trials} trials there"
        if not self._contends(tune_controller, trial.trial_id, epoch):
            log.info(
                "tune: trial %s stopped at the rung after epoch %d (%s): %d have done better, "
                "and the rung keeps at most that many",
                trial.trial_id,
                epoch,
                waiting,
                self._keep_at_most(tune_controller, epoch),
            )
            self._count_stop(trial, epoch)
            return TrialScheduler.STOP
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
        if self._may_park(tune_controller, trial, epoch):
            self._held.setdefault(epoch, set()).add(trial.trial_id)
            self._parked.add(trial.trial_id)
            log.info(
                "tune: trial %s parked at the rung after epoch %d (%s; among the best so far): "
                "it keeps its workers and goes on without a restart if the rung keeps it",
                trial.trial_id,
                epoch,
                waiting,
            )
            return TrialScheduler.NOOP  # as a held trial: its workers wait at the gate
        log.info(
            "tune: trial %s paused at the rung after epoch %d (%s)", trial.trial_id, epoch, waiting
        )
        return TrialScheduler.PAUSE

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self._forget_hold(trial)
        self._decide_waiting(tune_controller)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self._forget_hold(trial)
        self._decide_waiting(tune_controller)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._forget_hold(trial)
        self._decide_waiting(tune_controller)

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        trials = tune_controller.get_trials()
        self._decide_waiting(tune_controller)
        self._unpark_kept(tune_controller)  # kept parked trials go on first: no restart
        # Trials the last decision kept first (they finish the bracket), then fresh ones.
        paused = [t for t in trials if t.status == Trial.PAUSED and not t.is_saving]
        chosen = next(
            (t for t in paused if self._rung_of(t) is not None and self._may_go_on(t)), None
        ) or next((t for t in paused if self._rung_of(t) is None), None)
        if self._slots_taken(trials) >= self._max_running:
            if chosen is not None or self._parked_and_kept(trials):
                self._release_one_held(tune_controller)
            return None
        return chosen

    def debug_string(self) -> str:
        at = ", ".join(f"epoch {r}: {len(self._at[r])}" for r in self._rungs)
        return (
            f"Synchronous successive halving: rungs at epochs {self._rungs}, factor "
            f"{self._factor:g}; reached {at}; {len(self._parked)} parked; {self.stopped} stopped."
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

    def _count_stop(self, trial: Trial, rung: int) -> None:
        """Record the stop of `trial` at `rung` once, and count it."""
        if trial.trial_id in self._stopped_ids:
            return
        self._stopped_ids.add(trial.trial_id)
        self._record_stop(trial, rung)
        self.stopped += 1

    def _slots_taken(self, trials: list[Trial]) -> int:
        """Trials in the running slots: RUNNING or PENDING (chosen and starting, or restarted
        after a failure), parked ones left out."""
        parked = self._parked
        return sum(
            t.status == Trial.PENDING or (t.status == Trial.RUNNING and t.trial_id not in parked)
            for t in trials
        )

    def _may_reach(self, tune_controller, rung: int) -> int:
        """Trials that reached `rung` or may still: all but those that ended before it."""
        arrived = self._at[rung]
        ended = sum(
            t.status in (Trial.TERMINATED, Trial.ERROR) and t.trial_id not in arrived
            for t in tune_controller.get_trials()
        )
        return self._num_trials - ended

    def _keep_at_most(self, tune_controller, rung: int) -> int:
        """The most trials `rung` can keep (its keep only shrinks as trials end before it)."""
        return max(1, math.floor(self._may_reach(tune_controller, rung) / self._factor))

    def _still_to_arrive(self, tune_controller, rung: int) -> int:
        return self._may_reach(tune_controller, rung) - len(self._at[rung])

    def _score(self, trial_id: str, rung: int) -> float:
        """The trial's metric at `rung`, higher is better whatever the mode."""
        value = self._at[rung][trial_id]
        return value if self._mode == "max" else -value

    def _better(self, trial_id: str, rung: int) -> int:
        """How many trials did strictly better at `rung` than `trial_id`."""
        mine = self._score(trial_id, rung)
        return sum(self._score(other, rung) > mine for other in self._at[rung])

    def _contends(self, tune_controller, trial_id: str, rung: int) -> bool:
        """Whether the rung may still keep `trial_id`: fewer trials than it can keep did better."""
        return self._better(trial_id, rung) < self._keep_at_most(tune_controller, rung)

    def _waiting_at(self, trials: list[Trial], rung: int, parked_only: bool) -> list[Trial]:
        """The trials held (or, with parked_only, parked) at `rung` that still wait there."""
        return [
            t
            for t in trials
            if t.trial_id in self._held.get(rung, ())
            and t.status == Trial.RUNNING
            and (not parked_only or t.trial_id in self._parked)
        ]

    def _stop_out_of_contention(self, tune_controller, rung: int) -> None:
        """Stop the trials held at the undecided `rung` that arrivals pushed out of contention:
        they free their CPUs and memory now rather than when the rung is decided."""
        for trial in self._waiting_at(tune_controller.get_trials(), rung, parked_only=False):
            if not self._contends(tune_controller, trial.trial_id, rung):
                log.info(
                    "tune: trial %s, held at the rung after epoch %d, stopped: later arrivals "
                    "did better",
                    trial.trial_id,
                    rung,
                )
                self._unhold(trial.trial_id, rung)
                self._count_stop(trial, rung)
                tune_controller.stop_trial(trial)

    def _may_park(self, tune_controller, trial: Trial, rung: int) -> bool:
        """Whether the contender `trial` may wait at `rung` outside the running slots: the
        cap leaves room (or it is better than the weakest parked contender there, which is
        paused to make room), and the node has the memory."""
        if self._max_held <= 0 or self._gate_prefix is None:
            return False
        if not callable(getattr(tune_controller, "_schedule_trial_train", None)):
            return False
        if self._still_to_arrive(tune_controller, rung) > _PARK_ROUNDS * self._max_running:
            return False  # the rung is far from decided: waiting would cost more than a restart
        if self._memory_allows is not None and not self._memory_allows():
            return False
        if len(self._parked) < self._max_held:
            return True
        rivals = self._waiting_at(tune_controller.get_trials(), rung, parked_only=True)
        if not rivals:
            return False
        weakest = min(rivals, key=lambda t: self._score(t.trial_id, rung))
        if self._score(weakest.trial_id, rung) >= self._score(trial.trial_id, rung):
            return False
        log.info(
            "tune: trial %s, parked at the rung after epoch %d, paused to make room for the "
            "better %s",
            weakest.trial_id,
            rung,
            trial.trial_id,
        )
        self._unhold(weakest.trial_id, rung)
        tune_controller.pause_trial(weakest)
        return True

    def _unhold(self, trial_id: str, rung: int) -> None:
        self._held.get(rung, set()).discard(trial_id)
        self._parked.discard(trial_id)

    def _forget_hold(self, trial: Trial) -> None:
        for rung in self._rungs:
            self._unhold(trial.trial_id, rung)

    def _parked_and_kept(self, trials: list[Trial]) -> bool:
        """Whether a parked trial that its rung kept waits for a running slot."""
        return any(
            t.trial_id in self._parked and t.trial_id in self._kept.get(rung, ())
            for t in trials
            for rung in self._rungs
            if t.trial_id in self._held.get(rung, ())
        )

    def _unpark_kept(self, tune_controller) -> None:
        """Parked trials their rung kept go on, best first, while the running slots allow."""
        trials = tune_controller.get_trials()
        for rung in self._rungs:
            if rung not in self._kept:
                continue
            waiting = sorted(
                self._waiting_at(trials, rung, parked_only=True),
                key=lambda t: -self._score(t.trial_id, rung),
            )
            for trial in waiting:
                if self._slots_taken(trials) >= self._max_running:
                    return
                self._parked.discard(trial.trial_id)
                self._go_on(tune_controller, trial, rung)

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
            if other.status == Trial.PAUSED or other.trial_id in self._parked:
                return False  # it waits for CPUs (or, parked and kept, for a slot)
        return True

    def _release_one_held(self, tune_controller) -> None:
        """A trial waits for CPUs that held trials keep (a trial restarted after a failure,
        say): one held trial goes on training, as under ASHA, keeping its Train run; the
        rung's decision stops it later if it is not kept."""
        for rung in self._rungs:
            for trial in tune_controller.get_trials():
                if trial.trial_id in self._parked:
                    continue  # outside the slots: it keeps no trial from starting
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
        self._unhold(trial_id, rung)
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
        held = set(self._held.get(rung, ()))
        for trial in trials:
            if trial.trial_id in arrived and trial.trial_id not in self._kept[rung]:
                # paused, pausing, held, parked, or released from its hold (_release_one_held)
                self._unhold(trial.trial_id, rung)
                ended = trial.status in (Trial.TERMINATED, Trial.ERROR)
                if trial is current:
                    self._stopped_ids.add(trial.trial_id)  # recorded in _verdict
                    self.stopped += 1
                elif not ended:
                    self._count_stop(trial, rung)
                    tune_controller.stop_trial(trial)
                elif trial.trial_id not in self._stopped_ids:
                    self._stopped_ids.add(trial.trial_id)  # it failed after it arrived
                    self.stopped += 1
            elif (
                trial.trial_id in held
                and trial.status == Trial.RUNNING
                and trial.trial_id not in self._parked  # parked: _unpark_kept, below
            ):
                self._go_on(tune_controller, trial, rung)  # kept: on in the same Train run
        self._unpark_kept(tune_controller)  # kept parked ones: as the slots allow
