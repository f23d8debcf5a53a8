"""The tune: section: a bad search space is a validation error naming the key and the fix."""

from __future__ import annotations

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
    assert _sized(workers=2, cpus=1, max_concurrent_trials=3) == 3  # the config decides
