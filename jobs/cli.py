"""The `raylift` command: a dispatch table of subcommands, each a thin call into a job.

Every job module also runs on its own, so the same work goes to any Ray cluster with
`ray job submit --working-dir . -- python -m jobs.finetune --config FILE [key=value ...]`,
given a config whose state is on shared storage (README, "From laptop to cluster"); `raylift
submit` does that, making local state paths absolute.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

from jobs.config import (
    ConfigError,
    LifecycleConfig,
    load_config,
    parse_overrides,
    validate_mapping,
)

__all__ = ["COMMANDS", "CommandFailedError", "build_parser", "main", "parse_args", "run_job"]


@dataclass(frozen=True)
class Command:
    help: str
    run: Callable[[argparse.Namespace], Any]
    needs_config: bool = True
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None


class CommandFailedError(Exception):
    """The command ran and its work failed (e.g. a submitted job ended FAILED): exit 1."""


def _config(args: argparse.Namespace) -> LifecycleConfig:
    return _declared(load_config(args.config, parse_overrides(args.overrides)))


def _declared(config: LifecycleConfig) -> LifecycleConfig:
    """Tell `init_ray` which state this job keeps on local disk: on a cluster of several nodes
    it refuses to start unless cluster.allow_local_state (cluster.shared_state)."""
    from cluster.runtime import declare_local_state
    from cluster.shared_state import local_state

    declare_local_state(local_state(config), config.cluster.allow_local_state)
    return config


def _validate(args: argparse.Namespace) -> dict[str, Any]:
    """`raylift validate FILE...` or `--config FILE`; trailing key=value are overrides."""
    files = [a for a in args.items if "=" not in a] + ([args.config] if args.config else [])
    overrides = parse_overrides([a for a in args.items if "=" in a])
    if not files:
        raise ConfigError("validate", ["  no config given: raylift validate FILE.yaml"])
    errors: list[str] = []
    for path in files:
        try:
            load_config(path, overrides)
        except ConfigError as exc:
            errors.append(str(exc))
    if errors:
        raise ConfigError(", ".join(files), ["\n".join(errors)])
    return {"valid": files}


def _validate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="Lifecycle YAML (or give files as arguments).")
    parser.add_argument("items", nargs="*", help="YAML files and key=value overrides.")


def _warehouse(args: argparse.Namespace) -> Any:
    from jobs import load

    return load.main(_config(args))


def _finetune(args: argparse.Namespace) -> Any:
    from jobs import finetune

    return finetune.main(_config(args), resume=args.resume)


def _tune(args: argparse.Namespace) -> Any:
    from jobs import tune

    return tune.main(_config(args), resume=args.resume)


def _resume_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--resume",
        action="store_true",
        help="Continue this config's search whose driver died; finished trials are kept.",
    )


def _finetune_resume_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--resume",
        action="store_true",
        help="Continue this config's training run whose driver died, from its last checkpoint "
        "(same checkpoint folder, same MLflow run).",
    )


def _promote(args: argparse.Namespace) -> Any:
    from jobs import promote

    return promote.main(_config(args), version=args.version, best_of=args.best_of)


def _rollback(args: argparse.Namespace) -> Any:
    from jobs import rollback

    return rollback.main(_config(args), reason=args.reason)


def _serve(args: argparse.Namespace) -> Any:
    from serving import app

    return app.deploy(_config(args), model_uri=args.model_uri, blocking=True)


def _score(args: argparse.Namespace) -> Any:
    from jobs import score

    return score.main(_config(args))


def _demo(args: argparse.Namespace) -> Any:
    from jobs import demo

    return demo.main(_config(args))


def _report(args: argparse.Namespace) -> Any:
    from jobs import report

    if "=" in args.run:
        raise ConfigError("report", [f"  {args.run!r} is not a run id: raylift report RUN [...]"])
    return report.main(_config_or_defaults(args), run_id=args.run, out=args.out)


def _ui(args: argparse.Namespace) -> Any:
    from jobs import ui

    return ui.main(_config_or_defaults(args), port=args.port)


def _config_or_defaults(args: argparse.Namespace) -> LifecycleConfig:
    """--config FILE, or the embedded defaults (registry, catalog) with the overrides."""
    if args.config:
        return _config(args)
    raw: dict[str, Any] = {"name": "raylift"}
    for key, value in parse_overrides(args.overrides).items():
        *sections, leaf = key.split(".")
        node = raw
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return validate_mapping(raw, source="defaults")


def _optional_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help="Lifecycle YAML the run was made with (default: the embedded store)."
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides")


def _report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run", metavar="RUN", help="MLflow run id: a tune parent run or a finetune run."
    )
    parser.add_argument(
        "--out", help="Folder for report.html and its plots: a local path or an s3:// URI."
    )
    _optional_config_arguments(parser)


def _ui_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=5000, help="Port on 127.0.0.1.")
    _optional_config_arguments(parser)


def _version_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", help="Registered version to promote (default: newest).")
    parser.add_argument(
        "--best-of", metavar="RUN", help="Promote the winner of this tune run (parent run id)."
    )


def _reason_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reason", help="Why: tagged on both versions with the time.")


def _model_uri_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-uri", help="Model to serve (default: the promoted alias).")


def _warehouse_action(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["load"], help="load: file → Iceberg tables.")


def _submit(args: argparse.Namespace) -> Any:
    from jobs import submit

    wait = "none" if args.no_wait else "logs" if args.follow else "status"
    return submit.submit(args.job, args.job_argv, address=args.address, wait=wait, pip=args.pip)


def _address_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", help="The head's dashboard, http://HEAD:8265 (default: RAY_ADDRESS)."
    )


def _submit_arguments(parser: argparse.ArgumentParser) -> None:
    from jobs.submit import SUBMITTABLE

    parser.add_argument("job", choices=SUBMITTABLE, help="The raylift job to run on the cluster.")
    _address_argument(parser)
    wait = parser.add_mutually_exclusive_group()
    wait.add_argument("--no-wait", action="store_true", help="Print the job id and return.")
    wait.add_argument("--follow", action="store_true", help="Print the job's output as it runs.")
    parser.add_argument(
        "--pip",
        action="store_true",
        help="Have Ray install the pinned requirements for the job (default: the cluster's "
        "image already has them).",
    )
    # --config FILE, key=value overrides and the job's own flags (--resume, --version N, ...),
    # checked against the job's parser before anything is submitted.
    parser.set_defaults(job_argv=[])


def _jobs(args: argparse.Namespace) -> Any:
    from jobs import submit

    if args.action == "list":
        return submit.jobs_list(args.address)
    if args.action == "status":
        return submit.jobs_status(args.address, args.job_id)
    if args.action == "logs":
        return submit.jobs_logs(args.address, args.job_id, follow=args.follow)
    return submit.jobs_stop(args.address, args.job_id)


def _jobs_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, help_text in (
        ("list", "Every job the cluster knows, oldest first."),
        ("status", "A job's status and message."),
        ("logs", "A job's output."),
        ("stop", "Stop a job and wait until it has stopped."),
    ):
        child = actions.add_parser(action, help=help_text, description=help_text)
        if action != "list":
            child.add_argument("job_id", metavar="ID", help="The submission id submit printed.")
        if action == "logs":
            child.add_argument("--follow", action="store_true", help="Until the job ends.")
        _address_argument(child)


COMMANDS: dict[str, Command] = {
    "validate": Command(
        "Check configs; list every error with its key and a fix.",
        _validate,
        needs_config=False,
        add_arguments=_validate_arguments,
    ),
    "warehouse": Command(
        "Load the source file into the Iceberg tables.",
        _warehouse,
        add_arguments=_warehouse_action,
    ),
    "finetune": Command(
        "Fine-tune with Ray Train + DeepSpeed; register the model.",
        _finetune,
        add_arguments=_finetune_resume_argument,
    ),
    "tune": Command(
        "Search hyperparameters with Ray Tune (ASHA); register the winner.",
        _tune,
        add_arguments=_resume_argument,
    ),
    "promote": Command(
        "Gate a registered version and move the alias.", _promote, add_arguments=_version_argument
    ),
    "rollback": Command(
        "Move the promoted alias back to @previous.", _rollback, add_arguments=_reason_argument
    ),
    "report": Command(
        "One HTML page on a tune search or finetune run: curves, trials, confusion, gates.",
        _report,
        needs_config=False,
        add_arguments=_report_arguments,
    ),
    "ui": Command(
        "The MLflow UI on the tracking store, on 127.0.0.1 (blocks).",
        _ui,
        needs_config=False,
        add_arguments=_ui_arguments,
    ),
    "serve": Command(
        "Serve the promoted model with Ray Serve (blocks).",
        _serve,
        add_arguments=_model_uri_argument,
    ),
    "score": Command("Batch-score a table with Ray Data into the predictions table.", _score),
    "submit": Command(
        "Run a job on a Ray cluster through its Jobs API (this repository as working_dir).",
        _submit,
        needs_config=False,
        add_arguments=_submit_arguments,
    ),
    "jobs": Command(
        "Submitted jobs on a Ray cluster: list, status ID, logs ID [--follow], stop ID.",
        _jobs,
        needs_config=False,
        add_arguments=_jobs_arguments,
    ),
    "demo": Command("The whole lifecycle on the embedded default.", _demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylift", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        child = sub.add_parser(name, help=command.help, description=command.help)
        if command.add_arguments:
            command.add_arguments(child)
        if command.needs_config:
            _add_config_arguments(child)
    return parser


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="Lifecycle YAML, e.g. configs/...")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=1")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    _setup_logging()
    return _dispatch(lambda: COMMANDS[args.command].run(args))


def run_job(job_main: Callable[[LifecycleConfig], Any], doc: str | None) -> None:
    """`python -m jobs.<name> --config FILE [key=value ...]`."""
    parser = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0])
    _add_config_arguments(parser)
    args = parse_args(parser, sys.argv[1:])
    _setup_logging()
    sys.exit(_dispatch(lambda: job_main(_config(args))))


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse `argv`, taking `key=value` overrides wherever they stand after the subcommand.

    argparse fills a trailing `nargs="*"` positional as soon as the first positional is seen, so
    in `warehouse load --config F data.source=x.csv` the overrides list was already closed (empty)
    at `load`, and `data.source=x.csv` was left over as "unrecognized". Left-over arguments are
    therefore collected here: `key=value` items become overrides (for `validate`, any item:
    files and overrides alike); anything else is still an error.
    """
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "job_argv"):  # `submit JOB ...`: the job's own parser checks them
        args.job_argv = [*args.job_argv, *extra]
        return args
    target = "items" if hasattr(args, "items") else "overrides"
    stray = [a for a in extra if a.startswith("-") or (target == "overrides" and "=" not in a)]
    if stray or (extra and not hasattr(args, target)):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        setattr(args, target, [*getattr(args, target), *extra])
    return args


def _dispatch(call: Callable[[], Any]) -> int:
    from serving.registry import RegistryUnavailable

    try:
        result = call()
    except ConfigError as exc:
        print(f"error: invalid config {exc}", file=sys.stderr)
        return 2
    except (
        LookupError,
        FileNotFoundError,
        ValueError,
        CommandFailedError,
        RegistryUnavailable,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if result is not None:
        print(json.dumps(_plain(result), indent=2, default=str))
    return 0


def _plain(result: Any) -> Any:
    return asdict(result) if is_dataclass(result) else result


def _setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("RAYLIFT_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


if __name__ == "__main__":
    sys.exit(main())
