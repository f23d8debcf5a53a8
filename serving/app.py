"""The online endpoint: a Ray Serve application with a FastAPI ingress around one Predictor.

    POST /v1/models/{model_name}/predict   {"texts": [...]} -> {"predictions": [...], ...}
    GET  /v1/models/{model_name}           name, version, labels
    GET  /healthz                          liveness (never needs a token)

Texts from concurrent requests are batched together with `@serve.batch`; the batch unit is
one text, so `serve.max_batch_size` counts texts however the clients group them. Batch size
and wait are the deployment's `user_config`, so `serve deploy` with new values changes them
on live replicas without a restart.

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
import hashlib
import hmac
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr, ValidationError
from ray import serve

from cluster.storage import worker_visible_uri
from jobs.config import LifecycleConfig, ServeConfig
from serving.text import is_usable_text

__all__ = [
    "ModelInfo",
    "ModelServer",
    "PredictRequest",
    "PredictResponse",
    "Prediction",
    "app_builder",
    "build_app",
    "deploy",
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
    model_uri: str = Field(..., description="URI the model was loaded from.")
    precision: str = Field(..., description="Inference precision in use.")


class Health(BaseModel):
    status: str = "ok"


app = FastAPI(title="raylift model endpoint", docs_url="/docs")
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


# -- the deployment --------------------------------------------------------------------------


@serve.deployment(name="ModelServer")
@serve.ingress(app)
class ModelServer:
    """One replica: a Predictor behind batched HTTP routes."""

    def __init__(
        self,
        model_uri: str,
        *,
        served_name: str,
        serve_config: ServeConfig,
        tracking_uri: str | None = None,
        token_sha256: str | None = None,
        trust_remote_code: bool = False,
    ):
        from serving.predictor import Predictor

        self._served_name = served_name
        self._config = serve_config
        # Only a digest reaches the replica: the token cannot be read back from it.
        self._token_sha256 = token_sha256
        self._predictor = Predictor(
            model_uri,
            tracking_uri=tracking_uri,
            precision=serve_config.precision,
            torch_threads=serve_config.torch_threads,
            trust_remote_code=trust_remote_code,  # the config's model.trust_remote_code only
        )
        # One thread runs the model so the event loop keeps accepting (and batching)
        # requests while a batch computes; torch releases the GIL inside kernels.
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict")
        self._stats = {"batches": 0, "texts": 0, "largest_batch": 0}
        self._batching = _batching(serve_config)
        self.reconfigure(self._batching)
        log.info(
            "serving %s version %s (%s) as %r",
            self._predictor.model_name,
            self._predictor.model_version,
            self._predictor.precision,
            served_name,
        )

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this with the deployment's user_config: batch size and wait."""
        unknown = set(user_config) - {"max_batch_size", "batch_wait_timeout_s"}
        if unknown:
            raise ValueError(f"unknown user_config keys {sorted(unknown)}")
        self._batching = {**self._batching, **user_config}
        self._predict_batch.set_max_batch_size(int(self._batching["max_batch_size"]))
        self._predict_batch.set_batch_wait_timeout_s(float(self._batching["batch_wait_timeout_s"]))

    def batch_stats(self) -> dict[str, Any]:
        """Batching settings, batches run, texts scored, largest batch (through a handle)."""
        return {**self._batching, **self._stats}

    @app.get("/healthz", response_model=Health)
    async def healthz(self) -> Health:
        return Health()

    @app.get("/v1/models/{model_name}", response_model=ModelInfo)
    async def model_info(self, model_name: str, credentials: Credentials) -> ModelInfo:
        self._authorize(credentials)
        self._check_model_name(model_name)
        return ModelInfo(
            name=self._served_name,
            version=self._predictor.model_version,
            labels=self._predictor.labels,
            model_uri=self._predictor.model_uri,
            precision=self._predictor.precision,
        )

    @app.post(
        "/v1/models/{model_name}/predict",
        response_model=PredictResponse,
        openapi_extra=_PREDICT_BODY_DOC,
    )
    async def predict(
        self, model_name: str, request: Request, credentials: Credentials
    ) -> PredictResponse:
        self._authorize(credentials)
        self._check_model_name(model_name)
        _check_json_content_type(request)
        body = _parse_predict_request(await _read_body(request, self._config.max_body_bytes))
        self._check_limits(body.texts)
        answers = await asyncio.gather(*(self._predict_batch(text) for text in body.texts))
        return PredictResponse(
            predictions=[Prediction(**answer) for answer in answers],
            model_name=self._predictor.model_name,
            model_version=self._predictor.model_version,
        )

    # Sizes here are placeholders: reconfigure() sets them from the config's user_config.
    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def _predict_batch(self, texts: list[str]) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        answers = await loop.run_in_executor(
            self._model_thread, self._predictor.predict_texts, texts
        )
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
    else the production alias (models:/<registry.model_name>@<promote.alias>)."""
    serve_cfg = config.serve
    uri = model_uri or serve_cfg.model_uri or config.production_uri
    scaling = serve_cfg.autoscaling
    deployment = ModelServer.options(
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
        user_config=_batching(serve_cfg),
    )
    return deployment.bind(
        worker_visible_uri(uri, key="serve.model_uri"),
        served_name=config.registry.model_name,
        serve_config=serve_cfg,
        tracking_uri=worker_visible_uri(config.registry.tracking_uri, key="registry.tracking_uri"),
        token_sha256=_expected_token_sha256(serve_cfg),
        trust_remote_code=config.model.trust_remote_code,
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
    """Start Serve on (or join) the cluster, run the app; the endpoint's base URL."""
    from cluster import init_ray

    init_ray()
    serve_cfg = config.serve
    serve.start(http_options=_http_options(serve_cfg))
    url = _endpoint_url(serve_cfg)
    application = build_app(config, model_uri)
    name = config.registry.model_name
    log.info("deploying %s at %s/v1/models/%s", name, url, name)
    serve.run(application, name=name, route_prefix="/", blocking=blocking)
    return url


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
