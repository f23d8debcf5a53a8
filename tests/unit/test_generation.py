"""Generation on the tiny random Llama (no Ray): batched with left padding and the KV cache equals
one-by-one and transformers' own greedy generate, stop sequences, usage, seeds, limits."""

from __future__ import annotations

import dataclasses

import pytest

from jobs.config import GenerationConfig
from serving.generation import GenerationRequestError, Generator, SamplingParams
from tests.helpers import WORDS, make_tiny_llama

PROMPTS = [
    "card",
    "lost stolen pin blocked transfer cancel refund fee exchange rate top up failed",
    "refund pending",
    "atm declined payment pending balance account",
    "verify identity change address phone",
]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).float().eval()
    model.base_path = path  # the Predictor test saves a checkpoint of it
    return model, AutoTokenizer.from_pretrained(path)


def _generator(llama, **limits) -> Generator:
    model, tokenizer = llama
    return Generator(model, tokenizer, GenerationConfig(**limits), position_limit=256)


def _greedy(tokens: int = 12, **more) -> SamplingParams:
    return SamplingParams(max_new_tokens=tokens, temperature=0.0, **more)


def _encode(generator: Generator, prompts=PROMPTS) -> list[list[int]]:
    return [generator.encode(prompt) for prompt in prompts]


def test_batched_generation_equals_one_by_one(llama):
    generator = _generator(llama)
    prompts = _encode(generator)
    params = [_greedy(tokens) for tokens in (12, 5, 12, 9, 12)]

    batched = generator.generate(prompts, params)
    single = [generator.generate([ids], [p])[0] for ids, p in zip(prompts, params, strict=True)]
    # Sub-batches of one or two rows: sorting and splitting under the budget keep the order.
    split = _generator(llama, sub_batch_tokens=64).generate(prompts, params)

    assert [c.text for c in batched] == [c.text for c in single] == [c.text for c in split]
    assert any(c.text for c in batched)
    for completion, ids, p in zip(batched, prompts, params, strict=True):
        assert completion.prompt_tokens == len(ids)
        assert 1 <= completion.completion_tokens <= p.max_new_tokens
        if completion.finish_reason == "length":
            assert completion.completion_tokens == p.max_new_tokens


def test_greedy_matches_transformers_generate(llama):
    import torch

    model, tokenizer = llama
    generator = _generator(llama)
    ids = generator.encode(PROMPTS[1])
    ours = generator.generate([ids], [_greedy(10)])[0]
    with torch.inference_mode():
        theirs = model.generate(
            torch.tensor([ids]), max_new_tokens=10, do_sample=False, pad_token_id=0
        )[0, len(ids) :]
    eos = set(model.generation_config.eos_token_id or [])
    expected = tokenizer.decode(
        [t for t in theirs.tolist() if t not in eos], skip_special_tokens=True
    )
    assert ours.text == expected.strip() or ours.text == expected
    assert ours.completion_tokens == len(theirs)


def test_chat_messages_use_the_tokenizer_template(llama):
    _, tokenizer = llama
    generator = _generator(llama)
    messages = [{"role": "system", "content": "the intent"}, {"role": "user", "content": "card"}]

    ids = generator.encode(messages)

    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected if isinstance(expected, list) else expected["input_ids"]
    assert ids == list(expected)
    assert generator.chat_text(messages).endswith("<|assistant|> ")
    with pytest.raises(GenerationRequestError, match="role"):
        generator.encode([{"role": "robot", "content": "hi"}])


def test_stop_sequences_are_trimmed_and_never_streamed(llama):
    generator = _generator(llama)
    prompts = _encode(generator)
    free = generator.generate(prompts, [_greedy(12)] * len(prompts))
    row = next(i for i, c in enumerate(free) if len(c.text.split()) >= 4)
    words = free[row].text.split()
    stop = f"{words[2]} {words[3]}"  # spans two tokens: held back while only its start is out
    cut = free[row].text.index(stop)

    params = [_greedy(12, stop=(stop, "never-generated"))] * len(prompts)
    stopped = generator.generate(prompts, params)
    streamed: dict[int, str] = {}
    finish: dict[int, str] = {}
    for step in generator.stream(prompts, params):
        for delta in step:
            assert stop not in streamed.get(delta.index, "") + delta.text
            streamed[delta.index] = streamed.get(delta.index, "") + delta.text
            if delta.finish_reason:
                assert delta.index not in finish, "one finishing delta per prompt"
                finish[delta.index] = delta.finish_reason

    assert stopped[row].text == free[row].text[:cut]
    assert stopped[row].finish_reason == "stop"
    assert stopped[row].completion_tokens < free[row].completion_tokens
    assert [streamed[i] for i in range(len(prompts))] == [c.text for c in stopped]
    assert [finish[i] for i in range(len(prompts))] == [c.finish_reason for c in stopped]


def test_seeded_sampling_is_deterministic_and_batch_independent(llama):
    generator = _generator(llama)
    prompts = _encode(generator)
    sampled = [SamplingParams(max_new_tokens=10, temperature=1.5, seed=7)] * len(prompts)

    first = generator.generate(prompts, sampled)
    again = generator.generate(prompts, sampled)
    alone = generator.generate(prompts[2:3], sampled[2:3])
    other = generator.generate(prompts, [dataclasses.replace(sampled[0], seed=8)] * len(prompts))
    nucleus = [dataclasses.replace(p, top_p=0.01) for p in sampled]
    greedy = generator.generate(prompts, [_greedy(10)] * len(prompts))

    assert [c.text for c in first] == [c.text for c in again]
    assert alone[0].text == first[2].text
    assert [c.text for c in other] != [c.text for c in first]
    # top_p this small keeps only the most likely token: sampling becomes greedy
    assert [c.text for c in generator.generate(prompts, nucleus)] == [c.text for c in greedy]


@pytest.mark.parametrize(
    ("params", "prompt", "param", "message"),
    [
        (_greedy(65), "card", "max_tokens", "generation.max_new_tokens_limit"),
        (_greedy(0), "card", "max_tokens", "between 1 and 64"),
        (_greedy(4), " ".join(WORDS[:12] * 3), "prompt", "generation.max_prompt_tokens"),
        (_greedy(4, stop=("a", "b", "c")), "card", "stop", "generation.max_stop_sequences"),
        (SamplingParams(max_new_tokens=4, temperature=3.0), "card", "temperature", "between"),
        (SamplingParams(max_new_tokens=4, top_p=0.0), "card", "top_p", "more than 0"),
    ],
    ids=["max-tokens", "zero-tokens", "long-prompt", "stops", "temperature", "top-p"],
)
def test_limits_are_refused_before_any_work(llama, params, prompt, param, message):
    generator = _generator(
        llama, max_new_tokens=8, max_new_tokens_limit=64, max_prompt_tokens=32, max_stop_sequences=2
    )
    ids = generator.encode(prompt)

    with pytest.raises(GenerationRequestError, match=message) as refused:
        list(generator.stream([generator.encode("card"), ids], [_greedy(4), params]))
    assert refused.value.param == param


def test_positions_past_the_model_are_refused(llama):
    model, tokenizer = llama
    generator = Generator(model, tokenizer, GenerationConfig(), position_limit=20)

    with pytest.raises(GenerationRequestError, match="model's 20") as refused:
        generator.check(generator.encode("card atm"), _greedy(19))
    assert refused.value.code == "context_length_exceeded"


def test_plain_template_prompts_match_training(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jobs.instruct import prompt_text

    path = make_tiny_llama(tmp_path / "plain", chat_template=False)
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    generator = Generator(model, tokenizer, GenerationConfig())
    messages = [{"role": "system", "content": "intent"}, {"role": "user", "content": "card"}]

    ids = generator.encode(messages)

    expected = prompt_text(tokenizer, "card", "intent", "plain")
    assert ids == tokenizer(expected, add_special_tokens=False)["input_ids"]
    with pytest.raises(GenerationRequestError, match="plain prompt template") as refused:
        generator.encode([*messages, {"role": "assistant", "content": "x"}, messages[1]])
    assert refused.value.param == "messages"


def make_causal_lm_checkpoint(base: str, directory) -> str:
    """A full causal-lm checkpoint of the model at `base` (chat template), saved as training
    saves one."""
    from transformers import AutoModelForCausalLM

    from jobs.checkpoint import CheckpointMeta, InstructMeta
    from jobs.modeling import load_tokenizer, save_checkpoint

    model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True)
    meta = CheckpointMeta(
        task="causal-lm",
        labels=[],
        base_model=base,
        method="full",
        max_length=64,
        text_column="prompt",
        instruct=InstructMeta(template="chat", prompt_column="prompt", response_column="answer"),
    )
    return str(save_checkpoint(model, load_tokenizer(base), directory, meta))


def test_predictor_generates_for_a_causal_lm_checkpoint(llama, tmp_path):
    import numpy as np

    from serving.predictor import Predictor
    from serving.text import UNUSABLE_REASON

    checkpoint = make_causal_lm_checkpoint(llama[0].base_path, tmp_path / "ckpt")
    limits = GenerationConfig(temperature=0.0, max_new_tokens=6, max_prompt_tokens=24)
    predictor = Predictor(
        checkpoint, precision="fp32", passthrough_columns=("id",), generation_config=limits
    )
    prompts = ["card", "refund pending", None, " ".join(WORDS[:30])]

    out = predictor({"prompt": np.array(prompts, dtype=object), "id": np.arange(4)})

    direct = _generator(llama).generate(
        [_generator(llama).encode([{"role": "user", "content": p}]) for p in prompts[:2]],
        [_greedy(6)] * 2,
    )
    assert list(out["completion"][:2]) == [c.text for c in direct]
    assert list(out["completion_tokens"][:2]) == [c.completion_tokens for c in direct]
    assert out["completion"][2] is None and out["error"][2] == UNUSABLE_REASON
    assert out["completion"][3] is None and "generation.max_prompt_tokens" in out["error"][3]
    assert list(out["id"]) == [0, 1, 2, 3] and set(out["model_version"]) == {"local"}
    answers = predictor.generate([[{"role": "user", "content": "card"}]], _greedy(6))
    assert answers[0].text == direct[0].text
    with pytest.raises(TypeError, match="generates text"):
        predictor.predict_texts(["card"])


def test_bf16_autocast_generates(llama):
    from cluster import hardware

    if not hardware.cpu_has_native_bf16():
        pytest.skip("this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 is emulated here")
    model, tokenizer = llama
    generator = Generator(model, tokenizer, GenerationConfig(), precision="bf16")
    prompts = _encode(generator)

    done = generator.generate(prompts, [_greedy(6)] * len(prompts))

    assert all(1 <= c.completion_tokens <= 6 and c.finish_reason for c in done)
    assert str(next(model.parameters()).dtype) == "torch.float32"  # autocast: weights stay
    assert any(c.text for c in done)


def test_prompts_for_different_adapters_decode_together(llama):
    """Rows of Generators over one PeftModel, each with its adapter (or none: the base), decode
    in one batch and give what each adapter gives alone."""
    import copy

    import peft
    import torch

    from serving.generation import stream_together

    model, tokenizer = llama
    lora = peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    torch.manual_seed(1)
    shared = peft.get_peft_model(copy.deepcopy(model), lora, adapter_name="one")
    torch.manual_seed(2)
    shared.add_adapter("two", lora)
    shared.eval()
    limits = GenerationConfig()
    owners = {
        name: Generator(shared, tokenizer, limits, position_limit=256, adapter_name=name)
        for name in ("one", "two", None)
    }
    picked = ["one", "two", None, "one", "two"]
    prompts = _encode(owners["one"])
    params = [_greedy(8)] * len(prompts)

    texts: dict[int, str] = {}
    for step in stream_together([owners[p] for p in picked], prompts, params):
        for delta in step:
            texts[delta.index] = texts.get(delta.index, "") + delta.text

    alone = {}
    for name in ("one", "two"):
        shared.set_adapter(name)
        alone[name] = Generator(shared, tokenizer, limits).generate(prompts, params)
    alone[None] = _generator(llama).generate(prompts, params)  # the untouched base
    assert [texts[i] for i in range(len(prompts))] == [
        alone[p][i].text for i, p in enumerate(picked)
    ]
    assert [c.text for c in alone["one"]] != [c.text for c in alone["two"]]
    with pytest.raises(ValueError, match="different models"):
        list(stream_together([owners["one"], _generator(llama)], prompts[:2], params[:2]))


@pytest.mark.parametrize(
    ("model", "named"),
    [
        ("ticket-router", (None, None)),
        ("ticket-router/3", ("3", None)),
        ("ticket-router@challenger", (None, "challenger")),
        ("ticket-router/abc", ("abc", None)),  # the router answers 404: not a version number
    ],
)
def test_the_model_field_names_a_version_or_an_alias(model, named):
    from serving.openai_api import _named

    assert _named(model, "ticket-router") == named


@pytest.mark.parametrize("model", ["gpt-4o", "ticket-router/", "ticket-router@", "ticket-routerx"])
def test_a_model_field_naming_another_model_is_an_openai_404(model):
    from serving.openai_api import OpenAIError, _named

    with pytest.raises(OpenAIError) as refused:
        _named(model, "ticket-router")
    assert (refused.value.status, refused.value.param) == (404, "model")
    assert "ticket-router/<version>" in refused.value.message
