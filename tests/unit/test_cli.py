import re
from pathlib import Path

import pytest

from jobs.cli import COMMANDS, build_parser, main
from tests.unit.job_recorder import (
    CONFIG_FREE_COMMANDS,
    JOB_ENTRY_POINTS,
    SUBCOMMAND_ARGUMENTS,
    JobCall,
    record_jobs,
)

CONFIG = "configs/banking77/minilm_lora.yaml"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def job_calls(monkeypatch) -> list[JobCall]:
    return record_jobs(monkeypatch)


def test_dispatch_table_and_help_agree(capsys):
    """The parser's subcommands (the choices argparse names for an unknown one), the commands
    `--help` lists, with their help, and the README's command block are the dispatch table."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["no-such-command"])
    choices = re.findall(r"\w+", capsys.readouterr().err.split("choose from", 1)[1])
    assert choices == list(COMMANDS)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    help_text = capsys.readouterr().out
    listing = help_text.split("positional arguments:", 1)[1].split("options:", 1)[0]
    assert re.findall(r"^ {4}(\w+)", listing, flags=re.M) == list(COMMANDS)
    for name, command in COMMANDS.items():
        assert " ".join(command.help.split()) in " ".join(listing.split()), name
    assert _readme_command_names() == set(COMMANDS)


def _readme_command_names() -> set[str]:
    """The first word after `raylift` on each line of the README's "The `raylift` command"."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## The `raylift` command", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return {line.split()[1] for line in block.splitlines() if line.startswith("raylift ")}


def test_validate_ok_and_error_exit_codes(tmp_path, capsys):
    assert main(["validate", "--config", "configs/banking77/minilm_lora.yaml"]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain: {epochz: 1}\n")
    assert main(["validate", "--config", str(bad)]) == 2
    assert "train.epochz: unknown key; did you mean 'train.epochs'?" in capsys.readouterr().err


def test_validate_applies_overrides(capsys):
    code = main(["validate", "--config", "configs/banking77/minilm_lora.yaml", "train.zero=3"])
    assert code == 2
    assert "train.zero: unknown key" in capsys.readouterr().err


def test_every_subcommand_hands_its_config_to_its_job_main(job_calls):
    """The dispatch table reaches each job's real entry point (replaced by a recorder)."""
    assert set(COMMANDS) == set(JOB_ENTRY_POINTS) | CONFIG_FREE_COMMANDS
    for command, (module, attr) in JOB_ENTRY_POINTS.items():
        job_calls.clear()
        argv = [command, *SUBCOMMAND_ARGUMENTS.get(command, [])]
        assert main([*argv, "--config", CONFIG, "train.epochs=7"]) == 0
        assert [c.job for c in job_calls] == [f"{module}.{attr}"]
        assert job_calls[0].config.train.epochs == 7


@pytest.mark.parametrize(
    "argv",
    [
        ["warehouse", "load", "--config", CONFIG, "data.source=my.csv", "train.epochs=2"],
        ["warehouse", "--config", CONFIG, "load", "data.source=my.csv", "train.epochs=2"],
        ["warehouse", "load", "data.source=my.csv", "--config", CONFIG, "train.epochs=2"],
        ["promote", "data.source=my.csv", "--config", CONFIG, "train.epochs=2", "--version", "3"],
    ],
)
def test_overrides_are_taken_before_and_after_options(argv, job_calls):
    assert main(argv) == 0
    assert job_calls[0].config.data.source == "my.csv"
    assert job_calls[0].config.train.epochs == 2


def test_unknown_flags_and_bare_words_are_still_refused(job_calls, capsys):
    for argv in (
        ["finetune", "--config", CONFIG, "--epochs", "2"],
        ["warehouse", "load", "--config", CONFIG, "my.csv"],
    ):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err
    assert job_calls == []


def test_validate_takes_files_as_arguments(tmp_path, capsys):
    assert (
        main(
            [
                "validate",
                "configs/banking77/minilm_lora.yaml",
                "configs/banking77/minilm_quality.yaml",
            ]
        )
        == 0
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nserve: {port: 0}\n")
    assert main(["validate", "configs/banking77/minilm_lora.yaml", str(bad)]) == 2
    assert "serve.port" in capsys.readouterr().err
