"""Training that survives failures, on the tiny BERT with real Ray Train, DeepSpeed and MLflow.

A training worker process is SIGKILLed once the run holds a checkpoint: Ray Train restarts the
worker group (train.max_failures), every rank loads the latest checkpoint's state (engine,
optimizer, LR schedule, RNG, data position) and the run finishes the planned steps, each epoch
logged once, one version registered. A killed driver's run is continued by --resume in the same
folder and the same MLflow run.
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
from tests.helpers import make_ticket_rows, tiny_lifecycle

LABELS = ["card_arrival", "lost_card", "refund"]
EPOCHS = 3
STEPS = 8  # planned optimizer steps per epoch (max_steps_per_epoch; the data holds more)
EVERY = 2  # checkpoint_every_steps
WORKER = "RayTrainWorker"


def _config(root: Path, tiny_bert: str, name: str):
    return tiny_lifecycle(
        root,
        tiny_bert,
        make_ticket_rows(240, LABELS, seed=3),
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

    found = list_actors(filters=[("class_name", "=", WORKER)], limit=1000, detail=True)
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
    assert [v for _, v in _epoch_history(config, result.run_id, "train_steps")] == [STEPS] * 3
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


def test_a_killed_worker_is_restarted_from_the_last_checkpoint(ray_session, tmp_path, tiny_bert):
    config = _config(tmp_path, tiny_bert, "resilience-worker")
    load.main(config)
    before = set(_workers())
    killer = _WorkerKiller(config, before)
    killer.start()
    started = time.perf_counter()
    result = finetune.main(config)
    wall = time.perf_counter() - started
    killer.join(timeout=5)
    assert killer.error is None, killer.error
    assert killer.killed is not None, "the run finished before a worker could be killed"

    # Two attempts of two workers each: the killed one is dead, the second group is new.
    workers = _workers(before)
    assert len(workers) == 4, workers
    assert all(w["state"] == "DEAD" for w in workers.values())
    assert killer.killed["pid"] in {w["pid"] for w in workers.values()}

    # Resumed once, from a checkpoint at or after the one seen before the kill, mid-run.
    (resumed,) = _resumed_at(config, result.run_id)
    assert resumed % EVERY == 0 and 0 < resumed < EPOCHS * STEPS
    seen_epoch, seen_batch = killer.killed["after"].removeprefix("epoch").split("-")
    seen = (int(seen_epoch) - 1) * STEPS + (STEPS if seen_batch == "end" else int(seen_batch[5:]))
    assert resumed >= seen
    _assert_finished_once(config, result)
    print(f"\nrun with one killed worker: {wall:.1f} s; resumed at step {resumed}")


def test_a_killed_driver_is_resumed_in_the_same_run(ray_session, tmp_path, tiny_bert):
    import ray

    config = _config(tmp_path, tiny_bert, "resilience-driver")
    config_file = tmp_path / "finetune.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    load.main(config)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    log = tmp_path / "driver.log"
    with log.open("w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-m", "jobs.finetune", "--config", str(config_file)],
            cwd=Path(__file__).resolve().parents[2],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 180
    while not _checkpoints(config):
        assert driver.poll() is None, f"driver exited early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint in 180 s"
        time.sleep(0.05)
    assert psutil.pid_exists(driver.pid)
    driver.kill()
    assert driver.wait(timeout=30) == -signal.SIGKILL
    state = json.loads((Path(finetune._run_path(config)) / "raylift_finetune.json").read_text())
    assert state["finished"] is False
    with pytest.raises(ValueError, match="unfinished finetune .* --resume"):
        finetune.main(config)  # a fresh start would throw the checkpoints away

    result = finetune.main(with_overrides(config, {}), resume=True)

    assert result.run_id == state["run_id"]  # the same MLflow run, reopened and finished
    assert Path(result.checkpoint_path).parent == Path(finetune._run_path(config))
    assert len(_resumed_at(config, result.run_id)) == 1
    _assert_finished_once(config, result)
