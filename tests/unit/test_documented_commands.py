"""Every command line the project shows a user is run through the real entry points.

The README's `raylift ...`, `python -m jobs.X ...` and `ray job submit ... -- python -m ...`
lines, each job module's docstring command, each config's first-line command and the Makefile's
`raylift` recipes are parsed by `jobs.cli`, with each job's entry point replaced by a recorder:
the test asserts the line parsed, reached the job its subcommand names, and that its
`key=value` overrides took effect.
`raylift submit` and `raylift jobs` lines reach a recorded Ray cluster (job_recorder.FakeCluster):
a submitted job's entrypoint is run through `jobs.cli` there, so it too must reach its job.
"""

from __future__ import annotations

import importlib
import itertools
import re
import shlex
import sys
from pathlib import Path

import pytest

from jobs import cli
from jobs.config import parse_overrides
from tests.unit.job_recorder import (
    CONFIG_FREE_COMMANDS,
    JOB_ENTRY_POINTS,
    JobCall,
    dotted,
    module_main_block_runs_its_main,
    module_main_block_subcommand,
    record_jobs,
    recorder,
)

REPO = Path(__file__).resolve().parents[2]
JOB_MODULES = (
    "jobs.load",
    "jobs.finetune",
    "jobs.tune",
    "jobs.promote",
    "jobs.rollback",
    "jobs.report",
    "jobs.score",
    "jobs.demo",
)
_BRACKET = re.compile(r"\[([^\]]*)\]")
_PLACEHOLDER = "..."  # `[key=value ...]` stands for any override: shown, never typed as is


@pytest.fixture
def job_calls(monkeypatch) -> list[JobCall]:
    return record_jobs(monkeypatch)


def _code_lines(markdown: str) -> list[str]:
    lines, inside = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
        elif inside:
            lines.append(re.sub(r"\s+#.*$", "", line).strip())
    return lines


def _expand(line: str) -> list[str]:
    """One line per choice of its `[optional ...]` parts, each with and without; globs expanded."""
    options = _BRACKET.findall(line)
    choices = [[""] if _PLACEHOLDER in opt else ["", opt] for opt in options]
    variants = []
    for picked in itertools.product(*choices):
        pieces = _BRACKET.split(line)  # text, option, text, option, ..., text
        pieces[1::2] = picked
        variants.append(" ".join("".join(pieces).split()))
    return [_glob(v) for v in variants]


def _glob(line: str) -> str:
    words = []
    for word in shlex.split(line):
        if "*" in word:
            found = sorted(str(p.relative_to(REPO)) for p in REPO.glob(word))
            assert found, f"{word!r} matches no file"
            words.extend(found)
        else:
            words.append(word)
    return shlex.join(words)


def _raylift_argv(line: str) -> list[str]:
    words = shlex.split(line)
    assert words[0] == "raylift", line
    return words[1:]


def _module_argv(line: str) -> tuple[str, list[str]]:
    """`python -m jobs.X ARGS` (alone or after `ray job submit ... --`) → (jobs.X, ARGS)."""
    words = shlex.split(line)
    if "--" in words:
        words = words[words.index("--") + 1 :]
    assert words[:2] == ["python", "-m"], line
    return words[2], words[3:]


def _readme_lines() -> list[str]:
    return _code_lines((REPO / "README.md").read_text())


def _readme_raylift() -> list[str]:
    lines = [line for line in _readme_lines() if line.startswith("raylift ")]
    return sorted({v for line in lines for v in _expand(line)})


def _readme_modules() -> list[str]:
    lines = [line for line in _readme_lines() if "python -m jobs." in line]
    return sorted({v for line in lines for v in _expand(line)})


def _docstring_modules() -> list[str]:
    lines = []
    for name in JOB_MODULES:
        doc = importlib.import_module(name).__doc__ or ""
        lines += [ln.strip() for ln in doc.splitlines() if ln.strip().startswith("python -m ")]
    return sorted({v for line in lines for v in _expand(line)})


def _config_commands() -> list[str]:
    commands = []
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# raylift "), f"{path}: first line must be the command"
        commands += [c.strip() for c in first.removeprefix("#").split("&&")]
    return commands


def _makefile_commands() -> list[str]:
    """`$(BIN)/raylift ...` recipe lines of the Makefile, with its `VAR ?= value` defaults."""
    text = (REPO / "Makefile").read_text()
    defaults = dict(re.findall(r"^(\w+)\s*\?=\s*(.+)$", text, flags=re.M))
    commands = []
    for line in re.findall(r"^\t\$\(BIN\)/(raylift .+)$", text, flags=re.M):
        commands.append(re.sub(r"\$\((\w+)\)", lambda m: defaults[m[1]].strip(), line))
    return commands


def _run_raylift(argv: list[str], calls) -> None:
    assert cli.main(argv) == 0, argv
    command = argv[0]
    if command in CONFIG_FREE_COMMANDS:
        assert calls == []
        return
    # `submit JOB ...` runs JOB's entrypoint on the (recorded) cluster: JOB's main is reached
    module_name, attr = JOB_ENTRY_POINTS[argv[1] if command == "submit" else command]
    assert [c.job for c in calls] == [f"{module_name}.{attr}"]
    _assert_overrides_applied(argv, calls[0].config)
    if "--version" in argv:
        assert calls[0].kwargs["version"] == argv[argv.index("--version") + 1]
    if command == "report":
        assert calls[0].kwargs["run_id"] == argv[1]
        if "--out" in argv:
            assert calls[0].kwargs["out"] == argv[argv.index("--out") + 1]
    if command == "ui":
        port = argv[argv.index("--port") + 1] if "--port" in argv else "5000"
        assert calls[0].kwargs["port"] == int(port)


def _assert_overrides_applied(argv: list[str], config) -> None:
    for item in (a for a in argv if "=" in a and not a.startswith("-")):
        key, value = next(iter(parse_overrides([item]).items()))
        assert dotted(config, key) == value, f"{item} did not reach the config"


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)


@pytest.mark.parametrize("line", _readme_raylift())
def test_readme_raylift_line_parses_and_reaches_its_job(line, job_calls):
    _run_raylift(_raylift_argv(line), job_calls)


@pytest.mark.parametrize("line", _config_commands() + _makefile_commands())
def test_config_and_makefile_command_parses_and_reaches_its_job(line, job_calls):
    _run_raylift(_raylift_argv(line), job_calls)


@pytest.mark.parametrize("line", _readme_modules() + _docstring_modules())
def test_python_m_line_parses_and_reaches_the_module_main(line, monkeypatch, job_calls):
    module_name, args = _module_argv(line)
    subcommand = module_main_block_subcommand(module_name)
    if subcommand is not None:  # the module is `raylift SUBCOMMAND` under another name
        _run_raylift([subcommand, *args], job_calls)
        return
    assert module_main_block_runs_its_main(module_name), f"{module_name} has no run_job(main)"
    calls = []
    monkeypatch.setattr(sys, "argv", [module_name, *args])
    with pytest.raises(SystemExit) as exited:
        cli.run_job(recorder(calls, module_name), importlib.import_module(module_name).__doc__)
    assert exited.value.code == 0, line
    assert [c.job for c in calls] == [module_name]
    _assert_overrides_applied(args, calls[0].config)


def test_readme_shows_every_subcommand_and_only_real_ones():
    shown = {_raylift_argv(line)[0] for line in _readme_raylift()}
    assert shown == set(cli.COMMANDS)


def test_readme_shows_the_user_loading_their_own_file():
    """The line from issue 6: a user's own data, loaded the way the README shows it."""
    assert any("data.source=" in line for line in _readme_raylift() if " load " in line)
    assert _readme_modules(), "the README shows how to submit a job to a cluster"
