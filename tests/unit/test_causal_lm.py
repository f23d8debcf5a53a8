"""causal-lm without Ray: formatting, prompt masking, packing, token-weighted perplexity, the
checkpoint it writes, and the config checks that keep it apart from classification."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs import instruct
from jobs.config import ConfigError, validate_mapping, with_overrides
from jobs.instruct import IGNORE_INDEX, collate, encode_example, pack_rows, prompt_text
from jobs.modeling import load_tokenizer
from jobs.tasks import get_task
from jobs.train_loop import BatchInputs
from tests.helpers import make_tiny_llama


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def plain_llama(tmp_path_factory) -> str:
    return make_tiny_llama(tmp_path_factory.mktemp("plain-llama"), chat_template=False)


@pytest.fixture(scope="module")
def model(tiny_llama):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_llama, use_safetensors=True).eval()


def _tokens(tokenizer, ids) -> list[str]:
    return tokenizer.convert_ids_to_tokens([int(i) for i in ids])


def test_chat_template_masks_the_prompt_and_teaches_the_end_of_turn(tiny_llama):
    tok = load_tokenizer(tiny_llama)
    assert instruct.resolve_template(tok) == "chat"
    ids, labels = encode_example(
        tok, "card arrived late", "card_arrival", "be short", template="chat", max_length=64
    )
    prompt = tok(prompt_text(tok, "card arrived late", "be short"), add_special_tokens=False)
    n_prompt = len(prompt["input_ids"])
    assert list(ids[:n_prompt]) == prompt["input_ids"]  # generation sees exactly this prefix
    assert _tokens(tok, ids[:2]) == ["<s>", "<|system|>"]
    assert _tokens(tok, ids[n_prompt - 1 : n_prompt]) == ["<|assistant|>"]
    assert (labels[:n_prompt] == IGNORE_INDEX).all()
    assert _tokens(tok, labels[n_prompt:]) == ["card_arrival", "<|end|>"]


def test_plain_template_when_the_tokenizer_has_none(plain_llama):
    tok = load_tokenizer(plain_llama)
    assert instruct.resolve_template(tok) == "plain"
    with pytest.raises(ValueError, match="prompt_template: plain"):
        instruct.resolve_template(tok, "chat")
    text = prompt_text(tok, "lost card", template="plain")
    assert text == "<s>### Instruction:\nlost card\n\n### Response:\n"
    ids, labels = encode_example(tok, "lost card", "lost_card", template="plain", max_length=64)
    scored = labels != IGNORE_INDEX
    assert _tokens(tok, ids[scored]) == ["lost_card", "</s>"]  # the answer, then eos
    assert _tokens(tok, ids[~scored])[-3:] == ["###", "Response", ":"]


def test_truncation_keeps_the_generation_prompt_next_to_the_answer(tiny_llama):
    tok = load_tokenizer(tiny_llama)
    long_prompt = " ".join(["card"] * 40)
    ids, labels = encode_example(tok, long_prompt, "refund", template="chat", max_length=16)
    assert len(ids) == 16
    scored = labels != IGNORE_INDEX
    assert _tokens(tok, ids[scored]) == ["refund", "<|end|>"]
    assert _tokens(tok, ids[~scored])[-1] == "<|assistant|>"  # cut at the start, not the end
    long_answer = " ".join(["refund"] * 40)
    ids, labels = encode_example(tok, "card", long_answer, template="chat", max_length=16)
    assert len(ids) == 16 and (labels != IGNORE_INDEX).sum() >= 8  # half the budget at least


def test_prompt_tokens_are_ignored_by_the_loss(tiny_llama, model):
    """The gradient reaching the logits that predict prompt tokens (and padding) is exactly 0,
    and the model's loss is the mean NLL of the response tokens alone."""
    tok = load_tokenizer(tiny_llama)
    examples = [("card arrived late", "card_arrival"), ("refund fee", "refund")]
    encoded = [encode_example(tok, p, r, template="chat", max_length=64) for p, r in examples]
    batch = collate([e[0] for e in encoded], [e[1] for e in encoded], tok.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits.detach().requires_grad_(True)
    loss = model.loss_function(logits, batch["labels"], vocab_size=model.config.vocab_size)
    loss.backward()
    predicts_scored = torch.zeros_like(batch["labels"], dtype=torch.bool)
    predicts_scored[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX  # logit t scores label t+1
    grad_norm = logits.grad.abs().sum(-1)
    assert (grad_norm[~predicts_scored] == 0).all()
    assert (grad_norm[predicts_scored] > 0).all()
    assert int(predicts_scored.sum()) == 4  # two answers of one token + end of turn each
    nll, tokens = instruct.token_nll(logits.detach(), batch["labels"])
    assert tokens == 4 and math.isclose(loss.item(), nll / tokens, rel_tol=1e-5)


def test_a_tokenizer_with_a_pad_but_no_eos_token_is_refused():
    """The pad token must not stand in for the eos token a causal LM learns to end with."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(
        models.WordLevel(vocab={"<pad>": 0, "<unk>": 1, "refund": 2}, unk_token="<unk>")
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id is None
    with pytest.raises(ValueError, match="tokenizer of model.base has no eos token"):
        instruct.prepare_tokenizer(tokenizer)


def test_a_tokenizer_without_a_pad_token_pads_with_eos(tmp_path):
    from transformers import AutoTokenizer

    base = make_tiny_llama(tmp_path / "no-pad", pad_token=False)
    loaded = AutoTokenizer.from_pretrained(base)
    assert loaded.pad_token is None
    tokenizer = instruct.prepare_tokenizer(loaded)
    assert tokenizer.pad_token == "</s>"
    assert tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("</s>")


class _Shard:
    """Tokenized instruction rows, as a worker's validation shard hands them to the loop."""

    def __init__(self, encoded: list[tuple[np.ndarray, np.ndarray]]):
        self.encoded = encoded

    def iter_batches(self, *, batch_size, **kwargs):
        for start in range(0, len(self.encoded), batch_size):
            part = self.encoded[start : start + batch_size]
            yield {
                "input_ids": np.array([e[0] for e in part] + [None], dtype=object)[:-1],
                "targets": np.array([e[1] for e in part] + [None], dtype=object)[:-1],
            }


def test_evaluation_takes_the_models_own_loss_instead_of_scoring_the_logits_again(
    process_group, tiny_llama, monkeypatch
):
    """The LoRA model training evaluates (peft over Llama): its loss is the mean NLL of the
    scored tokens, so the evaluation's figures from it equal the summed NLL of the logits
    (jobs.instruct.token_nll, what evaluation computed before) while the full-vocabulary
    cross-entropy runs once per batch, in the model, not twice."""
    from jobs.config import ModelConfig, TrainConfig
    from jobs.modeling import build_model
    from jobs.train_loop import _evaluate, _stream

    task = get_task("causal-lm")
    tok = instruct.prepare_tokenizer(load_tokenizer(tiny_llama))
    pairs = [
        ("card arrived late", "card_arrival"),
        ("lost card stolen pin", "lost_card refund"),
        ("refund", "refund"),
        ("atm declined payment pending", "refund fee"),
        ("pin", "lost_card"),
    ]
    shard = _Shard([encode_example(tok, p, r, template="chat", max_length=32) for p, r in pairs])
    torch.manual_seed(0)
    lora = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
    model = build_model(ModelConfig(base=tiny_llama, method="lora", lora=lora), task, [])
    model.eval()
    assert instruct.loss_is_mean_token_nll(model)
    train = TrainConfig(batch_size=2, length_window=1)
    collate = BatchInputs(task, tok.pad_token_id)

    nll, tokens, batches = 0.0, 0, 0
    with torch.no_grad():
        for item in _stream(shard, train, rng=None):
            inputs, _ = collate(item, training=False)
            batch_nll, batch_tokens = instruct.token_nll(model(**inputs).logits, inputs["labels"])
            nll, tokens, batches = nll + batch_nll, tokens + batch_tokens, batches + 1
    assert batches == 3 and tokens > batches

    scored = []
    cross_entropy = torch.nn.functional.cross_entropy

    def counted(*args, **kwargs):
        scored.append(args[0].shape)
        return cross_entropy(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", counted)
    metrics = _evaluate(model, shard, task, train, 0, tok.pad_token_id, collate)
    assert len(scored) == batches  # the model's own loss only
    assert metrics["val_loss"] == pytest.approx(nll / tokens, rel=1e-6)
    assert metrics["val_perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-6)
    assert metrics["val_rows"] == len(pairs)


def test_a_batch_without_a_scored_token_adds_nothing():
    """The model's mean over no token is NaN; the sum it stands for is 0."""
    task = get_task("causal-lm")
    state = task.eval_state(0)
    labels = torch.full((2, 5), IGNORE_INDEX)
    task.accumulate(state, torch.zeros(2, 5, 7), labels, loss=torch.tensor(float("nan")))
    assert state.tolist() == [0.0, 0.0]


def test_a_loss_that_is_not_the_mean_token_nll_is_not_taken(model):
    """A model that adds a router loss to its own, or a class transformers does not ship (remote
    code computes its loss as it likes), is scored from its logits."""
    assert instruct.loss_is_mean_token_nll(model)
    model.config.output_router_logits = True
    try:
        assert not instruct.loss_is_mean_token_nll(model)
    finally:
        model.config.output_router_logits = False
    remote = type("RemoteCodeForCausalLM", (type(model),), {"__module__": "remote_code.modeling"})
    assert not instruct.loss_is_mean_token_nll(remote(model.config))


def test_pack_rows_fill_rows_up_to_capacity():
    lengths = [5, 2, 8, 5, 6, 4]
    rows = pack_rows(lengths, capacity=10)
    assert sorted(i for row in rows for i in row) == list(range(6))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 3  # 30 tokens in rows of 10: no padding left
    assert pack_rows([12, 3], capacity=10) == [[0], [1]]  # too long: a row of its own


def test_packed_rows_attend_within_each_example_only(tiny_llama, model):
    """Packed logits equal each example's logits run alone (position ids restart, the mask is
    block-diagonal), and a packed batch has the unpacked batch's loss. In training mode too,
    where Llama would build a KV cache unless told not to (and then ignore the packing)."""
    tok = load_tokenizer(tiny_llama)
    examples = [
        ("card arrived late", "card_arrival"),
        ("lost card stolen pin", "lost_card"),
        ("refund", "refund"),
        ("atm declined payment pending", "refund"),
    ]
    encoded = [encode_example(tok, p, r, template="chat", max_length=64) for p, r in examples]
    seqs, labels = [e[0] for e in encoded], [e[1] for e in encoded]
    packed = collate(seqs, labels, tok.pad_token_id, packing=True, max_length=32)
    assert packed["input_ids"].shape[0] < len(seqs) and "attention_mask" not in packed
    with torch.no_grad():
        out = model(**{k: v for k, v in packed.items() if k != "labels"})
        rows = pack_rows([len(s) for s in seqs], 32)
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                alone = model(input_ids=torch.as_tensor(seqs[i], dtype=torch.long)[None]).logits
                n = len(seqs[i])
                torch.testing.assert_close(out.logits[r, at : at + n], alone[0], atol=1e-5, rtol=0)
                at += n
        padded = collate(seqs, labels, tok.pad_token_id)
        unpacked_loss = model(**padded).loss
    model.train()  # dropout is 0 in the tiny config: train mode changes only the cache default
    try:
        packed_loss = model(**packed).loss
    finally:
        model.eval()
    torch.testing.assert_close(packed_loss, unpacked_loss, atol=1e-5, rtol=0)


def test_batch_inputs_weight_the_loss_by_scored_tokens(tiny_llama):
    tok = load_tokenizer(tiny_llama)
    encoded = [
        encode_example(tok, "card", "card_arrival refund", template="chat", max_length=32),
        encode_example(tok, "refund", "refund", template="chat", max_length=32),
    ]
    item = ([e[0] for e in encoded], np.array([e[1] for e in encoded], dtype=object))
    batches = BatchInputs(get_task("causal-lm"), tok.pad_token_id, packing=True, max_length=32)
    packed, weight = batches(item)
    assert weight == 5 and "position_ids" in packed  # 3 + 2 answer tokens with end of turn
    unpacked, _ = batches(item, training=False)  # evaluation never packs
    assert "attention_mask" in unpacked and unpacked["input_ids"].shape[0] == 2


def test_perplexity_is_token_weighted_and_sums_over_workers(tiny_llama, model):
    """Two workers' summed states give the figures of one worker over all rows."""
    task = get_task("causal-lm")
    tok = load_tokenizer(tiny_llama)
    pairs = [("card", "refund fee"), ("lost card stolen", "lost_card"), ("pin", "refund")]
    encoded = [encode_example(tok, p, r, template="chat", max_length=32) for p, r in pairs]

    def state_of(part):
        state = task.eval_state(0)
        batch = collate([e[0] for e in part], [e[1] for e in part], tok.pad_token_id)
        with torch.no_grad():
            task.accumulate(state, model(**batch).logits, batch["labels"])
        return state

    whole = state_of(encoded)
    summed = state_of(encoded[:1]) + state_of(encoded[1:])
    torch.testing.assert_close(summed, whole)
    metrics = task.metrics(summed.numpy())
    assert whole[1] == 3 + 2 + 2  # scored tokens, not rows
    assert math.isclose(metrics["perplexity"], math.exp(metrics["loss"]))
    # A random tiny model is near-uniform over its vocabulary.
    assert 0.3 * model.config.vocab_size < metrics["perplexity"] < 3 * model.config.vocab_size
    assert math.isnan(task.metrics(task.eval_state(0).numpy())["perplexity"])


def test_lora_checkpoint_keeps_adapters_only_and_loads_as_a_causal_lm(tiny_llama, tmp_path):
    from safetensors import safe_open

    from jobs.checkpoint import AdapterMeta, CheckpointMeta, InstructMeta
    from jobs.config import ModelConfig
    from jobs.modeling import build_model, load_checkpoint, save_checkpoint

    cfg = ModelConfig(base=tiny_llama, method="lora", lora={"r": 4, "target_modules": ["q_proj"]})
    model = build_model(cfg, get_task("causal-lm"), [])
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)  # lm_head stays frozen
    meta = CheckpointMeta(
        task="causal-lm",
        labels=[],
        base_model=tiny_llama,
        method="lora",
        adapter=AdapterMeta(r=4, alpha=32, dropout=0.05, target_modules=["q_proj"]),
        max_length=32,
        text_column="prompt",
        instruct=InstructMeta(template="chat", prompt_column="prompt", response_column="response"),
    )
    directory = save_checkpoint(model, load_tokenizer(tiny_llama), tmp_path / "ckpt", meta)
    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as handle:
        assert all("lora_" in key for key in handle.keys())  # noqa: SIM118 (not a dict)
    assert (directory / "chat_template.jinja").is_file()
    loaded = load_checkpoint(directory)
    assert type(loaded.model).__name__ == "LlamaForCausalLM" and loaded.labels == []
    assert loaded.meta.instruct.template == "chat"
    with pytest.raises(ValueError, match="no labels and says how its prompts"):
        CheckpointMeta(**{**meta.model_dump(), "labels": ["x"]})


def _causal(**sections) -> dict:
    config = {
        "name": "instr",
        "task": {"type": "causal-lm"},
        "model": {"method": "lora"},
        "promote": {"metric": "val_perplexity", "mode": "min", "max_value": 50.0},
    }
    for key, values in sections.items():
        config[key] = {**config.get(key, {}), **values}
    return config


def test_config_keeps_causal_lm_and_classification_keys_apart():
    config = validate_mapping(_causal(task={"prompt_column": "text", "packing": True}))
    assert (config.task.input_column, config.task.target_column) == ("text", "response")
    again = validate_mapping(config.model_dump(mode="json"))  # a worker's copy validates
    assert again == config
    cases = {
        "task.label_column: the target is task.response_column": _causal(
            task={"label_column": "category"}
        ),
        "task.labels: a causal LM has no label set": _causal(task={"labels": ["a", "b"]}),
        "model.method=frozen trains a new task head only": _causal(model={"method": "frozen"}),
        "causal-lm reports val_perplexity and val_loss": _causal(
            promote={"metric": "val_accuracy", "mode": "max", "min_value": 0.5, "max_value": None}
        ),
        # tune.mode unset follows promote.mode (min here); set against the metric, refused
        "tune ranks trials by val_perplexity \\(mode max\\).*set tune.mode: min": _causal(
            tune={
                "search_space": {"train.learning_rate": {"type": "choice", "values": [0.1]}},
                "mode": "max",
            }
        ),
        "task.packing: applies to task.type=causal-lm only": {
            "name": "cls",
            "task": {"packing": True},
        },
    }
    for message, raw in cases.items():
        with pytest.raises(ConfigError, match=message):
            validate_mapping(raw)


def test_tokenize_stage_yields_ids_and_masked_labels(tiny_llama):
    import pyarrow as pa

    from jobs.train_loop import INPUT_IDS, TARGETS
    from jobs.training_data import tokenize_instructions, trainable_instructions

    batch = pa.table(
        {
            "prompt": ["card arrived late", " ", "refund fee", None],
            "response": ["card_arrival", "refund", "refund", "refund"],
            "system": [None, None, "be short", None],
        }
    )
    kept = trainable_instructions(batch, prompt_column="prompt", response_column="response")
    assert kept.num_rows == 2  # a blank and a null prompt are not trained on
    out = tokenize_instructions(
        kept,
        base_model=tiny_llama,
        trust_remote_code=False,
        prompt_column="prompt",
        response_column="response",
        system_column="system",
        prompt_template="auto",
        max_length=32,
    )
    ids, labels = out[INPUT_IDS].to_pylist(), out[TARGETS].to_pylist()
    assert [len(i) for i in ids] == [len(lab) for lab in labels]
    tok = load_tokenizer(tiny_llama)
    assert "<|system|>" in _tokens(tok, ids[1]) and "<|system|>" not in _tokens(tok, ids[0])
    assert [[t for t in lab if t != IGNORE_INDEX] for lab in labels] == [
        tok.convert_tokens_to_ids(["card_arrival", "<|end|>"]),
        tok.convert_tokens_to_ids(["refund", "<|end|>"]),
    ]


def _write_instructions(path: Path, rows: list[dict]) -> Path:
    import csv

    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "response"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_scan_refuses_too_many_unusable_instructions_before_ray(tiny_llama, tmp_path):
    from jobs import load
    from jobs.training_data import scan_training_rows

    rows = [{"prompt": f"card {i}", "response": "card_arrival"} for i in range(20)]
    rows[3]["response"] = ""
    source = _write_instructions(tmp_path / "instructions.csv", rows)
    config = validate_mapping(
        _causal(
            model={"base": tiny_llama},
            catalog={"uri": f"sqlite:///{tmp_path}/catalog.db", "warehouse": str(tmp_path / "wh")},
            data={"source": str(source), "inbox_rows": 0},
        )
    )
    load.main(config)
    with pytest.raises(ValueError, match="'prompt' or 'response', more than task.max_refused"):
        scan_training_rows(config)
    scanned = scan_training_rows(with_overrides(config, {"task.max_refused_share": 0.1}))
    assert (len(scanned.keys), scanned.rows_refused) == (19, 1)
    assert set(scanned.labels) == {"all"}  # one split group: a plain seeded split


def test_finetune_keeps_the_lowest_perplexity_epoch_when_promote_mode_is_min():
    from types import SimpleNamespace

    from jobs.finetune import _best_checkpoint

    result = SimpleNamespace(
        best_checkpoints=[
            ("epoch1", {"epoch": 1, "val_perplexity": 9.0}),
            ("epoch2", {"epoch": 2, "val_perplexity": 4.0}),
            ("mid", {"val_perplexity": 1e300}),  # a mid-epoch state checkpoint: never picked
            ("epoch3", {"epoch": 3, "val_perplexity": 6.0}),
        ]
    )
    assert _best_checkpoint(result, "val_perplexity", "min")[0] == "epoch2"
    assert _best_checkpoint(result, "val_perplexity", "max")[0] == "epoch1"


def test_promote_against_an_alias_on_other_rows_needs_the_candidates_rows_to_reevaluate():
    from types import SimpleNamespace

    from jobs.promote import GateRefused, _reevaluated

    # Perplexity is measured again (tests/integration/test_promote_reevaluate_causal_lm.py),
    # on the candidate's split: a candidate without lineage tags names no rows to measure on.
    config = validate_mapping(_causal())
    candidate, incumbent = SimpleNamespace(version=2, tags={}), SimpleNamespace(version=1, tags={})
    with pytest.raises(GateRefused, match="cannot tell which rows the version was evaluated on"):
        _reevaluated(config, candidate, incumbent)
