"""The MLflow UI on the config's tracking store (runs, metrics, registered versions, artifacts),
bound to 127.0.0.1 only: `raylift ui [--config FILE] [--port 5000]` blocks until Ctrl-C.

It runs `mlflow server` (the UI and its REST API) on registry.tracking_uri with artifact
serving on: runs logged by raylift keep their artifacts beside the SQLite store (mlartifacts/),
which the server reads directly; anything uploaded through it lands in the same folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from cluster.storage import redact_credentials
from jobs.config import LifecycleConfig
from serving import registry

__all__ = ["HOST", "main", "server_command", "server_env"]

log = logging.getLogger(__name__)

# Local only: the store holds every run's params and the registry, and MLflow's server has no
# authentication of its own. Reaching it from elsewhere is an SSH tunnel's job.
HOST = "127.0.0.1"
# One worker process: the UI is for one person, and each worker is a full MLflow import (about
# 200 MB and several seconds of the 2 cores here).
_WORKERS = 1
_START_TIMEOUT_S = 180.0  # 42 s seen on 2 cores busy with a tune search
_SERVER_SCHEMES = ("http://", "https://", "databricks")


def main(config: LifecycleConfig, port: int = 5000) -> None:
    command = server_command(config, port)
    _require_free_port(port)
    url = f"http://{HOST}:{port}"
    log.info("starting the MLflow UI on %s", redact_credentials(config.registry.tracking_uri))
    # Its own session: Ctrl-C reaches raylift alone, which stops the server with one SIGTERM
    # (in the terminal's group, uvicorn got SIGINT twice, once more forwarded by `mlflow
    # server`, and died with a traceback).
    server = subprocess.Popen(command, env=server_env(), start_new_session=True)
    try:
        _wait_until_up(server, url)
        print(f"MLflow UI: {url}  (Ctrl-C stops it){_runs_page(config, url)}", flush=True)
        code = server.wait()
    except KeyboardInterrupt:
        _stop(server)
        return
    if code != 0:  # 0: someone stopped the server itself
        raise SystemExit(f"error: mlflow server exited with code {code}; see its log above")


def _runs_page(config: LifecycleConfig, url: str) -> str:
    """Where the config's experiment lists its runs: MLflow 3 opens experiments on a GenAI
    overview, where a training run is two clicks away."""
    from mlflow import MlflowClient

    uri = registry.absolute_tracking_uri(config.registry.tracking_uri)
    experiment = MlflowClient(uri).get_experiment_by_name(config.registry.experiment)
    if experiment is None:
        return ""
    runs = f"{url}/#/experiments/{experiment.experiment_id}/runs"
    return f"\nruns of experiment {experiment.name}: {runs}"


def server_command(config: LifecycleConfig, port: int) -> list[str]:
    """The `mlflow server` command line serving `config`'s tracking store on HOST:port."""
    tracking = config.registry.tracking_uri
    shown = redact_credentials(tracking)
    if tracking.startswith(_SERVER_SCHEMES):
        raise ValueError(
            f"registry.tracking_uri={shown} is already a tracking server: open it in a "
            "browser (raylift ui serves a local store, e.g. sqlite:///.raylift/mlflow.db)"
        )
    uri = registry.absolute_tracking_uri(tracking)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    command += ["--host", HOST, "--port", str(port), "--workers", str(_WORKERS)]
    command += ["--serve-artifacts"]
    store = _sqlite_store(uri)
    if store is not None:
        if not store.is_file():
            raise FileNotFoundError(
                f"no MLflow store at {store} (registry.tracking_uri={shown}); run a job "
                "first (raylift finetune or tune), or pass the --config it ran with"
            )
        # where registry.configure_tracking puts the experiments' artifacts
        command += ["--artifacts-destination", (store.parent / "mlartifacts").as_uri()]
    return command


def server_env() -> dict[str, str]:
    """This environment, with MLflow's server-side job execution off: a viewer runs no jobs, and
    it starts seven huey consumer processes beside the server (seen here: on 2 busy cores the
    UI then took over 90 s to answer; without them, 42 s)."""
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def _sqlite_store(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").partition("?")[0])


def _require_free_port(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # as uvicorn binds: a port whose last connections wait in TIME_WAIT is free
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            raise ValueError(
                f"port {port} on {HOST} is in use (another raylift ui?); pass --port N"
            ) from None


def _wait_until_up(server: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"error: mlflow server exited with code {server.returncode}")
        with (
            contextlib.suppress(urllib.error.URLError, OSError),
            urllib.request.urlopen(f"{url}/health", timeout=2) as answer,
        ):
            if answer.status == 200:
                return
        time.sleep(0.5)
    log.warning(
        "the MLflow UI did not answer within %.0f s; it may still be starting", _START_TIMEOUT_S
    )


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
