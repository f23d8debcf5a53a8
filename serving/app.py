"""The online endpoint: a Ray Serve application with a FastAPI ingress around one Predictor.

    POST /v1/models/{model_name}/predict   {"texts": [...]} -> {"predictions": [...], ...}
    POST /v1/models/{model_name}/versions/{version}/predict   the same, by registry version
    POST /v1/models/{model_name}/aliases/{alias}/predict      the same, by registry alias
    GET  /v1/models/{model_name}           name, version, labels, runtime (engine, precision)
    GET  /healthz                          liveness (never needs a token)
    GET  /readyz                           200 once the model is loaded and warm, else 503
    POST /v1/chat/completions, /v1/completions; GET /v1/models   OpenAI-compatible, for a
                                           causal-lm version (serving.openai_api)

One version at a time, following the alias. The app is two deployments: `ModelVersion`
resolves serve.model_uri (by default models:/<name>@production) to a registry version once,
then again every serve.model_poll_interval_s and whenever `raylift promote` / `rollback` call
its `refresh`; `ModelServer` replicas never see the alias, only `models:/name/N` from it. Each
replica long-polls ModelVersion (a handle call that returns as soon as the version changes),
loads a new version in a background thread while the old Predictor keeps answering, and swaps
the reference once the new one is warm. A request is answered whole by the Predictor it found
when it arrived, so every response's `model_version` is the version that produced all of it,
and no request fails during a swap. A replica started later (scale-up, crash restart) asks
ModelVersion, so it loads the current version, never a stale one. Replicas switch within about
one model load of one another (each loads on its own), not at the same instant.

A replica starts answering at once and loads its first model in the background: /readyz is 503
until that model is warm (/healthz is 200 throughout), and model requests that reach the
replica meanwhile wait for it, bounded by serve.request_timeout_s; `deploy` returns once a
replica is ready. A replica whose first model cannot load fails Serve's health check and is
replaced.

Metrics go through Ray's metrics API (`ray.serve.metrics`) and are exported with Ray's own,
at each Ray node's metrics export port (`metrics_url()`): raylift_requests_total (route,
status, model_version), raylift_request_latency_s, raylift_batch_texts,
raylift_batched_texts_total, raylift_queued_texts, raylift_model_info (model_version, engine,
precision, threads), and raylift_adapter_cache_{hits,misses}_total.

Many LoRA versions of one base are served beside the app's own (`serving.adapter_server`):
a request may name a registry version (the versions/ route, or Serve's
`serve_multiplexed_model_id: <version>` header on the plain route) or an alias (the aliases/
route); the plain route answers with the deployment's version. A request for another version
is passed on by handle to the app's third deployment, `Adapters`, with the version as Serve's
multiplexed model id: Serve routes it to a replica that holds that adapter, where adapters sit
on one copy of the base in an LRU cache of serve.max_adapters_per_replica (Ray Serve model
multiplexing). The ingress itself does not multiplex, so the app runs behind Serve's proxy and
behind its HAProxy ingress alike (cluster.runtime). An unknown version or alias is a 404, a
version that is not a LoRA adapter over the served version's base a 409.

Texts from concurrent requests are batched together (`serving.batching`: a batch forms when the
model thread is free, from every text waiting); the batch unit is one text, so
`serve.max_batch_size` counts texts however the clients group them. Batch size and wait are the
deployment's `user_config`, so `serve deploy` with new values changes them on live replicas
without a restart.

Bad input is answered with a 4xx naming the reason and the config key; the replica keeps
serving. Limits apply before any work is done, cheapest first:
- 401 without the bearer token (when configured), 404 for another model name;
- 415 unless `Content-Type: application/json` (parameters such as charset are fine);
- 413 for a body over `serve.max_body_bytes`, refused from its Content-Length before a byte
  is read; 411 for a body without Content-Length (chunked), which a replica could not stop
  reading at the limit (see `_read_body`);
- 400 for a body that is not JSON, 422 for JSON of the wrong shape (blank texts included,
  `serving.text.is_usable_text`), 413 / 422 for too many / too long texts.
Serve itself answers 503 when `serve.max_queued_requests` requests already wait for a replica,
and 408 past `serve.request_timeout_s`.

A text the model cannot score does not fail its request or the others batched with it: its
prediction has `label` and `score` null and `error` saying why (non-finite model output);
every other text gets its answer, and the response is a 200. Check `error` (or a null
`label`) per prediction. Texts longer than the model's positions are truncated, never an error.

When `serve.auth_token_env` names an environment variable, every model route needs
`Authorization: Bearer <its value>`. The value is read where the app is built (deploy, or
app_builder under a RayService) and replicas receive only its SHA-256 digest, so Ray's REST API
(`/api/serve/applications/`) and the replicas' environment show nothing that can be replayed.
Use a random token (`python -c "import secrets; print(secrets.token_urlsafe(32))"`): a digest
of a guessable word can be guessed back.

    deploy(load_config("configs/banking77/minilm_lora.yaml"))  # -> "http://127.0.0.1:8000"
"""

# No `from __future__ import annotations` here: routes are cloudpickled into replicas, where
# FastAPI cannot resolve string annotations (Request, the bearer dependency) and silently
# turns them into required query parameters.

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Path, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr, ValidationError
from ray import serve
from starlette.requests import ClientDisconnect

from cluster.storage import worker_visible_uri
from jobs.config import LifecycleConfig, ServeConfig
from serving.adapter_server import AdapterServer, RemoteAdapters
from serving.adapters import GENERATES, AdapterCatalog, AdapterError, normalized_version
from serving.batching import BatchMetrics, TextBatcher
from serving.openai_api import OpenAIRoutes, openai_router
from serving.text import is_usable_text

__all__ = [
    "ModelInfo",
    "ModelServer",
    "ModelVersion",
    "PredictRequest",
    "PredictResponse",
    "Prediction",
    "app_builder",
    "build_app",
    "deploy",
    "metrics_url",
    "tell_running_app",
]

log = logging.getLogger(__name__)


# -- request / response schemas ------------------------------------------------------------


def _usable(text: str) -> str:
    if not is_usable_text(text):
        raise ValueError("text is empty or blank; send at least one non-space character")
    return text


Text = Annotated[StrictStr, AfterValidator(_usable)]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[Text] = Field(..., min_length=1, description="Texts to classify, one per item.")


class Prediction(BaseModel):
    label: str | None = Field(..., description="Most likely label; null when `error` is set.")
    score: float | None = Field(..., description="Its probability; null when `error` is set.")
    error: str | None = Field(
        None, description="Why this text has no label (e.g. non-finite model output); else null."
    )


class PredictResponse(BaseModel):
    predictions: list[Prediction] = Field(..., description="One per text, in request order.")
    model_name: str = Field(..., description="Model name in the registry.")
    model_version: str = Field(..., description="Registry version that answered.")


class ModelInfo(BaseModel):
    name: str = Field(..., description="Name this endpoint serves the model under.")
    version: str = Field(..., description="Registry version loaded.")
    labels: list[str] = Field(..., description="Labels the model can answer, in head order.")
    model_uri: str = Field(..., description="URI the model was loaded from (never an alias).")
    engine: str = Field(..., description="Inference runtime in use (Predictor.runtime).")
    precision: str = Field(..., description="Inference precision in use.")
    threads: int = Field(..., description="Intra-op threads the runtime uses.")
    replica: str = Field(..., description="Serve replica that answered.")


class Health(BaseModel):
    status: str = "ok"


class Readiness(BaseModel):
    status: str = Field("ready", description="`ready` once the model is loaded and warm.")
    model_version: str = Field(..., description="Registry version this replica answers with.")


app = FastAPI(title="raylift model endpoint", docs_url="/docs")
app.include_router(openai_router)
_bearer = HTTPBearer(auto_error=False, description="Needed when serve.auth_token_env is set.")
_JSON = "application/json"
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
# The predict body is parsed by hand (auth first, then 400 vs 422); this keeps it in /docs.
_PREDICT_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
    }
}


# Registry versions are numbers; MLflow aliases are letters, digits, '_' and '-'.
VersionParam = Annotated[
    str, Path(pattern=r"^[1-9][0-9]{0,8}$", description="Registry version number, e.g. 3.")
]
AliasParam = Annotated[
    str,
    Path(
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Registry alias, e.g. production or challenger.",
    ),
]


# -- helpers of the deployment ----------------------------------------------------------------
# Everything the deployment class calls is defined above it: @serve.ingress cloudpickles the
# FastAPI app and its routes when the class is decorated, capturing only the globals that
# exist at that moment (a helper defined below fails with NameError in the replica).


def _parse_predict_request(raw: bytes) -> PredictRequest:
    """400 for a body that is not JSON, 422 (FastAPI's format) for JSON of the wrong shape."""
    try:
        return PredictRequest.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        if any(err["type"] == "json_invalid" for err in errors):
            raise HTTPException(
                status.HTTP_400_BAD_REQUEST,
                detail='body is not valid JSON; send {"texts": ["..."]}',
            ) from None
        for err in errors:
            err["loc"] = ("body", *err["loc"])
        raise RequestValidationError(errors) from None


def _check_json_content_type(request: Request) -> None:
    sent = request.headers.get("content-type", "")
    if sent.split(";", 1)[0].strip().lower() != _JSON:
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            detail=f"Content-Type is {sent or 'missing'!r}; send 'Content-Type: {_JSON}'",
        )


def _body_too_large(size: str, limit: int) -> HTTPException:
    return HTTPException(
        status.HTTP_413_CONTENT_TOO_LARGE,
        detail=f"request body is {size} bytes; the limit is {limit} (serve.max_body_bytes): "
        "send fewer or shorter texts per request",
    )


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or a 413 as soon as it is known to exceed `limit`, from Content-Length
    before a byte is read; a body without one (chunked) gets a 411.

    Why chunked bodies are refused rather than counted while they stream: a Serve replica
    fetches a request's body from the proxy in the background, each fetch taking all the
    proxy has buffered, whatever the app has read. Measured on Ray 2.60, 50 MB bodies sent at
    loopback speed: reading a chunked one only until it passed 64 KB still grew the replica
    by 20 to 67 MiB per request, never given back; refusing from Content-Length (or its
    absence) without reading, 0 MiB.
    """
    declared = request.headers.get("content-length", "")
    if not declared:
        raise HTTPException(
            status.HTTP_411_LENGTH_REQUIRED,
            detail="send the body with a Content-Length header (not chunked); bodies are "
            f"limited to {limit} bytes (serve.max_body_bytes)",
        )
    if declared.isdigit() and int(declared) > limit:
        raise _body_too_large(declared, limit)
    # The server enforces Content-Length framing; the running total guards an ASGI server that
    # would not, so no more than `limit` bytes are ever held.
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _body_too_large(f"more than {limit}", limit)
    return bytes(body)


def _token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _batching(serve_config: ServeConfig) -> dict[str, Any]:
    return {
        "max_batch_size": serve_config.max_batch_size,
        "batch_wait_timeout_s": serve_config.batch_wait_timeout_s,
    }


# -- metrics ---------------------------------------------------------------------------------
# Created inside the replica (Ray metrics belong to the process that records them); Serve adds
# the deployment, replica and application tags itself.

# The status a request cancelled before its answer is counted under (nginx's "client closed
# request"), so that 5xx counts only this app's failures.
_CANCELLED = 499
_LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


class _RequestMetrics:
    """ASGI middleware: every HTTP request counted by route template, status and the model
    version that answered it (set by the route in `request.state.model_version`), and timed."""

    def __init__(self, app: Any):
        from ray.serve import metrics

        self.app = app
        self._requests = metrics.Counter(
            "raylift_requests_total",
            description="HTTP requests answered, by route, status and model version.",
            tag_keys=("route", "status", "model_version"),
        )
        self._latency = metrics.Histogram(
            "raylift_request_latency_s",
            description="Seconds from request to the end of the response, by route and status.",
            boundaries=_LATENCY_BUCKETS_S,
            tag_keys=("route", "status"),
        )

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_seen = [500]  # an exception that escapes the app is Serve's 500
        state = scope.setdefault("state", {})

        async def send_and_note(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_seen[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except (asyncio.CancelledError, ClientDisconnect):
            # The client went away, or Serve cancelled the request at serve.request_timeout_s
            # (its 408 is Serve's own): no answer of this app's, so not a 500 of it.
            if status_seen[0] == 500:
                status_seen[0] = _CANCELLED
            raise
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            tags = {"route": route, "status": str(status_seen[0])}
            self._latency.observe(time.perf_counter() - started, tags=tags)
            version = str(state.get("model_version", ""))
            self._requests.inc(tags={**tags, "model_version": version})


class _ReplicaMetrics(BatchMetrics):
    """What a ModelServer replica records besides requests: its batches and queue
    (BatchMetrics), and the model it runs."""

    def __init__(self, waiting: Callable[[], int]) -> None:
        from ray.serve import metrics

        super().__init__(waiting)
        self.model_info = metrics.Gauge(
            "raylift_model_info",
            description="1 for the model version this replica answers with, 0 once replaced.",
            tag_keys=("model_version", "engine", "precision", "threads"),
        )
        self._model_info: dict[tuple[tuple[str, str], ...], int] = {}  # tags -> value set

    def serving(self, predictor: Any, replaced: Any | None) -> None:
        if replaced is not None:
            self._model_info[tuple(_runtime_tags(replaced).items())] = 0
        self._model_info[tuple(_runtime_tags(predictor).items())] = 1
        self.refresh()

    def refresh(self) -> None:
        super().refresh()
        for tags, value in self._model_info.items():
            self.model_info.set(value, tags=dict(tags))


def _runtime_tags(predictor: Any) -> dict[str, str]:
    runtime = predictor.runtime
    return {
        "model_version": str(predictor.model_version),
        "engine": str(runtime["engine"]),
        "precision": str(runtime["precision"]),
        "threads": str(runtime["threads"]),
    }


app.add_middleware(_RequestMetrics)


# -- which version the app serves --------------------------------------------------------------

_ALIAS_URI = re.compile(r"^models:/[^/@]+@[^/]+$")
# A replica's long poll: ModelVersion answers at once when the version changes, else after this.
_LONG_POLL_S = 30.0
_RETRY_S = 2.0  # after a failed poll or load, before trying again
_MAX_RETRY_S = 60.0  # the longest wait between tries of a version that fails to load
# The model is loaded in the background; requests arriving meanwhile wait at most this long.
_LOAD_WAIT_S = 600.0


def _follows_alias(source: str) -> bool:
    return bool(_ALIAS_URI.match(source))


def _pin(source: str, tracking_uri: str | None) -> dict[str, str]:
    """What `source` names now: {"uri": models:/name/N (never an alias) or a checkpoint
    directory, "version": N or "local", "source": where its artifacts are}; asks the registry
    only, downloads nothing. Replicas load "source" when it is a local folder, without asking
    the registry again (serving.registry.resolve_model)."""
    from serving.registry import resolve_version

    resolved = resolve_version(source, tracking_uri)
    return {"uri": resolved.uri, "version": resolved.version or "local", "source": resolved.source}


def _group_by_predictor(predictors: list[Any]) -> list[tuple[Any, list[int]]]:
    """Positions of a batch's texts per Predictor (two only while a swap is under way)."""
    groups: dict[int, tuple[Any, list[int]]] = {}
    for i, predictor in enumerate(predictors):
        groups.setdefault(id(predictor), (predictor, []))[1].append(i)
    return list(groups.values())


def _not_ready(reason: str) -> HTTPException:
    return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=reason)


_ADAPTER_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "No such version or alias in the registry."},
    409: {"description": "The version is not a LoRA adapter over the deployment's base."},
}


# A stopping replica (scale-down, delete, rollout) sleeps one wait loop before it first counts
# its ongoing requests: Serve's 2 s default kept every idle replica 2 s past its last answer.
_DRAIN_WAIT_LOOP_S = 0.5


# Its requests are long polls with nothing to finish: no reason to wait 20 s for them on delete.
# Nor to log them: Serve's access log wrote a "CALL wait_for_change OK 30008.6ms" line per
# ModelServer replica every 30 s, for the app's whole life (its errors are still logged).
@serve.deployment(
    name="ModelVersion",
    num_replicas=1,
    ray_actor_options={"num_cpus": 0},
    graceful_shutdown_timeout_s=1,
    graceful_shutdown_wait_loop_s=_DRAIN_WAIT_LOOP_S,
    logging_config={"enable_access_log": False},
)
class ModelVersion:
    """The registry version the app serves, one for all replicas.

    Re-reads `source` every `poll_interval_s` (None: only when `refresh` is called) when it is
    an alias; a pinned version or a directory never changes. Each target it sets is kept in
    Ray's key-value store under the app and its build, so a ModelVersion that Serve restarts
    while the registry is unreachable starts on the last version it named, not on the one
    pinned when the app was built."""

    async def __init__(
        self,
        source: str,
        pinned: dict[str, str],
        *,
        tracking_uri: str | None,
        poll_interval_s: float | None,
        build: str = "",
    ):
        self._source = source
        self._tracking_uri = tracking_uri
        self._follows = _follows_alias(source)
        self._alias = source.rpartition("@")[2] if self._follows else ""
        self._target = {**pinned, "alias": self._alias}
        self._changed = asyncio.Event()
        # One read of the alias at a time: a poll that read it before a rollback moved it
        # must not set its older answer after the rollback's.
        self._reading = asyncio.Lock()
        self._kept = _KeptTarget(serve.get_replica_context().app_name if build else "", build)
        if self._follows:
            # A restarted ModelVersion must not send replicas back to the build-time version.
            try:
                await self.refresh("start")
            except Exception as exc:  # registry unreachable: the last target, until a poll
                self._target = self._kept.read() or self._target
                log.warning(
                    "could not read %s: %s; starting on version %s",
                    source,
                    exc,
                    self._target["version"],
                )
        if self._follows and poll_interval_s:
            self._poller = asyncio.get_running_loop().create_task(self._poll(poll_interval_s))

    async def current(self) -> dict[str, str]:
        return dict(self._target)

    async def wait_for_change(self, known_uri: str | None, timeout_s: float) -> dict[str, str]:
        """The target as soon as it differs from `known_uri`, or after `timeout_s`."""
        changed = self._changed
        if self._target["uri"] == known_uri:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout_s)
        return dict(self._target)

    async def refresh(self, reason: str = "asked") -> dict[str, Any]:
        """Read the alias now; {"version", "previous", "changed"}."""
        async with self._reading:
            before = self._target
            if self._follows:
                pinned = await asyncio.to_thread(_pin, self._source, self._tracking_uri)
                if pinned["uri"] != before["uri"]:
                    log.info(
                        "%s now names version %s (was %s; %s)",
                        self._source,
                        pinned["version"],
                        before["version"],
                        reason,
                    )
                    self._target = {**pinned, "alias": self._alias}
                    await asyncio.to_thread(self._kept.write, self._target)
                    changed, self._changed = self._changed, asyncio.Event()
                    changed.set()
        return {
            "version": self._target["version"],
            "previous": before["version"],
            "changed": self._target["uri"] != before["uri"],
        }

    async def _poll(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.refresh("poll")
            except Exception as exc:  # the registry may be down for a while: keep serving
                log.warning(
                    "could not read %s: %s; keeping version %s",
                    self._source,
                    exc,
                    self._target["version"],
                )


class _KeptTarget:
    """ModelVersion's last target in Ray's key-value store, for the app `app` as built once
    (`build`): a new build of the app starts from its own pinned version."""

    _NAMESPACE = "raylift-serve"

    def __init__(self, app: str, build: str):
        self._key = f"{app}/model-version".encode()
        self._build = build

    def write(self, target: dict[str, str]) -> None:
        if not self._build:  # built outside `build_app` (tests): nothing to keep
            return
        from ray.experimental import internal_kv

        body = json.dumps({"build": self._build, "target": target}).encode()
        internal_kv._internal_kv_put(self._key, body, overwrite=True, namespace=self._NAMESPACE)

    def read(self) -> dict[str, str] | None:
        if not self._build:
            return None
        from ray.experimental import internal_kv

        found = internal_kv._internal_kv_get(self._key, namespace=self._NAMESPACE)
        if not found:
            return None
        kept = json.loads(found)
        return kept["target"] if kept.get("build") == self._build else None


# -- the deployment --------------------------------------------------------------------------


# The time a replica may take to finish its requests stays Serve's default
# (graceful_shutdown_timeout_s, 20 s).
@serve.deployment(name="ModelServer", graceful_shutdown_wait_loop_s=_DRAIN_WAIT_LOOP_S)
@serve.ingress(app)
class ModelServer(OpenAIRoutes):
    """One replica: the Predictor of the version ModelVersion names, behind batched routes."""

    def __init__(
        self,
        versions: Any,
        adapters: Any,
        *,
        served_name: str,
        serve_config: ServeConfig,
        tracking_uri: str | None = None,
        token_sha256: str | None = None,
        trust_remote_code: bool = False,
    ):
        self._versions = versions  # handle to ModelVersion
        self._served_name = served_name
        self._config = serve_config
        self._tracking_uri = tracking_uri
        self._trust_remote_code = trust_remote_code  # the config's model.trust_remote_code only
        # Only a digest reaches the replica: the token cannot be read back from it.
        self._token_sha256 = token_sha256
        self._predictor: Any = None
        self._target: dict[str, str] = {}  # what ModelVersion names: loaded, or loading
        self._swapping = asyncio.Event()  # set once the load of the target has ended
        self._loaded = asyncio.Event()
        self._load_error: str | None = None
        self._replica = serve.get_replica_context().replica_id.unique_id
        # One thread runs the model so the event loop keeps accepting (and batching)
        # requests while a batch computes; torch releases the GIL inside kernels. Another
        # loads new versions, so a swap never stops the current one from answering.
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict")
        self._load_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load")
        self._stats = {"batches": 0, "texts": 0, "largest_batch": 0}
        self._metrics = _ReplicaMetrics(lambda: self._batcher.waiting)
        # Versions other than this one: the registry says what they are, the Adapters
        # deployment (serving.adapter_server) runs them.
        self._catalog = AdapterCatalog(
            served_name, tracking_uri, ttl_s=serve_config.model_poll_interval_s or 10.0
        )
        self._adapters = RemoteAdapters(adapters)
        self._batching = _batching(serve_config)
        self._batcher = TextBatcher(self._predict_batch, 1, 0.0)  # sizes: reconfigure()
        self.reconfigure(self._batching)
        loop = asyncio.get_running_loop()
        self._follower = loop.create_task(self._follow())
        self._gauges = loop.create_task(self._metrics.keep_fresh())

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this with the deployment's user_config: batch size and wait."""
        unknown = set(user_config) - {"max_batch_size", "batch_wait_timeout_s"}
        if unknown:
            raise ValueError(f"unknown user_config keys {sorted(unknown)}")
        self._batching = {**self._batching, **user_config}
        self._batcher.configure(
            int(self._batching["max_batch_size"]), float(self._batching["batch_wait_timeout_s"])
        )

    def batch_stats(self) -> dict[str, Any]:
        """Batching settings, batches run, texts scored, largest batch, by this replica
        (through a handle)."""
        return {"replica": self._replica, **self._batching, **self._stats}

    async def adapter_stats(self) -> dict[str, Any]:
        """An Adapters replica's adapters (LRU order), cache hits and misses, RSS in MiB."""
        return await self._adapters.stats()

    async def wait_ready(self, timeout_s: float) -> str:
        """The version once this replica's model is warm; RuntimeError if it cannot load."""
        deadline = time.monotonic() + timeout_s
        while not self._loaded.is_set():
            if self._load_error:
                raise RuntimeError(self._load_error)
            if time.monotonic() > deadline:
                raise TimeoutError(f"the model is still loading after {timeout_s:.0f} s")
            await asyncio.sleep(0.1)
        return self._predictor.model_version

    def check_health(self) -> None:
        """Serve's health check: a replica whose first model never loaded is replaced."""
        if self._load_error and not self._loaded.is_set():
            raise RuntimeError(self._load_error)

    # -- following ModelVersion -----------------------------------------------------------

    async def _follow(self) -> None:
        """Load whatever ModelVersion names, now and each time it changes. A version that
        fails to load is tried again after 2, 4, 8 ... up to 60 s, sooner if the target moves
        meanwhile (a rollback)."""
        known, wait_s, failures = None, _LONG_POLL_S, 0
        while True:
            try:
                target = await self._versions.wait_for_change.remote(known, wait_s)
            except Exception as exc:  # ModelVersion restarting: keep serving, ask again
                log.warning("could not ask ModelVersion for the version: %s", exc)
                await asyncio.sleep(_RETRY_S)
                continue
            self._target = target
            known, wait_s = target["uri"], _LONG_POLL_S
            if target["uri"] == (self._predictor.model_uri if self._predictor else None):
                continue
            swapped = self._swapping = asyncio.Event()  # requests naming it wait for it
            try:
                await self._load(target)
                failures = 0
            except Exception as exc:  # keep the current version; try again later
                failures += 1
                wait_s = min(_RETRY_S * 2 ** (failures - 1), _MAX_RETRY_S)
                self._load_error = f"could not load {target['uri']}: {exc}"
                log.warning(
                    "%s; still serving %s; trying again in %.0f s",
                    self._load_error,
                    self._version(),
                    wait_s,
                )
            finally:
                swapped.set()

    async def _load(self, target: dict[str, str]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        predictor = await loop.run_in_executor(
            self._load_thread, self._build, target["uri"], target.get("source")
        )
        replaced, self._predictor = self._predictor, predictor  # the swap: one reference
        self._catalog.forget_aliases()  # they have probably moved with the app's version
        self._loaded.set()
        self._load_error = None
        self._metrics.serving(predictor, replaced)
        log.info(
            "serving %s version %s (%s, loaded in %.1f s) as %r%s",
            predictor.model_name,
            predictor.model_version,
            ", ".join(f"{k} {v}" for k, v in predictor.runtime.items()),
            time.perf_counter() - started,
            self._served_name,
            f"; replaced version {replaced.model_version}" if replaced is not None else "",
        )

    def _build(self, uri: str, source: str | None = None) -> Any:
        from serving.predictor import Predictor

        return Predictor(
            uri,
            model_source=source,
            tracking_uri=self._tracking_uri,
            precision=self._config.precision,
            engine=self._config.engine,
            torch_threads=self._config.torch_threads,
            trust_remote_code=self._trust_remote_code,
            generation_config=self._config.generation,
            calibration_rows=self._config.calibration_texts,
        )

    def _version(self) -> str | None:
        return self._predictor.model_version if self._predictor is not None else None

    def _label(self, request: Request) -> None:
        """Count the request under the version this replica serves, a refusal included;
        `_serving` relabels it with the version that answers."""
        request.state.model_version = self._version() or ""

    async def _serving(self, request: Request) -> Any:
        """The Predictor that answers this request (waiting for the first load if needed)."""
        if not self._loaded.is_set():
            try:
                await asyncio.wait_for(self._loaded.wait(), _LOAD_WAIT_S)
            except TimeoutError:
                raise _not_ready(self._load_error or "the model is still loading") from None
        predictor = self._predictor
        request.state.model_version = predictor.model_version
        return predictor

    # -- routes ---------------------------------------------------------------------------

    @app.get("/healthz", response_model=Health)
    async def healthz(self) -> Health:
        return Health()

    @app.get(
        "/readyz",
        response_model=Readiness,
        responses={503: {"description": "The model is not loaded and warm yet."}},
    )
    async def readyz(self, request: Request) -> Readiness:
        if not self._loaded.is_set():
            raise _not_ready(self._load_error or "the model is still loading")
        request.state.model_version = self._predictor.model_version
        return Readiness(model_version=self._predictor.model_version)

    @app.get("/v1/models/{model_name}", response_model=ModelInfo)
    async def model_info(
        self, model_name: str, request: Request, credentials: Credentials
    ) -> ModelInfo:
        self._label(request)
        self._authorize(credentials)
        self._check_model_name(model_name)
        predictor = await self._serving(request)
        runtime = predictor.runtime
        return ModelInfo(
            name=self._served_name,
            version=predictor.model_version,
            labels=predictor.labels,
            model_uri=predictor.model_uri,
            engine=str(runtime["engine"]),
            precision=str(runtime["precision"]),
            threads=int(runtime["threads"]),
            replica=self._replica,
        )

    @app.post(
        "/v1/models/{model_name}/predict",
        response_model=PredictResponse,
        openapi_extra=_PREDICT_BODY_DOC,
    )
    async def predict(
        self, model_name: str, request: Request, credentials: Credentials
    ) -> PredictResponse:
        # Serve's own multiplexing header names a version on the plain route.
        return await self._answer(model_name, request, credentials, self._header_version(request))

    @app.post(
        "/v1/models/{model_name}/versions/{version}/predict",
        response_model=PredictResponse,
        openapi_extra=_PREDICT_BODY_DOC,
        responses=_ADAPTER_ERRORS,
    )
    async def predict_version(
        self, model_name: str, version: VersionParam, request: Request, credentials: Credentials
    ) -> PredictResponse:
        return await self._answer(model_name, request, credentials, version)

    @app.post(
        "/v1/models/{model_name}/aliases/{alias}/predict",
        response_model=PredictResponse,
        openapi_extra=_PREDICT_BODY_DOC,
        responses=_ADAPTER_ERRORS,
    )
    async def predict_alias(
        self, model_name: str, alias: AliasParam, request: Request, credentials: Credentials
    ) -> PredictResponse:
        return await self._answer(model_name, request, credentials, None, alias)

    async def _answer(
        self,
        model_name: str,
        request: Request,
        credentials: HTTPAuthorizationCredentials | None,
        version: str | None,
        alias: str | None = None,
    ) -> PredictResponse:
        self._label(request)
        self._authorize(credentials)
        self._check_model_name(model_name)
        _check_json_content_type(request)
        body = _parse_predict_request(await _read_body(request, self._config.max_body_bytes))
        self._check_limits(body.texts)
        predictor = await self._serving(request)
        if predictor.generator is not None:
            raise HTTPException(
                status.HTTP_400_BAD_REQUEST, detail=GENERATES.format(name=self._served_name)
            )
        try:
            version, predictor = await self._requested(version, alias, predictor, request)
        except AdapterError as exc:
            raise HTTPException(exc.status, detail=exc.detail) from None
        if version is not None and version != predictor.model_version:
            return await self._answer_adapter(version, body.texts, predictor, request)
        answers = await asyncio.gather(
            *(self._batcher.submit(text, predictor) for text in body.texts)
        )
        return PredictResponse(
            predictions=[Prediction(**answer) for answer in answers],
            model_name=predictor.model_name,
            model_version=predictor.model_version,
        )

    async def _requested(
        self, version: str | None, alias: str | None, predictor: Any, request: Request
    ) -> tuple[str | None, Any]:
        """The version a request names (a path, Serve's header, an alias; None: the app's own)
        and the Predictor to answer it with when it is the app's. AdapterError: 404 for no
        such version or alias, 409 for one the Adapters deployment cannot hold, 503 when the
        registry cannot be read.

        The alias the app follows is what ModelVersion names, not a registry read: during a
        swap, a request for the version being loaded waits for it (as on the plain route)
        rather than going to the adapters' replicas, which may not hold it."""
        try:
            if alias is not None and alias == self._target.get("alias"):
                version = self._target["version"]
            elif alias is not None:
                version = await self._catalog.alias_version(alias)
            if version is None:
                return None, predictor
            version = normalized_version(version)
            if version == self._target.get("version") and version != predictor.model_version:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._swapping.wait(), _LOAD_WAIT_S)
                predictor = self._predictor
                request.state.model_version = predictor.model_version
            if version != predictor.model_version:
                await self._catalog.check(version, predictor.model_version)
            return version, predictor
        except AdapterError:
            raise
        except Exception as exc:  # the registry is unreachable: this request only
            log.warning("could not look up version %s / alias %s: %s", version, alias, exc)
            raise AdapterError(503, f"the model registry could not be read: {exc}") from None

    async def _answer_adapter(
        self, version: str, texts: list[str], predictor: Any, request: Request
    ) -> PredictResponse:
        """Another version than this replica's: the Adapters deployment answers."""
        try:
            found = await self._adapters.predict(version, texts, predictor.model_uri)
        except AdapterError as exc:
            raise HTTPException(exc.status, detail=exc.detail) from None
        # Counted under the version that answered: never one a refused request made up.
        request.state.model_version = found["model_version"]
        return PredictResponse(
            predictions=[Prediction(**answer) for answer in found["answers"]],
            model_name=self._served_name,
            model_version=found["model_version"],
        )

    def _header_version(self, request: Request) -> str | None:
        """The version in Serve's multiplexing header (serve_multiplexed_model_id), if any.
        Read from the request itself: Serve sets its multiplexed model id from it through
        its proxy, but not on every ingress path."""
        for name in ("serve_multiplexed_model_id", "serve-multiplexed-model-id"):
            value = request.headers.get(name)
            if value:
                return value
        return serve.get_multiplexed_model_id() or None

    async def _predict_batch(self, texts: list[str], predictors: list[Any]) -> list[dict]:
        """One batch of `TextBatcher`: texts of concurrent requests, in one forward pass per
        Predictor (two only during a swap)."""
        self._metrics.batch(len(texts))
        loop = asyncio.get_running_loop()
        answers: list[dict[str, Any]] = [{}] * len(texts)
        for predictor, rows in _group_by_predictor(predictors):
            found = await loop.run_in_executor(
                self._model_thread, predictor.predict_texts, [texts[i] for i in rows]
            )
            for i, answer in zip(rows, found, strict=True):
                answers[i] = answer
        self._stats["batches"] += 1
        self._stats["texts"] += len(texts)
        self._stats["largest_batch"] = max(self._stats["largest_batch"], len(texts))
        return answers

    def _authorize(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        if self._token_sha256 is None:
            return
        sent = credentials.credentials if credentials else ""
        if not hmac.compare_digest(_token_digest(sent), self._token_sha256):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                detail="missing or wrong bearer token; send 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def _check_model_name(self, model_name: str) -> None:
        if model_name != self._served_name:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                detail=f"no model {model_name!r} here; this endpoint serves "
                f"{self._served_name!r} (GET /v1/models/{self._served_name})",
            )

    def _check_limits(self, texts: list[str]) -> None:
        limit = self._config.max_texts_per_request
        if len(texts) > limit:
            raise HTTPException(
                status.HTTP_413_CONTENT_TOO_LARGE,
                detail=f"{len(texts)} texts in one request; the limit is {limit} "
                "(serve.max_texts_per_request): split the request",
            )
        max_chars = self._config.max_text_chars
        too_long = [
            {
                "loc": ["body", "texts", i],
                "msg": f"text has {len(text)} characters; the limit is {max_chars} "
                "(serve.max_text_chars)",
                "type": "string_too_long",
            }
            for i, text in enumerate(texts)
            if len(text) > max_chars
        ]
        if too_long:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=too_long)


# -- building and deploying ------------------------------------------------------------------


def _expected_token_sha256(serve_config: ServeConfig) -> str | None:
    """Digest of the token in serve.auth_token_env, read here where the app is built."""
    env_name = serve_config.auth_token_env
    if not env_name:
        return None
    token = os.environ.get(env_name)
    if not token:
        raise ValueError(
            f"serve.auth_token_env={env_name!r}, but {env_name} is not set; "
            f"export {env_name}=<token> before deploying, or unset serve.auth_token_env"
        )
    return _token_digest(token)


def build_app(config: LifecycleConfig, model_uri: str | None = None) -> serve.Application:
    """The Serve application for `config`; the model is `model_uri`, else serve.model_uri,
    else the production alias (models:/<registry.model_name>@<promote.alias>).

    An alias is resolved to its version here (LookupError if it names none), so a bad URI
    fails the build, not a replica."""
    serve_cfg = config.serve
    token_sha256 = _expected_token_sha256(serve_cfg)
    source = worker_visible_uri(
        model_uri or serve_cfg.model_uri or config.production_uri, key="serve.model_uri"
    )
    tracking_uri = worker_visible_uri(config.registry.tracking_uri, key="registry.tracking_uri")
    versions = ModelVersion.options(
        # Every replica holds one long poll here, plus promote/rollback's refresh calls.
        max_ongoing_requests=2 * serve_cfg.autoscaling.max_replicas + 16,
    ).bind(
        source,
        _pin(source, tracking_uri),
        tracking_uri=tracking_uri,
        poll_interval_s=serve_cfg.model_poll_interval_s,
        build=uuid.uuid4().hex,
    )
    adapters = _adapter_server(serve_cfg).bind(
        versions,
        served_name=config.registry.model_name,
        serve_config=serve_cfg,
        tracking_uri=tracking_uri,
        trust_remote_code=config.model.trust_remote_code,
    )
    return _model_server(serve_cfg).bind(
        versions,
        adapters,
        served_name=config.registry.model_name,
        serve_config=serve_cfg,
        tracking_uri=tracking_uri,
        token_sha256=token_sha256,
        trust_remote_code=config.model.trust_remote_code,
    )


def _model_server(serve_cfg: ServeConfig) -> Any:
    scaling = serve_cfg.autoscaling
    return ModelServer.options(
        autoscaling_config={
            "min_replicas": scaling.min_replicas,
            "initial_replicas": max(scaling.min_replicas, 1),
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
        },
        # Batching is per text: a replica must admit at least a full batch of one-text
        # requests, and headroom over the autoscaling target.
        max_ongoing_requests=max(
            serve_cfg.max_batch_size, math.ceil(2 * scaling.target_ongoing_requests)
        ),
        # Requests past this many waiting at a proxy get Serve's 503 instead of queueing
        # without bound (-1 is Serve's "no limit").
        max_queued_requests=serve_cfg.max_queued_requests or -1,
        ray_actor_options={"num_cpus": serve_cfg.num_cpus},
        logging_config={"enable_access_log": serve_cfg.access_log},
        user_config=_batching(serve_cfg),
    )


def _adapter_server(serve_cfg: ServeConfig) -> Any:
    """Replicas only while versions other than the app's are asked for, by default: Serve
    starts the first one on the first such request (serve.adapters_min_replicas)."""
    scaling = serve_cfg.autoscaling
    low = min(serve_cfg.adapters_min_replicas, scaling.max_replicas)
    return AdapterServer.options(
        autoscaling_config={
            "min_replicas": low,
            "initial_replicas": low,
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
        },
        max_ongoing_requests=max(
            serve_cfg.max_batch_size, math.ceil(2 * scaling.target_ongoing_requests)
        ),
        ray_actor_options={"num_cpus": serve_cfg.num_cpus},
        logging_config={"enable_access_log": serve_cfg.access_log},
        user_config=_batching(serve_cfg),
        graceful_shutdown_wait_loop_s=_DRAIN_WAIT_LOOP_S,
    )


def app_builder(args: dict[str, str]) -> serve.Application:
    """For `serve run serving.app:app_builder config=configs/banking77/minilm_lora.yaml` and a
    RayService import_path: `config` is the YAML, `model_uri` optional, other keys overrides
    (`serve.max_batch_size=32`).

    HTTP options belong to the Serve instance, not to an application: under a RayService put
    `serve.request_timeout_s` in serveConfigV2's `http_options.request_timeout_s` (and host,
    port there too); `deploy` passes them to serve.start itself."""
    from jobs.config import load_config, parse_overrides

    args = dict(args)
    path = args.pop("config", None)
    if not path:
        raise ValueError("app_builder needs config=<lifecycle YAML>, e.g. configs/banking77/...")
    model_uri = args.pop("model_uri", None)
    overrides = parse_overrides([f"{key}={value}" for key, value in args.items()])
    return build_app(load_config(path, overrides), model_uri)


def deploy(config: LifecycleConfig, model_uri: str | None = None, blocking: bool = False) -> str:
    """Start Serve on (or join) the cluster, run the app, wait until its model is warm; the
    endpoint's base URL."""
    from cluster import init_ray

    init_ray()
    serve_cfg = config.serve
    serve.start(
        http_options=_http_options(serve_cfg),
        logging_config={"log_level": serve_cfg.system_log_level},
    )
    url = _endpoint_url(serve_cfg)
    application = build_app(config, model_uri)
    name = config.registry.model_name
    serve.run(application, name=name, route_prefix="/")
    version = serve.get_app_handle(name).wait_ready.remote(_LOAD_WAIT_S).result()
    log.info("serving %s version %s at %s/v1/models/%s", name, version, url, name)
    log.info("metrics (Prometheus text): %s", metrics_url() or "not exported by this Ray")
    if blocking:
        _block_until_interrupted()
    return url


def _block_until_interrupted() -> None:
    try:
        while True:
            time.sleep(10)
    except KeyboardInterrupt:
        log.info("stopping: Ctrl-C")


def metrics_url() -> str | None:
    """Where the Ray node this driver runs on exports its metrics (raylift's among Ray's),
    in Prometheus text format; None when Ray exports none there."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node["NodeID"] == here and node.get("MetricsExportPort"):
            return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    return None


def tell_running_app(config: LifecycleConfig) -> dict[str, Any] | None:
    """Best effort, after promote or rollback: ask a running app for `config` to re-read its
    alias now instead of at its next poll. Joins the Ray cluster (RAY_ADDRESS, else a local
    one) when this process is not on one yet; no cluster or no app logs one line. Never
    raises: the alias has moved, and the app's own polling (serve.model_poll_interval_s)
    follows it anyway."""
    import ray

    name = config.registry.model_name
    joined = False
    try:
        if not ray.is_initialized():
            ray.init(
                address=os.environ.get("RAY_ADDRESS") or "auto",
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
            joined = True
        if name not in serve.status().applications:
            log.info("no Serve app %r runs on this Ray cluster: nothing to tell", name)
            return None
        handle = serve.get_deployment_handle("ModelVersion", app_name=name)
        answer = handle.refresh.remote("promote/rollback").result(timeout_s=60)
        log.info(
            "told the running Serve app %r: it serves version %s (was %s)",
            name,
            answer["version"],
            answer["previous"],
        )
        return answer
    except ConnectionError as exc:  # no cluster, or several and no RAY_ADDRESS to pick one
        log.info("no Serve app for %r told: %s", name, str(exc).split(". ")[0])
    except Exception as exc:
        log.warning("could not tell the Serve app %r about the alias: %s", name, exc)
    finally:
        if joined:
            ray.shutdown()
    return None


def _http_options(serve_cfg: ServeConfig) -> dict[str, Any]:
    return {
        "host": serve_cfg.host,
        "port": serve_cfg.port,
        "request_timeout_s": serve_cfg.request_timeout_s,
    }


def _endpoint_url(serve_cfg: ServeConfig) -> str:
    host, port = serve_cfg.host, serve_cfg.port
    # A Serve already running keeps its own HTTP options (serve.start only warns): report
    # where it really listens.
    from ray.serve.context import _get_global_client

    running = _get_global_client().http_config
    if running.request_timeout_s != serve_cfg.request_timeout_s:
        log.warning(
            "Serve already runs with request_timeout_s=%s; serve.request_timeout_s=%s is "
            "ignored until `serve shutdown`",
            running.request_timeout_s,
            serve_cfg.request_timeout_s,
        )
    if (running.host, running.port) != (host, port):
        log.warning(
            "Serve already runs on %s:%s; serve.host/port (%s:%s) are ignored until "
            "`serve shutdown`",
            running.host,
            running.port,
            host,
            port,
        )
        host, port = running.host, running.port
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://{host}:{port}"
