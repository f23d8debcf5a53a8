"""Bad training data is refused before Ray starts, or dropped and counted, never trained on.

These run without Ray: the unit-test conftest makes `ray.init` raise, so a check that happened
only after Ray started would fail here with "unit tests must not start Ray".
"""

from __future__ import annotations

import csv
import threading
from pathlib import Path

import pyarrow as pa
import pytest

from jobs import finetune, load
from jobs.config import TrainConfig, validate_mapping
from jobs.train_loop import INPUT_IDS, TARGETS, TrainProgress, _train_epoch
from jobs.training_data import (
    ReadAhead,
    read_ahead,
    scan_training_rows,
    shuffled_windows,
    tokenize_batch,
    trainable_rows,
)
from tests.helpers import make_ticket_rows


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


# --- the training stream: read ahead, seeded shuffle buffer -----------------------------------


def _blocks(rows: int, block_rows: int) -> list[pa.Table]:
    """Tokenized blocks as the Ray Data stage yields them, sorted by target (a sorted table)."""
    return [
        pa.table(
            {
                INPUT_IDS: pa.array(
                    [[5] * (1 + i % 7) for i in range(start, min(start + block_rows, rows))],
                    type=pa.list_(pa.int32()),
                ),
                TARGETS: pa.array(range(start, min(start + block_rows, rows)), type=pa.int64()),
            }
        )
        for start in range(0, rows, block_rows)
    ]


def _targets(windows) -> list[list[int]]:
    return [window[TARGETS].tolist() for window in windows]


def test_a_shard_within_the_buffer_is_shuffled_whole_and_the_same_on_every_pass():
    blocks = _blocks(400, 100)
    windows = _targets(shuffled_windows(blocks, 64, 10_000, seed=7))
    assert [len(w) for w in windows] == [64] * 6 + [16]
    assert sorted(sum(windows, [])) == list(range(400))
    assert max(windows[0]) >= 300 and min(windows[0]) < 100  # drawn from the whole shard
    assert windows == _targets(shuffled_windows(blocks, 64, 10_000, seed=7))
    assert windows != _targets(shuffled_windows(blocks, 64, 10_000, seed=8))
    assert sum(_targets(shuffled_windows(blocks, 64, 0, seed=None)), []) == list(range(400))
    first = next(shuffled_windows(blocks, 64, 10_000, seed=7))
    assert first[INPUT_IDS].dtype == object and len(first[INPUT_IDS][0]) >= 1


def test_a_larger_shard_gives_its_first_window_once_the_buffer_is_full():
    read = []

    def blocks():
        for block in _blocks(2_000, 100):
            read.append(block.num_rows)
            yield block

    windows = shuffled_windows(blocks(), 64, 300, seed=7)
    first = next(windows)[TARGETS].tolist()
    assert sum(read) == 300  # three blocks, not the 2,000-row shard
    assert max(first) < 300
    rest = _targets(windows)
    assert sorted(first + sum(rest, [])) == list(range(2_000)) and sum(read) == 2_000


class _BlockShard:
    """A training shard as Ray Data's split gives it: the same blocks on every pass, counted as
    they are read; `fail` raises in the middle of a pass."""

    def __init__(self, rows: int = 400, block_rows: int = 100, fail: bool = False):
        self.blocks, self.fail = _blocks(rows, block_rows), fail
        self.passes_started = 0
        self.rows_read: list[int] = []  # per pass
        self.read = threading.Condition()

    def iter_batches(self, *, batch_size, batch_format, **kwargs):
        assert batch_size is None and batch_format == "pyarrow" and not kwargs
        with self.read:
            self.passes_started += 1
            self.rows_read.append(0)
        for i, block in enumerate(self.blocks):
            if self.fail and i == 2:
                raise OSError("the warehouse went away")
            with self.read:
                self.rows_read[-1] += block.num_rows
                self.read.notify_all()
            yield block

    def wait(self, predicate) -> None:
        with self.read:
            assert self.read.wait_for(predicate, timeout=10)


def test_the_shard_is_read_ahead_one_pass_and_each_pass_is_shuffled_by_its_seed():
    shard = _BlockShard()
    ahead = ReadAhead(shard, passes=4, max_rows=10_000)
    shard.wait(lambda: shard.rows_read == [400])  # read before anyone asked for a batch
    assert shard.passes_started == 1  # the next pass waits until this one is asked for

    def epoch(seed: int) -> list[list[int]]:
        batches = ahead.iter_batches(
            batch_size=64,
            batch_format="numpy",
            local_shuffle_buffer_size=10_000,
            local_shuffle_seed=seed,
        )
        return _targets(batches)

    first = epoch(1001)
    assert first == _targets(shuffled_windows(shard.blocks, 64, 10_000, seed=1001))
    shard.wait(lambda: shard.rows_read == [400, 400])  # the second pass read during the first
    assert epoch(1002) == _targets(shuffled_windows(shard.blocks, 64, 10_000, seed=1002))
    # a pass left early (a capped epoch) leaves nothing behind for the next one
    capped = ahead.iter_batches(batch_size=64, local_shuffle_buffer_size=10_000)
    next(iter(capped))
    assert epoch(1001) == first
    assert epoch(1001) == first  # past the 4 passes read ahead: read when asked, same order
    assert shard.passes_started == 5


def test_a_read_that_fails_ahead_fails_the_consumer():
    ahead = ReadAhead(_BlockShard(fail=True), passes=1, max_rows=100)
    windows = ahead.iter_batches(batch_size=64, local_shuffle_buffer_size=0)
    assert len(next(iter(windows))[TARGETS]) == 64  # what was read before the failure
    with pytest.raises(RuntimeError, match="reading the training shard ahead failed"):
        list(windows)


class _Engine:
    """Records the targets of each step (test_train_loop's engine, in short)."""

    global_rank, dp_world_size, global_steps = 0, 1, 0

    def __init__(self):
        self.steps: list[list[int]] = []

    def train(self):
        pass

    def __call__(self, input_ids, attention_mask, labels):
        import torch

        self._batch = labels.tolist()
        return type("Out", (), {"loss": torch.tensor(float(sum(self._batch)) / 1000)})()

    def backward(self, loss):
        pass

    def step(self):
        self.steps.append(self._batch)
        self.global_steps += 1

    def get_lr(self):
        return [0.1]


def test_a_restarted_worker_reading_ahead_resumes_the_epoch_where_it_stopped(process_group):
    train = TrainConfig(batch_size=8, length_window=4, checkpoint_every_steps=3, epochs=2)
    saved: list[TrainProgress] = []
    whole = _Engine()
    shard = read_ahead(_BlockShard(), train)
    _train_epoch(whole, shard, train, 0, TrainProgress(epoch=1), lambda progress: None)
    _train_epoch(whole, shard, train, 0, TrainProgress(epoch=2), saved.append)
    epoch2 = whole.steps[50:]
    assert len(whole.steps) == 100 and sorted(sum(epoch2, [])) == list(range(400))
    assert epoch2 != whole.steps[:50]  # each epoch its own order

    rest = _Engine()  # a restarted worker: a fresh read-ahead, from epoch 2's 4th checkpoint
    at = saved[3]
    _train_epoch(rest, read_ahead(_BlockShard(), train), train, 0, at, lambda progress: None)
    assert at.batches == 12 and rest.steps == epoch2[12:]
