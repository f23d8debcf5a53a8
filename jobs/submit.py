"""`raylift submit` and `raylift jobs`: raylift's jobs on any Ray cluster, through Ray's Jobs API.

raylift submit finetune --config configs/banking77/minilm_lora.yaml --address http://127.0.0.1:8265

The job is checked here first (its flags, its config with the overrides, its state on local
disk against the cluster's node count), then submitted with this repository as the job's
`working_dir` and run on the cluster as `python -m jobs.cli JOB ...`, the same command line as
locally. The cluster's Python environment must already hold the project's pinned dependencies
(the raylift image, `cluster/Dockerfile`); `--pip` asks Ray to install them per job instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cluster.shared_state import absolute_local_state, check_local_state, local_state
from jobs.cli import CommandFailedError, build_parser, parse_args
from jobs.config import load_config, parse_overrides

__all__ = [
    "EXCLUDES",
    "SUBMITTABLE",
    "Cluster",
    "JobFailedError",
    "Submission",
    "SubmitResult",
    "connect",
    "jobs_list",
    "jobs_logs",
    "jobs_status",
    "jobs_stop",
    "plan",
    "submit",
]

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
# Batch jobs only: `serve` and `ui` block (an endpoint on a cluster is a RayService or `serve
# deploy`), `validate` is local, `report` writes its page on the machine it runs on.
SUBMITTABLE = ("warehouse", "finetune", "tune", "promote", "rollback", "score")
ADDRESS_ENV = "RAY_ADDRESS"
# What never goes to the cluster (gitignore patterns, on top of Ray honouring .gitignore):
# state, environments, caches, tests; Ray refuses a working_dir over 512 MiB.
EXCLUDES = [
    ".git/",
    ".raylift/",
    ".venv/",
    "venv/",
    ".ci/",
    "tests/",
    "data/",
    "mlruns/",
    "mlartifacts/",
    "*.db",
    "*.egg-info/",
    "__pycache__/",
    ".pytest_cache/",
    ".ruff_cache/",
    "build/",
    "dist/",
    ".whl/",  # wheels tests/gpu/device_check.sh carries to a GPU box: hundreds of MB
    ".gpu_minilm/",  # that check's MiniLM copy
]
# Logging knobs only. Credentials never go in a runtime_env: the dashboard shows it to anyone
# who can read the Jobs API; the cluster gets them from its own secrets or instance roles.
_FORWARDED_ENV = ("RAYLIFT_LOG_LEVEL", "RAYLIFT_PROGRESS_BARS")
_POLL_S = 1.0
_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# How Ray's JobSubmissionClient reports an HTTP error (dashboard_sdk._raise_error, Ray 2.60).
_HTTP_STATUS = re.compile(r"Request failed with status code (\d{3})")


class JobFailedError(CommandFailedError):
    """A submitted job ended FAILED or STOPPED."""


@dataclass
class Submission:
    """What `submit` sends: checked here before anything reaches the cluster."""

    job: str
    entrypoint: str
    runtime_env: dict[str, Any]
    submission_id: str
    metadata: dict[str, str]
    local_state: dict[str, str] = field(default_factory=dict)
    allow_local_state: bool = False


@dataclass
class Cluster:
    """A Ray cluster's Jobs API (`jobs`: a JobSubmissionClient) at its dashboard `address`."""

    address: str
    jobs: Any

    def alive_nodes(self) -> int | None:
        """How many nodes are alive (Ray's state API); None when it cannot be asked."""
        from ray.util.state import list_nodes

        try:
            # A node lost earlier (preempted, stopped) leaves the answer partial: that is not an
            # error when counting the live ones.
            alive = list_nodes(
                address=self.address,
                filters=[("state", "=", "ALIVE")],
                timeout=10,
                raise_on_missing_output=False,
            )
        except Exception as exc:  # the state API may be off or forbidden: the job checks again
            log.warning("could not count the cluster's nodes (%s); the job checks at start", exc)
            return None
        return len(alive)


@dataclass
class SubmitResult:
    job_id: str
    address: str
    entrypoint: str
    status: str
    seconds: float


def plan(
    job: str, job_argv: list[str], *, pip: bool = False, cwd: Path | None = None
) -> Submission:
    """Parse `raylift JOB *job_argv` as the job would, load its config, build the submission."""
    if job not in SUBMITTABLE:
        raise ValueError(f"cannot submit {job!r}; submittable jobs: {', '.join(SUBMITTABLE)}")
    args = parse_args(build_parser(), [job, *job_argv])
    config = load_config(args.config, parse_overrides(args.overrides))
    cwd = cwd or Path.cwd()
    absolute = absolute_local_state(config, cwd)
    argv = [*_without_config(job_argv), *(f"{key}={value}" for key, value in absolute.items())]
    argv = ["--config", _remote_config_path(Path(args.config)), *argv]
    # `python -m` puts the job's working directory (the uploaded repository) first on sys.path;
    # an installed `raylift` script would run the image's copy of the code instead.
    entrypoint = shlex.join(["python", "-m", "jobs.cli", job, *argv])
    local = {**local_state(config), **absolute}
    return Submission(
        job=job,
        entrypoint=entrypoint,
        runtime_env=_runtime_env(pip),
        submission_id=f"raylift-{job}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}",
        metadata={"raylift_job": job, "raylift_config": config.name},
        local_state=local,
        allow_local_state=config.cluster.allow_local_state,
    )


def submit(
    job: str,
    job_argv: list[str],
    *,
    address: str | None = None,
    wait: Literal["none", "status", "logs"] = "status",
    pip: bool = False,
) -> SubmitResult:
    """Submit `raylift JOB *job_argv` to the cluster; wait for its end unless wait="none"."""
    started = time.perf_counter()
    submission = plan(job, job_argv, pip=pip)
    cluster = connect(address)
    _check_nodes(cluster, submission)
    client = cluster.jobs
    job_id = client.submit_job(
        entrypoint=submission.entrypoint,
        runtime_env=submission.runtime_env,
        submission_id=submission.submission_id,
        metadata=submission.metadata,
    )
    log.info("submitted %s to %s: %s", job_id, cluster.address, submission.entrypoint)
    print(job_id, flush=True)
    if wait == "none":
        status = str(client.get_job_status(job_id))
    else:
        status = _follow(client, job_id) if wait == "logs" else _wait(client, job_id)
        _raise_unless_succeeded(client, job_id, status, show_tail=wait == "status")
    return SubmitResult(job_id, cluster.address, submission.entrypoint, status, _since(started))


def connect(address: str | None) -> Cluster:
    """A JobSubmissionClient for `address` or RAY_ADDRESS (the dashboard's http://HOST:8265)."""
    address = address or os.environ.get(ADDRESS_ENV)
    if not address:
        raise ValueError(
            "no Ray cluster to submit to: pass --address http://HEAD:8265 (the head's "
            f"dashboard) or set {ADDRESS_ENV}"
        )
    _token_auth_from_env()
    from ray import __version__ as local_ray
    from ray.job_submission import JobSubmissionClient

    with _jobs_api(address):  # a refused token: its own error, with its own fix
        try:
            client = JobSubmissionClient(address)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ValueError(
                f"cannot reach Ray's Jobs API at {address}: {exc}\nFix: give the head's "
                "dashboard address (http://HEAD:8265, e.g. through `kubectl port-forward`); on a "
                "cluster with token auth set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (or "
                "RAY_AUTH_TOKEN)"
            ) from None
    remote_ray = getattr(client, "_server_ray_version", None)
    if remote_ray and remote_ray != local_ray:
        log.warning("the cluster runs Ray %s, this checkout pins %s", remote_ray, local_ray)
    return Cluster(address, client)


def jobs_list(address: str | None) -> None:
    cluster = connect(address)
    with _jobs_api(cluster.address):
        listed = cluster.jobs.list_jobs()
    for job in sorted(listed, key=lambda j: j.start_time or 0):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime((job.start_time or 0) / 1000))
        name = job.submission_id or job.job_id
        print(f"{name}  {job.status!s:9}  {started} UTC  {job.entrypoint}")


def jobs_status(address: str | None, job_id: str) -> dict[str, Any]:
    cluster = connect(address)
    with _jobs_api(cluster.address, job_id):
        info = cluster.jobs.get_job_info(job_id)
    return {
        "job_id": job_id,
        "status": str(info.status),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "start_time": info.start_time,
        "end_time": info.end_time,
    }


def jobs_logs(address: str | None, job_id: str, follow: bool = False) -> None:
    cluster = connect(address)
    with _jobs_api(cluster.address, job_id):
        if follow:
            cluster.jobs.get_job_status(job_id)  # an unknown id fails here, not in the websocket
            _follow(cluster.jobs, job_id)
        else:
            sys.stdout.write(cluster.jobs.get_job_logs(job_id))


def jobs_stop(address: str | None, job_id: str) -> dict[str, Any]:
    cluster = connect(address)
    with _jobs_api(cluster.address, job_id):
        was_running = cluster.jobs.stop_job(job_id)
        status = _wait(cluster.jobs, job_id) if was_running else _status(cluster.jobs, job_id)
    return {"job_id": job_id, "was_running": was_running, "status": status}


@contextlib.contextmanager
def _jobs_api(address: str, job_id: str | None = None) -> Iterator[None]:
    """Turn the Jobs API's refusals into errors naming the job, the address and the fix.

    Ray's client raises AuthenticationError for 401/403 and RuntimeError("Request failed with
    status code N: ...") for other HTTP errors; `raylift` prints a ValueError and exits 1."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as exc:
        raise ValueError(_token_refused(address, str(exc).splitlines()[0])) from None
    except RuntimeError as exc:
        found = _HTTP_STATUS.search(str(exc))
        if found is None:
            raise
        code = int(found[1])
        if code in (401, 403):
            raise ValueError(_token_refused(address, f"HTTP {code}")) from None
        if code == 404 and job_id is not None:
            raise ValueError(
                f"no job {job_id!r} on the Ray cluster at {address}; "
                f"`raylift jobs list --address {address}` shows the ids it knows"
            ) from None
        raise ValueError(f"Ray's Jobs API at {address} failed: {exc}") from None


def _token_refused(address: str, reason: str) -> str:
    return (
        f"Ray's Jobs API at {address} refused this client's Ray token ({reason})\nFix: set "
        "RAY_AUTH_TOKEN to the cluster's token (or RAY_AUTH_TOKEN_PATH to a file holding it), "
        "with RAY_AUTH_MODE=token"
    )


def _status(client: Any, job_id: str) -> str:
    return str(client.get_job_status(job_id))


def _without_config(job_argv: list[str]) -> list[str]:
    kept, skip = [], False
    for arg in job_argv:
        if skip:
            skip = False
        elif arg == "--config":
            skip = True
        elif not arg.startswith("--config="):
            kept.append(arg)
    return kept


def _remote_config_path(path: Path) -> str:
    """The config's path as the job sees it: relative inside the uploaded repository."""
    resolved = path.resolve()
    if resolved.is_relative_to(REPO):
        return str(resolved.relative_to(REPO))
    log.warning("%s is outside the uploaded repository: the cluster must see that path", resolved)
    return str(resolved)


def _runtime_env(pip: bool) -> dict[str, Any]:
    env: dict[str, Any] = {"working_dir": str(REPO), "excludes": list(EXCLUDES)}
    forwarded = {name: os.environ[name] for name in _FORWARDED_ENV if name in os.environ}
    if forwarded:
        env["env_vars"] = forwarded
    if pip:
        env["pip"] = _pinned_requirements()
    return env


def _pinned_requirements() -> list[str]:
    """The installed raylift's own requirements (pyproject.toml's pins), without extras."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        return [r for r in requires("raylift") or [] if "extra ==" not in r]
    except PackageNotFoundError:
        raise ValueError("--pip needs raylift installed here: pip install -e .") from None


def _token_auth_from_env() -> None:
    """Ray's clients send the token only with RAY_AUTH_MODE=token; a token given in the
    environment without the mode would be ignored and the request refused (401)."""
    if os.environ.get("RAY_AUTH_MODE") is None and (
        os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
    ):
        os.environ["RAY_AUTH_MODE"] = "token"
        log.info("Ray token auth: token from the environment (RAY_AUTH_MODE=token)")


def _check_nodes(cluster: Cluster, submission: Submission) -> None:
    if not submission.local_state or submission.allow_local_state:
        return
    nodes = cluster.alive_nodes()
    if nodes is not None:
        check_local_state(submission.local_state, nodes, submission.allow_local_state)


def _wait(client: Any, job_id: str) -> str:
    last = None
    while True:
        status = str(client.get_job_status(job_id))
        if status != last:
            log.info("%s: %s", job_id, status)
            last = status
        if status in _TERMINAL:
            return status
        time.sleep(_POLL_S)


def _follow(client: Any, job_id: str) -> str:
    """Print the job's output as it comes until the job ends; its final status."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())
    return _wait(client, job_id)


def _raise_unless_succeeded(client: Any, job_id: str, status: str, show_tail: bool) -> None:
    if status == "SUCCEEDED":
        return
    info = client.get_job_info(job_id)
    if show_tail:
        tail = client.get_job_logs(job_id).splitlines()[-20:]
        print("\n".join(tail), file=sys.stderr)
    raise JobFailedError(f"job {job_id} {status}: {info.message}")


def _since(started: float) -> float:
    return round(time.perf_counter() - started, 2)
