import pytest

from jobs.cli import COMMANDS, build_parser, main


def test_dispatch_table_and_help_agree(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    shown = capsys.readouterr().out
    for name in COMMANDS:
        assert name in shown
    assert set(COMMANDS) >= {
        "validate",
        "warehouse",
        "finetune",
        "promote",
        "serve",
        "score",
        "demo",
    }


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


def test_job_modules_expose_main():
    import importlib

    for module in ("jobs.load", "jobs.finetune", "jobs.promote", "jobs.score", "jobs.demo"):
        assert callable(importlib.import_module(module).main)


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
