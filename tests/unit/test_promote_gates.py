import numpy as np
import pytest

from jobs.config import ConfigError, validate_mapping
from jobs.promote import Comparison, Figures, GateRefused, evaluate_gates
from jobs.reevaluate import (
    MIN_KEPT_SHARE,
    EvalRows,
    select_comparison_keys,
    slice_accuracy,
    split_keys,
)
from jobs.training_data import TrainingRows
from serving import tags

SAME_ROWS = {
    tags.ICEBERG_TABLE: "support.tickets",
    tags.ICEBERG_SNAPSHOT_ID: "1",
    tags.VALIDATION_SPLIT: "fraction=0.1,seed=17",
}
ACCURACY = tags.metric_tag("val_accuracy")


def _config(**promote):
    return validate_mapping({"name": "x", "promote": {"min_value": 0.8, **promote}})


def _compare(candidate: float, incumbent: float, **slices) -> Comparison:
    cand = {k: v[0] for k, v in slices.items()}
    inc = {k: v[1] for k, v in slices.items()}
    return Comparison("1", "rows", Figures(candidate, cand), Figures(incumbent, inc))


def _passed(checks) -> bool:
    return all(c.passed for c in checks)


def test_floor():
    checks = evaluate_gates(_config(), {ACCURACY: "0.79"}, None)
    assert not _passed(checks) and "< floor 0.8" in checks[0].line
    assert (checks[0].gate, checks[0].value, checks[0].threshold) == ("floor", "0.790000", "0.8")
    assert _passed(evaluate_gates(_config(), {ACCURACY: "0.81"}, None))


def test_min_mode_bounds_from_above_and_regresses_upwards():
    config = _config(min_value=None, mode="min", metric="val_loss", max_value=1.0)
    loss = tags.metric_tag("val_loss")
    checks = evaluate_gates(config, {loss: "1.2"}, None)
    assert not _passed(checks) and "val_loss=1.2000 > ceiling 1.0" in checks[0].line
    assert _passed(evaluate_gates(config, {loss: "0.5"}, _compare(0.5, 0.6)))
    worse = evaluate_gates(config, {loss: "0.7"}, _compare(0.7, 0.6))
    assert [c.gate for c in worse if not c.passed] == ["regression"]


def test_floor_key_must_match_the_mode():
    with pytest.raises(ConfigError, match="min_value does not apply with mode=min; set max_value"):
        _config(mode="min", metric="val_loss")


def test_regression_against_the_alias():
    checks = evaluate_gates(_config(max_regression=0.01), {ACCURACY: "0.85"}, _compare(0.85, 0.9))
    assert not _passed(checks) and "beyond max_regression" in checks[1].line
    assert checks[1].threshold == "0.890000"
    close = evaluate_gates(_config(max_regression=0.01), {ACCURACY: "0.895"}, _compare(0.895, 0.9))
    assert _passed(close)


def test_the_comparison_figures_decide_not_the_stored_metric():
    # Stored 0.99 clears the floor, but on the shared rows the candidate is far behind.
    checks = evaluate_gates(_config(), {ACCURACY: "0.99"}, _compare(0.80, 0.95))
    assert [c.gate for c in checks if not c.passed] == ["regression"]


def test_base_model_allow_list():
    config = _config(allowed_base_models=["all-MiniLM-L6-v2"])
    checks = evaluate_gates(config, {ACCURACY: "0.9", tags.BASE_MODEL: "bert-large"}, None)
    refused = [c for c in checks if not c.passed]
    assert [c.gate for c in refused] == ["base_model"]
    assert "'bert-large' is not in promote.allowed_base_models" in refused[0].line
    ok = {ACCURACY: "0.9", tags.BASE_MODEL: "all-MiniLM-L6-v2"}
    assert _passed(evaluate_gates(config, ok, None))
    assert "base_model" not in [c.gate for c in evaluate_gates(_config(), ok, None)]


def test_a_slice_dropping_too_far_is_refused_even_when_the_total_holds():
    config = _config(slices={"card_arrival": "cards", "top_up_failed": "top_ups"})
    comparison = _compare(0.90, 0.90, cards=(0.80, 0.90), top_ups=(0.97, 0.90))
    checks = evaluate_gates(config, {ACCURACY: "0.9"}, comparison)
    refused = [c for c in checks if not c.passed]
    assert [c.gate for c in refused] == ["slice.cards"]
    assert "beyond max_slice_drop 0.05" in refused[0].line
    near = _compare(0.90, 0.90, cards=(0.86, 0.90), top_ups=(0.90, 0.90))
    assert _passed(evaluate_gates(config, {ACCURACY: "0.9"}, near))


def test_eval_rows_parse_from_the_lineage_tags():
    rows = EvalRows.from_tags({**SAME_ROWS, tags.ICEBERG_SNAPSHOT_ID: "42"})
    assert rows == EvalRows("support.tickets", 42, 0.1, 17)
    with pytest.raises(ValueError, match="cannot tell which rows"):
        EvalRows.from_tags({tags.ICEBERG_TABLE: "support.tickets"})


def test_slice_accuracy_counts_only_mapped_labels():
    truth = np.array(["a", "a", "b", "c"], dtype=object)
    predicted = np.array(["a", "b", "b", None], dtype=object)
    accuracy, rows = slice_accuracy(truth, predicted, {"a": "x", "b": "y"})
    assert accuracy == {"x": 0.5, "y": 1.0} and rows == {"x": 2, "y": 1}


def test_missing_metric_names_the_version_the_tag_and_the_key():
    with pytest.raises(
        GateRefused, match=r"version 7 has no metric\.val_macro_f1 tag; set promote\.metric"
    ):
        evaluate_gates(_config(metric="val_macro_f1"), {ACCURACY: "0.9"}, None, "7")


def test_metric_that_is_not_a_number_is_refused_naming_the_tag():
    with pytest.raises(GateRefused, match=r"metric\.val_accuracy='high' is not a number"):
        evaluate_gates(_config(), {ACCURACY: "high"}, None)


def test_tag_names_on_the_wire_are_unchanged():
    # Registries hold versions tagged with these names: renaming one silently breaks gates.
    assert ACCURACY == "metric.val_accuracy"
    assert tags.gate_tag("production") == "raylift.gate.production"
    assert (
        tags.gate_check_tag("production", "floor", "value") == "raylift.gate.production.floor.value"
    )
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


def test_perplexity_regresses_upwards_on_the_comparison_figures():
    promote = {"min_value": None, "mode": "min", "metric": "val_perplexity", "max_value": 50.0}
    causal = {"task": {"type": "causal-lm"}, "model": {"method": "lora"}}  # it reports perplexity
    config = validate_mapping({"name": "x", **causal, "promote": promote})
    stored = {tags.metric_tag("val_perplexity"): "3.0"}  # looks good; the shared rows decide
    worse = evaluate_gates(config, stored, _compare(12.5, 12.0))
    assert [c.gate for c in worse if not c.passed] == ["regression"]
    assert worse[-1].threshold == "12.005000" and "val_perplexity=12.5000 vs" in worse[-1].line
    assert _passed(evaluate_gates(config, stored, _compare(11.0, 12.0)))


def test_every_metric_a_causal_lm_may_promote_on_can_be_measured_again():
    from jobs.config import _CAUSAL_LM_METRICS
    from jobs.reevaluate import REEVALUATED_METRICS, reevaluated_metrics

    assert set(_CAUSAL_LM_METRICS) <= set(reevaluated_metrics("causal-lm"))
    assert reevaluated_metrics("causal-lm") == ("val_loss", "val_perplexity")
    assert reevaluated_metrics("sequence-classification") == REEVALUATED_METRICS


def test_every_version_labels_the_same_rows_in_one_actor(tiny_bert, tmp_path):
    """VersionLabels (one re-evaluation pass for every version): each row's true label beside
    each version's label; a version whose label names are shuffled disagrees where they moved,
    and a text that cannot be scored gets no label from either."""
    from jobs.reevaluate import _TRUE_LABEL, VersionLabels, _predicted
    from tests.helpers import make_full_checkpoint

    labels = ["card_arrival", "lost_card", "refund"]
    same = make_full_checkpoint(tiny_bert, tmp_path / "same", labels)
    shuffled = make_full_checkpoint(tiny_bert, tmp_path / "shuffled", labels[1:] + labels[:1])
    one = {"precision": "fp32", "torch_threads": 1, "engine": "torch"}
    labeller = VersionLabels(
        text_column="text",
        versions=[{"model_uri": str(same), **one}, {"model_uri": str(shuffled), **one}],
    )
    texts = np.array(["card arrived late", "", "refund my fee", "lost my card"], dtype=object)
    out = labeller({"text": texts, _TRUE_LABEL: np.array(labels + ["refund"], dtype=object)})

    assert list(out) == [_TRUE_LABEL, _predicted(0), _predicted(1)]
    assert list(out[_TRUE_LABEL]) == labels + ["refund"]
    first, second = out[_predicted(0)], out[_predicted(1)]
    assert first[1] is None and second[1] is None
    moved = dict(zip(labels, labels[1:] + labels[:1], strict=True))  # same weights, new names
    assert [moved[a] for a in first[[0, 2, 3]]] == list(second[[0, 2, 3]])


def test_versions_are_reevaluated_on_one_runtime_where_the_engine_is_picked_by_timing(tmp_path):
    """engine or precision auto: each version's Predictor would time the variants it offers and
    could run another one than its rival's; both run the reference, fp32 torch. An engine and
    precision the config names are kept for both."""
    from jobs.reevaluate import alike_predictor_kwargs
    from serving.registry import ResolvedVersion

    version = ResolvedVersion(name="m", version="3", source=str(tmp_path))
    for engine, precision in [("auto", "auto"), ("openvino", "auto"), ("auto", "int8")]:
        config = validate_mapping(
            {"name": "x", "score": {"engine": engine, "precision": precision}}
        )
        kwargs = alike_predictor_kwargs(config, version)
        assert (kwargs["engine"], kwargs["precision"]) == ("torch", "fp32")
        assert kwargs["model_uri"] == "models:/m/3" and kwargs["model_source"] == str(tmp_path)
    named = validate_mapping({"name": "x", "score": {"engine": "onnxruntime", "precision": "int8"}})
    kwargs = alike_predictor_kwargs(named, version)
    assert (kwargs["engine"], kwargs["precision"]) == ("onnxruntime", "int8")


def _scanned(rows: int, snapshot: int) -> TrainingRows:
    """A snapshot's trainable rows as scan_training_rows returns them: keys 0..rows-1 (the
    warehouse keeps a row's key across snapshots), 7 classes."""
    keys = np.arange(rows, dtype=np.int64)
    labels = np.array([f"intent_{k % 7}" for k in keys], dtype=object)
    return TrainingRows(snapshot, keys, labels, 0)


def test_the_comparison_leaves_out_the_rows_the_incumbent_trained_on():
    """The candidate's validation rows (its snapshot, grown by 10%) minus the incumbent's
    training side, by the real split code: a retrain with the same fraction and seed drops a
    few rows, another seed most of them; never a row of the incumbent's training side stays."""
    incumbent, candidate = _scanned(2100, 1), _scanned(2310, 2)
    trained_on = EvalRows("t", 1, 0.1, 17)
    trained = split_keys(incumbent, trained_on, "train")
    assert len(trained) == 1890 and len(split_keys(incumbent, trained_on, "validation")) == 210

    same = select_comparison_keys(candidate, EvalRows("t", 2, 0.1, 17), incumbent, trained_on)
    assert len(same.validation_keys) == 231
    assert 0 < len(same.dropped_keys) < 0.2 * 231  # the per-class thresholds moved a little
    assert set(same.dropped_keys) == set(same.validation_keys) & set(trained)
    kept = set(same.validation_keys) - set(same.dropped_keys)
    assert len(kept) == same.kept and not kept & set(trained)

    other = select_comparison_keys(candidate, EvalRows("t", 2, 0.1, 18), incumbent, trained_on)
    assert other.kept < MIN_KEPT_SHARE * len(other.validation_keys)  # refused by promote

    # The incumbent's own split: nothing of its validation side was trained on.
    own = select_comparison_keys(incumbent, trained_on, incumbent, trained_on)
    assert len(own.dropped_keys) == 0 and own.kept == 210


def test_a_comparison_on_too_few_unseen_rows_is_refused_with_the_fix(tmp_path):
    """comparison_rows on two real Iceberg snapshots (no Ray): the incumbent split with seed
    17, the candidate with 18, so most of the candidate's validation rows were trained on."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs import warehouse
    from jobs.reevaluate import TooFewRows, comparison_rows
    from tests.helpers import make_ticket_rows

    config = validate_mapping(
        {
            "name": "x",
            "task": {"label_column": "category"},
            "catalog": {"uri": f"sqlite:///{tmp_path}/catalog.db", "warehouse": str(tmp_path)},
            "data": {"table": "support.tickets"},
        }
    )
    load = {"text_column": "text", "label_column": "category", "key_column": "ticket_id"}
    snapshots = []
    for rows in (300, 330):
        path = tmp_path / f"tickets-{rows}.parquet"
        pq.write_table(pa.Table.from_pylist(make_ticket_rows(rows, ["a", "b", "c"])), path)
        snapshots.append(
            warehouse.load_table_from_file(config.catalog, "support.tickets", path, **load)
        )
    trained_on = EvalRows("support.tickets", snapshots[0], 0.2, 17)
    fine = comparison_rows(config, EvalRows("support.tickets", snapshots[1], 0.2, 17), trained_on)
    assert len(fine.validation_keys) == 66 and fine.kept >= 0.8 * 66
    with pytest.raises(TooFewRows, match=r"(?s)were trained on .* data\.validation\.seed=17"):
        comparison_rows(config, EvalRows("support.tickets", snapshots[1], 0.2, 18), trained_on)
