"""Predictor on a tiny LoRA checkpoint: columns, order under length sorting, bf16, bad rows,
texts longer than the model's positions, non-finite scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serving.predictor import NON_FINITE_REASON
from serving.text import UNUSABLE_REASON
from tests.helpers import WORDS, make_lora_checkpoint, make_tiny_bert

LABELS = ["card_arrival", "lost_or_stolen_card", "refund_not_showing_up"]
# make_lora_checkpoint records max_length 32; the fragile model embeds only this many positions.
FRAGILE_POSITIONS = 16
NAN_WORD = "declined"


def make_fragile_bert(directory: Path, positions: int = FRAGILE_POSITIONS) -> str:
    """The tiny BERT of tests.helpers with only `positions` position embeddings and a NaN
    embedding for NAN_WORD: any text holding that word gets NaN logits, others stay finite."""
    import torch
    from transformers import BertConfig, BertModel

    make_tiny_bert(directory)
    config = BertConfig.from_pretrained(directory)
    config.max_position_embeddings = positions
    torch.manual_seed(0)
    model = BertModel(config)
    word_id = WORDS.index(NAN_WORD) + 5  # after the 5 special tokens, as make_tiny_bert builds
    with torch.no_grad():
        model.embeddings.word_embeddings.weight[word_id] = float("nan")
    model.save_pretrained(directory, safe_serialization=True)
    return str(directory)


def make_fragile_checkpoint(directory: Path) -> str:
    base = make_fragile_bert(directory / "base")
    return make_lora_checkpoint(base, directory / "checkpoint", LABELS)


@pytest.fixture(scope="module")
def checkpoint(tiny_bert, tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("ckpt") / "tiny-lora"
    return make_lora_checkpoint(tiny_bert, directory, LABELS)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _texts(n: int, seed: int = 0) -> np.ndarray:
    """Texts of 1..30 words in shuffled length order, so sorting has work to undo."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 31, size=n)
    return np.array([" ".join(rng.choice(WORDS, size=k)) for k in lengths], dtype=object)


def _predictor(checkpoint, **kwargs):
    from serving.predictor import Predictor

    return Predictor(checkpoint, torch_threads=1, **kwargs)


def test_output_columns_and_types(checkpoint):
    predictor = _predictor(checkpoint, precision="fp32")
    out = predictor({"text": _texts(10)})

    assert set(out) == {"label", "score", "model_name", "model_version"}
    assert out["score"].dtype == np.float32
    assert all(label in LABELS for label in out["label"])
    assert np.all((out["score"] > 0) & (out["score"] <= 1))
    assert set(out["model_name"]) == {"tiny-lora"} and set(out["model_version"]) == {"local"}
    assert predictor.labels == LABELS and predictor.model_name == "tiny-lora"


def test_length_sorting_keeps_row_order(checkpoint):
    texts = _texts(50)
    sorted_run = _predictor(checkpoint, precision="fp32", sub_batch_tokens=64)
    unsorted_run = _predictor(checkpoint, precision="fp32", sort_window=False, sub_batch_tokens=64)
    one_by_one = [sorted_run({"text": texts[i : i + 1]}) for i in range(len(texts))]

    got = sorted_run({"text": texts})
    expected = np.concatenate([row["score"] for row in one_by_one])
    np.testing.assert_allclose(got["score"], expected, rtol=1e-4, atol=1e-6)
    assert list(got["label"]) == [row["label"][0] for row in one_by_one]
    np.testing.assert_allclose(unsorted_run({"text": texts})["score"], expected, rtol=1e-4)


def test_bf16_agrees_with_fp32(checkpoint, monkeypatch):
    from cluster import hardware

    # Force the bf16 path even on CPUs without native bf16, where it falls back to fp32.
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    texts = _texts(200, seed=1)
    fp32 = _predictor(checkpoint, precision="fp32")({"text": texts})
    bf16_predictor = _predictor(checkpoint, precision="bf16")
    bf16 = bf16_predictor({"text": texts})

    assert bf16_predictor.precision == "bf16"
    assert np.mean(fp32["label"] == bf16["label"]) >= 0.95
    np.testing.assert_allclose(bf16["score"], fp32["score"], atol=0.02)


def test_bf16_falls_back_to_fp32_without_native_support(checkpoint, monkeypatch):
    from cluster import hardware

    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    assert _predictor(checkpoint, precision="bf16").precision == "fp32"
    assert _predictor(checkpoint, precision="auto").precision == "fp32"
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    assert _predictor(checkpoint, precision="auto").precision == "bf16"


def test_bad_rows_get_null_label_and_nan_score(checkpoint):
    rows = ["card arrived late", None, "", "   ", 123, float("nan"), "pin blocked"]
    texts = np.array(rows, dtype=object)
    out = _predictor(checkpoint, precision="fp32")({"text": texts})

    good = [0, 6]
    bad = [1, 2, 3, 4, 5]
    assert all(out["label"][i] in LABELS for i in good)
    assert not np.isnan(out["score"][good]).any()
    assert all(out["label"][i] is None for i in bad)
    assert np.isnan(out["score"][bad]).all()
    assert len(out["model_version"]) == len(texts)


def test_batch_of_only_bad_rows(checkpoint):
    out = _predictor(checkpoint, precision="fp32")({"text": np.array([None, ""], dtype=object)})
    assert list(out["label"]) == [None, None] and np.isnan(out["score"]).all()


def test_passthrough_columns_are_carried(checkpoint):
    predictor = _predictor(checkpoint, precision="fp32", passthrough_columns=("ticket_id",))
    ids = np.arange(100, 120)
    out = predictor({"text": _texts(20), "ticket_id": ids, "ignored": ids})

    np.testing.assert_array_equal(out["ticket_id"], ids)
    assert "ignored" not in out


def test_missing_columns_name_the_fix(checkpoint):
    predictor = _predictor(checkpoint, precision="fp32", passthrough_columns=("ticket_id",))
    with pytest.raises(KeyError, match="text_column"):
        predictor({"body": _texts(2)})
    with pytest.raises(KeyError, match="ticket_id"):
        predictor({"text": _texts(2)})


def test_predict_texts_answers_plain_python(checkpoint):
    answers = _predictor(checkpoint, precision="fp32").predict_texts(["card arrived late", ""])

    assert answers[0]["label"] in LABELS and isinstance(answers[0]["score"], float)
    assert answers[0]["error"] is None
    assert answers[1] == {"label": None, "score": None, "error": UNUSABLE_REASON}


@pytest.fixture(scope="module")
def fragile_checkpoint(tmp_path_factory) -> str:
    return make_fragile_checkpoint(tmp_path_factory.mktemp("fragile"))


def test_fragile_builder_really_has_nan_and_few_positions(fragile_checkpoint):
    """Guards the builder: the tests below prove nothing if the model is not fragile."""
    from jobs.modeling import load_checkpoint

    loaded = load_checkpoint(fragile_checkpoint)
    assert loaded.model.config.max_position_embeddings == FRAGILE_POSITIONS
    nan_row, long_row = loaded.tokenizer([f"card {NAN_WORD}", " ".join(["card"] * 40)])["input_ids"]
    with pytest.raises((IndexError, RuntimeError)):  # past the positions
        loaded.model(input_ids=_ids([long_row]))
    assert loaded.model(input_ids=_ids([nan_row])).logits.isnan().all()
    assert not loaded.model(input_ids=_ids([nan_row[:2] + nan_row[3:]])).logits.isnan().any()


def _ids(rows: list[list[int]]):
    import torch

    return torch.tensor(rows, dtype=torch.long)


def test_max_length_is_clamped_to_the_model_positions(fragile_checkpoint):
    predictor = _predictor(fragile_checkpoint, precision="fp32")
    assert predictor.max_length == FRAGILE_POSITIONS
    assert _predictor(fragile_checkpoint, precision="fp32", max_length=8).max_length == 8


def test_a_text_longer_than_the_positions_is_truncated_not_an_error(fragile_checkpoint):
    long_text = " ".join(["card", "pin"] * 200)
    texts = np.array(["card arrived late", long_text, "refund pending"], dtype=object)
    out = _predictor(fragile_checkpoint, precision="fp32")({"text": texts})

    assert all(label in LABELS for label in out["label"])
    assert np.isfinite(out["score"]).all()
    truncated = _predictor(fragile_checkpoint, precision="fp32")({"text": texts[1:2]})
    same_start = " ".join(long_text.split()[: FRAGILE_POSITIONS - 2])  # minus [CLS], [SEP]
    prefix = _predictor(fragile_checkpoint, precision="fp32")({"text": np.array([same_start])})
    np.testing.assert_allclose(truncated["score"], prefix["score"], rtol=1e-5)


def test_a_nan_row_gets_no_label_and_the_others_their_answers(fragile_checkpoint):
    texts = [
        "card arrived late",
        f"payment {NAN_WORD} at the atm",
        " ".join(["card", "pin"] * 200),
        "refund pending",
    ]
    predictor = _predictor(fragile_checkpoint, precision="fp32", sub_batch_tokens=4096)
    out = predictor({"text": np.array(texts, dtype=object)})
    alone = [predictor({"text": np.array([t], dtype=object)}) for t in texts]

    assert out["label"][1] is None and np.isnan(out["score"][1])
    for i in (0, 2, 3):
        assert out["label"][i] == alone[i]["label"][0]
        np.testing.assert_allclose(out["score"][i], alone[i]["score"][0], rtol=1e-4)
    answers = predictor.predict_texts(texts)
    assert answers[1] == {"label": None, "score": None, "error": NON_FINITE_REASON}
    assert [a["error"] for a in answers[::2]] == [None, None]


def test_nan_logits_from_the_forward_pass_are_caught(checkpoint, monkeypatch):
    """Whatever makes the model emit NaN (here: the forward pass itself, for the rows holding
    one word), only those rows lose their label."""
    predictor = _predictor(checkpoint, precision="fp32", sub_batch_tokens=4096)
    model = predictor._model
    forward = model.forward
    poison = WORDS.index("fee") + 5

    def nan_for_poisoned_rows(input_ids, **kwargs):
        out = forward(input_ids=input_ids, **kwargs)
        out.logits[(input_ids == poison).any(dim=1)] = float("nan")
        return out

    monkeypatch.setattr(model, "forward", nan_for_poisoned_rows)
    answers = predictor.predict_texts(["card arrived", "atm fee charged", "pin blocked"])

    assert [a["error"] for a in answers] == [None, NON_FINITE_REASON, None]
    assert answers[0]["label"] in LABELS and answers[2]["label"] in LABELS
    assert 0 < answers[0]["score"] <= 1


def test_position_limit_knows_the_roberta_offset():
    from transformers import BertConfig, GPT2Config, RobertaConfig, T5Config

    from serving.predictor import _clamp_max_length, _position_limit

    assert _position_limit(BertConfig(max_position_embeddings=512)) == 512
    roberta = RobertaConfig(max_position_embeddings=514, pad_token_id=1)
    assert _position_limit(roberta) == 512
    assert _position_limit(GPT2Config(n_positions=1024)) == 1024
    assert _position_limit(T5Config()) is None  # relative positions: nothing to clamp
    assert _clamp_max_length(600, roberta) == 512
    assert _clamp_max_length(128, roberta) == 128


def test_torch_threads_are_set(checkpoint):
    import torch

    torch.set_num_threads(2)
    _predictor(checkpoint, precision="fp32")
    assert torch.get_num_threads() == 1


def test_sub_batches_cover_every_row_within_the_token_budget():
    from serving.predictor import _sub_batches

    lengths = np.array([3, 40, 5, 5, 90, 7, 12, 12, 2, 60])
    order = np.argsort(lengths, kind="stable")
    chunks = list(_sub_batches(order, lengths, budget=50))

    np.testing.assert_array_equal(np.concatenate(chunks), order)
    for chunk in chunks:
        assert len(chunk) == 1 or len(chunk) * lengths[chunk].max() <= 50
    assert len(chunks[-1]) == 1  # the 90-token row exceeds the budget alone and runs alone


def test_sub_batches_stop_at_the_row_cap_within_a_large_budget():
    """A GPU's budget (32,768 tokens) holds thousands of short rows: the row cap still cuts."""
    from serving.predictor import _sub_batches

    lengths = np.full(10, 4)
    chunks = list(_sub_batches(np.arange(10), lengths, budget=32_768, max_rows=4))

    assert [len(chunk) for chunk in chunks] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(chunks), np.arange(10))
