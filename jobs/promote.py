"""Gate a registered version and, if it passes, move the alias (the old target kept as @previous).

python -m jobs.promote --config configs/banking77/minilm_lora.yaml

The gates: the metric's floor (or ceiling, promote.mode=min), the allow-list of base models, no
regression against the current alias and no slice dropping more than promote.max_slice_drop.
The candidate and the incumbent are always compared on the same rows: their stored figures
when both were evaluated on the same table snapshot and split, else both are evaluated again on
the candidate's validation rows (jobs.reevaluate: a classifier's accuracy and macro-F1, a causal
LM's val_loss and val_perplexity), which per-slice figures always need. Every
gate's verdict, value, threshold and time is tagged on the candidate, replacing the tags of any
earlier attempt; the overall verdict reads "pending" while the alias moves, then "passed".

The alias moves under serving.registry.alias_lock, which promote and rollback of one model both
hold: under it the incumbent is read again (if another promote moved it since the gates read
it, this one refuses), @previous is set to the version the gates judged against, @production to
the candidate, and both are read back.
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
    value: float | None  # the candidate's stored metric (None: not tagged, measured again)
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
    if not all(c.passed for c in checks):
        _record_verdicts(config, str(candidate.version), checks, overall="refused")
    if before_alias_move is not None:
        before_alias_move()
    previous = _move_alias(config, str(candidate.version), incumbent, checks)
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
    config: LifecycleConfig,
    candidate: Mapping[str, str],
    comparison: Comparison | None,
    version: str | None = None,
) -> list[GateCheck]:
    """Every gate's result for a candidate (its tags; `version`, its number, for messages),
    against `comparison` (None: no other version holds the alias, so there is nothing to
    regress against)."""
    bound = config.promote.bound is not None
    checks = [_bound_check(config, candidate, version)] if bound else []
    if config.promote.allowed_base_models:
        checks.append(_base_model_check(config, candidate))
    checks.append(_regression_check(config, comparison))
    if config.promote.slices:
        checks += _slice_checks(config, comparison)
    return checks


def _bound_check(
    config: LifecycleConfig, candidate: Mapping[str, str], version: str | None
) -> GateCheck:
    gate = config.promote
    value, bound = _metric(candidate, gate.metric, version), gate.bound
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
    version = str(candidate.version)
    try:
        comparison = _comparison(config, candidate, incumbent)
    except GateRefused as exc:  # no figures on shared rows: refused, never skipped
        own = evaluate_gates(config, candidate.tags, None, version)
        failed = GateCheck("regression", False, "", "", str(exc))
        return [*(c for c in own if c.gate != "regression"), failed]
    return evaluate_gates(config, candidate.tags, comparison, version)


def _comparison(config: LifecycleConfig, candidate: Any, incumbent: Any) -> Comparison | None:
    """Both versions' figures on the same rows: stored when comparable, else re-evaluated."""
    if incumbent is None or str(incumbent.version) == str(candidate.version):
        return None
    metric = config.promote.metric
    stored = all(_has_metric(v.tags, metric) for v in (candidate, incumbent))
    if stored and _same_rows(candidate.tags, incumbent.tags) and not config.promote.slices:
        return Comparison(
            incumbent_version=str(incumbent.version),
            rows="the same validation rows (stored figures)",
            candidate=Figures(_metric(candidate.tags, metric, str(candidate.version))),
            incumbent=Figures(_metric(incumbent.tags, metric, str(incumbent.version))),
        )
    return _reevaluated(config, candidate, incumbent)  # also for a figure one of them lacks


def _has_metric(version_tags: Mapping[str, str], metric: str) -> bool:
    return tags.metric_tag(metric) in version_tags


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
        trained_on = reevaluate.EvalRows.from_tags(incumbent.tags)
    except ValueError as exc:
        raise GateRefused(str(exc)) from None
    versions = [str(candidate.version), str(incumbent.version)]
    try:
        found = reevaluate.reevaluate(config, versions, rows, trained_on)
    except reevaluate.TooFewRows as exc:
        raise GateRefused(f"@{config.promote.alias} (version {versions[1]}): {exc}") from None
    for version, evaluation in found.items():
        _record_reevaluation(config, version, rows.describe(), evaluation)
    figures = {v: Figures(e.metrics[metric], e.slices) for v, e in found.items()}
    counted = found[versions[0]]
    return Comparison(
        incumbent_version=versions[1],
        rows=(
            f"{rows.describe()} (both re-evaluated, {counted.rows} rows; "
            f"{counted.dropped_rows} left out, trained on by version {versions[1]})"
        ),
        candidate=figures[versions[0]],
        incumbent=figures[versions[1]],
    )


def _record_reevaluation(config: LifecycleConfig, version: str, rows: str, evaluation) -> None:
    figures = {
        **{name: tags.format_metric(value) for name, value in evaluation.metrics.items()},
        **{f"slice.{n}": tags.format_metric(v) for n, v in evaluation.slices.items()},
        "rows": rows,
        "row_count": str(evaluation.rows),
        "rows_dropped": str(evaluation.dropped_rows),  # the incumbent trained on them
        **({"token_count": str(evaluation.tokens)} if evaluation.tokens is not None else {}),
        "at": _now(),
    }
    _set_tags(config, version, {tags.reevaluated_tag(k): v for k, v in figures.items()})


def _move_alias(
    config: LifecycleConfig, version: str, seen: Any, checks: list[GateCheck]
) -> str | None:
    """Under the model's alias lock: refuse if the alias moved since the gates read it (another
    promote won), else record the verdicts ("pending"), move the alias (the version the gates
    judged against kept as @previous), and stamp "passed". Serving is told once the alias may
    have moved, even if a later step fails. Returns the version kept as @previous."""
    name, alias = config.registry.model_name, config.promote.alias
    before = str(seen.version) if seen is not None else None
    moving = False
    try:
        with registry.alias_lock(name):
            checks.append(_incumbent_unchanged(config, before))
            passed = all(c.passed for c in checks)
            _record_verdicts(config, version, checks, overall="pending" if passed else "refused")
            moving = True
            registry.move_alias(name, alias, version, current=before)
            _set_tags(config, version, {tags.gate_tag(alias): "passed"})
    finally:
        if moving:
            _tell_serving(config)
    return before


def _incumbent_unchanged(config: LifecycleConfig, before: str | None) -> GateCheck:
    alias = config.promote.alias
    now = registry.get_alias_version(config.registry.model_name, alias)
    after = str(now.version) if now is not None else None
    shown = (before or "none", after or "none")
    if after != before:
        line = (
            f"@{alias} moved from version {shown[0]} to {shown[1]} while the gates ran "
            f"(another promote won); run raylift promote again to gate against the new @{alias}"
        )
        return GateCheck("incumbent_unchanged", False, shown[1], shown[0], line)
    line = f"@{alias} was still version {shown[0]} when it moved"
    return GateCheck("incumbent_unchanged", True, shown[1], shown[0], line)


def _record_verdicts(
    config: LifecycleConfig, version: str, checks: list[GateCheck], overall: str
) -> None:
    """Tag `overall` and every check on the candidate, in place of any earlier attempt's gate
    tags for the alias; raise GateRefused, listing the checks, if one failed.

    The overall verdict is written first, so a reader never sees an earlier attempt's verdict
    over this attempt's checks."""
    alias = config.promote.alias
    at = _now()
    recorded = {}
    for check in checks:
        fields = ("refused" if not check.passed else "passed", check.value, check.threshold, at)
        for name, value in zip(tags.GATE_FIELDS, fields, strict=True):
            recorded[tags.gate_check_tag(alias, check.gate, name)] = value
    _set_tags(config, version, {tags.gate_tag(alias): overall})
    _delete_gate_checks(config, version, keep=set(recorded))
    _set_tags(config, version, recorded)
    if not all(c.passed for c in checks):
        raise GateRefused(
            f"{config.registry.model_name} version {version} not promoted to @{alias}; "
            "the alias was not moved:\n" + "\n".join(f"  {c}" for c in checks)
        )


def _delete_gate_checks(config: LifecycleConfig, version: str, keep: set[str]) -> None:
    """Delete the alias's gate-check tags an earlier attempt left that this one does not write
    (a gate since dropped from the config, a slice comparison this attempt could not make)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    name, head = config.registry.model_name, tags.gate_tag(config.promote.alias) + "."
    for key in client.get_model_version(name, version).tags:
        if key.startswith(head) and key not in keep:
            client.delete_model_version_tag(name, version, key)


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
        value=_stored_metric(candidate.tags, gate.metric),
        previous_version=previous,
        checks=[str(c) for c in checks],
    )


def _metric(version_tags: Mapping[str, str], metric: str, version: str | None) -> float:
    try:
        value = tags.read_metric(version_tags, metric)
    except ValueError as exc:  # a tag that is not a number cannot pass a gate
        raise GateRefused(str(exc)) from None
    if value is None:
        raise GateRefused(
            f"{f'version {version}' if version else 'the candidate'} has no "
            f"{tags.metric_tag(metric)} tag; set promote.metric to a metric the training run "
            "reported, e.g. val_accuracy"
        )
    return value


def _stored_metric(version_tags: Mapping[str, str], metric: str) -> float | None:
    try:
        return tags.read_metric(version_tags, metric)
    except ValueError:  # the gates refused it already, or measured it again
        return None


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _candidate(client: Any, name: str, version: str | None, best_of: str | None) -> Any:
    if version and best_of:
        raise ValueError("give --version or --best-of, not both")
    if best_of:
        version = _tune_winner(client, name, best_of)
    if not version:
        return client.get_model_version(name, _newest_version(client, name))
    known = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    if not str(version).isdigit() or int(version) not in known:
        raise LookupError(
            f"model {name!r} has no version {version!r}; its versions: "
            f"{', '.join(map(str, known)) or 'none (run raylift finetune)'}; pass one of them "
            "as --version N, or leave --version out for the newest"
        )
    return client.get_model_version(name, str(version))


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
