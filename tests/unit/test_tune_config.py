"""The tune: section: a bad search space is a validation error naming the key and the fix."""

from __future__ import annotations

import sys

import pytest

from jobs.config import ConfigError, validate_mapping


def _config(search_space: dict, **tune) -> dict:
    return {
        "name": "tune-test",
        "train": {"epochs": 4},
        "tune": {"search_space": search_space, **tune},
    }


def _errors(search_space: dict, **tune) -> str:
    with pytest.raises(ConfigError) as raised:
        validate_mapping(_config(search_space, **tune))
    return str(raised.value)


def test_a_good_search_space_validates_every_kind():
    config = validate_mapping(
        _config(
            {
                "train.learning_rate": {"type": "loguniform", "low": "1e-4", "high": 3.0e-3},
                "train.head_learning_rate": {"type": "uniform", "low": 1.0e-3, "high": 1.0e-2},
                "model.lora.r": {"type": "randint", "low": 4, "high": 32},
                "train.batch_size": {"type": "choice", "values": [16, 32]},
            },
            num_samples=3,
        )
    )
    space = config.tune.search_space
    assert space["train.learning_rate"].low == pytest.approx(1e-4)  # YAML's "1e-4" is a str
    assert space["model.lora.r"].probe_values() == [4, 32]
    assert config.tune.metric_name(config.promote) == "val_accuracy"


def test_unknown_key_suggests_the_close_one():
    err = _errors({"train.learnig_rate": {"type": "uniform", "low": 0.1, "high": 0.2}})
    assert "train.learnig_rate is not a config key; did you mean 'train.learning_rate'?" in err


def test_unknown_nested_key_lists_the_keys_of_its_section():
    err = _errors({"model.lora.rank": {"type": "randint", "low": 2, "high": 8}})
    assert "model.lora.rank is not a config key; known keys here: r, alpha, dropout" in err


def test_a_section_or_an_unsearchable_key_is_refused_with_the_reason():
    assert "model.lora is a section; search one of its keys: r, alpha" in _errors(
        {"model.lora": {"type": "choice", "values": [1]}}
    )
    assert "train.epochs cannot be searched: it is ASHA's max_t" in _errors(
        {"train.epochs": {"type": "choice", "values": [1, 2]}}
    )
    assert "registry.model_name cannot be searched: only keys under task, model, train" in (
        _errors({"registry.model_name": {"type": "choice", "values": ["a"]}})
    )


def test_low_not_below_high_names_the_key_and_says_swap():
    err = _errors({"train.learning_rate": {"type": "uniform", "low": 0.2, "high": 0.1}})
    assert "tune.search_space.train.learning_rate" in err
    assert "low=0.2 must be below high=0.1; swap them" in err


def test_loguniform_needs_a_positive_low():
    err = _errors({"train.weight_decay": {"type": "loguniform", "low": 0, "high": 0.1}})
    assert "loguniform needs low > 0, got 0; use uniform from 0" in err


def test_kinds_take_their_own_arguments():
    assert "choice takes values" in _errors({"train.seed": {"type": "choice", "low": 1}})
    assert "uniform takes low and high" in _errors(
        {"train.learning_rate": {"type": "uniform", "values": [1e-3]}}
    )
    assert "randint takes integer low and high" in _errors(
        {"model.lora.r": {"type": "randint", "low": 2.5, "high": 8}}
    )
    assert "tune.search_space.train.learning_rate.type" in _errors(
        {"train.learning_rate": {"type": "normal", "low": 1, "high": 2}}
    )


def test_a_sampled_value_the_config_refuses_is_caught_at_validation():
    # model.lora.r >= 1: randint from 0 could sample 0
    err = _errors({"model.lora.r": {"type": "randint", "low": 0, "high": 8}})
    assert "tune.search_space.model.lora.r: randint can sample 0, which model.lora.r refuses" in (
        err
    )
    assert "LoRA rank" in err  # the key's own description
    # the bounds 4.0 and 64.0 are whole, but uniform samples fractions an int key refuses
    err = _errors({"model.lora.r": {"type": "uniform", "low": 4, "high": 64}})
    assert "uniform can sample" in err and "use randint/choice for an integer key" in err
    err = _errors({"train.precision": {"type": "choice", "values": ["fp32", "fp8"]}})
    assert "choice can sample 'fp8', which train.precision refuses" in err


def test_every_problem_is_reported_at_once():
    err = _errors(
        {
            "model.lora.r": {"type": "randint", "low": 0, "high": 8},
            "train.warmup_ratio": {"type": "uniform", "low": 0.0, "high": 1.5},
        },
        asha={"grace_period": 9},
    )
    assert "3 error(s)" in err
    assert "tune.asha.grace_period: 9 is more than train.epochs=4" in err
    assert "train.warmup_ratio" in err and "model.lora.r" in err


def test_tune_settings_are_strict():
    assert "tune.max_concurent_trials: unknown key; did you mean 'tune.max_concurrent_trials'?" in (
        _errors({}, max_concurent_trials=2)
    )
    assert "tune.mode" in _errors({}, mode="maximize")
    assert "tune.asha.reduction_factor" in _errors({}, asha={"reduction_factor": 1})


# --- tune.metric and tune.mode against promote and the task ----------------------------------

ONE_RATE = {"train.learning_rate": {"type": "choice", "values": [1.0e-3]}}
LOSS_GATE = {"metric": "val_loss", "mode": "min", "min_value": None, "max_value": 2.0}


def _ranked(tmp_path, **sections) -> tuple[str, str, str, dict[str, str]]:
    """(metric, mode) the config resolves, the mode handed to trials, and the parent's params."""
    from jobs import tune

    db = f"sqlite:///{tmp_path}/mlflow.db"
    raw = {"name": "rank", "registry": {"tracking_uri": db}, **sections}
    config = validate_mapping(raw)
    setup = tune._trial_setup(config, {}, parent_run_id="parent", experiment="exp")
    metric, mode = config.tune.metric_name(config.promote), config.tune.mode_name(config.promote)
    return metric, mode, setup.mode, tune.search_params(config)


def test_tune_mode_follows_promote_mode_when_the_metric_is_promotes(tmp_path):
    metric, mode, trials, params = _ranked(
        tmp_path, promote=LOSS_GATE, tune={"search_space": ONE_RATE}
    )
    assert (metric, mode, trials) == ("val_loss", "min", "min")  # ASHA keeps the lowest losses
    assert (params["tune.metric"], params["tune.mode"]) == ("val_loss", "min")  # for report


def test_tune_mode_unset_follows_the_way_its_own_metric_improves(tmp_path):
    metric, mode, trials, _ = _ranked(
        tmp_path, tune={"search_space": ONE_RATE, "metric": "val_loss"}
    )
    assert (metric, mode, trials) == ("val_loss", "min", "min")  # promote: val_accuracy, max
    _, mode, _, _ = _ranked(tmp_path, tune={"metric": "val_macro_f1"}, promote=LOSS_GATE)
    assert mode == "max"
    _, mode, _, _ = _ranked(tmp_path, tune={"metric": "val_accuracy", "mode": "max"})
    assert mode == "max"


def test_a_metric_the_task_does_not_report_is_refused_with_its_key_and_the_close_one():
    err = _errors({}, metric="val_acc") + _errors({}, metric="train_loss")
    assert (
        "tune.metric=val_acc: sequence-classification reports val_accuracy and val_macro_f1 " in err
    )
    assert "set tune.metric to one of them (did you mean 'val_accuracy'?)" in err
    assert "tune.metric=train_loss" in err  # reported, but it says nothing of quality
    with pytest.raises(ConfigError) as raised:
        validate_mapping(
            {"name": "t", "promote": {"metric": "val_acuracy"}, "tune": {"metric": "f1"}}
        )
    both = str(raised.value)
    assert "2 error(s)" in both  # every one at once
    assert "promote.metric=val_acuracy" in both and "did you mean 'val_accuracy'?" in both
    assert "tune.metric=f1" in both


def test_a_mode_against_the_way_the_metric_improves_is_refused():
    with pytest.raises(ConfigError) as raised:
        validate_mapping({"name": "t", "promote": {"metric": "val_loss"}})  # mode max by default
    err = str(raised.value)
    assert (
        "promote.metric=val_loss improves downward (lower is better), but promote.mode=max" in err
    )
    assert "set promote.mode: min and promote.max_value (a ceiling, or null)" in err
    err = _errors(ONE_RATE, mode="min")  # ranks promote's val_accuracy
    assert "tune ranks trials by val_accuracy (mode min), but val_accuracy improves upward" in err
    assert "set tune.mode: max, or unset tune.mode" in err
    err = _errors(ONE_RATE, metric="val_loss", mode="max")
    assert "tune ranks trials by val_loss (mode max)" in err and "set tune.mode: min" in err
    err = _errors(ONE_RATE, metric="val_macro_f1", mode="min")
    assert "set tune.mode: max" in err


def test_the_metrics_a_run_is_ranked_by_are_those_each_task_reports():
    """jobs.config cannot import the train loop (torch) to validate: its lists are checked here
    against what train_func reports for each task, val_loss and the task's metrics as val_*."""
    from jobs.config import ranked_metrics
    from jobs.tasks import get_task, task_names
    from jobs.train_loop import REPORTED_METRICS

    for name in task_names():
        task = get_task(name, check_libraries=False)
        own = task.metrics(task.eval_state(2).numpy())
        reported = {"val_loss", *(f"val_{key}" for key in own)}
        assert set(ranked_metrics(name)) == reported, name
        assert reported <= set(REPORTED_METRICS), name


def _sized(workers: int, cpus: float, samples: int = 8, **tune) -> int:
    from jobs.tune import concurrent_trials

    config = validate_mapping(
        {
            "name": "sizing",
            "train": {"num_workers": workers, "cpus_per_worker": cpus},
            "tune": {"num_samples": samples, **tune},
        }
    )
    return concurrent_trials(config, {"CPU": 4.0})


def test_trials_at_once_fit_workers_and_data_stages_in_the_cluster_cpus():
    assert _sized(workers=2, cpus=1) == 1  # 2 + 1.5 data CPUs: one trial on 4 logical CPUs
    assert _sized(workers=1, cpus=0.5) == 2  # 0.5 + 1.5 each
    assert _sized(workers=4, cpus=1) == 1  # never less than one: it waits for resources
    assert _sized(workers=1, cpus=0.5, samples=1) == 1  # never more than there are trials
    assert _sized(workers=1, cpus=0.5, max_concurrent_trials=1) == 1  # a cap below what fits


def test_max_concurrent_trials_above_what_fits_runs_what_fits_and_says_so(caplog):
    """3 trials of 1 worker on 4 logical CPUs would place 3 workers (3 CPUs) and leave 0.97 for
    3 trials' read tasks of 1 CPU each: no data stage could run, and every trial would wait."""
    with caplog.at_level("WARNING", logger="jobs.tune"):
        assert _sized(workers=1, cpus=1, max_concurrent_trials=3) == 1
    line = caplog.text
    assert "tune.max_concurrent_trials=3: the cluster's 4 CPUs fit 1 trial(s) of 2.5 CPUs" in line
    assert "running 1 at a time" in line and "add CPUs or give each trial fewer" in line
    caplog.clear()
    assert _sized(workers=1, cpus=0.5, max_concurrent_trials=2) == 2  # fits: nothing said
    assert "max_concurrent_trials" not in caplog.text


def _held(
    workers: int, cpus: float, cluster: dict, samples: int = 9, gpu: bool = False, **tune
) -> int:
    from jobs.tune import concurrent_trials, held_trials

    config = validate_mapping(
        {
            "name": "sizing",
            "train": {"num_workers": workers, "cpus_per_worker": cpus, "use_gpu": gpu},
            "tune": {"num_samples": samples, "scheduler": "sha", **tune},
        }
    )
    return held_trials(config, cluster, concurrent_trials(config, cluster))


def test_parked_trials_keep_only_the_cpus_the_running_trials_and_a_read_task_leave():
    """sha parks contenders at a rung with their workers' CPUs: 2 running trials of one 0.5-CPU
    worker on 4 logical CPUs take 1.02 for workers and leave 1 for a read task; 3 parked ones
    fit in the 1.98 left. Never more than the first rung keeps (9 trials, factor 3: 3)."""
    factor3 = {"asha": {"reduction_factor": 3}}
    assert _held(1, 0.5, {"CPU": 4.0}, **factor3) == 3
    assert _held(1, 0.5, {"CPU": 3.0}, **factor3) == 2  # 1 running: 3 - 0.51 - 1 = 1.49
    assert _held(1, 0.5, {"CPU": 4.0}, max_held_trials=1, **factor3) == 1
    assert _held(1, 0.5, {"CPU": 4.0}, max_held_trials=0, **factor3) == 0
    assert _held(1, 0.5, {"CPU": 64.0}, **factor3) == 3  # what the first rung keeps
    assert _held(1, 0.5, {"CPU": 64.0}, max_held_trials=8, **factor3) == 8
    assert _held(2, 1, {"CPU": 4.0}, **factor3) == 0  # one trial fills it
    assert _held(1, 1, {"CPU": 64.0, "GPU": 2.0}, gpu=True, **factor3) == 0  # both GPUs run
    one_running = {"max_concurrent_trials": 1, **factor3}
    assert _held(1, 1, {"CPU": 64.0, "GPU": 3.0}, gpu=True, **one_running) == 2  # 2 GPUs free


def test_max_held_trials_must_not_be_negative():
    with pytest.raises(ConfigError, match="tune.max_held_trials"):
        validate_mapping({"name": "x", "tune": {"max_held_trials": -1}})


# --- tune.searcher: optuna --------------------------------------------------------------------

SPACE = {
    "train.learning_rate": {"type": "loguniform", "low": 1.0e-4, "high": 3.0e-3},
    "train.warmup_ratio": {"type": "uniform", "low": 0.0, "high": 0.2},
    "model.lora.r": {"type": "randint", "low": 2, "high": 4},
    "model.lora.alpha": {"type": "choice", "values": [8, 16, 32]},
}


def _searcher(seed: int | None = 3, samples: int = 6, concurrent: int = 2):
    """The search algorithm jobs.tune builds, given the space as Tune gives it (no Ray needed)."""
    from jobs.tune import _param_space, _search_alg

    config = validate_mapping(_config(SPACE, searcher="optuna", seed=seed, num_samples=samples))
    searcher = _search_alg(config, concurrent)
    assert searcher.set_search_properties("val_accuracy", "max", _param_space(config))
    return searcher


def _suggestions(searcher, trial_ids: list[str]) -> list[dict]:
    return [searcher.suggest(trial_id) for trial_id in trial_ids]


def test_optuna_samples_every_kind_of_dimension_within_its_bounds():
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    searcher = _searcher(samples=40, concurrent=40)
    assert isinstance(searcher, ConcurrencyLimiter)
    assert isinstance(searcher.searcher, OptunaSearch)
    samples = [s["overrides"] for s in _suggestions(searcher, [f"t{i}" for i in range(40)])]
    assert all(set(s) == set(SPACE) for s in samples)
    rates = [s["train.learning_rate"] for s in samples]
    assert all(1.0e-4 <= r <= 3.0e-3 for r in rates)
    assert sum(r < 5.5e-4 for r in rates) > 10  # log-uniform: the lower half of the decades
    assert all(0.0 <= s["train.warmup_ratio"] <= 0.2 for s in samples)
    ranks = {s["model.lora.r"] for s in samples}
    assert ranks == {2, 3, 4} and all(isinstance(r, int) for r in ranks)  # high included
    assert {s["model.lora.alpha"] for s in samples} == {8, 16, 32}


def test_optuna_same_seed_same_trials():
    ids = ["a", "b", "c"]
    first = _suggestions(_searcher(seed=3), ids)
    assert _suggestions(_searcher(seed=3), ids) == first
    assert _suggestions(_searcher(seed=4), ids) != first


def test_optuna_holds_back_trials_beyond_the_concurrency_cap():
    searcher = _searcher(concurrent=2)
    assert all(_suggestions(searcher, ["a", "b"]))
    assert searcher.suggest("c") is None  # Tune asks again once a trial finished
    searcher.on_trial_complete("a", {"val_accuracy": 0.5, "training_iteration": 1})
    freed = searcher.suggest("c")
    assert freed is not None and set(freed["overrides"]) == set(SPACE)


def test_optuna_state_survives_a_save_and_restore(tmp_path):
    """What --resume relies on: Tune saves the searcher in the experiment and restores it."""
    from ray.tune.search.search_generator import SearchGenerator

    before = SearchGenerator(_searcher(seed=3, samples=4))
    first = _suggestions(before.searcher, ["a", "b"])
    before.searcher.on_trial_complete("a", {"val_accuracy": 0.7, "training_iteration": 2})
    before.save_to_dir(str(tmp_path), session_str="s1")
    expected = before.searcher.suggest("c")

    after = SearchGenerator(_searcher(seed=99, samples=4))  # its own seed is overwritten
    after.restore_from_dir(str(tmp_path))
    study = after.searcher.searcher._ot_study
    assert [t.params for t in study.trials][:2] == [
        {f"overrides/{k}": v for k, v in s["overrides"].items()} for s in first
    ]
    assert [t.value for t in study.trials] == [0.7, None]  # a told, b still running
    assert after.searcher.suggest("c") == expected
    assert after.searcher.suggest("d") is None  # b and c still hold the two slots


def test_optuna_searcher_is_validated_with_the_key_and_the_fix(monkeypatch):
    config = validate_mapping(_config(SPACE, searcher="optuna"))
    assert config.tune.searcher == "optuna"
    assert "tune.searcher: Input should be 'random' or 'optuna'" in _errors(SPACE, searcher="tpe")
    err = _errors(
        {"model.lora.target_modules": {"type": "choice", "values": [["query"], ["value"]]}},
        searcher="optuna",
    )
    assert "tune.searcher" in err
    assert "tune.search_space.model.lora.target_modules offers ['query']" in err
    assert "use searcher: random for it" in err
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if not installed
    err = _errors(SPACE, searcher="optuna")
    assert "tune.searcher" in err and "pip install optuna, or use searcher: random" in err
