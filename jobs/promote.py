"""Gate a registered version and, if it passes, move the alias (the old target kept as @previous).

python -m jobs.promote --config configs/banking77/minilm_lora.yaml
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jobs.config import LifecycleConfig
from serving import registry, tags

__all__ = ["GateRefused", "PromoteResult", "evaluate_gates", "main"]


class GateRefused(ValueError):
    """The candidate did not pass the promotion gates; the alias was not moved."""


@dataclass
class PromoteResult:
    model_name: str
    version: str
    alias: str
    metric: str
    value: float
    previous_version: str | None
    checks: list[str] = field(default_factory=list)


def main(config: LifecycleConfig, version: str | None = None) -> PromoteResult:
    from mlflow import MlflowClient

    registry.configure_tracking(config.registry.tracking_uri)
    client = MlflowClient()
    name, gate = config.registry.model_name, config.promote
    candidate = client.get_model_version(name, version or _newest_version(client, name))
    current = registry.get_alias_version(name, gate.alias)
    passed, checks = evaluate_gates(config, candidate.tags, current.tags if current else None)
    verdict = "passed" if passed else "refused"
    client.set_model_version_tag(name, candidate.version, tags.gate_tag(gate.alias), verdict)
    if not passed:
        raise GateRefused(
            f"{name} version {candidate.version} not promoted to @{gate.alias}: "
            + "; ".join(checks)
        )
    previous = registry.set_alias(name, gate.alias, str(candidate.version))
    return PromoteResult(
        model_name=name,
        version=str(candidate.version),
        alias=gate.alias,
        metric=gate.metric,
        value=_metric(candidate.tags, gate.metric),
        previous_version=previous,
        checks=checks,
    )


def evaluate_gates(
    config: LifecycleConfig, candidate: dict[str, str], current: dict[str, str] | None
) -> tuple[bool, list[str]]:
    """(passed, one line per check) for the metric floor and no regression vs the alias."""
    gate = config.promote
    value = _metric(candidate, gate.metric)
    checks, passed = [], value >= gate.min_value
    checks.append(f"{gate.metric}={value:.4f} {'>=' if passed else '<'} floor {gate.min_value}")
    if current is None:
        checks.append(f"no current @{gate.alias}: nothing to regress against")
    elif all(candidate.get(t) == current.get(t) for t in tags.EVAL_ROWS_TAGS):
        incumbent = _metric(current, gate.metric)
        ok = value >= incumbent - gate.max_regression
        passed = passed and ok
        checks.append(
            f"{gate.metric}={value:.4f} vs @{gate.alias} {incumbent:.4f} "
            f"({'within' if ok else 'beyond'} max_regression {gate.max_regression})"
        )
    else:
        checks.append(f"@{gate.alias} was evaluated on other rows: regression check skipped")
    return passed, checks


def _metric(version_tags: dict[str, str], metric: str) -> float:
    try:
        value = tags.read_metric(version_tags, metric)
    except ValueError as exc:  # a tag that is not a number cannot pass a gate
        raise GateRefused(str(exc)) from None
    if value is None:
        raise GateRefused(
            f"the version has no {tags.metric_tag(metric)} tag; set promote.metric to a "
            "metric the training run reported, e.g. val_accuracy"
        )
    return value


def _newest_version(client, name: str) -> str:
    versions = client.search_model_versions(f"name='{name}'")
    if not versions:
        raise LookupError(f"model {name!r} has no registered versions; run raylift finetune")
    return str(max(int(v.version) for v in versions))


if __name__ == "__main__":
    from jobs.cli import run_job

    run_job(main, __doc__)
