"""`raylift promote` against a real MLflow registry (SQLite in a temp dir, no Ray): a refused
candidate leaves the alias where it was and records the verdict; a promotion keeps the old
target under @previous, which still resolves to its own checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs import promote, tracking
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
        metrics = {"val_accuracy": accuracy, "epoch": 1}
        return tracking.register(config, run_id, checkpoint, version_tags, metrics)


def _aliases(config) -> dict[str, str]:
    from mlflow import MlflowClient

    model = MlflowClient().get_registered_model(config.registry.model_name)
    return {alias: str(version) for alias, version in model.aliases.items()}


def _verdict(config, version: str) -> str | None:
    from mlflow import MlflowClient

    found = MlflowClient().get_model_version(config.registry.model_name, version)
    return found.tags.get(tags.gate_tag(config.promote.alias))


def test_a_regression_is_refused_and_the_alias_stays(tracking_uri, tmp_path):
    config = _config(tracking_uri, "refuse-regression")
    first = _register(config, tmp_path, 0.90, "v1")
    assert promote.main(config, version=first).previous_version is None
    worse = _register(config, tmp_path, 0.85, "v2")
    with pytest.raises(promote.GateRefused, match="not promoted to @production.*beyond"):
        promote.main(config, version=worse)
    assert _aliases(config) == {"production": first}
    assert (_verdict(config, first), _verdict(config, worse)) == ("passed", "refused")


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


def test_a_regression_on_other_rows_is_not_compared(tracking_uri, tmp_path):
    config = _config(tracking_uri, "other-rows")
    first = _register(config, tmp_path, 0.95, "v1")
    promote.main(config, version=first)
    other = _register(config, tmp_path, 0.80, "v2", **{tags.ICEBERG_SNAPSHOT_ID: "2"})
    result = promote.main(config, version=other)
    assert "regression check skipped" in result.checks[1]
    assert _aliases(config) == {"production": other, "previous": first}
