"""raylift submit / raylift jobs against a recorded cluster, and the local-state refusal."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from cluster import runtime
from cluster.shared_state import LocalStateError, absolute_local_state, local_state
from jobs import cli, submit
from jobs.config import load_config
from tests.unit.job_recorder import REPO, record_jobs

CONFIG = "configs/banking77/minilm_lora.yaml"
SHARED = [
    "catalog.type=rest",
    "catalog.uri=http://iceberg-rest:8181",
    "catalog.warehouse=s3://lake/warehouse",
    "registry.tracking_uri=http://mlflow:5000",
    "train.checkpoint_dir=s3://lake/checkpoints",
]


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def _cluster(monkeypatch, nodes: int = 1):
    calls = record_jobs(monkeypatch, nodes=nodes)
    return calls, submit.connect(None)


def test_plan_runs_the_same_command_line_in_the_uploaded_repository():
    plan = submit.plan("finetune", ["--config", CONFIG, "train.epochs=1", "--resume"])
    words = shlex.split(plan.entrypoint)
    assert words[:6] == ["python", "-m", "jobs.cli", "finetune", "--config", CONFIG]
    assert "train.epochs=1" in words and "--resume" in words
    assert plan.runtime_env["working_dir"] == str(REPO)
    for never in (".git/", ".raylift/", ".venv/", "tests/", "*.db"):
        assert never in plan.runtime_env["excludes"]
    assert "pip" not in plan.runtime_env
    assert plan.submission_id.startswith("raylift-finetune-")


def test_relative_local_state_is_made_absolute_as_this_checkout_sees_it():
    plan = submit.plan("score", ["--config", CONFIG])
    words = shlex.split(plan.entrypoint)
    assert f"registry.tracking_uri=sqlite:///{REPO}/.raylift/mlflow.db" in words
    assert f"catalog.uri=sqlite:///{REPO}/.raylift/warehouse/catalog.db" in words
    assert f"train.checkpoint_dir={REPO}/.raylift/checkpoints" in words
    assert set(plan.local_state) == {
        "catalog.uri",
        "catalog.warehouse",
        "registry.tracking_uri",
        "train.checkpoint_dir",
    }


def test_pip_asks_ray_for_the_pinned_requirements():
    plan = submit.plan("score", ["--config", CONFIG], pip=True)
    assert "torch==2.13.0" in plan.runtime_env["pip"]
    assert any(r.startswith("ray[") and r.endswith("==2.60.0") for r in plan.runtime_env["pip"])
    assert not any("pytest" in r for r in plan.runtime_env["pip"])  # dev extra left out


def test_a_config_outside_the_repository_goes_by_its_absolute_path(tmp_path):
    outside = tmp_path / "mine.yaml"
    outside.write_text((REPO / CONFIG).read_text())
    plan = submit.plan("finetune", ["--config", str(outside)])
    assert shlex.split(plan.entrypoint)[5] == str(outside)


def test_submit_prints_the_id_and_the_job_reaches_its_main_on_the_cluster(monkeypatch, capsys):
    calls, cluster = _cluster(monkeypatch)
    code = cli.main(["submit", "finetune", "--config", CONFIG, "train.epochs=1", "--resume"])
    assert code == 0
    [submitted] = cluster.jobs.submitted
    out = capsys.readouterr().out
    assert out.splitlines()[0] == submitted["submission_id"]
    assert json.loads(out[out.index("{") :])["status"] == "SUCCEEDED"
    [call] = calls
    assert call.job == "jobs.finetune.main"
    assert call.config.train.epochs == 1
    assert call.kwargs == {"resume": True}
    assert call.config.registry.tracking_uri == f"sqlite:///{REPO}/.raylift/mlflow.db"


def test_job_flags_are_checked_before_anything_is_submitted(monkeypatch, capsys):
    _, cluster = _cluster(monkeypatch)
    with pytest.raises(SystemExit) as exited:
        cli.main(["submit", "finetune", "--config", CONFIG, "--version", "3"])
    assert exited.value.code == 2
    assert cli.main(["submit", "score", "--config", CONFIG, "train.epochz=1"]) == 2
    assert "train.epochz: unknown key" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["submit", "serve", "--config", CONFIG])
    assert cluster.jobs.submitted == []


def test_promote_and_warehouse_flags_reach_the_job(monkeypatch):
    calls, _ = _cluster(monkeypatch)
    assert cli.main(["submit", "promote", "--config", CONFIG, "--version", "3"]) == 0
    argv = ["submit", "warehouse", "load", "--config", CONFIG, "data.source=my.csv", "--no-wait"]
    assert cli.main(argv) == 0
    assert [c.job for c in calls] == ["jobs.promote.main", "jobs.load.main"]
    assert calls[0].kwargs["version"] == "3"
    assert calls[1].config.data.source == "my.csv"


def test_local_state_on_several_nodes_is_refused_naming_the_keys(monkeypatch, capsys):
    calls, cluster = _cluster(monkeypatch, nodes=2)
    assert cli.main(["submit", "finetune", "--config", CONFIG]) == 1
    err = capsys.readouterr().err
    assert "the Ray cluster has 2 nodes" in err
    for key in ("catalog.uri", "registry.tracking_uri", "cluster.allow_local_state=true"):
        assert key in err
    assert cluster.jobs.submitted == [] and calls == []


def test_allowed_local_state_or_shared_services_submit_to_several_nodes(monkeypatch):
    calls, cluster = _cluster(monkeypatch, nodes=2)
    allowed = ["submit", "score", "--config", CONFIG, "cluster.allow_local_state=true"]
    assert cli.main(allowed) == 0
    assert cli.main(["submit", "score", "--config", CONFIG, *SHARED]) == 0
    assert len(cluster.jobs.submitted) == 2
    assert calls[1].config.registry.tracking_uri == "http://mlflow:5000"
    assert "sqlite" not in cluster.jobs.submitted[1]["entrypoint"]  # nothing made absolute


def test_a_failed_job_exits_non_zero_with_its_message(monkeypatch, capsys):
    _, cluster = _cluster(monkeypatch)
    monkeypatch.setattr(cluster.jobs, "get_job_status", lambda job_id: "FAILED")
    assert cli.main(["submit", "score", "--config", CONFIG, "--follow"]) == 1
    assert "FAILED" in capsys.readouterr().err
    assert cli.main(["submit", "score", "--config", CONFIG, "--no-wait"]) == 0


def test_no_address_is_an_error_that_says_where_to_give_it(capsys):
    assert cli.main(["jobs", "list"]) == 1
    assert "--address http://HEAD:8265" in capsys.readouterr().err


def test_jobs_list_status_logs_stop(monkeypatch, capsys):
    _, cluster = _cluster(monkeypatch)
    assert cli.main(["submit", "score", "--config", CONFIG]) == 0
    job_id = cluster.jobs.submitted[0]["submission_id"]
    capsys.readouterr()
    assert cli.main(["jobs", "list", "--address", "http://127.0.0.1:9999"]) == 0
    assert job_id in capsys.readouterr().out
    assert cli.main(["jobs", "status", job_id]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "SUCCEEDED"
    assert cli.main(["jobs", "logs", job_id, "--follow"]) == 0
    assert cli.main(["jobs", "stop", job_id]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "STOPPED"
    assert cluster.address == "http://127.0.0.1:9999"


def test_local_state_keys():
    config = load_config(CONFIG)
    assert set(local_state(config)) == {
        "catalog.uri",
        "catalog.warehouse",
        "registry.tracking_uri",
        "train.checkpoint_dir",
    }
    shared = load_config(CONFIG, dict(item.split("=", 1) for item in SHARED))
    assert local_state(shared) == {}
    absolute = load_config(CONFIG, {"registry.tracking_uri": "sqlite:////srv/mlflow.db"})
    assert local_state(absolute)["registry.tracking_uri"] == "sqlite:////srv/mlflow.db"
    assert "registry.tracking_uri" not in absolute_local_state(absolute, Path("/x"))


def test_the_job_itself_refuses_after_joining_a_cluster_of_several_nodes(monkeypatch):
    """init_ray counts alive nodes once it joined; the CLI declared the config's state."""
    import ray

    nodes = [{"Alive": True}, {"Alive": True}, {"Alive": False}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    record_jobs(monkeypatch)
    assert cli.main(["score", "--config", CONFIG]) == 0  # loading the config declares its state
    assert "registry.tracking_uri" in runtime._local_state
    with pytest.raises(LocalStateError, match="has 2 nodes"):
        runtime._refuse_local_state_on_many_nodes()
    nodes.pop(0)
    runtime._refuse_local_state_on_many_nodes()
    assert cli.main(["score", "--config", CONFIG, "cluster.allow_local_state=true"]) == 0
    nodes.append({"Alive": True})
    runtime._refuse_local_state_on_many_nodes()
    runtime.declare_local_state({}, False)


class _VersionHandler(BaseHTTPRequestHandler):
    seen: list[str | None] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).seen.append(self.headers.get("Authorization"))
        body = json.dumps({"ray_version": "2.60.0", "version": "4", "session_name": "x"})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("mode", [None, "token", "disabled"])
def test_the_ray_token_from_the_environment_is_sent_and_never_printed(tmp_path, mode):
    """A fresh process (Ray reads RAY_AUTH_MODE once): the Jobs API client of `connect` sends
    `Authorization: Bearer <token>` with the token file given; RAY_AUTH_MODE=disabled wins."""
    token = "tok-" + "7" * 40
    (tmp_path / "token").write_text(token)
    server = HTTPServer(("127.0.0.1", 0), _VersionHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _VersionHandler.seen.clear()
    env = {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "token"), "PATH": "/usr/bin:/bin"}
    if mode:
        env["RAY_AUTH_MODE"] = mode
    code = f"from jobs import submit; submit.connect('http://127.0.0.1:{server.server_port}')"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True
    )
    server.shutdown()
    assert done.returncode == 0, done.stderr
    expected = None if mode == "disabled" else f"Bearer {token}"
    assert _VersionHandler.seen and set(_VersionHandler.seen) == {expected}
    assert token not in done.stdout + done.stderr


def test_an_unreachable_cluster_is_an_error_naming_the_address_and_the_fix(capsys):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert cli.main(["jobs", "list", "--address", f"http://127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach Ray's Jobs API at http://127.0.0.1:{port}" in err
    assert "RAY_AUTH_TOKEN_PATH" in err


def test_submit_never_uploads_the_gpu_checks_wheels_or_model():
    """tests/gpu/device_check.sh fills .whl/ (hundreds of MB) and .gpu_minilm/ at the root."""
    excludes = submit.plan("score", ["--config", CONFIG]).runtime_env["excludes"]
    assert {".whl/", ".gpu_minilm/"} <= set(excludes)
    ignored = subprocess.run(
        ["git", "check-ignore", ".whl/x.whl", ".gpu_minilm/config.json"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert ignored.stdout.split() == [".whl/x.whl", ".gpu_minilm/config.json"], ignored.stderr


class _JobsApiHandler(BaseHTTPRequestHandler):
    """Ray's Jobs API as far as `raylift jobs` needs it: the version, then `answer` (status,
    body) to every /api/jobs/ request, as the dashboard answers an unknown id or a bad token."""

    version_answer: tuple[int, str] = (200, "")
    answer: tuple[int, str] = (404, "Job raylift-x does not exist")

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/api/version" and self.version_answer[0] == 200:
            self._reply(200, json.dumps({"ray_version": "2.60.0", "version": "4"}))
        elif self.path == "/api/version":
            self._reply(*self.version_answer)
        else:
            self._reply(*self.answer)

    do_POST = do_GET  # noqa: N815 (stop_job)

    def _reply(self, status: int, body: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def jobs_api():
    server = HTTPServer(("127.0.0.1", 0), _JobsApiHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    _JobsApiHandler.version_answer, _JobsApiHandler.answer = (200, ""), (404, "no such job")


@pytest.mark.parametrize("action", [["status"], ["logs"], ["logs", "--follow"], ["stop"]])
def test_an_unknown_job_id_is_an_error_naming_it_not_a_traceback(jobs_api, action, capsys):
    """Ray's real JobSubmissionClient against an HTTP server that answers 404, as the dashboard
    does for an id it does not know: RuntimeError("Request failed with status code 404")."""
    argv = ["jobs", action[0], "raylift-nope", *action[1:], "--address", jobs_api]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert f"no job 'raylift-nope' on the Ray cluster at {jobs_api}" in err
    assert "raylift jobs list" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("refused", "where"),
    [
        ((403, "Forbidden: Invalid authentication token"), "answer"),
        ((401, "Unauthorized"), "version_answer"),
    ],
)
def test_a_refused_ray_token_is_an_error_with_the_token_fix(jobs_api, refused, where, capsys):
    """A wrong token (403) on a job call, or none (401) already on the version check."""
    setattr(_JobsApiHandler, where, refused)
    assert cli.main(["jobs", "status", "raylift-x", "--address", jobs_api]) == 1
    err = capsys.readouterr().err
    assert f"Ray's Jobs API at {jobs_api} refused this client's Ray token" in err
    assert "RAY_AUTH_TOKEN" in err and "RAY_AUTH_MODE=token" in err


def test_the_local_clusters_token_file_is_created_owner_only(tmp_path, monkeypatch):
    """Created 0600, never written first and narrowed after (a window where others read it),
    also over a token file left world-readable by an earlier start."""
    from cluster import local_cluster

    token = tmp_path / "auth_token"
    token.write_text("an old token")
    token.chmod(0o644)

    def no_chmod(*args, **kwargs):
        raise AssertionError("the mode must come with the file, not from a chmod after")

    monkeypatch.setattr(Path, "chmod", no_chmod)
    monkeypatch.setattr(os, "chmod", no_chmod)
    umask = os.umask(0o022)
    try:
        local_cluster.write_token(token, "t" * 64)
    finally:
        os.umask(umask)
    assert token.stat().st_mode & 0o777 == 0o600
    assert token.read_text() == "t" * 64
