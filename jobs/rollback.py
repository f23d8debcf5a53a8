"""Move the promoted alias back to the version it held before (@production → @previous).

python -m jobs.rollback --config configs/banking77/minilm_lora.yaml

The reason and the time are tagged on both versions. @previous is removed afterwards, so a
second rollback is refused instead of silently re-promoting the version just rolled back
(promote it again through the gates if it was fine after all).

Nothing is lost if it stops half-way: under the model's alias lock (serving.registry.alias_lock,
which promote holds too) the rollback is first noted on the model (a tag,
`raylift.rollback.<alias>.pending`, naming both versions), @production is written to
@previous's version and read back, and only then are @previous and the note deleted. Run again
after a failure, it completes the noted rollback (its reason and time) instead of refusing it.
"""

from __future__ import annotations

import datetime
import json
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
    moving = False
    try:
        with registry.alias_lock(name):
            result = _interrupted(name, alias) or _start(name, alias, reason)
            moving = True
            _move_back(result)
    finally:
        if moving:
            _tell_serving(config)
    return result


def _tell_serving(config: LifecycleConfig) -> None:
    """A running Serve app for this model goes back now (best effort, never fails)."""
    from serving.app import tell_running_app

    tell_running_app(config)


def _start(name: str, alias: str, reason: str | None) -> RollbackResult:
    """Plan the rollback, note it on the model and tag both versions (before any alias moves)."""
    current, previous = _targets(name, alias)
    result = RollbackResult(name, alias, previous, current, reason or _NO_REASON, _now())
    _client().set_registered_model_tag(name, _pending_tag(alias), _pending(result))
    _record(result)
    return result


def _targets(name: str, alias: str) -> tuple[str | None, str]:
    """(version at @alias or None, version at its previous alias); LookupError if there is
    nothing to go back to."""
    keep = registry.previous_alias(alias)
    found = registry.alias_versions(name)
    current, previous = found.get(alias), found.get(keep)
    if previous is None:
        raise LookupError(
            f"model {name!r} has no @{keep}: nothing to roll @{alias} back to (a promotion "
            f"keeps the old target there); promote the version you want with "
            "raylift promote --config FILE --version N"
        )
    if previous == current:  # a promotion that failed between its two alias writes leaves this
        raise LookupError(
            f"@{keep} and @{alias} of {name!r} both name version {current}: nothing to roll "
            "back to; promote the version you want with raylift promote --config FILE "
            "--version N"
        )
    return current, previous


def _interrupted(name: str, alias: str) -> RollbackResult | None:
    """The rollback noted on the model, if the aliases are where it left them (before its
    @alias write, after it, or after deleting @previous too), else None (planned afresh)."""
    found = registry.alias_versions(name)
    noted = _client().get_registered_model(name).tags.get(_pending_tag(alias)) if found else None
    if noted is None:
        return None
    result = RollbackResult(**json.loads(noted))
    left_at = (found.get(alias), found.get(registry.previous_alias(alias)))
    to, back = result.version, result.rolled_back_version
    return result if left_at in ((back, to), (to, to), (to, None)) else None


def _move_back(result: RollbackResult) -> None:
    """@alias to the version @previous held, read back; then @previous and the note removed
    (a rollback must not offer the rolled-back version back). Each step may be run again."""
    name, alias, keep = result.model_name, result.alias, registry.previous_alias(result.alias)
    if registry.alias_versions(name).get(alias) != result.version:
        registry.move_alias(name, alias, result.version, current=None)  # reads it back
    if keep in registry.alias_versions(name):
        registry.delete_alias(name, keep)
    registry.check_aliases(name, {alias: result.version, keep: None})
    _client().delete_registered_model_tag(name, _pending_tag(alias))


def _record(result: RollbackResult) -> None:
    client = _client()
    roles = {result.version: "restored", result.rolled_back_version: "rolled_back"}
    for version, role in roles.items():
        if version is None:
            continue
        for field, value in (("role", role), ("reason", result.reason), ("at", result.at)):
            client.set_model_version_tag(
                result.model_name, version, tags.rollback_tag(result.alias, field), value
            )


def _pending_tag(alias: str) -> str:
    return tags.rollback_tag(alias, "pending")


def _pending(result: RollbackResult) -> str:
    return json.dumps(vars(result), sort_keys=True)


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


if __name__ == "__main__":
    from jobs.cli import run_job

    run_job(main, __doc__)
