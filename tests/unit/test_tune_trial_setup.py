"""Trials run in their own working directory: what they are handed must not depend on the cwd."""

from __future__ import annotations

from jobs import tune
from jobs.config import LifecycleConfig, validate_mapping


def test_trials_get_the_drivers_absolute_tracking_uri(tmp_path, monkeypatch):
    driver_dir = tmp_path / "driver"
    driver_dir.mkdir()
    monkeypatch.chdir(driver_dir)
    config = validate_mapping(
        {
            "name": "t",
            "model": {"base": "all-MiniLM-L6-v2"},
            "registry": {"tracking_uri": "sqlite:///.raylift/mlflow.db", "experiment": "t"},
        }
    )
    setup = tune._trial_setup(config, {}, parent_run_id="parent", experiment="exp")

    expected = f"sqlite:///{driver_dir / '.raylift' / 'mlflow.db'}"
    assert setup.tracking_uri == expected
    # Tune chdirs a trial into its own folder before the trial resolves its config.
    trial_dir = tmp_path / "trial"
    trial_dir.mkdir()
    monkeypatch.chdir(trial_dir)
    trial_config = LifecycleConfig.model_validate(setup.base_config)
    assert trial_config.registry.tracking_uri == expected
    assert not (trial_dir / ".raylift").exists()
