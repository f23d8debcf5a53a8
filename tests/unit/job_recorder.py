"""Stand-ins for each job's entry point, so a command line can be run through the real CLI
without training, serving or scoring anything: the stand-in records what it was handed.

`raylift submit` and `raylift jobs` reach a stand-in Ray cluster instead (`FakeCluster`): a
submitted entrypoint is run there through the real CLI, in the repository as the cluster's
working_dir, so `submit finetune ...` records jobs.finetune.main with the config the job would
see on the cluster."""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from jobs.config import LifecycleConfig

# subcommand → the function the CLI must hand the parsed config to
JOB_ENTRY_POINTS: dict[str, tuple[str, str]] = {
    "warehouse": ("jobs.load", "main"),
    "finetune": ("jobs.finetune", "main"),
    "tune": ("jobs.tune", "main"),
    "promote": ("jobs.promote", "main"),
    "rollback": ("jobs.rollback", "main"),
    "report": ("jobs.report", "main"),
    "ui": ("jobs.ui", "main"),
    "serve": ("serving.app", "deploy"),
    "score": ("jobs.score", "main"),
    "demo": ("jobs.demo", "main"),
    # `submit JOB ...` hands its config to JOB's main, on the cluster (SUBCOMMAND_ARGUMENTS)
    "submit": ("jobs.finetune", "main"),
}
CONFIG_FREE_COMMANDS = {"validate", "jobs"}
# positional arguments a subcommand needs before its options (placeholders: the job is recorded)
SUBCOMMAND_ARGUMENTS: dict[str, list[str]] = {
    "warehouse": ["load"],
    "report": ["RUN_ID"],
    "submit": ["finetune"],
}
REPO = Path(__file__).resolve().parents[2]


@dataclass
class JobCall:
    job: str  # "jobs.finetune.main"
    config: LifecycleConfig
    kwargs: dict[str, Any] = field(default_factory=dict)


def recorder(calls: list[JobCall], job: str):
    def record(config: LifecycleConfig, **kwargs: Any) -> None:
        calls.append(JobCall(job, config, kwargs))

    return record


def record_jobs(monkeypatch: pytest.MonkeyPatch, nodes: int = 1) -> list[JobCall]:
    """Replace every job's entry point with a recorder, and the Ray cluster that `submit` and
    `jobs` reach with a FakeCluster of `nodes` nodes; the list fills as the CLI calls them."""
    from jobs import submit

    calls: list[JobCall] = []
    for module_name, attr in JOB_ENTRY_POINTS.values():
        module = importlib.import_module(module_name)
        monkeypatch.setattr(module, attr, recorder(calls, f"{module_name}.{attr}"))
    cluster = FakeCluster(nodes=nodes)
    monkeypatch.setattr(submit, "connect", lambda address: cluster.connected(address))
    return calls


@dataclass
class FakeJobsClient:
    """The JobSubmissionClient calls raylift makes; a submitted job runs at once, in-process."""

    submitted: list[dict[str, Any]] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)

    def submit_job(self, *, entrypoint: str, **options: Any) -> str:
        from jobs import cli

        words = shlex.split(entrypoint)
        assert words[:3] == ["python", "-m", "jobs.cli"], entrypoint
        assert options["runtime_env"]["working_dir"] == str(REPO)
        self.submitted.append({"entrypoint": entrypoint, **options})
        here = Path.cwd()
        os.chdir(REPO)  # the job runs in its copy of the working_dir
        try:
            assert cli.main(words[3:]) == 0, entrypoint
        finally:
            os.chdir(here)
        return options["submission_id"]

    def get_job_status(self, job_id: str) -> str:
        return "STOPPED" if job_id in self.stopped else "SUCCEEDED"

    def get_job_info(self, job_id: str) -> SimpleNamespace:
        entrypoint = next(
            (s["entrypoint"] for s in self.submitted if s["submission_id"] == job_id), ""
        )
        return SimpleNamespace(
            status=self.get_job_status(job_id),
            message="",
            entrypoint=entrypoint,
            start_time=0,
            end_time=0,
            submission_id=job_id,
            job_id=None,
        )

    def list_jobs(self) -> list[SimpleNamespace]:
        return [self.get_job_info(s["submission_id"]) for s in self.submitted]

    def get_job_logs(self, job_id: str) -> str:
        return ""

    async def tail_job_logs(self, job_id: str):
        for line in ():
            yield line

    def stop_job(self, job_id: str) -> bool:
        self.stopped.append(job_id)
        return True


@dataclass
class FakeCluster:
    """What `jobs.submit.connect` returns, with `nodes` alive nodes."""

    nodes: int = 1
    address: str = "http://127.0.0.1:8265"
    jobs: FakeJobsClient = field(default_factory=FakeJobsClient)

    def connected(self, address: str | None) -> FakeCluster:
        self.address = address or self.address
        return self

    def alive_nodes(self) -> int:
        return self.nodes


def dotted(config: LifecycleConfig, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


def module_main_block_runs_its_main(module_name: str) -> bool:
    """Whether `module_name`'s `if __name__ == "__main__":` block is `run_job(main, __doc__)`."""
    tree = ast.parse(inspect.getsource(importlib.import_module(module_name)))
    for node in tree.body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            return "run_job(main, __doc__)" in ast.unparse(node)
    return False


def module_main_block_subcommand(module_name: str) -> str | None:
    """The raylift subcommand `module_name`'s `__main__` block hands its arguments to, as in
    `raylift(["report", *sys.argv[1:]])`; None when the block does something else."""
    tree = ast.parse(inspect.getsource(importlib.import_module(module_name)))
    for node in tree.body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            for call in ast.walk(node):
                if isinstance(call, ast.List) and "*sys.argv[1:]" in ast.unparse(call):
                    first = call.elts[0]
                    if isinstance(first, ast.Constant) and isinstance(first.value, str):
                        return first.value
    return None
