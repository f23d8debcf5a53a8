"""The Predictor on a GPU: the torch engine runs on cuda (chosen by default when a GPU is
visible, with no CPU engine timed), says so in `runtime`, gives the labels the same checkpoint
gives on the CPU in fp32, and still gives a bad row no label."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cluster.hardware import cuda_has_native_bf16
from tests.helpers import WORDS, make_full_checkpoint, make_ticket_rows

LABELS = ["card_arrival", "lost_or_stolen_card", "refund_not_showing_up"]
MIN_AGREEMENT = 0.99


@pytest.fixture(scope="module")
def checkpoint(tiny_bert, tmp_path_factory) -> str:
    """The tiny BERT trained for a moment on the CPU to tell the labels apart: a random head
    gives every text the same label, and agreeing on that would prove nothing."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert, num_labels=len(LABELS), use_safetensors=True
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    rows = make_ticket_rows(240, LABELS, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for start in range(0, 60 * 16, 16):
        batch = [rows[i % len(rows)] for i in range(start, start + 16)]
        encoded = tokenizer([r["text"] for r in batch], padding=True, return_tensors="pt")
        targets = torch.tensor([LABELS.index(r["category"]) for r in batch])
        model(**encoded, labels=targets).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    directory = tmp_path_factory.mktemp("ckpt") / "tiny-full"
    return str(make_full_checkpoint(tiny_bert, directory, LABELS, model=model.eval()))


def _texts() -> list[str]:
    """128 texts of the trained kind and 128 of random words (1-30, in shuffled length order).
    Near ties are rare but there: on the CPU, bf16 autocast changed 1 label of 1,000 random
    texts (0 of 1,000 trained ones), and MIN_AGREEMENT allows 2 of these 256."""
    rng = np.random.default_rng(0)
    randoms = [" ".join(rng.choice(WORDS, size=k)) for k in rng.integers(1, 31, size=128)]
    return [r["text"] for r in make_ticket_rows(128, LABELS, seed=7)] + randoms


def _agreement(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([g == w for g, w in zip(got, want, strict=True)]))


def test_the_predictor_runs_on_the_gpu_and_agrees_with_cpu_fp32(checkpoint):
    from serving.predictor import Predictor

    texts = _texts()
    reference = Predictor(checkpoint, engine="torch", precision="fp32", device="cpu")
    expected = reference.predict_labels(texts)
    assert reference.runtime["engine"] == "torch" and "device" not in reference.runtime
    assert len(set(expected)) == len(LABELS)  # the labels differ from text to text

    for precision in ("bf16", "fp32"):  # bf16: the default, on a GPU with native bf16
        gpu = Predictor(checkpoint, engine="auto", precision=precision)
        runtime = gpu.runtime
        assert runtime["engine"] == "torch", runtime
        assert runtime["device"] == f"cuda:{torch.cuda.current_device()}", runtime
        assert next(gpu.engine.model.parameters()).device.type == "cuda"
        bf16 = precision == "bf16" and cuda_has_native_bf16()
        assert runtime["precision"] == ("bf16" if bf16 else "fp32"), runtime
        got = gpu.predict_labels(texts)
        assert _agreement(got, expected) >= MIN_AGREEMENT, (precision, got, expected)


def test_a_bad_row_still_gets_no_label_on_the_gpu(checkpoint):
    from serving.predictor import Predictor

    gpu = Predictor(checkpoint)
    texts = ["card arrived late", None, "", "   ", "refund pending"]
    out = gpu({"text": np.array(texts, dtype=object)})
    assert list(out["label"][1:4]) == [None, None, None]
    assert np.isnan(out["score"][1:4]).all()
    assert all(label in LABELS for label in out["label"][[0, 4]])
    assert np.isfinite(out["score"][[0, 4]]).all()
    answers = gpu.predict_texts(texts)
    assert [a["label"] is None for a in answers] == [False, True, True, True, False]
