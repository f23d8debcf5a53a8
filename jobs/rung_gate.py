"""Rung verdicts from the sha scheduler (jobs.halving, in the Tune driver) to a trial's workers.

Synchronous successive halving judges a rung only once every trial has reached it. A trial that
arrives early is PAUSED: its Train run is torn down and, if the rung keeps it, started again
from its checkpoint, which costs a whole start (actors, imports, model, data pipeline: about 1.5
epochs of the bench's sample on AVX512-BF16). When no other trial waits for the CPUs, the
scheduler HOLDS the trial instead: the trial keeps its actors, and its workers wait here, after
the rung epoch's checkpoint, until the scheduler opens the gate (the rung kept it) or stops the
trial (the rung did not). A held trial that the rung keeps goes on without a restart, and no
trial ever trains past a rung that has not been decided.

The verdict travels through Ray's key-value store (GCS): the driver writes one key per trial and
rung, every worker of the trial polls it. The keys live under the search's parent run, which the
driver deletes at the end of the search (jobs.tune._forget_assigned_runs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = ["RungGate", "open_gate"]

NAMESPACE = "raylift-tune"  # shared with jobs.tune's run assignments, under the same prefix
_OPEN = b"go on"
_POLL_S = 0.25
_LOG_EVERY_S = 60.0


def _key(prefix: str, trial_id: str, epoch: int) -> bytes:
    return f"{prefix}/{trial_id}/rung/{epoch}".encode()


def open_gate(prefix: str, trial_id: str, epoch: int) -> None:
    """Let the workers of `trial_id` go on past the rung at `epoch` (the driver's side)."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(
        _key(prefix, trial_id, epoch), _OPEN, overwrite=True, namespace=NAMESPACE
    )


@dataclass(frozen=True)
class RungGate:
    """What a trial's workers are handed (plain data: it travels in jobs.train_loop.LoopInputs)."""

    prefix: str  # the search's parent run id
    trial_id: str
    epochs: tuple[int, ...]  # the rungs: epochs after which the scheduler judges

    def wait(self, epoch: int, rank: int) -> None:
        """After `epoch` was reported: return once the scheduler let this trial go on; a rung
        that does not keep it stops the trial (its workers are killed while they wait here)."""
        if epoch not in self.epochs:
            return
        from ray.experimental import internal_kv

        key = _key(self.prefix, self.trial_id, epoch)
        started = logged = time.monotonic()
        while internal_kv._internal_kv_get(key, namespace=NAMESPACE) != _OPEN:
            now = time.monotonic()
            if rank == 0 and now - logged >= _LOG_EVERY_S:
                print(
                    f"raylift.train: waiting at the rung after epoch {epoch} for "
                    f"{now - started:.0f} s: the other trials have not all reached it",
                    flush=True,
                )
                logged = now
            time.sleep(_POLL_S)
        if rank == 0:
            print(
                f"raylift.train: the rung after epoch {epoch} kept this trial "
                f"(waited {time.monotonic() - started:.1f} s)",
                flush=True,
            )
