"""`raylift promote` against a real MLflow registry (SQLite in a temp dir, no Ray): a refused
candidate leaves the alias where it was and records the verdict; a promotion keeps the old
target under @previous, which still resolves to its own checkpoint."""

from __future__ import annotations

import datetime
import threading
import time
from pathlib import Path

import pytest
import yaml

from jobs import cli, demo, promote, rollback, tracking
from jobs.config import validate_mapping
from serving import registry, tags

SAME_ROWS = {
    tags.ICEBERG_TABLE: "support.tickets",
    tags.ICEBERG_SNAPSHOT_ID: "1",
    tags.VALIDATION_SPLIT: "fraction=0.1,seed=17",
}


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    # One database for the module (creating one costs seconds); each test has its own model.
    return f"sqlite:///{tmp_path_factory.mktemp('registry')}/mlflow.db"


def _config(tracking_uri: str, model: str, **gate):
    return validate_mapping(
        {
            "name": "promote-test",
            "registry": {"tracking_uri": tracking_uri, "model_name": model},
            "promote": {"min_value": 0.5, "max_regression": 0.01, **gate},
        }
    )


def _register(config, tmp_path: Path, accuracy: float, marker: str, **lineage) -> str:
    """A version whose artifact is a tiny directory naming it, with lineage and metric tags."""
    checkpoint = tmp_path / marker
    checkpoint.mkdir()
    (checkpoint / "marker.txt").write_text(marker)
    version_tags = {**SAME_ROWS, **lineage}
    with tracking.tracked_run(config, version_tags) as run_id:
        metrics = {"val_accuracy": accuracy, "val_loss": 1 - accuracy, "epoch": 1}
        return tracking.register(config, run_id, checkpoint, version_tags, metrics)


def _aliases(config) -> dict[str, str]:
    from mlflow import MlflowClient

    model = MlflowClient().get_registered_model(config.registry.model_name)
    return {alias: str(version) for alias, version in model.aliases.items()}


def _version_tags(config, version: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return MlflowClient().get_model_version(config.registry.model_name, version).tags


def _verdict(config, version: str) -> str | None:
    from mlflow import MlflowClient

    found = MlflowClient().get_model_version(config.registry.model_name, version)
    return found.tags.get(tags.gate_tag(config.promote.alias))


def test_a_regression_is_refused_and_the_alias_stays(tracking_uri, tmp_path):
    config = _config(tracking_uri, "refuse-regression")
    first = _register(config, tmp_path, 0.90, "v1")
    assert promote.main(config, version=first).previous_version is None
    worse = _register(config, tmp_path, 0.85, "v2")
    with pytest.raises(promote.GateRefused, match="(?s)not promoted to @production.*beyond"):
        promote.main(config, version=worse)
    assert _aliases(config) == {"production": first}
    assert (_verdict(config, first), _verdict(config, worse)) == ("passed", "refused")


def test_the_demo_goes_on_with_production_when_its_new_version_is_refused(tracking_uri, tmp_path):
    """`make demo` run again: a retrained candidate the gates refuse leaves @production where
    it was, and the demo keeps that version instead of failing; with nothing in production,
    the refusal stands."""
    config = _config(tracking_uri, "demo-again")
    first = _register(config, tmp_path, 0.90, "v1")
    assert demo.promote_or_keep(config, first) is None
    worse = _register(config, tmp_path, 0.85, "v2")
    refused = demo.promote_or_keep(config, worse)
    assert refused and "FAIL regression" in refused, refused
    assert _aliases(config) == {"production": first}
    assert _verdict(config, worse) == "refused"

    alone = _config(tracking_uri, "demo-first", min_value=0.95)
    under = _register(alone, tmp_path, 0.90, "u1")
    with pytest.raises(promote.GateRefused, match="FAIL floor"):
        demo.promote_or_keep(alone, under)
    assert _aliases(alone) == {}


def test_a_first_version_under_the_floor_is_refused_and_no_alias_is_set(tracking_uri, tmp_path):
    config = _config(tracking_uri, "refuse-floor")
    version = _register(config, tmp_path, 0.30, "v1")
    with pytest.raises(promote.GateRefused, match="val_accuracy=0.3000 < floor 0.5"):
        promote.main(config)  # no --version: the newest
    assert _aliases(config) == {}
    assert _verdict(config, version) == "refused"


def test_promotion_keeps_the_old_version_under_previous(tracking_uri, tmp_path):
    config = _config(tracking_uri, "keep-previous")
    first = _register(config, tmp_path, 0.90, "v1")
    promote.main(config, version=first)
    second = _register(config, tmp_path, 0.92, "v2")
    result = promote.main(config)  # no --version: the newest, v2
    assert (result.version, result.previous_version) == (second, first)
    assert _aliases(config) == {"production": second, "previous": first}
    name = config.registry.model_name
    for alias, marker in (("production", "v2"), ("previous", "v1")):
        resolved = registry.resolve_model(f"models:/{name}@{alias}", tracking_uri)
        assert (Path(resolved.path) / "marker.txt").read_text() == marker


def test_promoting_the_current_version_again_does_not_overwrite_previous(tracking_uri, tmp_path):
    config = _config(tracking_uri, "promote-twice")
    first = _register(config, tmp_path, 0.90, "v1")
    promote.main(config, version=first)
    second = _register(config, tmp_path, 0.91, "v2")
    promote.main(config, version=second)
    promote.main(config, version=second)
    assert _aliases(config) == {"production": second, "previous": first}


def test_other_rows_are_never_skipped_a_metric_that_cannot_be_remeasured_is_refused(
    tracking_uri, tmp_path
):
    config = _config(tracking_uri, "other-rows")
    first = _register(config, tmp_path, 0.95, "v1")
    promote.main(config, version=first)
    other = _register(config, tmp_path, 0.80, "v2", **{tags.ICEBERG_SNAPSHOT_ID: "2"})
    loss = _config(tracking_uri, "other-rows", metric="val_loss", min_value=None, mode="min")
    with pytest.raises(promote.GateRefused, match="promote.metric=val_loss cannot be measured"):
        promote.main(loss, version=other)
    assert _aliases(config) == {"production": first}
    verdict = tags.gate_check_tag("production", "regression", "verdict")
    assert _version_tags(config, other)[verdict] == "refused"


def test_a_causal_lm_on_other_rows_is_gated_on_the_perplexity_measured_again(
    tracking_uri, tmp_path, monkeypatch
):
    """The wiring around jobs.reevaluate (which needs Ray: the real measurement is
    tests/integration/test_promote_reevaluate_causal_lm.py): both versions measured on the
    candidate's rows, the figures tagged on both, the gate in mode min decided by them."""
    from jobs import reevaluate

    config = validate_mapping(
        {
            "name": "promote-lm",
            "task": {"type": "causal-lm"},
            "registry": {"tracking_uri": tracking_uri, "model_name": "lm-other-rows"},
            "promote": {"metric": "val_perplexity", "mode": "min", "max_value": 100.0},
        }
    )
    measured = {}  # version → perplexity on the candidate's rows
    asked = []

    def fake_reevaluate(cfg, versions, rows, trained_on):
        asked.append((versions, rows, trained_on))
        return {
            v: reevaluate.Evaluation(
                rows=7,
                metrics={"val_loss": 0.0, "val_perplexity": measured[v]},
                tokens=40,
            )
            for v in versions
        }

    monkeypatch.setattr(reevaluate, "reevaluate", fake_reevaluate)

    def register(perplexity: float, marker: str, snapshot: str) -> str:
        checkpoint = tmp_path / marker
        checkpoint.mkdir()
        lineage = {**SAME_ROWS, tags.ICEBERG_SNAPSHOT_ID: snapshot}
        with tracking.tracked_run(config, lineage) as run_id:
            metrics = {"val_perplexity": perplexity, "val_loss": 0.0}
            return tracking.register(config, run_id, checkpoint, lineage, metrics)

    first = register(5.0, "v1", "1")
    promote.main(config, version=first)
    # Stored 9.0 against the incumbent's stored 5.0 would refuse; on the same rows it is better.
    better = register(9.0, "v2", "2")
    measured.update({first: 12.0, better: 8.0})
    result = promote.main(config, version=better)
    rows = {n: reevaluate.EvalRows("support.tickets", n, 0.1, 17) for n in (1, 2, 3)}
    assert asked == [([better, first], rows[2], rows[1])]  # less what the incumbent trained on
    assert _aliases(config) == {"production": better, "previous": first}
    assert any(c.startswith("PASS regression: val_perplexity=8.0000 vs") for c in result.checks)
    for version, figure in ((first, "12.000000"), (better, "8.000000")):
        found = _version_tags(config, version)
        assert found[tags.reevaluated_tag("val_perplexity")] == figure
        assert found[tags.reevaluated_tag("token_count")] == "40"
        assert found[tags.reevaluated_tag("rows")] == (
            "support.tickets@2 validation fraction=0.1,seed=17"
        )
    # Stored 2.0 looks best of all; measured on its rows it is worse than @production.
    worse = register(2.0, "v3", "3")
    measured.update({better: 8.0, worse: 8.5})
    with pytest.raises(promote.GateRefused, match=r"FAIL regression: val_perplexity=8\.5000 vs"):
        promote.main(config, version=worse)
    assert asked[-1] == ([worse, better], rows[3], rows[2])
    assert _aliases(config) == {"production": better, "previous": first}
    verdict = tags.gate_check_tag("production", "regression", "verdict")
    assert _version_tags(config, worse)[verdict] == "refused"


def _config_file(config, tmp_path: Path) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude={"tune"})))
    return str(path)


def test_a_refusal_through_the_cli_exits_non_zero_prints_and_tags_every_verdict(
    tracking_uri, tmp_path, capsys
):
    config = _config(tracking_uri, "refuse-cli", min_value=0.8)
    version = _register(config, tmp_path, 0.75, "v1")
    before = time.time()
    assert cli.main(["promote", "--config", _config_file(config, tmp_path)]) == 1
    err = capsys.readouterr().err
    assert (
        "not promoted to @production" in err
        and "FAIL floor: val_accuracy=0.7500 < floor 0.8" in err
    )
    assert "PASS regression: no other version at @production" in err
    assert _aliases(config) == {}
    found = _version_tags(config, version)
    floor = {f: found[tags.gate_check_tag("production", "floor", f)] for f in tags.GATE_FIELDS}
    assert (floor["verdict"], floor["value"], floor["threshold"]) == ("refused", "0.750000", "0.8")
    stamped = datetime.datetime.fromisoformat(floor["at"]).timestamp()
    assert before - 1 <= stamped <= time.time() + 1
    assert found[tags.gate_tag("production")] == "refused"


def test_a_base_model_not_allowed_is_refused(tracking_uri, tmp_path):
    config = _config(tracking_uri, "base-allow", allowed_base_models=["all-MiniLM-L6-v2"])
    version = _register(config, tmp_path, 0.95, "v1", **{tags.BASE_MODEL: "bert-large"})
    with pytest.raises(promote.GateRefused, match="'bert-large' is not in promote.allowed_base"):
        promote.main(config, version=version)
    assert _aliases(config) == {}
    verdict = tags.gate_check_tag("production", "base_model", "verdict")
    assert _version_tags(config, version)[verdict] == "refused"
    allowed = _register(config, tmp_path, 0.95, "v2", **{tags.BASE_MODEL: "all-MiniLM-L6-v2"})
    promote.main(config, version=allowed)
    assert _aliases(config) == {"production": allowed}


def test_a_promote_whose_incumbent_moved_while_its_gates_ran_is_refused(tracking_uri, tmp_path):
    config = _config(tracking_uri, "moved-meanwhile")
    first = _register(config, tmp_path, 0.90, "v1")
    promote.main(config, version=first)
    slow = _register(config, tmp_path, 0.91, "v2")
    fast = _register(config, tmp_path, 0.92, "v3")
    won = []

    def the_other_promote_lands_first():  # runs after slow's gates, before its alias lock
        won.append(promote.main(config, version=fast).version)

    with pytest.raises(promote.GateRefused, match="moved from version 1 to 3 while the gates ran"):
        promote.main(config, version=slow, before_alias_move=the_other_promote_lands_first)
    assert won == [fast]
    assert _aliases(config) == {"production": fast, "previous": first}
    assert _verdict(config, slow) == "refused" and _verdict(config, fast) == "passed"
    check = tags.gate_check_tag("production", "incumbent_unchanged", "verdict")
    assert _version_tags(config, slow)[check] == "refused"


def test_of_two_racing_promotes_exactly_one_wins(tracking_uri, tmp_path, monkeypatch):
    """B starts inside A's window: A has re-read @production (version 1) and is about to move
    it. Without the alias lock B, gated against version 1 too, moved it in that window, and A
    then overwrote B without ever being gated against it (review 36, finding 2). With it, B
    waits for A's move, reads @production again and is refused."""
    config = _config(tracking_uri, "race")
    first = _register(config, tmp_path, 0.90, "v1")
    promote.main(config, version=first)
    a = _register(config, tmp_path, 0.905, "v2")
    b = _register(config, tmp_path, 0.95, "v3")
    real_move = registry.move_alias
    outcome: dict[str, object] = {}

    def promote_b() -> None:
        try:
            outcome["B"] = promote.main(config, version=b).version
        except promote.GateRefused as exc:
            outcome["B"] = exc

    def b_runs_inside_as_window(name, alias, version, current):
        if version == a and "thread" not in outcome:
            thread = outcome["thread"] = threading.Thread(target=promote_b)
            thread.start()
            thread.join(timeout=3)  # ample for B's stored-figure gates and its move
            outcome["B finished inside A's window"] = not thread.is_alive()
        return real_move(name, alias, version, current)

    monkeypatch.setattr(registry, "move_alias", b_runs_inside_as_window)
    assert promote.main(config, version=a).previous_version == first
    outcome["thread"].join(timeout=60)

    assert outcome["B finished inside A's window"] is False
    assert isinstance(outcome["B"], promote.GateRefused)
    assert "moved from version 1 to 2 while the gates ran" in str(outcome["B"])
    assert _aliases(config) == {"production": a, "previous": first}
    assert _verdict(config, a) == "passed" and _verdict(config, b) == "refused"


def test_rollback_moves_production_back_records_why_and_only_once(tracking_uri, tmp_path, capsys):
    config = _config(tracking_uri, "rollback")
    first = _register(config, tmp_path, 0.90, "v1")
    promote.main(config, version=first)
    second = _register(config, tmp_path, 0.91, "v2")
    promote.main(config, version=second)
    path = _config_file(config, tmp_path)
    assert cli.main(["rollback", "--config", path, "--reason", "cards slice broke"]) == 0
    assert _aliases(config) == {"production": first}
    for version, role in ((first, "restored"), (second, "rolled_back")):
        found = _version_tags(config, version)
        assert found[tags.rollback_tag("production", "role")] == role
        assert found[tags.rollback_tag("production", "reason")] == "cards slice broke"
        assert datetime.datetime.fromisoformat(found[tags.rollback_tag("production", "at")])
    capsys.readouterr()
    assert cli.main(["rollback", "--config", path]) == 1
    assert "has no @previous: nothing to roll @production back to" in capsys.readouterr().err
    assert _aliases(config) == {"production": first}
    resolved = registry.resolve_model(f"models:/{config.registry.model_name}@production")
    assert (Path(resolved.path) / "marker.txt").read_text() == "v1"


def test_rollback_without_a_previous_version_is_refused(tracking_uri, tmp_path):
    config = _config(tracking_uri, "rollback-none")
    only = _register(config, tmp_path, 0.90, "v1")
    promote.main(config, version=only)
    with pytest.raises(LookupError, match="promote the version you want with raylift promote"):
        rollback.main(config, reason="x")
    assert _aliases(config) == {"production": only}


def test_best_of_promotes_the_winner_a_tune_run_registered(tracking_uri, tmp_path, capsys):
    config = _config(tracking_uri, "best-of")
    winner = _register(config, tmp_path, 0.93, "v1", **{tags.TUNE_PARENT_RUN_ID: "parent-a"})
    _register(config, tmp_path, 0.94, "v2")  # newer, but not from that search
    path = _config_file(config, tmp_path)
    assert cli.main(["promote", "--config", path, "--best-of", "parent-b"]) == 1
    assert "no version of 'best-of' was registered by a tune run" in capsys.readouterr().err
    assert cli.main(["promote", "--config", path, "--best-of", "parent-a"]) == 0
    assert _aliases(config) == {"production": winner}


def _fail_once(monkeypatch, method: str, alias: str | None = None) -> list[tuple]:
    """Make one MlflowClient write (for `alias`, if given) raise once, as a locked database or
    a killed server would, in front of the real store; returns the failed calls."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    real, failed = getattr(MlflowClient, method), []

    def once(self, *args):
        if not failed and (alias is None or alias in args):
            failed.append(args)
            raise MlflowException("simulated: database is locked")
        return real(self, *args)

    monkeypatch.setattr(MlflowClient, method, once)
    return failed


@pytest.mark.parametrize("step", ["set_registered_model_alias", "delete_registered_model_alias"])
def test_a_rollback_that_fails_half_way_loses_nothing_and_a_retry_completes_it(
    tracking_uri, tmp_path, monkeypatch, step
):
    """The write of @production, or the delete of @previous after it, fails once: the good
    version stays under an alias, and the rollback run again ends as one that never failed
    (review 36, finding 1: the @production write failing left no alias on the good version,
    and the retry "rolled back" from the bad version to itself)."""
    config = _config(tracking_uri, f"rollback-fails-{step.split('_')[0]}")
    good = _register(config, tmp_path, 0.90, "v1")
    promote.main(config, version=good)
    bad = _register(config, tmp_path, 0.91, "v2")
    promote.main(config, version=bad)
    failed = _fail_once(monkeypatch, step)

    with pytest.raises(Exception, match="simulated: database is locked"):
        rollback.main(config, reason="cards slice broke")
    assert failed and good in _aliases(config).values()
    result = rollback.main(config)  # the retry completes the noted rollback, its reason kept

    assert (result.version, result.rolled_back_version) == (good, bad)
    assert result.reason == "cards slice broke"
    assert _aliases(config) == {"production": good}
    for version, role in ((good, "restored"), (bad, "rolled_back")):
        found = _version_tags(config, version)
        assert found[tags.rollback_tag("production", "role")] == role
        assert found[tags.rollback_tag("production", "reason")] == "cards slice broke"
    with pytest.raises(LookupError, match="has no @previous"):
        rollback.main(config)


def test_a_promote_that_fails_between_its_alias_writes_keeps_the_incumbent_and_retries(
    tracking_uri, tmp_path, monkeypatch
):
    """@previous is written first: the @production write failing leaves both on the incumbent
    (still served, still named), serving is told anyway, a rollback finds nothing to go back
    to, and the promote run again completes the move."""
    config = _config(tracking_uri, "promote-fails")
    first = _register(config, tmp_path, 0.90, "v1")
    promote.main(config, version=first)
    second = _register(config, tmp_path, 0.92, "v2")
    _fail_once(monkeypatch, "set_registered_model_alias", alias="production")
    told = []
    monkeypatch.setattr(promote, "_tell_serving", lambda c: told.append(c.registry.model_name))

    with pytest.raises(
        registry.AliasMoveFailed,
        match=r"writing @production=version 2 .*failed .*simulated.*before it: @previous=1",
    ):
        promote.main(config, version=second)
    assert _aliases(config) == {"production": first, "previous": first}
    assert _verdict(config, second) == "pending" and told == ["promote-fails"]
    with pytest.raises(LookupError, match="@previous and @production .* both name version 1"):
        rollback.main(config)

    assert promote.main(config, version=second).previous_version == first
    assert _aliases(config) == {"production": second, "previous": first}
    assert _verdict(config, second) == "passed"


def test_the_verdicts_are_recorded_before_the_alias_moves_and_stamped_after(
    tracking_uri, tmp_path, monkeypatch
):
    from mlflow import MlflowClient

    config = _config(tracking_uri, "verdict-order")
    first = _register(config, tmp_path, 0.90, "v1")
    promote.main(config, version=first)
    second = _register(config, tmp_path, 0.92, "v2")
    events = []
    set_tag, set_alias = MlflowClient.set_model_version_tag, MlflowClient.set_registered_model_alias

    def tagged(self, name, version, key, value):
        if key == tags.gate_tag("production"):
            events.append(f"verdict {value}")
        elif key.startswith(tags.gate_tag("production") + ".") and key.endswith(".verdict"):
            events.append("check")
        return set_tag(self, name, version, key, value)

    def aliased(self, name, alias, version):
        events.append(f"@{alias}={version}")
        return set_alias(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_model_version_tag", tagged)
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", aliased)
    monkeypatch.setattr(promote, "_tell_serving", lambda c: events.append("serving told"))
    promote.main(config, version=second)

    checks = ["check"] * events.count("check")
    assert len(checks) == 3  # floor, regression, incumbent_unchanged
    assert events == [
        "verdict pending",
        *checks,
        f"@previous={first}",
        f"@production={second}",
        "verdict passed",
        "serving told",
    ]


def test_a_later_attempt_replaces_the_verdicts_of_an_earlier_one(tracking_uri, tmp_path):
    """Refused by the base-model gate, then passed with the allow-list emptied: the version
    keeps only the second attempt's checks, and the report shows those alone."""
    from jobs import report

    only_minilm = _config(tracking_uri, "attempts", allowed_base_models=["all-MiniLM-L6-v2"])
    version = _register(only_minilm, tmp_path, 0.95, "v1", **{tags.BASE_MODEL: "bert-large"})
    with pytest.raises(promote.GateRefused, match="FAIL base_model"):
        promote.main(only_minilm, version=version)
    promote.main(_config(tracking_uri, "attempts"), version=version)

    found = _version_tags(only_minilm, version)
    assert not [key for key in found if ".base_model." in key]
    overall, checks = report.gate_verdicts(found)["production"]
    assert overall == "passed"
    assert sorted(checks) == ["floor", "incumbent_unchanged", "regression"]
    assert {check["verdict"] for check in checks.values()} == {"passed"}


def test_promoting_a_version_that_does_not_exist_lists_those_that_do(
    tracking_uri, tmp_path, capsys
):
    config = _config(tracking_uri, "no-such-version")
    _register(config, tmp_path, 0.90, "v1")
    _register(config, tmp_path, 0.91, "v2")
    path = _config_file(config, tmp_path)
    assert cli.main(["promote", "--config", path, "--version", "7"]) == 1
    err = capsys.readouterr().err
    assert "model 'no-such-version' has no version '7'; its versions: 1, 2;" in err
    assert "Traceback" not in err and _aliases(config) == {}
