"""The OpenAI-compatible routes of the Serve app, asked through the official `openai` client:
chat and completions, plain and streaming, usage, concurrent requests batched, 4xx errors; the
`model` field picking a registered LoRA version over the shared base (name/N, name@alias), in
mixed-adapter batches, and GET /v1/models listing them."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers import SERVE_PORT as PORT
from tests.helpers import make_tiny_llama

openai = pytest.importorskip("openai")

MODEL = "tiny-assistant"
TOKEN_ENV = "RAYLIFT_TEST_OPENAI_TOKEN"
TOKEN = "not-a-real-secret-4f0a9d"
MESSAGES = [
    {"role": "system", "content": "the intent"},
    {"role": "user", "content": "card arrived late"},
]


def _config(root: Path | None = None, base: str = "", method: str = "full"):
    """The app's config (and, with `root`, its registry's: each version registers with its own
    model.base and method, which its lineage tags record)."""
    from jobs.config import validate_mapping

    serve = {
        "port": PORT,
        "num_cpus": 0.5,
        "torch_threads": 1,
        "precision": "fp32",
        "max_batch_size": 8,
        "batch_wait_timeout_s": 0.05,
        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
        "auth_token_env": TOKEN_ENV,
        "model_poll_interval_s": None,
        "max_adapters_per_replica": 2,
        "generation": {
            "max_new_tokens": 8,
            "max_new_tokens_limit": 32,
            "max_prompt_tokens": 64,
            "temperature": 0.0,
        },
    }
    registry = {"model_name": MODEL, "build_engines": False}
    if root is not None:
        registry |= {"tracking_uri": f"sqlite:///{root}/mlflow.db", "experiment": "openai-test"}
    return validate_mapping(
        {
            "name": "openai-test",
            "task": {"type": "causal-lm"},
            "model": {"base": base or "unused", "method": method},
            "promote": {"metric": "val_perplexity", "mode": "min", "max_value": None},
            "registry": registry,
            "serve": serve,
        }
    )


def _lora_checkpoint(base: str, directory: Path, seed: int) -> str:
    """A causal-lm LoRA checkpoint over `base` whose adapter changes the answers (random
    lora_B: a fresh adapter's is zero, so it would answer as the base does)."""
    import torch

    from jobs.checkpoint import AdapterMeta, CheckpointMeta, InstructMeta
    from jobs.config import ModelConfig
    from jobs.modeling import build_model, load_tokenizer, save_checkpoint
    from jobs.tasks import get_task

    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    model = build_model(ModelConfig(base=base, method="lora", lora=lora), get_task("causal-lm"), [])
    draw = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.copy_(torch.randn(weight.shape, generator=draw) * 0.5)
    meta = CheckpointMeta(
        task="causal-lm",
        labels=[],
        base_model=base,
        method="lora",
        adapter=AdapterMeta(**lora),
        max_length=64,
        text_column="prompt",
        instruct=InstructMeta(template="chat", prompt_column="prompt", response_column="answer"),
    )
    return str(save_checkpoint(model, load_tokenizer(base), directory, meta))


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    """(base URL, {model field: local Predictor of the version it names}) for an app serving a
    tiny Llama from a real MLflow registry (SQLite): v1 a full checkpoint (@production, the
    deployment's version), v2 and v3 LoRA adapters over its base (v3 @challenger), v4 a LoRA
    adapter over another base."""
    from ray import serve

    from jobs import tracking
    from serving.app import deploy
    from serving.predictor import Predictor
    from serving.registry import set_alias
    from tests.unit.test_generation import make_causal_lm_checkpoint

    root = tmp_path_factory.mktemp("openai")
    base = make_tiny_llama(root / "base")
    other = make_tiny_llama(root / "other-base")  # the same weights, but another base
    versions = [
        (make_causal_lm_checkpoint(base, root / "full"), base, "full"),
        (_lora_checkpoint(base, root / "lora2", seed=2), base, "lora"),
        (_lora_checkpoint(base, root / "lora3", seed=3), base, "lora"),
        (_lora_checkpoint(other, root / "lora4", seed=4), other, "lora"),
    ]
    registered = []
    for checkpoint, version_base, method in versions:
        config = _config(root, version_base, method)
        with tracking.tracked_run(config, {}) as run_id:
            lineage = tracking.lineage_tags(config, {})
            registered.append(tracking.register(config, run_id, checkpoint, lineage, {}))
    assert registered == ["1", "2", "3", "4"], registered
    set_alias(MODEL, "production", "1")
    set_alias(MODEL, "challenger", "3")
    config = _config(root, base)
    with pytest.MonkeyPatch.context() as env:
        env.setenv(TOKEN_ENV, TOKEN)
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        url = deploy(config)
    limits = config.serve.generation
    local = {
        model: Predictor(versions[k][0], precision="fp32", generation_config=limits)
        for model, k in ((MODEL, 0), (f"{MODEL}/2", 1), (f"{MODEL}/3", 2))
    }
    local[f"{MODEL}@challenger"] = local[f"{MODEL}/3"]
    yield url, local
    serve.delete(MODEL)  # Serve stays up for the next module (tests.helpers.SERVE_PORT)


@pytest.fixture(scope="module")
def client(served):
    with openai.OpenAI(base_url=f"{served[0]}/v1", api_key=TOKEN, max_retries=0) as api:
        yield api


def _greedy(tokens: int):
    from serving.generation import SamplingParams

    return SamplingParams(max_new_tokens=tokens, temperature=0.0)


def test_chat_plain_and_streaming_agree_with_the_predictor(client, served):
    local = served[1][MODEL]
    expected = local.generate([MESSAGES], _greedy(6))[0]

    answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6)
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, stream=True)
    )

    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert answer.model == MODEL and answer.system_fingerprint == "version-1"
    assert answer.usage.prompt_tokens == expected.prompt_tokens
    assert answer.usage.completion_tokens == expected.completion_tokens
    assert answer.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == answer.usage


def test_completions_plain_streaming_and_concurrent(client, served):
    local = served[1][MODEL]
    prompts = ["card arrived late", "refund pending balance account verify"]
    expected = local.generate(prompts, _greedy(5))

    answer = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5)
    chunks = list(client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, stream=True))
    with ThreadPoolExecutor(4) as pool:  # batched together by the replica
        alone = list(
            pool.map(
                lambda p: client.completions.create(model=MODEL, prompt=p, max_tokens=5),
                prompts * 2,
            )
        )

    assert [c.text for c in sorted(answer.choices, key=lambda c: c.index)] == [
        e.text for e in expected
    ]
    assert answer.usage.prompt_tokens == sum(e.prompt_tokens for e in expected)
    assert answer.usage.completion_tokens == sum(e.completion_tokens for e in expected)
    for index, want in enumerate(expected):
        got = "".join(
            c.choices[0].text for c in chunks if c.choices and c.choices[0].index == index
        )
        assert got == want.text
    assert chunks[-1].usage.total_tokens == answer.usage.total_tokens
    assert [a.choices[0].text for a in alone] == [e.text for e in expected] * 2
    assert all(a.usage.completion_tokens >= 1 for a in alone)


def test_the_model_field_picks_a_registered_adapter_version(client, served):
    from ray import serve

    local = served[1]
    expected = {model: p.generate([MESSAGES], _greedy(6))[0] for model, p in local.items()}
    assert expected[f"{MODEL}/2"].text != expected[f"{MODEL}/3"].text  # the adapters differ

    for model, version in ((f"{MODEL}/2", "2"), (f"{MODEL}/3", "3"), (f"{MODEL}@challenger", "3")):
        answer = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6)
        assert answer.choices[0].message.content == expected[model].text, model
        assert (answer.model, answer.system_fingerprint) == (model, f"version-{version}")
        assert answer.usage.completion_tokens == expected[model].completion_tokens
    chunks = list(
        client.chat.completions.create(
            model=f"{MODEL}/2", messages=MESSAGES, max_tokens=6, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        expected[f"{MODEL}/2"].text
    )
    assert chunks[-1].usage.completion_tokens == expected[f"{MODEL}/2"].completion_tokens

    # The deployment's version and two adapters, asked at once: mixed-adapter batches.
    asked = [MODEL, f"{MODEL}/2", f"{MODEL}/3"] * 4
    with ThreadPoolExecutor(6) as pool:
        answers = list(
            pool.map(
                lambda m: client.chat.completions.create(model=m, messages=MESSAGES, max_tokens=6),
                asked,
            )
        )
    for model, answer in zip(asked, answers, strict=True):
        assert answer.choices[0].message.content == expected[model].text, model
    stats = serve.get_app_handle(MODEL).adapter_stats.remote().result(timeout_s=30)
    # 12 adapter requests above: the first for each of v2 and v3 loaded it, the rest hit.
    assert sorted(stats["resident_versions"]) == ["2", "3"], stats
    assert (stats["misses"], stats["hits"]) == (2, 10), stats


def test_models_lists_the_served_model_its_adapters_and_aliases(client):
    listed = {model.id: model for model in client.models.list().data}

    assert sorted(listed) == [
        MODEL,
        f"{MODEL}/2",
        f"{MODEL}/3",
        f"{MODEL}@challenger",
        f"{MODEL}@production",
    ]  # v4 is over another base: not listed
    assert listed[MODEL].version == "1" and listed[MODEL].parent is None
    assert listed[f"{MODEL}@challenger"].version == "3"
    assert {listed[m].parent for m in listed if m != MODEL} == {MODEL}


@pytest.mark.parametrize(
    ("call", "error", "param"),
    [
        (lambda c: _chat(c, max_tokens=1000), "BadRequestError", "max_tokens"),
        (lambda c: _chat(c, model="gpt-4o"), "NotFoundError", "model"),
        (lambda c: _chat(c, stop=["a", "b", "c", "d", "e"]), "BadRequestError", "stop"),
        (lambda c: _chat(c, extra_body={"frobnicate": 1}), "BadRequestError", "frobnicate"),
        (
            lambda c: _chat(c, messages=[{"role": "robot", "content": "hi"}]),
            "BadRequestError",
            None,
        ),
        (lambda c: _chat(c, logprobs=True), "BadRequestError", "logprobs"),
        (lambda c: _complete(c, prompt=" ".join(["card"] * 300)), "BadRequestError", "prompt"),
        (lambda c: _chat(c.with_options(api_key="wrong")), "AuthenticationError", None),
        (lambda c: _chat(c, model=f"{MODEL}/99"), "NotFoundError", "model"),
        (lambda c: _chat(c, model=f"{MODEL}@nowhere"), "NotFoundError", "model"),
        (lambda c: _chat(c, model=f"{MODEL}/4"), "ConflictError", "model"),
    ],
    ids=[
        "max-tokens",
        "unknown-model",
        "stops",
        "unknown-param",
        "role",
        "logprobs",
        "long-prompt",
        "token",
        "unknown-version",
        "unknown-alias",
        "other-base",
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, call, error, param):
    with pytest.raises(getattr(openai, error)) as refused:
        call(client)

    body = refused.value.body
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    assert 400 <= refused.value.status_code < 500
    if param:
        assert body["param"] == param
    if error == "ConflictError":  # the reason: an adapter over another base
        assert "this deployment's base" in body["message"], body
    answer = _chat(client)  # the server keeps serving: a whole answer, with its usage
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.prompt_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


def _chat(client, **given):
    request = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, **given}
    return client.chat.completions.create(**request)


def _complete(client, **given):
    request = {"model": MODEL, "prompt": "card", "max_tokens": 3, **given}
    return client.completions.create(**request)


def test_a_lone_surrogate_is_a_400(served):
    import httpx

    # The openai client cannot even encode it; a raw body can.
    body = b'{"model": "tiny-assistant", "prompt": "lone \\ud800 surrogate", "max_tokens": 3}'
    headers = {"content-type": "application/json", "authorization": f"Bearer {TOKEN}"}
    answer = httpx.post(f"{served[0]}/v1/completions", content=body, headers=headers, timeout=60)

    assert answer.status_code == 400, answer.text
    assert set(answer.json()["error"]) == {"message", "type", "param", "code"}


def test_the_predict_routes_of_a_causal_lm_are_a_400_saying_where_to_ask(served):
    """A classifier's routes asked of a causal LM, its own version or an adapter's: a 400
    naming the OpenAI routes (it was a 500 from inside the batch)."""
    import httpx

    headers = {"authorization": f"Bearer {TOKEN}"}
    for route in ("predict", "versions/2/predict", "aliases/challenger/predict"):
        answer = httpx.post(
            f"{served[0]}/v1/models/{MODEL}/{route}",
            json={"texts": ["card"]},
            headers=headers,
            timeout=60,
        )
        assert answer.status_code == 400, (route, answer.text)
        assert "/v1/chat/completions" in answer.json()["detail"], answer.text
