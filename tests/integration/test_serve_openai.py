"""The OpenAI-compatible routes of the Serve app, asked through the official `openai` client:
chat and completions, plain and streaming, usage, concurrent requests batched, 4xx errors."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import make_tiny_llama

openai = pytest.importorskip("openai")

PORT = 8129
MODEL = "tiny-assistant"
TOKEN_ENV = "RAYLIFT_TEST_OPENAI_TOKEN"
TOKEN = "not-a-real-secret-4f0a9d"
MESSAGES = [
    {"role": "system", "content": "the intent"},
    {"role": "user", "content": "card arrived late"},
]


def _config():
    from jobs.config import LifecycleConfig

    serve = {
        "port": PORT,
        "num_cpus": 0.5,
        "torch_threads": 1,
        "precision": "fp32",
        "max_batch_size": 8,
        "batch_wait_timeout_s": 0.05,
        "autoscaling": {"min_replicas": 1, "max_replicas": 1},
        "auth_token_env": TOKEN_ENV,
        "generation": {
            "max_new_tokens": 8,
            "max_new_tokens_limit": 32,
            "max_prompt_tokens": 64,
            "temperature": 0.0,
        },
    }
    return LifecycleConfig(name="test", registry={"model_name": MODEL}, serve=serve)


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    """(base URL, local Predictor of the same checkpoint) for an app serving a tiny Llama."""
    from ray import serve

    from serving.app import deploy
    from serving.predictor import Predictor
    from tests.unit.test_generation import make_causal_lm_checkpoint

    root = tmp_path_factory.mktemp("openai")
    checkpoint = make_causal_lm_checkpoint(make_tiny_llama(root / "base"), root / "ckpt")
    with pytest.MonkeyPatch.context() as env:
        env.setenv(TOKEN_ENV, TOKEN)
        serve.start(http_options={"host": "127.0.0.1", "port": PORT})
        url = deploy(_config(), model_uri=checkpoint)
    local = Predictor(checkpoint, precision="fp32", generation_config=_config().serve.generation)
    yield url, local
    serve.delete(MODEL)
    serve.shutdown()


@pytest.fixture(scope="module")
def client(served):
    with openai.OpenAI(base_url=f"{served[0]}/v1", api_key=TOKEN, max_retries=0) as api:
        yield api


def _greedy(tokens: int):
    from serving.generation import SamplingParams

    return SamplingParams(max_new_tokens=tokens, temperature=0.0)


def test_chat_plain_and_streaming_agree_with_the_predictor(client, served):
    local = served[1]
    expected = local.generate([MESSAGES], _greedy(6))[0]

    answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6)
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, stream=True)
    )

    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert answer.model == MODEL and answer.system_fingerprint == "version-local"
    assert answer.usage.prompt_tokens == expected.prompt_tokens
    assert answer.usage.completion_tokens == expected.completion_tokens
    assert answer.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == answer.usage


def test_completions_plain_streaming_and_concurrent(client, served):
    local = served[1]
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


def test_models_lists_the_served_model(client):
    assert [model.id for model in client.models.list().data] == [MODEL]


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
