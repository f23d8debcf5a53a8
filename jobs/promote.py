"""Gate a registered version and, if it passes, move the alias (the old target kept as @previous).

python -m jobs.promote --config configs/banking77/minilm_lora.yaml

The gates: the metric's floor (or ceiling, promote.mode=min), the allow-list of base models, no
regression against the current alias and no slice dropping more than promote.max_slice_drop.
The candidate and the incumbent are always compared on the same rows: their stored figures
when both were evaluated on the same table snapshot and split, else both are evaluated again on
the candidate's validation rows (jobs.reevaluate: a classifier's accuracy and macro-F1, a causal
LM's val_loss and val_perplexity), which per-slice figures always need. Every
gate's verdict, value, threshold and time is tagged on the candidate. Right before the alias
moves, the incumbent is read again: if another promote moved it meanwhile, this one refuses.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from jobs.config import LifecycleConfig
from serving import registry, tags

__all__ = [
    "Comparison",
    "Figures",
    "GateCheck",
    "GateRefused",
    "PromoteResult",
    "evaluate_gates",
    "main",
]


class GateRefused(ValueError):
    """The candidate did not pass the promotion gates; the alias was not moved."""


@dataclass(frozen=True)
class GateCheck:
    """One gate's result, as printed and as tagged on the candidate."""

    gate: str  # floor, base_model, regression, slice.<name>, incumbent_unchanged
    passed: bool
    value: str
    threshold: str
    line: str

    def __str__(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'} {self.gate}: {self.line}"


@dataclass(frozen=True)
class Figures:
    """What the regression gates compare for one version, on the comparison's rows."""

    metric: float
    slices: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Comparison:
    """Candidate and incumbent figures measured on the same rows."""

    incumbent_version: str
    rows: str  # which rows, for the verdict lines
    candidate: Figures
    incumbent: Figures


@dataclass
class PromoteResult:
    model_name: str
    version: str
    alias: str
    metric: str
    value: float
    previous_version: str | None
    checks: list[str] = field(default_factory=list)


def main(
    config: LifecycleConfig,
    version: str | None = None,
    *,
    best_of: str | None = None,
    before_alias_move: Callable[[], None] | None = None,
) -> PromoteResult:
    """Gate `version` (default: the newest; with `best_of`, the winner a tune run registered)
    and move promote.alias to it.

    `before_alias_move` runs between the gates and the alias move (tests use it to race)."""
    client = _client(config)
    candidate = _candidate(client, config.registry.model_name, version, best_of)
    incumbent = registry.get_alias_version(config.registry.model_name, config.promote.alias)
    checks = _gate(config, candidate, incumbent)
    previous = None
    if all(c.passed for c in checks):
        if before_alias_move is not None:
            before_alias_move()
        previous, moved = _move_alias(config, str(candidate.version), incumbent)
        checks.append(moved)
    _record_verdicts(config, str(candidate.version), checks)  # raises unless all passed
    _tell_serving(config)
    return _result(config, candidate, previous, checks)


def _tell_serving(config: LifecycleConfig) -> None:
    """A running Serve app for this model follows the alias now (best effort, never fails)."""
    from serving.app import tell_running_app

    tell_running_app(config)


def _client(config: LifecycleConfig) -> Any:
    from mlflow import MlflowClient

    registry.configure_tracking(config.registry.tracking_uri)
    return MlflowClient()


def evaluate_gates(
    config: LifecycleConfig, candidate: Mapping[str, str], comparison: Comparison | None
) -> list[GateCheck]:
    """Every gate's result for a candidate (its tags), against `comparison` (None: no other
    version holds the alias, so there is nothing to regress against)."""
    checks = [_bound_check(config, candidate)] if config.promote.bound is not None else []
    if config.promote.allowed_base_models:
        checks.append(_base_model_check(config, candidate))
    checks.append(_regression_check(config, comparison))
    if config.promote.slices:
        checks += _slice_checks(config, comparison)
    return checks


def _bound_check(config: LifecycleConfig, candidate: Mapping[str, str]) -> GateCheck:
    gate = config.promote
    value, bound = _metric(candidate, gate.metric), gate.bound
    if gate.mode == "max":
        ok, word = value >= bound, ">=" if value >= bound else "<"
        line = f"{gate.metric}={value:.4f} {word} floor {bound}"
    else:
        ok, word = value <= bound, "<=" if value <= bound else ">"
        line = f"{gate.metric}={value:.4f} {word} ceiling {bound}"
    return GateCheck("floor", ok, tags.format_metric(value), str(bound), line)


def _base_model_check(config: LifecycleConfig, candidate: Mapping[str, str]) -> GateCheck:
    allowed = config.promote.allowed_base_models
    base = candidate.get(tags.BASE_MODEL, "")
    ok = base in allowed
    line = (
        f"base model {base or '(untagged)'!r} {'is' if ok else 'is not'} in "
        f"promote.allowed_base_models {allowed}"
        + ("" if ok else "; retrain on an allowed base, or add it to the list")
    )
    return GateCheck("base_model", ok, base, ",".join(allowed), line)


def _regression_check(config: LifecycleConfig, comparison: Comparison | None) -> GateCheck:
    gate = config.promote
    if comparison is None:
        return GateCheck(
            "regression", True, "", "", f"no other version at @{gate.alias}: nothing to regress"
        )
    value, incumbent = comparison.candidate.metric, comparison.incumbent.metric
    limit = (
        incumbent - gate.max_regression if gate.mode == "max" else incumbent + gate.max_regression
    )
    ok = value >= limit if gate.mode == "max" else value <= limit
    line = (
        f"{gate.metric}={value:.4f} vs @{gate.alias} (version {comparison.incumbent_version}) "
        f"{incumbent:.4f} on {comparison.rows} "
        f"({'within' if ok else 'beyond'} max_regression {gate.max_regression})"
    )
    return GateCheck("regression", ok, tags.format_metric(value), tags.format_metric(limit), line)


def _slice_checks(config: LifecycleConfig, comparison: Comparison | None) -> list[GateCheck]:
    if comparison is None:
        return []  # the regression line already says there is nothing to compare against
    drop = config.promote.max_slice_drop
    checks = []
    for name in sorted(set(comparison.incumbent.slices) | set(comparison.candidate.slices)):
        value = comparison.candidate.slices.get(name, 0.0)
        incumbent = comparison.incumbent.slices.get(name, 0.0)
        ok = value >= incumbent - drop
        line = (
            f"slice {name!r} accuracy {value:.4f} vs @{config.promote.alias} {incumbent:.4f} "
            f"({'within' if ok else 'beyond'} max_slice_drop {drop})"
        )
        threshold = tags.format_metric(incumbent - drop)
        checks.append(GateCheck(f"slice.{name}", ok, tags.format_metric(value), threshold, line))
    return checks


def _gate(config: LifecycleConfig, candidate: Any, incumbent: Any) -> list[GateCheck]:
    """evaluate_gates, with a comparison that could not be made recorded as a failed check."""
    try:
        comparison = _comparison(config, candidate, incumbent)
    except GateRefused as exc:  # no figures on shared rows: refused, never skipped
        own = evaluate_gates(config, candidate.tags, None)
        failed = GateCheck("regression", False, "", "", str(exc))
        return [*(c for c in own if c.gate != "regression"), failed]
    return evaluate_gates(config, candidate.tags, comparison)


def _comparison(config: LifecycleConfig, candidate: Any, incumbent: Any) -> Comparison | None:
    """Both versions' figures on the same rows: stored when comparable, else re-evaluated."""
    if incumbent is None or str(incumbent.version) == str(candidate.version):
        return None
    if _same_rows(candidate.tags, incumbent.tags) and not config.promote.slices:
        metric = config.promote.metric
        return Comparison(
            incumbent_version=str(incumbent.version),
            rows="the same validation rows (stored figures)",
            candidate=Figures(_metric(candidate.tags, metric)),
            incumbent=Figures(_metric(incumbent.tags, metric)),
        )
    return _reevaluated(config, candidate, incumbent)


def _same_rows(candidate: Mapping[str, str], incumbent: Mapping[str, str]) -> bool:
    return all(
        candidate.get(t) and candidate.get(t) == incumbent.get(t) for t in tags.EVAL_ROWS_TAGS
    )


def _reevaluated(config: LifecycleConfig, candidate: Any, incumbent: Any) -> Comparison:
    """Evaluate both versions on the candidate's validation rows; tag the figures on both."""
    from jobs import reevaluate

    metric = config.promote.metric
    measured = reevaluate.reevaluated_metrics(config.task.type)  # causal-lm: loss, perplexity
    if metric not in measured:
        raise GateRefused(
            f"@{config.promote.alias} (version {incumbent.version}) was evaluated on other rows "
            f"or per slice, and promote.metric={metric} cannot be measured again; set "
            f"promote.metric to one of {', '.join(measured)}"
        )
    try:
        rows = reevaluate.EvalRows.from_tags(candidate.tags)
    except ValueError as exc:
        raise GateRefused(str(exc)) from None
    versions = [str(candidate.version), str(incumbent.version)]
    found = reevaluate.reevaluate(config, versions, rows)
    for version, evaluation in found.items():
        _record_reevaluation(config, version, rows.describe(), evaluation)
    figures = {v: Figures(e.metrics[metric], e.slices) for v, e in found.items()}
    return Comparison(
        incumbent_version=versions[1],
        rows=f"{rows.describe()} (both re-evaluated, {found[versions[0]].rows} rows)",
        candidate=figures[versions[0]],
        incumbent=figures[versions[1]],
    )


def _record_reevaluation(config: LifecycleConfig, version: str, rows: str, evaluation) -> None:
    figures = {
        **{name: tags.format_metric(value) for name, value in evaluation.metrics.items()},
        **{f"slice.{n}": tags.format_metric(v) for n, v in evaluation.slices.items()},
        "rows": rows,
        "row_count": str(evaluation.rows),
        **({"token_count": str(evaluation.tokens)} if evaluation.tokens is not None else {}),
        "at": _now(),
    }
    _set_tags(config, version, {tags.reevaluated_tag(k): v for k, v in figures.items()})


def _move_alias(config: LifecycleConfig, version: str, seen: Any) -> tuple[str | None, GateCheck]:
    """Move the alias unless it changed since the gates read it (another promote won).

    MLflow offers no compare-and-set on aliases, so this re-read narrows the race to the
    moment between this read and the write below (milliseconds), where the gates took seconds
    to minutes; two promotes landing inside that moment would still both move it."""
    name, alias = config.registry.model_name, config.promote.alias
    now = registry.get_alias_version(name, alias)
    before = str(seen.version) if seen is not None else "none"
    after = str(now.version) if now is not None else "none"
    if after != before:
        line = (
            f"@{alias} moved from version {before} to {after} while the gates ran (another "
            f"promote won); run raylift promote again to gate against the new @{alias}"
        )
        return None, GateCheck("incumbent_unchanged", False, after, before, line)
    previous = registry.set_alias(name, alias, version)
    line = f"@{alias} was still version {before} when it moved"
    return previous, GateCheck("incumbent_unchanged", True, after, before, line)


def _record_verdicts(config: LifecycleConfig, version: str, checks: list[GateCheck]) -> None:
    """Tag every check on the candidate; raise GateRefused, listing them, if one failed."""
    alias = config.promote.alias
    passed = all(c.passed for c in checks)
    at = _now()
    recorded = {tags.gate_tag(alias): "passed" if passed else "refused"}
    for check in checks:
        fields = ("refused" if not check.passed else "passed", check.value, check.threshold, at)
        for name, value in zip(tags.GATE_FIELDS, fields, strict=True):
            recorded[tags.gate_check_tag(alias, check.gate, name)] = value
    _set_tags(config, version, recorded)
    if not passed:
        raise GateRefused(
            f"{config.registry.model_name} version {version} not promoted to @{alias}; "
            "the alias was not moved:\n" + "\n".join(f"  {c}" for c in checks)
        )


def _set_tags(config: LifecycleConfig, version: str, values: dict[str, str]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    for key, value in values.items():
        client.set_model_version_tag(config.registry.model_name, version, key, value)


def _result(
    config: LifecycleConfig, candidate: Any, previous: str | None, checks: list[GateCheck]
) -> PromoteResult:
    gate = config.promote
    return PromoteResult(
        model_name=config.registry.model_name,
        version=str(candidate.version),
        alias=gate.alias,
        metric=gate.metric,
        value=_metric(candidate.tags, gate.metric),
        previous_version=previous,
        checks=[str(c) for c in checks],
    )


def _metric(version_tags: Mapping[str, str], metric: str) -> float:
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


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _candidate(client: Any, name: str, version: str | None, best_of: str | None) -> Any:
    if version and best_of:
        raise ValueError("give --version or --best-of, not both")
    if best_of:
        version = _tune_winner(client, name, best_of)
    return client.get_model_version(name, version or _newest_version(client, name))


def _tune_winner(client: Any, name: str, parent_run_id: str) -> str:
    """The version `raylift tune` registered from the search whose MLflow parent run is this."""
    found = [
        int(v.version)
        for v in client.search_model_versions(f"name='{name}'")
        if v.tags.get(tags.TUNE_PARENT_RUN_ID) == parent_run_id
    ]
    if not found:
        raise LookupError(
            f"no version of {name!r} was registered by a tune run with parent run id "
            f"{parent_run_id!r}; pass the parent_run_id raylift tune printed, or --version N"
        )
    return str(max(found))


def _newest_version(client: Any, name: str) -> str:
    versions = client.search_model_versions(f"name='{name}'")
    if not versions:
        raise LookupError(f"model {name!r} has no registered versions; run raylift finetune")
    return str(max(int(v.version) for v in versions))


if __name__ == "__main__":
    from jobs.cli import run_job

    run_job(main, __doc__)
