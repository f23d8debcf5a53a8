"""Stand-ins for each job's entry point, so a command line can be run through the real CLI
without training, serving or scoring anything: the stand-in records what it was handed."""

from __future__ import annotations

import ast
import importlib
import inspect
from dataclasses import dataclass, field
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
}
CONFIG_FREE_COMMANDS = {"validate"}
# positional arguments a subcommand needs before its options (placeholders: the job is recorded)
SUBCOMMAND_ARGUMENTS: dict[str, list[str]] = {"warehouse": ["load"], "report": ["RUN_ID"]}


@dataclass
class JobCall:
    job: str  # "jobs.finetune.main"
    config: LifecycleConfig
    kwargs: dict[str, Any] = field(default_factory=dict)


def recorder(calls: list[JobCall], job: str):
    def record(config: LifecycleConfig, **kwargs: Any) -> None:
        calls.append(JobCall(job, config, kwargs))

    return record


def record_jobs(monkeypatch: pytest.MonkeyPatch) -> list[JobCall]:
    """Replace every job's entry point with a recorder; the list fills as the CLI calls them."""
    calls: list[JobCall] = []
    for module_name, attr in JOB_ENTRY_POINTS.values():
        module = importlib.import_module(module_name)
        monkeypatch.setattr(module, attr, recorder(calls, f"{module_name}.{attr}"))
    return calls


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
