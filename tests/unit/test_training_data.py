"""Bad training data is refused before Ray starts, or dropped and counted, never trained on.

These run without Ray: the unit-test conftest makes `ray.init` raise, so a check that happened
only after Ray started would fail here with "unit tests must not start Ray".
"""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow as pa
import pytest

from jobs import finetune, load, tune
from jobs.config import LifecycleConfig, validate_mapping
from jobs.train_loop import INPUT_IDS, TARGETS
from jobs.training_data import scan_training_rows, tokenize_batch, trainable_rows
from tests.helpers import make_ticket_rows, run_in_fresh_process


def _config(root: Path, source: Path, base: str, **task):
    return validate_mapping(
        {
            "name": "bad-data",
            "task": {"label_column": "category", **task},
            "model": {"base": base},
            "catalog": {"uri": f"sqlite:///{root}/catalog.db", "warehouse": str(root / "wh")},
            "data": {"source": str(source), "inbox_rows": 0},
            "registry": {"tracking_uri": f"sqlite:///{root}/mlflow.db", "model_name": "bad"},
        }
    )


def _load(tmp_path: Path, rows: list[dict], base: str, **task):
    source = tmp_path / "tickets.csv"
    with source.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "category"])
        writer.writeheader()
        writer.writerows(rows)
    config = _config(tmp_path, source, base, **task)
    load.main(config)
    return config


def _rows_with_bad_ones() -> tuple[list[dict], set[int]]:
    """40 rows, 4 of them unusable: two empty texts (null in the CSV), one blank, one no label."""
    rows = make_ticket_rows(40, ["a", "b"])
    rows[3]["text"] = ""
    rows[8]["text"] = ""
    rows[13]["text"] = "   \t "
    rows[21]["category"] = ""
    return rows, {3, 8, 13, 21}


def _table(config) -> pa.Table:
    from jobs.warehouse import load_catalog

    return load_catalog(config.catalog).load_table(config.data.table).scan().to_arrow()


def test_unusable_rows_are_dropped_counted_and_dropped_again_in_the_stream(tmp_path, tiny_bert):
    rows, bad = _rows_with_bad_ones()
    config = _load(tmp_path, rows, tiny_bert, max_refused_share=0.2)
    scanned = scan_training_rows(config)
    assert scanned.rows_refused == 4
    table = _table(config).sort_by("ticket_id")
    # the loader numbers rows itself: find the bad rows by what they hold
    bad_keys = {
        key
        for key, text, label in zip(
            table.column("ticket_id").to_pylist(),
            table.column("text").to_pylist(),
            table.column("category").to_pylist(),
            strict=True,
        )
        if text is None or not text.strip() or label is None
    }
    assert len(bad_keys) == len(bad) == 4
    assert set(scanned.keys.tolist()) == set(table.column("ticket_id").to_pylist()) - bad_keys
    assert sorted(set(scanned.labels)) == ["a", "b"] and len(scanned.labels) == 36
    kept = trainable_rows(table, text_column="text", label_column="category")
    assert sorted(kept.column("ticket_id").to_pylist()) == sorted(scanned.keys.tolist())


def test_too_many_unusable_rows_refuse_the_run_before_ray_starts(tmp_path, tiny_bert):
    rows, _ = _rows_with_bad_ones()
    config = _load(tmp_path, rows, tiny_bert)  # default task.max_refused_share = 0.01
    expected = (
        r"4 of 40 rows \(10.0%\) in support.tickets@\d+ have a null, empty or blank 'text' or "
        r"a null 'category', more than task.max_refused_share=0.01"
    )
    with pytest.raises(ValueError, match=expected):
        finetune.main(config)


def test_zero_share_refuses_a_single_blank_text(tmp_path, tiny_bert):
    rows = make_ticket_rows(40, ["a", "b"])
    rows[0]["text"] = " "
    config = _load(tmp_path, rows, tiny_bert, max_refused_share=0.0)
    with pytest.raises(ValueError, match="1 of 40 rows"):
        finetune.main(config)


def test_a_table_with_one_label_is_refused_before_ray_starts(tmp_path, tiny_bert):
    config = _load(tmp_path, make_ticket_rows(30, ["only"]), tiny_bert)
    with pytest.raises(ValueError, match=r"1 distinct label\(s\) in 'category' \(only\)"):
        finetune.main(config)


def test_a_second_label_seen_only_on_unusable_rows_does_not_count(tmp_path, tiny_bert):
    rows = make_ticket_rows(30, ["a"])
    rows.append({"text": "", "category": "b"})
    config = _load(tmp_path, rows, tiny_bert, max_refused_share=0.1)
    with pytest.raises(ValueError, match=r"1 distinct label\(s\) in 'category' \(a\)"):
        finetune.main(config)


def test_a_training_split_smaller_than_the_workers_is_refused_before_ray_starts(
    tmp_path, tiny_bert
):
    """4 rows of 2 labels: one of each is held out, 2 are left to train on, and Ray Train's
    equal split would give each of 3 workers train_rows // num_workers = 0 of them."""
    config = _load(tmp_path, make_ticket_rows(4, ["a", "b"]), tiny_bert)
    config.train.num_workers = 3
    expected = (
        r"support.tickets@\d+ leaves 2 training row\(s\) after the validation split \(2 held "
        r"out\), fewer than train.num_workers=3: .* load more rows or lower train.num_workers"
    )
    with pytest.raises(ValueError, match=expected):
        finetune.main(config)
    space = {"train.learning_rate": {"type": "loguniform", "low": 1e-4, "high": 1e-3}}
    searched = LifecycleConfig.model_validate(
        {**config.model_dump(), "tune": {"search_space": space, "num_samples": 2}}
    )
    with pytest.raises(ValueError, match=expected):
        tune.main(searched)
    from jobs.training_data import plan_split

    config.train.num_workers = 2  # one row each: trains
    assert plan_split(config, scan_training_rows(config)).train_rows == 2


def test_tokenize_never_turns_a_missing_text_into_an_empty_one(tiny_bert):
    batch = pa.table({"text": ["card arrived", None], "category": ["a", "b"]})
    kwargs = {
        "base_model": tiny_bert,
        "trust_remote_code": False,
        "text_column": "text",
        "label_column": "category",
        "labels": ["a", "b"],
        "max_length": 16,
        "task_name": "sequence-classification",
    }
    with pytest.raises(ValueError, match="1 row\\(s\\) reached tokenization"):
        tokenize_batch(batch, **kwargs)
    out = tokenize_batch(batch.slice(0, 1), **kwargs)
    assert out.column(TARGETS).to_pylist() == [0] and len(out.column(INPUT_IDS)[0]) >= 3


# A child process, as Ray Data's tokenize task is: this one may have imported peft already.
_TOKENIZE_SCRIPT = """
import json, sys
import pyarrow as pa
from jobs.training_data import tokenize_batch

batch = pa.table({"text": ["my card has not arrived", "refund please"], "category": ["a", "b"]})
out = tokenize_batch(batch, base_model=sys.argv[1], trust_remote_code=False, text_column="text",
                     label_column="category", labels=["a", "b"], max_length=16,
                     task_name="sequence-classification")
seen = {"rows": out.num_rows, "targets": out.column("targets").to_pylist(),
        "tokenize": sorted(m for m in ("peft", "deepspeed") if m in sys.modules)}
from jobs.tasks import get_task
get_task("sequence-classification")  # what a training worker's build imports: the control
seen["worker"] = sorted(m for m in ("peft", "deepspeed") if m in sys.modules)
print(json.dumps(seen))
"""


def test_the_tokenize_stage_does_not_import_peft(tiny_bert):
    """Every Ray Data tokenize process paid 2.6 CPU-s (AVX512-BF16) for a peft import it never
    used; the control shows the same check sees peft once a worker's task check imports it."""
    seen = run_in_fresh_process(_TOKENIZE_SCRIPT, tiny_bert)
    assert seen["rows"] == 2 and seen["targets"] == [0, 1]
    assert seen["tokenize"] == []
    assert "peft" in seen["worker"]
