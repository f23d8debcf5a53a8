"""Sequence classification on a Llama-class base whose tokenizer and config name no pad token,
as Llama's do not, in one process (no Ray, no DeepSpeed): the model builds, trains a step on
a batch padded by the train loop's collate, saves and loads back, and the Predictor scores a
padded batch as it scores each text alone.

LlamaForSequenceClassification pools each row at its rightmost token that is not
config.pad_token_id, and refuses batches of more than one row without one; raylift pads with
eos and sets that id (jobs.modeling.pad_with_eos). A text that itself ends with eos is pooled
at the token before it, alone as in any batch: TEXTS holds one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jobs.checkpoint import AdapterMeta, CheckpointMeta
from jobs.config import ModelConfig
from jobs.modeling import build_model, load_checkpoint, load_tokenizer, save_checkpoint
from jobs.tasks import get_task
from jobs.train_loop import BatchInputs
from serving.predictor import Predictor
from tests.helpers import make_tiny_llama

LABELS = ["card_arrival", "lost_card", "refund"]
# Different lengths, so every batch of them is padded; the last one ends with eos (</s>).
TEXTS = ["card arrived late", "lost card stolen pin blocked", "refund", "refund fee </s>"]
TARGETS = [0, 1, 2, 2]
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return make_tiny_llama(tmp_path_factory.mktemp("llama-no-pad"), pad_token=False)


def _trained_one_step(base: str, method: str) -> tuple[torch.nn.Module, object]:
    """The model build_model makes for `method`, after one step on TEXTS padded as the train
    loop pads a classification batch; and the tokenizer it pads with."""
    task = get_task("sequence-classification")
    torch.manual_seed(0)
    model = build_model(ModelConfig(base=base, method=method, lora=LORA), task, LABELS)
    tokenizer = load_tokenizer(base)
    ids = [np.array(row) for row in tokenizer(TEXTS)["input_ids"]]
    batch, rows = BatchInputs(None, tokenizer.pad_token_id)((ids, TARGETS))
    assert rows == len(TEXTS) and (batch["attention_mask"] == 0).any()  # padded
    model.train()
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    head = [p for name, p in model.named_parameters() if "score" in name and p.requires_grad]
    assert head and all(p.grad is not None and p.grad.abs().sum() > 0 for p in head)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    return model.eval(), tokenizer


def test_pad_token_is_eos_in_tokenizer_and_model_config(base):
    tokenizer = load_tokenizer(base)
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    config = ModelConfig(base=base, method="full")
    model = build_model(config, get_task("sequence-classification"), LABELS)
    assert model.config.pad_token_id == tokenizer.pad_token_id


@pytest.mark.parametrize("method", ["full", "lora"])
def test_trains_saves_reloads_and_scores_padded_batches_as_single_texts(base, tmp_path, method):
    model, tokenizer = _trained_one_step(base, method)
    meta = CheckpointMeta(
        task="sequence-classification",
        labels=LABELS,
        base_model=base,
        method=method,
        adapter=AdapterMeta(**LORA) if method == "lora" else None,
        max_length=32,
    )
    checkpoint = save_checkpoint(model, tokenizer, tmp_path / "ckpt", meta)

    loaded = load_checkpoint(checkpoint)  # an adapter's base is loaded again, config and all
    assert loaded.tokenizer.pad_token_id == tokenizer.pad_token_id
    assert loaded.model.config.pad_token_id == tokenizer.pad_token_id

    predictor = Predictor(str(checkpoint), torch_threads=1)
    together = predictor.predict_texts(TEXTS)
    alone = [predictor.predict_texts([text])[0] for text in TEXTS]
    assert [a["label"] for a in together] == [a["label"] for a in alone]
    np.testing.assert_allclose(
        [a["score"] for a in together], [a["score"] for a in alone], rtol=1e-5
    )
    # The trailing eos counts as padding: pooled at "fee", as the text without it is.
    assert predictor.predict_texts(["refund fee"]) == [alone[-1]]


def test_onnx_export_pools_padded_rows_as_torch_does(base, tmp_path):
    """The export traces the head's pooling with config.pad_token_id in the graph; without one
    its batch of two rows fails (the version would be served by torch only)."""
    import onnxruntime

    from serving.engines import export_onnx
    from serving.predictor import _pad

    model, tokenizer = _trained_one_step(base, "full")
    path = export_onnx(model, tmp_path / "model.onnx")
    ids, mask = _pad(tokenizer(TEXTS)["input_ids"], tokenizer.pad_token_id)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    exported = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    with torch.no_grad():
        expected = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    np.testing.assert_allclose(exported, expected.logits.numpy(), atol=1e-5)
