import pytest

from jobs.config import validate_mapping
from jobs.promote import GateRefused, evaluate_gates
from serving import tags

SAME_ROWS = {
    tags.ICEBERG_TABLE: "support.tickets",
    tags.ICEBERG_SNAPSHOT_ID: "1",
    tags.VALIDATION_SPLIT: "fraction=0.1,seed=17",
}
ACCURACY = tags.metric_tag("val_accuracy")


def _config(**promote):
    return validate_mapping({"name": "x", "promote": {"min_value": 0.8, **promote}})


def test_floor():
    passed, checks = evaluate_gates(_config(), {ACCURACY: "0.79"}, None)
    assert not passed and "< floor 0.8" in checks[0]
    passed, _ = evaluate_gates(_config(), {ACCURACY: "0.81"}, None)
    assert passed


def test_no_regression_against_alias_on_same_rows():
    current = {**SAME_ROWS, ACCURACY: "0.90"}
    worse = {**SAME_ROWS, ACCURACY: "0.85"}
    passed, checks = evaluate_gates(_config(max_regression=0.01), worse, current)
    assert not passed and "beyond max_regression" in checks[1]
    close = {**SAME_ROWS, ACCURACY: "0.895"}
    assert evaluate_gates(_config(max_regression=0.01), close, current)[0]


def test_regression_check_skipped_on_other_rows():
    current = {**SAME_ROWS, ACCURACY: "0.99"}
    other = {**SAME_ROWS, tags.ICEBERG_SNAPSHOT_ID: "2", ACCURACY: "0.85"}
    passed, checks = evaluate_gates(_config(), other, current)
    assert passed and "regression check skipped" in checks[1]


def test_missing_metric_names_the_tag_and_the_key():
    with pytest.raises(GateRefused, match=r"no metric\.val_macro_f1 tag; set promote\.metric"):
        evaluate_gates(_config(metric="val_macro_f1"), {ACCURACY: "0.9"}, None)


def test_metric_that_is_not_a_number_is_refused_naming_the_tag():
    with pytest.raises(GateRefused, match=r"metric\.val_accuracy='high' is not a number"):
        evaluate_gates(_config(), {ACCURACY: "high"}, None)


def test_tag_names_on_the_wire_are_unchanged():
    # Registries hold versions tagged with these names: renaming one silently breaks gates.
    assert ACCURACY == "metric.val_accuracy"
    assert tags.gate_tag("production") == "raylift.gate.production"
    assert tags.EVAL_ROWS_TAGS == (
        "raylift.iceberg_table",
        "raylift.iceberg_snapshot_id",
        "raylift.validation_split",
    )
    assert (tags.TRAIN_ROWS, tags.ROWS_REFUSED, tags.RUN_DATE_PROPERTY) == (
        "raylift.train_rows",
        "raylift.rows_refused",
        "raylift.run-date",
    )


def test_metric_values_round_trip():
    written = tags.metric_tags(
        {"val_accuracy": 0.912345678, "epoch": 2, "other": 1.0}, ("val_accuracy", "epoch")
    )
    assert written == {"metric.val_accuracy": "0.912346", "metric.epoch": "2"}
    assert tags.read_metric(written, "val_accuracy") == pytest.approx(0.912346)
    assert tags.read_metric(written, "val_loss") is None
    assert tags.format_metric(float("nan")) == "nan"
