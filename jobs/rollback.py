"""Move the promoted alias back to the version it held before (@production → @previous).

python -m jobs.rollback --config configs/banking77/minilm_lora.yaml

The reason and the time are tagged on both versions. @previous is removed afterwards, so a
second rollback is refused instead of silently re-promoting the version just rolled back
(promote it again through the gates if it was fine after all).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from jobs.config import LifecycleConfig
from serving import registry, tags

__all__ = ["RollbackResult", "main"]

_NO_REASON = "no reason given (raylift rollback --reason ...)"


@dataclass
class RollbackResult:
    model_name: str
    alias: str
    version: str  # what the alias points at now
    rolled_back_version: str | None  # what it pointed at before
    reason: str
    at: str


def main(config: LifecycleConfig, reason: str | None = None) -> RollbackResult:
    registry.configure_tracking(config.registry.tracking_uri)
    name, alias = config.registry.model_name, config.promote.alias
    current, previous = _targets(name, alias)
    result = RollbackResult(name, alias, previous, current, reason or _NO_REASON, _now())
    _move_back(result)
    _record(result)
    _tell_serving(config)
    return result


def _tell_serving(config: LifecycleConfig) -> None:
    """A running Serve app for this model goes back now (best effort, never fails)."""
    from serving.app import tell_running_app

    tell_running_app(config)


def _targets(name: str, alias: str) -> tuple[str | None, str]:
    """(version at @alias or None, version at its previous alias); LookupError if none."""
    keep = registry.previous_alias(alias)
    previous = registry.get_alias_version(name, keep)
    if previous is None:
        raise LookupError(
            f"model {name!r} has no @{keep}: nothing to roll @{alias} back to (a promotion "
            f"keeps the old target there); promote the version you want with "
            "raylift promote --config FILE --version N"
        )
    current = registry.get_alias_version(name, alias)
    return (str(current.version) if current is not None else None), str(previous.version)


def _move_back(result: RollbackResult) -> None:
    registry.set_alias(result.model_name, result.alias, result.version)
    # set_alias kept the rolled-back version under @previous: a rollback must not offer it back.
    registry.delete_alias(result.model_name, registry.previous_alias(result.alias))


def _record(result: RollbackResult) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    roles = {result.version: "restored", result.rolled_back_version: "rolled_back"}
    for version, role in roles.items():
        if version is None:
            continue
        for field, value in (("role", role), ("reason", result.reason), ("at", result.at)):
            client.set_model_version_tag(
                result.model_name, version, tags.rollback_tag(result.alias, field), value
            )


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


if __name__ == "__main__":
    from jobs.cli import run_job

    run_job(main, __doc__)
