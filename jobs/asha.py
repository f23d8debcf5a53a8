"""Ray's ASHA, with its rungs given back to a search that `raylift tune --resume` restores.

Ray Tune (2.60) does not save the scheduler with the experiment: `TuneController.save_to_dir`
writes the trials, the searcher and the callbacks, and `Tuner.restore` brings back the
scheduler as the Tuner pickled it when the search began, with empty rungs. A resumed ASHA
search would then judge the trials it still runs only against the trials that reach a rung
after the restart, and let through trials that the dead driver's rungs would have stopped.

Each STOP it decides before max_t is recorded beside the trial's results
(jobs.scheduler_stops), which tells the trials ASHA stopped from those the time budget cut.

`ResumableASHA` puts each restored trial's reported results back into the rungs, as the dead
driver had recorded them. The results come from the trial's `result.json` in the experiment's
storage (Tune's own record of every result the trial reported); if that file cannot be read,
the trial's last result, which Tune restores with it, is all that goes back.

This subclass reads ASHA's private bookkeeping (`_trial_info`, each bracket's `_rungs`,
`_metric_op`), written against Ray 2.60; if those are not there, it warns and leaves the rungs
as Ray restores them.
"""

from __future__ import annotations

import json
import logging
from pathlib import PurePosixPath
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from jobs.scheduler_stops import SchedulerStop, record_stop

__all__ = ["ResumableASHA"]

log = logging.getLogger(__name__)

_RESULTS_FILE = "result.json"  # ray.air.constants.EXPR_RESULT_FILE


class ResumableASHA(ASHAScheduler):
    """ASHAScheduler whose rungs survive `raylift tune --resume` (see the module doc)."""

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        # A restored trial reported epochs before the driver died; a new one's last result
        # holds only its trial id, and its storage has no trial folder yet.
        if trial.last_result.get(self._time_attr) is not None:
            self._record_history(trial)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        epoch = result.get(self._time_attr)
        # ASHA says STOP at max_t too: that trial ran all its epochs, it was not stopped early.
        if decision == TrialScheduler.STOP and epoch is not None and epoch < self._max_t:
            value = result.get(self._metric)
            record_stop(trial, SchedulerStop("asha", int(epoch), self._metric, value))
        return decision

    def _record_history(self, trial: Trial) -> None:
        try:
            rungs = self._trial_info[trial.trial_id]._rungs
            sign = self._metric_op
        except (AttributeError, KeyError):
            log.warning("tune --resume: ASHA's rungs cannot be rebuilt under this Ray version")
            return
        results = [*_reported_results(trial), trial.last_result]
        for milestone, recorded in rungs:
            value = self._value_at(results, milestone)
            if value is not None:  # what ASHA recorded when the trial first reached the rung
                recorded.setdefault(trial.trial_id, sign * value)

    def _value_at(self, results: list[dict[str, Any]], milestone: float) -> float | None:
        """The metric of the first result at or past the rung, if that is known to be where
        the trial first reached it: it stands on the rung, or an earlier result stood below."""
        known = sorted(
            (r for r in results if r.get(self._metric) is not None and self._time_attr in r),
            key=lambda r: r[self._time_attr],
        )
        for index, result in enumerate(known):
            if result[self._time_attr] >= milestone:
                first_reach = index > 0 or result[self._time_attr] == milestone
                return float(result[self._metric]) if first_reach else None
        return None


def _reported_results(trial: Trial) -> list[dict[str, Any]]:
    """Every result the trial reported, from its result.json in the experiment's storage
    (local or remote: the storage's own filesystem reads it); none if it cannot be read."""
    try:
        path = (PurePosixPath(trial.path) / _RESULTS_FILE).as_posix()
        with trial.storage.storage_filesystem.open_input_stream(path) as stream:
            lines = stream.read().decode().splitlines()
    except (OSError, AttributeError, TypeError, RuntimeError) as error:
        log.warning("tune --resume: no result history for trial %s (%s)", trial.trial_id, error)
        return []
    results = []
    for line in lines:
        try:
            results.append(json.loads(line))
        except ValueError:  # a line cut short when the driver died
            continue
    return results
