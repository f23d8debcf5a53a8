"""The Serve app without Ray: app_builder (the RayService entry point), the limits taken from
the config, the token digest, and the bounded body read."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

LABELS = ["card_arrival", "lost_or_stolen_card", "refund_not_showing_up"]
CONFIG = "configs/banking77/minilm_lora.yaml"
TOKEN_ENV = "RAYLIFT_TEST_BUILDER_TOKEN"


@pytest.fixture(scope="module")
def checkpoint(tiny_bert, tmp_path_factory) -> str:
    from tests.helpers import make_lora_checkpoint

    return make_lora_checkpoint(tiny_bert, tmp_path_factory.mktemp("ckpt") / "tiny", LABELS)


def _deployment(application):
    # Serve has no public accessor for the deployment an Application binds; the test reads
    # the private attribute rather than starting Ray to ask the controller.
    return application._bound_deployment


def test_app_builder_applies_overrides_to_the_deployment(checkpoint):
    from serving.app import app_builder

    args = {
        "config": CONFIG,
        "model_uri": checkpoint,
        "serve.max_batch_size": "8",
        "serve.batch_wait_timeout_s": "0.02",
        "serve.max_queued_requests": "7",
        "serve.num_cpus": "0.5",
        "serve.autoscaling.target_ongoing_requests": "2",
    }
    deployment = _deployment(app_builder(args))

    assert deployment.name == "ModelServer"
    assert deployment.user_config == {"max_batch_size": 8, "batch_wait_timeout_s": 0.02}
    assert deployment.max_queued_requests == 7
    assert deployment.max_ongoing_requests == 8  # a full batch of one-text requests fits
    assert deployment.ray_actor_options["num_cpus"] == 0.5
    versions = _deployment(deployment.init_args[0])  # replicas ask ModelVersion what to load
    local = str(Path(checkpoint).resolve())
    assert versions.name == "ModelVersion"
    assert versions.init_args == (local, {"uri": local, "version": "local", "source": local})
    assert versions.init_kwargs["poll_interval_s"] == 10.0
    kwargs = deployment.init_kwargs
    assert kwargs["served_name"] == "ticket-router"
    assert kwargs["serve_config"].max_batch_size == 8
    assert kwargs["tracking_uri"].startswith("sqlite:////")  # absolute for replicas
    assert kwargs["token_sha256"] is None


def test_app_builder_defaults_come_from_the_yaml(checkpoint):
    from jobs.config import load_config
    from serving.app import app_builder

    expected = load_config(CONFIG).serve
    deployment = _deployment(app_builder({"config": CONFIG, "model_uri": checkpoint}))

    assert deployment.user_config["max_batch_size"] == expected.max_batch_size
    assert deployment.max_queued_requests == expected.max_queued_requests
    assert deployment.max_queued_requests > 0  # bounded by default


def test_unlimited_queue_is_serves_minus_one(checkpoint):
    from serving.app import app_builder

    args = {"config": CONFIG, "model_uri": checkpoint, "serve.max_queued_requests": "null"}
    assert _deployment(app_builder(args)).max_queued_requests == -1


def test_app_builder_without_a_config_says_what_to_pass():
    from serving.app import app_builder

    with pytest.raises(ValueError, match="config=<lifecycle YAML>"):
        app_builder({"model_uri": "/somewhere", "serve.max_batch_size": "8"})


def test_app_builder_reports_bad_overrides_by_key(checkpoint):
    from jobs.config import ConfigError
    from serving.app import app_builder

    with pytest.raises(ConfigError, match="max_batch_size"):
        app_builder({"config": CONFIG, "model_uri": checkpoint, "serve.max_batch_size": "0"})
    with pytest.raises(ConfigError, match="max_body_bytes"):
        app_builder({"config": CONFIG, "model_uri": checkpoint, "serve.max_body_bytes": "-1"})


def test_replicas_get_a_digest_never_the_token(checkpoint, monkeypatch):
    from serving.app import app_builder

    token = "builder-test-token-3f9c"
    monkeypatch.setenv(TOKEN_ENV, token)
    args = {"config": CONFIG, "model_uri": checkpoint, "serve.auth_token_env": TOKEN_ENV}
    deployment = _deployment(app_builder(args))

    assert deployment.init_kwargs["token_sha256"] == hashlib.sha256(token.encode()).hexdigest()
    assert token not in repr(deployment.ray_actor_options)
    assert token not in repr(deployment.init_kwargs) and token not in repr(deployment.init_args)


def test_auth_token_env_unset_fails_at_build(checkpoint, monkeypatch):
    from serving.app import app_builder

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    args = {"config": CONFIG, "model_uri": checkpoint, "serve.auth_token_env": TOKEN_ENV}
    with pytest.raises(ValueError, match=f"export {TOKEN_ENV}="):
        app_builder(args)


# -- the bounded body read ---------------------------------------------------------------


def _request(chunks, headers: dict[str, str]):
    """A Starlette request whose body arrives in `chunks`; `pulled` counts what was read."""
    from starlette.requests import Request

    pulled = []
    source = iter(chunks)

    async def receive():
        chunk = next(source, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled.append(len(chunk))
        return {"type": "http.request", "body": chunk, "more_body": True}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    return Request(scope, receive), pulled


def _read(request, limit):
    from serving.app import _read_body

    return asyncio.run(_read_body(request, limit))


def test_body_over_content_length_is_refused_before_reading():
    from fastapi import HTTPException

    request, pulled = _request([b"x" * 1000] * 100, {"content-length": "100000"})
    with pytest.raises(HTTPException) as refused:
        _read(request, limit=4096)

    assert refused.value.status_code == 413
    assert "serve.max_body_bytes" in refused.value.detail and "100000" in refused.value.detail
    assert pulled == []


def test_body_without_content_length_is_refused_with_411():
    from fastapi import HTTPException

    ten_mb = (b"x" * 1000 for _ in range(10_000))  # chunked: no Content-Length to go by
    request, pulled = _request(ten_mb, {})
    with pytest.raises(HTTPException) as refused:
        _read(request, limit=4096)

    assert refused.value.status_code == 411
    assert "Content-Length" in refused.value.detail
    assert "serve.max_body_bytes" in refused.value.detail
    assert pulled == []


def test_a_body_longer_than_its_content_length_is_cut_at_the_limit():
    """Uvicorn enforces Content-Length framing; were a server not to, reading still stops."""
    from fastapi import HTTPException

    ten_mb = (b"x" * 1000 for _ in range(10_000))
    request, pulled = _request(ten_mb, {"content-length": "100"})
    with pytest.raises(HTTPException) as refused:
        _read(request, limit=4096)

    assert refused.value.status_code == 413
    assert sum(pulled) == 5000  # up to the first chunk past 4,096 bytes, then stopped


def test_body_within_the_limit_is_returned_whole():
    body = b'{"texts": ["card arrived"]}'
    request, _ = _request([body[:10], body[10:]], {"content-length": str(len(body))})
    assert _read(request, limit=len(body)) == body


@pytest.mark.parametrize(
    ("content_type", "accepted"),
    [
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("Application/JSON", True),
        ("text/plain", False),
        ("application/x-www-form-urlencoded", False),
        (None, False),
    ],
)
def test_only_json_content_type_is_accepted(content_type, accepted):
    from fastapi import HTTPException

    from serving.app import _check_json_content_type

    headers = {} if content_type is None else {"content-type": content_type}
    request, _ = _request([], headers)
    if accepted:
        _check_json_content_type(request)
        return
    with pytest.raises(HTTPException) as refused:
        _check_json_content_type(request)
    assert refused.value.status_code == 415 and "application/json" in refused.value.detail


# -- following the alias (ModelVersion without Serve, real MLflow registry) -----------------


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    # One database for the module (creating one costs seconds); each test has its own model.
    return f"sqlite:///{tmp_path_factory.mktemp('registry')}/mlflow.db"


@pytest.fixture
def registry_config(tracking_uri, checkpoint, request):
    """A config whose registry holds two versions of its own model, v1 at @production."""
    from jobs.config import validate_mapping
    from serving import registry

    name = request.node.name.replace("_", "-")[:60]
    config = validate_mapping(
        {
            "name": "follow-test",
            "registry": {"tracking_uri": tracking_uri, "model_name": name},
            "serve": {"model_poll_interval_s": 0.2},
        }
    )
    for _ in range(2):
        _register(config, checkpoint)
    registry.set_alias(name, "production", "1")
    return config


def _register(config, checkpoint: str) -> str:
    from jobs import tracking

    with tracking.tracked_run(config, {}) as run_id:
        return tracking.register(config, run_id, checkpoint, {}, {"val_accuracy": 0.9})


async def _model_version(source: str, tracking_uri: str, poll_interval_s: float | None):
    """A ModelVersion built the way a Serve replica builds it (its __init__ is async)."""
    from serving.app import ModelVersion, _pin

    cls = ModelVersion.func_or_class
    follower = cls.__new__(cls)
    await cls.__init__(
        follower,
        source,
        _pin(source, tracking_uri),
        tracking_uri=tracking_uri,
        poll_interval_s=poll_interval_s,
    )
    return follower


def test_build_app_pins_the_alias_to_its_version(registry_config):
    from serving.app import build_app

    name = registry_config.registry.model_name
    versions = _deployment(_deployment(build_app(registry_config)).init_args[0])
    source, pinned = versions.init_args

    assert source == f"models:/{name}@production"
    # the version's artifact folder rides along: replicas load it without asking the registry
    assert pinned.pop("source").startswith("file://")
    assert pinned == {"uri": f"models:/{name}/1", "version": "1"}


def test_an_alias_that_names_nothing_fails_the_build(registry_config):
    from serving.app import build_app

    canary = f"models:/{registry_config.registry.model_name}@canary"
    with pytest.raises(LookupError, match=canary):
        build_app(registry_config, model_uri=canary)


def test_model_version_follows_the_alias_by_polling(registry_config):
    from serving import registry

    name = registry_config.registry.model_name

    async def scenario():
        uri = f"models:/{name}@production"
        follower = await _model_version(uri, registry_config.registry.tracking_uri, 0.2)
        first = await follower.current()
        unchanged = await follower.wait_for_change(first["uri"], 0.5)  # times out: same
        registry.set_alias(name, "production", "2")
        started = asyncio.get_running_loop().time()
        moved = await follower.wait_for_change(first["uri"], 10)
        waited = asyncio.get_running_loop().time() - started
        follower._poller.cancel()
        return first, unchanged, moved, waited

    first, unchanged, moved, waited = asyncio.run(scenario())
    assert {k: first[k] for k in ("uri", "version")} == {"uri": f"models:/{name}/1", "version": "1"}
    assert unchanged == first
    assert {k: moved[k] for k in ("uri", "version")} == {"uri": f"models:/{name}/2", "version": "2"}
    assert moved["source"] != first["source"]  # each version's own artifact folder
    assert waited < 5  # woken by the poll after the move, not by the 10 s timeout


def test_refresh_moves_at_once_without_polling(registry_config):
    from serving import registry

    name = registry_config.registry.model_name

    async def scenario():
        uri = f"models:/{name}@production"
        follower = await _model_version(uri, registry_config.registry.tracking_uri, None)
        registry.set_alias(name, "production", "2")
        still = await follower.current()
        told = await follower.refresh()
        again = await follower.refresh()
        return still, told, again

    still, told, again = asyncio.run(scenario())
    assert still["version"] == "1"  # no poll: nothing moves until told
    assert told == {"version": "2", "previous": "1", "changed": True}
    assert again == {"version": "2", "previous": "2", "changed": False}


def test_a_pinned_version_never_moves(registry_config):
    from serving import registry

    name = registry_config.registry.model_name

    async def scenario():
        uri = f"models:/{name}/1"
        follower = await _model_version(uri, registry_config.registry.tracking_uri, 0.1)
        registry.set_alias(name, "production", "2")
        return await follower.refresh()

    assert asyncio.run(scenario()) == {"version": "1", "previous": "1", "changed": False}


def test_a_poll_that_read_before_a_rollback_does_not_undo_it(registry_config, monkeypatch):
    """On v1, a poll reads @production (v2 now), then a rollback moves it back to v1 and asks
    ModelVersion to read again while the poll is still on its way: the app ends on v1, the
    alias's last word (reads are serialised; without that, the poll's older answer was set
    last)."""
    import threading

    from serving import app, registry

    name = registry_config.registry.model_name
    real_pin = app._pin
    read, release = threading.Event(), threading.Event()
    calls = []

    def pin(source, tracking_uri):
        found = real_pin(source, tracking_uri)
        calls.append(found["version"])
        if len(calls) == 1:  # the poll's read: hold its answer back
            read.set()
            release.wait(10)
        return found

    async def scenario():
        uri = f"models:/{name}@production"
        follower = await _model_version(uri, registry_config.registry.tracking_uri, None)
        monkeypatch.setattr(app, "_pin", pin)  # after the read at start (v1)
        registry.set_alias(name, "production", "2")  # a promote (that told no one)
        poll = asyncio.create_task(follower.refresh("poll"))
        await asyncio.to_thread(read.wait, 10)
        registry.set_alias(name, "production", "1")  # the rollback's move...
        told = asyncio.create_task(follower.refresh("rollback"))  # ...and its call
        await asyncio.wait({told}, timeout=1.5)  # unserialised, it ends here, before the poll
        release.set()
        await asyncio.gather(poll, told)
        return (await follower.current())["version"]

    assert asyncio.run(scenario()) == "1"
    assert calls == ["2", "1"]


def test_a_restarted_model_version_starts_on_its_last_target_when_the_registry_is_down(
    registry_config, monkeypatch
):
    """ModelVersion keeps each target it sets (Ray's key-value store, here a dict in its
    place: the write to the real store is checked by the serving integration test); started
    again by Serve with the registry unreachable, it names that target, not the version the
    app was built with."""
    from types import SimpleNamespace

    from ray.experimental import internal_kv

    from serving import app, registry

    store: dict = {}
    monkeypatch.setattr(
        internal_kv,
        "_internal_kv_put",
        lambda key, value, overwrite, namespace: store.__setitem__((namespace, key), value),
    )
    monkeypatch.setattr(
        internal_kv, "_internal_kv_get", lambda key, namespace: store.get((namespace, key))
    )
    monkeypatch.setattr(
        app.serve, "get_replica_context", lambda: SimpleNamespace(app_name="follow-test")
    )
    name = registry_config.registry.model_name
    uri = f"models:/{name}@production"
    tracking_uri = registry_config.registry.tracking_uri
    pinned = app._pin(uri, tracking_uri)  # v1, as build_app pinned it

    async def start(build: str, tracking: str):
        cls = app.ModelVersion.func_or_class
        follower = cls.__new__(cls)
        await cls.__init__(
            follower, uri, pinned, tracking_uri=tracking, poll_interval_s=None, build=build
        )
        return (await follower.current())["version"]

    registry.set_alias(name, "production", "2")
    assert asyncio.run(start("build-1", tracking_uri)) == "2"  # read at start, and kept
    down = "http://127.0.0.1:9"  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert asyncio.run(start("build-1", down)) == "2"  # restarted: its last target
    assert asyncio.run(start("build-2", down)) == "1"  # a new build: its own pinned version


def test_a_registry_that_cannot_be_read_is_not_a_missing_version(monkeypatch):
    """An unreachable registry raises RegistryUnavailable (serving answers 503), never the
    LookupError of a missing version or alias (a 404), nor None for an alias (promotion would
    take it for no incumbent); its URI is shown without its credentials."""
    from serving import registry

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    down = "http://raylift:s3cret-word@127.0.0.1:9"
    with pytest.raises(registry.RegistryUnavailable) as raised:
        registry.resolve_version("models:/m@production", down)
    assert "s3cret-word" not in str(raised.value) and "127.0.0.1:9" in str(raised.value)
    with pytest.raises(registry.RegistryUnavailable):
        registry.get_alias_version("m", "production")  # configured by the call above


def test_a_cancelled_request_is_counted_as_499_not_as_a_failure_of_the_app():
    """A request cancelled before its answer (the client gone, Serve's request timeout) is
    counted with status 499; 5xx are the app's own failures. The counter's inc is recorded in
    place (creating Ray's metrics needs no Ray; the scrape is in the integration tests)."""
    from serving.app import _RequestMetrics

    async def cancelled(scope, receive, send):
        raise asyncio.CancelledError

    async def failing(scope, receive, send):
        raise RuntimeError("a bug")

    statuses = []
    for inner in (cancelled, failing):
        metrics = _RequestMetrics(inner)
        metrics._requests.inc = lambda value=1.0, tags=None: statuses.append(tags["status"])
        with pytest.raises((asyncio.CancelledError, RuntimeError)):
            asyncio.run(metrics({"type": "http", "state": {}}, None, None))
    assert statuses == ["499", "500"]


def test_tell_running_app_without_ray_logs_one_line_and_returns(registry_config, caplog):
    from serving.app import tell_running_app

    with caplog.at_level("INFO", logger="serving.app"):
        assert tell_running_app(registry_config) is None  # unit tests refuse ray.init
    assert len([r for r in caplog.records if r.name == "serving.app"]) == 1


def test_the_app_module_imports_no_torch():
    """ModelVersion's actor (it only follows the alias) and the CLI that tells a running app
    about a promotion import serving.app; torch came with it through serving.generation (1.6 s
    of its 3.1 s import on a 2-core AVX512-BF16 box) and is imported where generation runs."""
    from tests.helpers import run_in_fresh_process

    script = (
        "import json, sys\nimport serving.app\n"
        "print(json.dumps({m: m in sys.modules for m in ('torch', 'transformers', 'peft')}))"
    )
    assert run_in_fresh_process(script) == {"torch": False, "transformers": False, "peft": False}
