"""raylift's jobs on a real two-node Ray cluster on this machine (cluster/local_cluster.py).

The cluster is its own head and worker node (`ray start --block` each, own temp dirs and ports,
token auth with its own token file), never the test session's Ray. Jobs go through the real
Jobs API by the real CLI in a subprocess, as a user runs it. Training is kept on the worker
node (train.resources_per_worker asks for the resource only that node advertises); the worker
node is stopped mid-training, a fresh one joins, and the run resumes from its checkpoint there.
Every process the cluster started is stopped by pid at the end and checked gone. Both nodes
share this machine's disk, so the lifecycle's SQLite state is allowed
(cluster.allow_local_state) where it must work, and refused where it is not.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from cluster import local_cluster
from jobs import finetune, load
from jobs.train_loop import RESUME_METRIC
from tests.helpers import make_ticket_rows, tiny_lifecycle

REPO = Path(__file__).resolve().parents[2]
LABELS = ["card_arrival", "lost_card", "refund"]
MODEL = "cluster-router"
INBOX_ROWS = 24
EPOCHS, STEPS, EVERY = 2, 6, 2  # epochs, optimizer steps per epoch, checkpoint_every_steps
WORKER_CPUS = 2  # the two training workers, one CPU each, both on the worker node


@pytest.fixture(scope="module")
def two_nodes():
    # A short folder: Ray's socket paths under it must stay within the 107-byte limit.
    directory = tempfile.mkdtemp(prefix="rl-", dir="/tmp")
    cluster = local_cluster.start(directory, head_cpus=2, worker_cpus=WORKER_CPUS)
    try:
        yield cluster
    finally:
        started = {cluster.head_pid, *cluster.worker_pids}
        stopped = local_cluster.stop(cluster)
        assert started <= set(stopped)
        assert [pid for pid in stopped if _alive(pid)] == []
        assert local_cluster.stop_node_leftovers(cluster) == []
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory, tiny_bert) -> tuple[Path, object]:
    """The tiny lifecycle's YAML (state under a temp dir, loaded here: pyiceberg, no Ray)."""
    root = tmp_path_factory.mktemp("cluster")
    config = tiny_lifecycle(
        root,
        tiny_bert,
        make_ticket_rows(120, LABELS, seed=5),
        name="cluster",
        data={"inbox_rows": INBOX_ROWS},
        train={
            "epochs": EPOCHS,
            "num_workers": 2,
            "cpus_per_worker": 1,
            "resources_per_worker": {local_cluster.WORKER_RESOURCE: 1 / WORKER_CPUS},
            "max_steps_per_epoch": STEPS,
            "checkpoint_every_steps": EVERY,
            "max_failures": 1,
            "batch_size": 4,
            "precision": "fp32",
            "zero_stage": 0,
        },
        registry={"experiment": "cluster", "model_name": MODEL},
        score={
            "run_date": "2026-11-25",
            "engine": "torch",
            "precision": "fp32",
            "num_cpus": 0.5,
            "concurrency": 1,
        },
        cluster={"allow_local_state": True},
    )
    load.main(config)
    path = root / "lifecycle.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path, config


def test_finetune_survives_its_node_stopping_and_score_runs_on_two_nodes(two_nodes, lifecycle):
    path, config = lifecycle
    assert len(local_cluster._alive_nodes(two_nodes)) == 2

    submitted = _raylift(two_nodes, "submit", "finetune", "--config", str(path), "--no-wait")
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job_id = submitted.stdout.split()[0]
    assert job_id.startswith("raylift-finetune-")

    # Mid-training (a checkpoint exists, training goes on), stop the node the workers run on.
    _wait_for(lambda: _checkpoints(config), 240, "no checkpoint", two_nodes, job_id)
    node = two_nodes.worker_pids[0]
    on_node = _training_workers(node)
    assert len(on_node) == 2, f"training workers under the worker node: {on_node}"
    # Training workers blocked in a collective sit out SIGTERM: the default 15 s grace was all
    # spent waiting for them; a preempted node gets the SIGKILL sooner or later either way.
    stopped = local_cluster.stop_worker(two_nodes, node, grace_s=3)
    assert set(on_node) <= set(stopped) and not any(_alive(pid) for pid in stopped)
    assert _job_status(two_nodes, job_id) in ("PENDING", "RUNNING")

    # A fresh node joins; Ray Train restarts the worker group there from the checkpoint.
    replacement = local_cluster.add_worker(two_nodes, WORKER_CPUS)
    seen: set[int] = set()

    def finished() -> bool:
        seen.update(_training_workers(replacement))
        return _job_status(two_nodes, job_id) == "SUCCEEDED"

    _wait_for(finished, 300, "", two_nodes, job_id)
    assert seen, "no training worker ran on the replacement node"
    version = _assert_resumed_and_finished_once(config)

    scored = _raylift(
        two_nodes, "submit", "score", "--config", str(path), f"score.model_uri=models:/{MODEL}/1"
    )
    assert scored.returncode == 0, scored.stdout[-3000:] + scored.stderr[-3000:]
    assert json.loads(scored.stdout[scored.stdout.index("{") :])["status"] == "SUCCEEDED"
    assert _predictions(config) == {"model_version": {version}, "rows": INBOX_ROWS}
    listed = _raylift(two_nodes, "jobs", "list").stdout
    assert job_id in listed and "python -m jobs.cli score" in listed
    shown = _raylift(two_nodes, "jobs", "status", job_id)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert json.loads(shown.stdout)["status"] == "SUCCEEDED"


def test_local_sqlite_state_is_refused_on_two_nodes_at_submit_and_in_the_job(two_nodes, lifecycle):
    path, _ = lifecycle
    refused = _raylift(two_nodes, "submit", "score", "--config", str(path), _NOT_ALLOWED)
    assert refused.returncode == 1
    assert "the Ray cluster has 2 nodes" in refused.stderr
    assert "registry.tracking_uri" in refused.stderr and "catalog.uri" in refused.stderr
    assert "raylift-score" not in refused.stdout, refused.stderr[-3000:]  # nothing submitted

    # Submitted past raylift's check (plain `ray job submit`): the job refuses as it starts.
    entrypoint = f"python -m jobs.cli score --config {path} {_NOT_ALLOWED}"
    ray = str(Path(sys.executable).parent / "ray")
    done = subprocess.run(
        [ray, "job", "submit", "--working-dir", ".", "--", *entrypoint.split()],
        env=_client_env(two_nodes),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode != 0
    assert "the Ray cluster has 2 nodes" in done.stdout + done.stderr


_NOT_ALLOWED = "cluster.allow_local_state=false"


def _raylift(cluster, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *argv],
        env=_client_env(cluster),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _client_env(cluster) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    return {**env, **cluster.client_env()}


def _job_status(cluster, job_id: str) -> str:
    """The job's status from the Jobs API over HTTP, as `raylift jobs status` reads it.

    Polled in-process: a `raylift jobs status` process costs about 0.8 CPU-s (Ray's job SDK
    import), and polling through it once a second took a large share of the two cores the
    job under test trains on. The CLI command itself is run once, at the end."""
    import httpx

    token = Path(cluster.token_path).read_text().strip()
    answer = httpx.get(
        f"{cluster.address}/api/jobs/{job_id}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text[-2000:]
    return answer.json()["status"]


def _wait_for(ready, timeout: float, what: str, cluster, job_id: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        status = _job_status(cluster, job_id)
        if status in ("FAILED", "STOPPED") or time.monotonic() > deadline:
            logs = _raylift(cluster, "jobs", "logs", job_id).stdout
            pytest.fail(f"{what or 'job not done'} ({status} after {timeout} s):\n{logs[-4000:]}")
        time.sleep(1)


def _checkpoints(config) -> bool:
    snapshot = Path(finetune._run_path(config)) / "checkpoint_manager_snapshot.json"
    try:
        return bool(json.loads(snapshot.read_text()).get("latest_checkpoint_result"))
    except (FileNotFoundError, ValueError):  # not written yet, or caught mid-write
        return False


def _training_workers(node_pid: int) -> list[int]:
    """Pids of Ray Train workers in the process tree of the node started as `node_pid`."""
    try:
        tree = psutil.Process(node_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p.pid for p in tree if "RayTrainWorker" in _cmdline(p)]


def _cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return ""


def _assert_resumed_and_finished_once(config) -> str:
    """One MLflow run, FINISHED, resumed once mid-run, each epoch logged once; one version."""
    from mlflow import MlflowClient

    # Both URIs: this process's global registry URI is whatever an earlier test set (the run
    # and its version were written by the job, in another process).
    uri = config.registry.tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cluster").experiment_id])
    assert run.info.status == "FINISHED"
    resumed = [int(m.value) for m in client.get_metric_history(run.info.run_id, RESUME_METRIC)]
    assert len(resumed) == 1 and 0 < resumed[0] < EPOCHS * STEPS and resumed[0] % EVERY == 0
    history = client.get_metric_history(run.info.run_id, "global_step")
    assert sorted((m.step, int(m.value)) for m in history) == [
        (e, e * STEPS) for e in range(1, EPOCHS + 1)
    ]
    versions = client.search_model_versions(f"name='{MODEL}'")
    assert [str(v.version) for v in versions] == ["1"]
    return "1"


def _predictions(config) -> dict:
    from jobs.warehouse import load_catalog

    catalog = load_catalog(config.catalog)
    table = catalog.load_table(config.score.output_table).scan().to_arrow()
    return {"model_version": set(table.column("model_version").to_pylist()), "rows": table.num_rows}


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
