from jobs.config import validate_mapping
from jobs.promote import evaluate_gates

SAME_ROWS = {
    "raylift.iceberg_table": "support.tickets",
    "raylift.iceberg_snapshot_id": "1",
    "raylift.validation_split": "fraction=0.1,seed=17",
}


def _config(**promote):
    return validate_mapping({"name": "x", "promote": {"min_value": 0.8, **promote}})


def test_floor():
    passed, checks = evaluate_gates(_config(), {"metric.val_accuracy": "0.79"}, None)
    assert not passed and "< floor 0.8" in checks[0]
    passed, _ = evaluate_gates(_config(), {"metric.val_accuracy": "0.81"}, None)
    assert passed


def test_no_regression_against_alias_on_same_rows():
    current = {**SAME_ROWS, "metric.val_accuracy": "0.90"}
    worse = {**SAME_ROWS, "metric.val_accuracy": "0.85"}
    passed, checks = evaluate_gates(_config(max_regression=0.01), worse, current)
    assert not passed and "beyond max_regression" in checks[1]
    close = {**SAME_ROWS, "metric.val_accuracy": "0.895"}
    assert evaluate_gates(_config(max_regression=0.01), close, current)[0]


def test_regression_check_skipped_on_other_rows():
    current = {**SAME_ROWS, "metric.val_accuracy": "0.99"}
    other = {**SAME_ROWS, "raylift.iceberg_snapshot_id": "2", "metric.val_accuracy": "0.85"}
    passed, checks = evaluate_gates(_config(), other, current)
    assert passed and "regression check skipped" in checks[1]
