"""Training that survives failures, on the tiny BERT with real Ray Train, DeepSpeed and MLflow.

One run meets two failures, each checked where it happens (failure messages start with the
scenario): first a training worker process is SIGKILLed once the run holds a checkpoint; Ray
Train restarts the worker group inside the same driver (train.max_failures) and every rank loads
the latest checkpoint's state (engine, optimizer, LR schedule, RNG, data position). Then, once
the restarted group has saved a later checkpoint, the driver itself is SIGKILLed, and
`finetune --resume` continues the same folder and the same MLflow run to the end: the planned
steps, each epoch logged once, one version registered.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from jobs import finetune, load
from jobs.config import with_overrides
from jobs.train_loop import RESUME_METRIC
from tests.helpers import make_ticket_rows, session_ray_address, tiny_lifecycle

LABELS = ["card_arrival", "lost_card", "refund"]
EPOCHS = 2
STEPS = 6  # planned optimizer steps per epoch (max_steps_per_epoch; the data holds more)
EVERY = 3  # checkpoint_every_steps: one checkpoint mid-epoch, one at each epoch end
WORKER = "RayTrainWorker"


def _config(root: Path, tiny_bert: str, name: str):
    return tiny_lifecycle(
        root,
        tiny_bert,
        make_ticket_rows(96, LABELS, seed=3),
        name=name,
        train={
            "num_workers": 2,
            "cpus_per_worker": 1,
            "epochs": EPOCHS,
            "max_steps_per_epoch": STEPS,
            "checkpoint_every_steps": EVERY,
            "max_failures": 1,
            "batch_size": 4,
            "learning_rate": 2e-2,
            "precision": "fp32",
            "zero_stage": 2,  # optimizer state sharded per rank: each rank must load its own
        },
        registry={"experiment": name, "model_name": name},
    )


def _client(config):
    from mlflow import MlflowClient

    from serving.registry import absolute_tracking_uri

    return MlflowClient(absolute_tracking_uri(config.registry.tracking_uri))


def _checkpoints(config) -> list[str]:
    """Checkpoint folders Ray Train has registered for the run (its manager's snapshot)."""
    snapshot = Path(finetune._run_path(config)) / "checkpoint_manager_snapshot.json"
    try:
        state = json.loads(snapshot.read_text())
    except (FileNotFoundError, ValueError):  # not written yet, or caught mid-write
        return []
    latest = state.get("latest_checkpoint_result") or {}
    return [latest["checkpoint_dir_name"]] if latest else []


def _workers(exclude: set[str] = frozenset()) -> dict[str, dict]:
    from ray.util.state import list_actors

    found = list_actors(
        filters=[("class_name", "=", WORKER)],
        limit=1000,
        detail=True,
        address=session_ray_address(),
    )
    return {
        a.actor_id: {"pid": a.pid, "state": a.state} for a in found if a.actor_id not in exclude
    }


def _assert_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"pid {pid} still alive {timeout} s after SIGKILL"
        time.sleep(0.1)


class _WorkerKiller(threading.Thread):
    """Waits for the run's first checkpoint, then SIGKILLs one of its training workers."""

    def __init__(self, config, before: set[str]):
        super().__init__(daemon=True)
        self.config, self.before = config, before
        self.killed: dict | None = None
        self.error: BaseException | None = None

    def run(self):
        try:
            deadline = time.monotonic() + 120
            while not _checkpoints(self.config):
                assert time.monotonic() < deadline, "no checkpoint in 120 s"
                time.sleep(0.05)
            alive = [w for w in _workers(self.before).values() if w["state"] == "ALIVE"]
            assert alive, "no live training worker to kill"
            pid = alive[0]["pid"]
            assert psutil.pid_exists(pid)
            at = _checkpoints(self.config)[0]
            os.kill(pid, signal.SIGKILL)
            _assert_gone(pid)
            self.killed = {"pid": pid, "after": at}
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            self.error = exc


def _epoch_history(config, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in _client(config).get_metric_history(run_id, key))


def _assert_finished_once(config, result) -> None:
    """Every epoch logged once, with the planned steps; the run finished; one version."""
    run = _client(config).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    for key in ("val_loss", "train_loss", "train_steps"):
        steps = [step for step, _ in _epoch_history(config, result.run_id, key)]
        assert steps == list(range(1, EPOCHS + 1)), f"{key} logged at epochs {steps}"
    assert [v for _, v in _epoch_history(config, result.run_id, "train_steps")] == [STEPS] * EPOCHS
    # Optimizer steps since the start, at each epoch end: nothing trained twice, nothing lost.
    global_steps = [v for _, v in _epoch_history(config, result.run_id, "global_step")]
    assert global_steps == [STEPS * e for e in range(1, EPOCHS + 1)]
    versions = _client(config).search_model_versions(f"name='{config.registry.model_name}'")
    assert [str(v.version) for v in versions] == [result.version] == ["1"]
    state = Path(finetune._run_path(config)) / "raylift_finetune.json"
    assert json.loads(state.read_text()) == {
        "run_id": result.run_id,
        "snapshot_id": json.loads(state.read_text())["snapshot_id"],
        "finished": True,
    }


def _resumed_at(config, run_id: str) -> list[int]:
    return [int(v) for _, v in _epoch_history(config, run_id, RESUME_METRIC)]


def _step_of(checkpoint_dir_name: str) -> int:
    """Optimizer steps since the start at a checkpoint (epoch001-batch000003, epoch002-end)."""
    epoch, batch = checkpoint_dir_name.removeprefix("epoch").split("-")
    return (int(epoch) - 1) * STEPS + (
        STEPS if batch == "end" else int(batch.removeprefix("batch"))
    )


def _start_driver(config, root: Path) -> tuple[subprocess.Popen, Path]:
    """`python -m jobs.finetune` in its own process, on the session's Ray."""
    config_file = root / "finetune.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    env = {**os.environ, "RAY_ADDRESS": session_ray_address()}
    log = root / "driver.log"
    with log.open("w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-m", "jobs.finetune", "--config", str(config_file)],
            cwd=Path(__file__).resolve().parents[2],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return driver, log


def _wait_for(what: str, done, driver: subprocess.Popen, log: Path, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while not (found := done()):
        assert driver.poll() is None, f"{what}: driver exited early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.05)
    return found


def _worker_restarted(config, driver, log, killer: _WorkerKiller) -> int:
    """Scenario 1, while the driver runs: the worker group restarted inside it and resumed from
    a checkpoint at or after the one seen before the kill; the step it resumed at."""
    killer.join(timeout=180)
    assert not killer.is_alive(), "killed worker: no worker killed in 180 s"
    assert killer.error is None, f"killed worker: {killer.error!r}"
    assert killer.killed is not None, "killed worker: the run finished before a worker was killed"
    state = Path(finetune._run_path(config)) / "raylift_finetune.json"
    run_id = json.loads(state.read_text())["run_id"]
    what = "killed worker: the restarted group resuming (train_resumed_at_step logged)"
    resumes = _wait_for(what, lambda: _resumed_at(config, run_id), driver, log)
    assert len(resumes) == 1, f"killed worker: resumed {len(resumes)} times, at {resumes}"
    resumed = resumes[0]
    assert resumed % EVERY == 0 and 0 < resumed < EPOCHS * STEPS, f"killed worker: at {resumed}"
    seen = _step_of(killer.killed["after"])
    assert resumed >= seen, f"killed worker: resumed at step {resumed}, before {seen}"
    return resumed


def _kill_the_driver_after_a_later_checkpoint(config, driver, log, after: int) -> dict:
    """Scenario 2: SIGKILL the driver once the restarted group has checkpointed past `after`;
    the run's state, left unfinished."""

    def later() -> bool:
        return any(_step_of(name) > after for name in _checkpoints(config))

    _wait_for(f"killed driver: a checkpoint after step {after}", later, driver, log)
    assert driver.poll() is None, "killed driver: the run finished before the driver was killed"
    driver.kill()
    assert driver.wait(timeout=30) == -signal.SIGKILL, "killed driver: it was not SIGKILLed"
    state = json.loads((Path(finetune._run_path(config)) / "raylift_finetune.json").read_text())
    assert state["finished"] is False, "killed driver: its run is marked finished"
    return state


def test_a_killed_worker_then_a_killed_driver_finish_one_run(ray_session, tmp_path, tiny_bert):
    config = _config(tmp_path, tiny_bert, "resilience")
    load.main(config)
    before = set(_workers())
    killer = _WorkerKiller(config, before)
    killer.start()
    driver, log = _start_driver(config, tmp_path)
    try:
        first = _worker_restarted(config, driver, log, killer)
        state = _kill_the_driver_after_a_later_checkpoint(config, driver, log, after=first)
    finally:
        if driver.poll() is None:
            driver.kill()
    # Both groups ran in the killed driver: two of two workers, the killed one among them.
    workers = _workers(before)
    assert len(workers) == 4, f"killed worker: expected two groups of two, found {workers}"
    assert killer.killed["pid"] in {w["pid"] for w in workers.values()}, "killed worker: pid"
    with pytest.raises(ValueError, match="unfinished finetune .* --resume"):
        finetune.main(config)  # a fresh start would throw the checkpoints away

    result = finetune.main(with_overrides(config, {}), resume=True)

    assert result.run_id == state["run_id"], "killed driver: --resume opened another MLflow run"
    assert Path(result.checkpoint_path).parent == Path(finetune._run_path(config))
    resumes = _resumed_at(config, result.run_id)
    assert len(resumes) == 2 and resumes[0] == first < resumes[1], (
        f"killed driver: resumed at steps {resumes}; the worker's restart was at {first}"
    )
    # Three groups of two: the killed one, the restart the driver took down, the --resume one.
    workers = _workers(before)
    assert len(workers) == 6, f"killed driver: expected a third group of two, found {workers}"
    assert all(w["state"] == "DEAD" for w in workers.values()), workers
    _assert_finished_once(config, result)
