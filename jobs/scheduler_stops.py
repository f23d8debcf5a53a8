"""The STOP decisions of raylift's Tune schedulers, recorded beside each trial's results.

A trial ends before train.epochs for other reasons than its scheduler: tune.time_budget_s runs
out (Tune then stops every running trial without asking the scheduler), or the search ends
before the trial reported at all. Judged afterwards from its epochs alone, each of those was
"stopped early by ASHA". So the schedulers (jobs.asha.ResumableASHA, jobs.halving.SyncHalving)
write each decision as they make it, into the trial's folder in the experiment's storage: a
file Tune neither writes nor deletes, which a search restored by `raylift tune --resume` keeps
with the trial (the schedulers themselves are not saved with the experiment). A trial that has
no such file was not stopped by its scheduler.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Any

__all__ = ["SchedulerStop", "record_stop", "recorded_stop"]

log = logging.getLogger(__name__)

_STOP_FILE = "raylift_scheduler_stop.json"


@dataclass(frozen=True)
class SchedulerStop:
    scheduler: str  # asha, sha
    epoch: int  # the rung where the trial was judged
    metric: str
    value: float | None  # the trial's metric there


def record_stop(trial: Any, stop: SchedulerStop) -> None:
    """Write `stop` into the folder of `trial` (a Tune Trial) in the experiment's storage."""
    try:
        filesystem = trial.storage.storage_filesystem
        filesystem.create_dir(trial.path, recursive=True)
        with filesystem.open_output_stream(_stop_path(trial.path)) as stream:
            stream.write(json.dumps(asdict(stop)).encode())
    except (OSError, AttributeError, RuntimeError) as error:
        # A search is not failed for its report: the trial will show as cut short instead.
        log.warning("trial %s: its scheduler's stop was not recorded (%s)", trial, error)


def recorded_stop(path: str, filesystem: Any) -> SchedulerStop | None:
    """The scheduler's stop of the trial whose folder is `path` on `filesystem` (a pyarrow
    filesystem: a Tune Result's `path` and `filesystem`); None if it did not stop it."""
    try:
        with filesystem.open_input_stream(_stop_path(path)) as stream:
            return SchedulerStop(**json.loads(stream.read().decode()))
    except FileNotFoundError:
        return None


def _stop_path(folder: str) -> str:
    return (PurePosixPath(folder) / _STOP_FILE).as_posix()
