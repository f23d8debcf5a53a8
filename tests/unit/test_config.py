from pathlib import Path

import pytest

from jobs.config import ConfigError, config_hash, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "configs").rglob("*.yaml"))


def test_configs_are_shipped():
    assert len(SHIPPED) >= 2


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_validates(path):
    config = load_config(path)
    assert config.name
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# ") and "--config" in first_line, "first comment: the command"


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_every_error_reported_at_once_with_key_and_fix(tmp_path):
    path = _write(
        tmp_path,
        "name: x\ntrain:\n  epocs: 2\n  batch_size: 0\nmodel:\n  method: lorra\n"
        "serve:\n  autoscaling: {min_replicas: 3, max_replicas: 1}\n",
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert len(err.value.errors) == 4
    assert "train.epocs: unknown key; did you mean 'train.epochs'?" in text
    assert "train.batch_size" in text and "got 0" in text
    assert "model.method" in text and "'lorra'" in text
    assert "serve.autoscaling" in text and "max_replicas must be >= min_replicas" in text


def test_unknown_section_lists_known_keys(tmp_path):
    with pytest.raises(ConfigError, match="zzz: unknown key; known keys here: name, task"):
        load_config(_write(tmp_path, "name: x\nzzz: 1\n"))


def test_missing_name_is_required(tmp_path):
    with pytest.raises(ConfigError, match="name: required"):
        load_config(_write(tmp_path, "task: {}\n"))


def test_overrides_are_typed_and_applied(tmp_path):
    path = _write(tmp_path, "name: x\n")
    overrides = parse_overrides(["train.epochs=5", "model.method=full", "train.use_gpu=false"])
    config = load_config(path, overrides)
    assert config.train.epochs == 5 and config.model.method == "full"
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["train.epochs"])


def test_override_of_unknown_key_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="train.lr: unknown key"):
        load_config(_write(tmp_path, "name: x\n"), parse_overrides(["train.lr=1"]))


def test_cross_field_rules(tmp_path):
    with pytest.raises(ConfigError, match="fp16 needs use_gpu"):
        load_config(_write(tmp_path, "name: x\ntrain: {precision: fp16}\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "name: x\nscore: {run_date: 2026-13-45}\n"))
    with pytest.raises(ConfigError, match="score.run_date"):
        load_config(_write(tmp_path, "name: x\n"), parse_overrides(["score.run_date=2026-13-45"]))
    config = load_config(_write(tmp_path, "name: x\n"), {"score.run_date": "2026-11-22"})
    assert config.score.run_date.isoformat() == "2026-11-22"


def test_custom_worker_resources_leave_cpu_and_gpu_to_their_own_keys(tmp_path):
    with pytest.raises(ConfigError, match="names CPU; set train.cpus_per_worker and train.use_gpu"):
        load_config(_write(tmp_path, "name: x\ntrain: {resources_per_worker: {CPU: 2}}\n"))
    with pytest.raises(ConfigError, match="pool_a must be above 0"):
        load_config(_write(tmp_path, "name: x\ntrain: {resources_per_worker: {pool_a: 0}}\n"))
    config = load_config(_write(tmp_path, "name: x\ntrain: {resources_per_worker: {pool_a: 1}}\n"))
    assert config.train.resources_per_worker == {"pool_a": 1.0}


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "name: [unclosed\n"))


def test_config_hash_tracks_training_settings_only(tmp_path):
    path = _write(tmp_path, "name: x\n")
    base = config_hash(load_config(path))
    assert config_hash(load_config(path, {"serve.port": 9000})) == base
    assert config_hash(load_config(path, {"train.epochs": 9})) != base


def test_unknown_task_type_fails_validation_listing_the_known_tasks(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, "name: x\ntask: {type: seq-cls}\n"))
    assert err.value.errors == [
        "  task.type: Value error, unknown task 'seq-cls'; known: causal-lm, "
        "sequence-classification, "
        "got 'seq-cls'. This key: Task name; see jobs.tasks for the registry."
    ]
    config = load_config(_write(tmp_path, "name: x\n"), {"task.type": "sequence-classification"})
    assert config.task.type == "sequence-classification"


def test_fixed_labels_need_two_distinct_ones(tmp_path):
    with pytest.raises(ConfigError, match="task.labels: .*at least two labels"):
        load_config(_write(tmp_path, "name: x\ntask: {labels: [only]}\n"))
    with pytest.raises(ConfigError, match="task.labels: .*labels repeat a; list each label once"):
        load_config(_write(tmp_path, "name: x\ntask: {labels: [a, b, a]}\n"))


def test_refused_share_is_a_share(tmp_path):
    with pytest.raises(ConfigError, match="task.max_refused_share"):
        load_config(_write(tmp_path, "name: x\n"), {"task.max_refused_share": 1.5})
    assert load_config(_write(tmp_path, "name: x\n")).task.max_refused_share == 0.01
