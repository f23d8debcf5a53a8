"""Predictor.score_responses, the causal-LM re-evaluation's scorer: training's own tokenize stage
and per-epoch evaluation (jobs.training_data.tokenize_instructions, jobs.train_loop._evaluate,
in a one-rank gloo group, no Ray) give the val_loss that the Predictor's per-row figures sum to,
and a row's figure does not depend on the rows batched with it."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from jobs import instruct
from jobs.config import validate_mapping
from jobs.modeling import load_tokenizer
from jobs.tasks import get_task
from jobs.train_loop import INPUT_IDS, TARGETS, BatchInputs, _evaluate
from jobs.training_data import tokenize_instructions
from tests.helpers import WORDS, make_ticket_rows, make_tiny_llama

INTENTS = ["card_arrival", "lost_card", "refund"]
MAX_LENGTH = 32


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _checkpoint(base: str, directory, template: str) -> str:
    """A full causal-lm checkpoint of the base as training saves one."""
    from transformers import AutoModelForCausalLM

    from jobs.checkpoint import CheckpointMeta, InstructMeta
    from jobs.modeling import save_checkpoint

    meta = CheckpointMeta(
        task="causal-lm",
        labels=[],
        base_model=base,
        method="full",
        max_length=MAX_LENGTH,
        text_column="prompt",
        instruct=InstructMeta(
            template=template,
            prompt_column="prompt",
            response_column="response",
            system_column="system",
        ),
    )
    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True)
    tokenizer = instruct.prepare_tokenizer(load_tokenizer(base))
    return str(save_checkpoint(model, tokenizer, directory, meta))


def _rows() -> dict[str, list]:
    """Instructions of uneven lengths: some with a system message, one prompt far over
    MAX_LENGTH (training cuts its start)."""
    rows = make_ticket_rows(11, INTENTS, seed=4)
    prompts = [r["text"] for r in rows]
    prompts[3] = " ".join(WORDS * 2)  # ~60 tokens of prompt
    prompts[5] = "card"
    return {
        "prompt": prompts,
        "response": [f"the intent is {r['category']}" for r in rows],
        "system": [None if i % 3 else "answer with the intent" for i in range(len(rows))],
    }


class _Shard:
    """The validation shard Ray Data hands a worker, from training's own tokenize stage."""

    def __init__(self, base: str, rows: dict[str, list], template: str):
        tokenized = tokenize_instructions(
            pa.table(rows),
            base_model=base,
            trust_remote_code=False,
            prompt_column="prompt",
            response_column="response",
            system_column="system",
            prompt_template=template,
            max_length=MAX_LENGTH,
        )
        self.ids = [np.asarray(v, dtype=np.int32) for v in tokenized[INPUT_IDS].to_pylist()]
        self.labels = [np.asarray(v, dtype=np.int32) for v in tokenized[TARGETS].to_pylist()]

    def iter_batches(self, *, batch_size, **kwargs):
        for start in range(0, len(self.ids), batch_size):
            window = slice(start, start + batch_size)
            yield {
                INPUT_IDS: np.array([*self.ids[window], None], dtype=object)[:-1],
                TARGETS: np.array([*self.labels[window], None], dtype=object)[:-1],
            }


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_the_summed_response_nll_is_the_val_loss_training_reports(
    process_group, tiny_llama, tmp_path, template
):
    from transformers import AutoModelForCausalLM

    from serving.predictor import Predictor

    rows = _rows()
    config = validate_mapping(
        {
            "name": "scoring",
            "task": {"type": "causal-lm", "max_length": MAX_LENGTH, "system_column": "system"},
            "model": {"base": tiny_llama, "method": "full"},
            "train": {"batch_size": 4, "length_window": 2, "precision": "fp32"},
            "promote": {"metric": "val_perplexity", "mode": "min", "max_value": None},
        }
    )
    task = get_task("causal-lm")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, use_safetensors=True)
    pad = instruct.prepare_tokenizer(load_tokenizer(tiny_llama)).pad_token_id
    shard = _Shard(tiny_llama, rows, template)
    trained = _evaluate(model, shard, task, config.train, 0, pad, BatchInputs(task, pad))

    checkpoint = _checkpoint(tiny_llama, tmp_path / "ckpt", template)
    # A small token budget: the 11 rows run in several sub-batches, each padded to its longest.
    predictor = Predictor(checkpoint, precision="fp32", sub_batch_tokens=64)
    nll, tokens = predictor.score_responses(rows["prompt"], rows["response"], rows["system"])

    scored = [int((labels[1:] != instruct.IGNORE_INDEX).sum()) for labels in shard.labels]
    assert tokens.tolist() == scored
    figures = instruct.perplexity_metrics(float(nll.sum()), int(tokens.sum()))
    assert figures["loss"] == pytest.approx(trained["val_loss"], rel=1e-6)
    assert figures["perplexity"] == pytest.approx(trained["val_perplexity"], rel=1e-6)
    assert trained["val_rows"] == len(rows["prompt"])

    # Alone, each row gets the figure it got in its padded sub-batch.
    for i in range(len(rows["prompt"])):
        alone, count = predictor.score_responses(
            [rows["prompt"][i]], [rows["response"][i]], [rows["system"][i]]
        )
        assert count[0] == tokens[i]
        assert alone[0] == pytest.approx(nll[i], rel=1e-5, abs=1e-5)


def test_unusable_rows_score_nothing_and_a_classifier_is_refused(tiny_llama, tiny_bert, tmp_path):
    from serving.predictor import Predictor
    from tests.helpers import make_full_checkpoint

    predictor = Predictor(_checkpoint(tiny_llama, tmp_path / "ckpt", "chat"), precision="fp32")
    nll, tokens = predictor.score_responses(["card", None, "refund", "   "], ["x", "y", "", "z"])
    assert math.isfinite(nll[0]) and tokens[0] > 0
    assert np.isnan(nll[1:]).all() and tokens[1:].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="one of each per row"):
        predictor.score_responses(["card"], ["x", "y"])

    classifier = make_full_checkpoint(tiny_bert, tmp_path / "bert", INTENTS)
    with pytest.raises(TypeError, match="it scores texts, it does not generate"):
        Predictor(str(classifier), precision="fp32").score_responses(["card"], ["refund"])


def test_bf16_scoring_stays_close_to_fp32(tiny_llama, tmp_path):
    from cluster import hardware
    from serving.predictor import Predictor

    if not hardware.cpu_has_native_bf16():
        pytest.skip("bf16 falls back to fp32 on this CPU")
    checkpoint = _checkpoint(tiny_llama, tmp_path / "ckpt", "chat")
    rows = _rows()
    exact, _ = Predictor(checkpoint, precision="fp32").score_responses(
        rows["prompt"], rows["response"]
    )
    bf16 = Predictor(checkpoint, precision="bf16")
    assert bf16.precision == "bf16"
    rough, _ = bf16.score_responses(rows["prompt"], rows["response"])
    assert rough.sum() == pytest.approx(exact.sum(), rel=0.05)
