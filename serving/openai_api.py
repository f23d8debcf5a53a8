"""OpenAI-compatible routes on the Serve app, answered by a causal-lm version's Predictor.

    POST /v1/chat/completions   messages -> an assistant message (or SSE chunks with stream)
    POST /v1/completions        prompt (a string or a list of them) -> completions (or SSE)
    GET  /v1/models             what the `model` field can name, as OpenAI lists models

`OpenAIRoutes` is a mixin of `serving.app.ModelServer`: its routes use the replica's bearer
token check (serve.auth_token_env), its Predictor (loaded, followed and swapped as the app's
docstring says) and its model thread. A version that classifies answers these routes with a
400 naming the routes it does answer.

The `model` field picks the version, as the registry's `models:/` URIs name them:
- `<served name>` (e.g. `ticket-router`): the deployment's version (the one
  serve.model_uri names, by default @production), or the version in Serve's
  `serve_multiplexed_model_id` header, as on the predict route;
- `<served name>/<version>` (`ticket-router/3`): that registry version;
- `<served name>@<alias>` (`ticket-router@challenger`): the version the alias names now.
A version other than the deployment's is a LoRA adapter on the replica's one copy of the base
(`serving.adapters`: Serve's multiplexing LRU, serve.max_adapters_per_replica), and prompts for
different adapters decode in one batch. An unknown version or alias is a 404
(`model_not_found`), a version that is not a LoRA adapter over this base, or has another task,
a 409 (`model_not_compatible`) naming why; the replica serves on. GET /v1/models lists the
served name, then each registered LoRA version over the same base and task (`name/N`) and each
alias naming one (`name@alias`), with `parent` set to the served name (as vLLM lists adapters)
and `version` to the registry version.

Requests are checked before any work, against serve.generation (`GenerationConfig`): an
unknown parameter, a `model` this endpoint cannot serve (404, 409), max_tokens over
generation.max_new_tokens_limit, a prompt over generation.max_prompt_tokens, too many prompts
or stop sequences, an unsupported feature (logprobs, echo, tools) each get an OpenAI error body,
`{"error": {"message", "type", "param", "code"}}`, with a 4xx status, and the replica serves on.

Prompts from concurrent requests generate together: `@serve.batch` collects prompts (one per
prompt and choice, `n`) for up to serve.batch_wait_timeout_s, and the batch decodes as one
(`serving.generation`: length-sorted, left-padded, KV cache). Each decode step hands every
prompt its new text, so a streaming client gets its tokens as they are generated. Every
response carries usage (prompt, completion and total tokens); a stream sends it in a last chunk
with no choices, before `data: [DONE]`. A response's `model` is the request's `model` field;
`system_fingerprint` (`version-3`) the registry version that answered.
"""

# No `from __future__ import annotations`: FastAPI resolves these routes' annotations inside
# the replicas (see serving/app.py).

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError
from ray import serve

from serving.adapters import Adapter, AdapterError
from serving.generation import Delta, GenerationRequestError, SamplingParams

__all__ = ["OpenAIRoutes", "openai_router"]

log = logging.getLogger(__name__)

openai_router = APIRouter(tags=["openai"])
_bearer = HTTPBearer(auto_error=False, description="Needed when serve.auth_token_env is set.")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]

_ERROR_TYPES = {401: "authentication_error", 404: "invalid_request_error"}


# -- request bodies ------------------------------------------------------------------------------


class _Common(BaseModel):
    # Unknown parameters are refused, as OpenAI does: a typo must not be silently ignored.
    model_config = ConfigDict(extra="forbid")

    model: StrictStr = Field(
        ...,
        description="The served name (its current version), name/<version> or name@<alias> "
        "for a LoRA version over the same base (GET /v1/models).",
    )
    max_tokens: int | None = Field(None, description="Tokens to generate per choice.")
    temperature: float | None = Field(None, description="0 is greedy; at most 2.")
    top_p: float | None = Field(None, description="Nucleus sampling mass, in (0, 1].")
    n: int = Field(1, ge=1, description="Choices per prompt.")
    stop: StrictStr | list[StrictStr] | None = Field(None, description="Stop sequences.")
    seed: int | None = Field(None, ge=0, description="Choice i of prompt j samples with a seed.")
    stream: bool = Field(False, description="Answer with server-sent events.")
    stream_options: dict[str, Any] | None = Field(None, description="Usage is always sent.")
    user: str | None = Field(None, description="Accepted and ignored.")
    presence_penalty: float | None = Field(None, description="Only 0 (or unset).")
    frequency_penalty: float | None = Field(None, description="Only 0 (or unset).")
    logprobs: Any = Field(None, description="Not supported: unset or false only.")


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: StrictStr
    name: str | None = None


class ChatRequest(_Common):
    messages: list[_Message] = Field(..., min_length=1, description="The conversation.")
    max_completion_tokens: int | None = Field(None, description="Same as max_tokens.")


class CompletionRequest(_Common):
    prompt: StrictStr | list[StrictStr] = Field(..., description="A prompt or a list of them.")
    echo: bool = Field(False, description="Not supported: false only.")
    best_of: int | None = Field(None, description="Not supported: 1 (or unset) only.")
    suffix: str | None = Field(None, description="Not supported: unset only.")


class OpenAIError(Exception):
    """Answered as `{"error": {...}}` with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        kind = _ERROR_TYPES.get(self.status, "invalid_request_error")
        if self.status >= 500:
            kind = "server_error"
        body = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status, headers=self.headers)


@dataclass(frozen=True)
class _Item:
    """One prompt and choice of a request: what @serve.batch collects."""

    owner: Any  # the deployment's Predictor, or a serving.adapters.Adapter
    generator: Any  # the owner's Generator, which encoded `ids`
    ids: list[int]
    params: SamplingParams


def _body_doc(kind: type) -> dict[str, Any]:
    """The body schema for /docs (bodies are parsed by hand: auth first, OpenAI error bodies)."""
    schema = kind.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


# -- the routes --------------------------------------------------------------------------------


class OpenAIRoutes:
    """Mixin of serving.app.ModelServer: uses its `_authorize`, `_label`, `_serving`,
    `_served_name`, `_config` (ServeConfig), `_model_thread` and `_adapters` (an
    serving.adapters.AdapterRouter)."""

    @openai_router.get("/v1/models")
    async def openai_models(self, request: Request, credentials: Credentials) -> Any:
        try:
            self._label(request)
            self._authorize(credentials)
            predictor = await self._serving(request)
        except HTTPException as exc:
            return _from_http(exc).response()
        home = predictor.model_version
        data = [_model_entry(self._served_name, home, None)]
        if home.isdigit():  # a registered version: its adapters may be named too
            try:
                found = await self._adapters.servable(home)
            except Exception as exc:  # registry unreachable: list what this replica serves
                log.warning("could not list the registry's versions of %s: %s", home, exc)
                found = {"versions": [], "aliases": {}}
            parent = self._served_name
            data += [
                _model_entry(f"{parent}/{version}", version, parent)
                for version in found["versions"]
            ]
            data += [
                _model_entry(f"{parent}@{alias}", version, parent)
                for alias, version in found["aliases"].items()
            ]
        return {"object": "list", "data": data}

    @openai_router.post("/v1/chat/completions", openapi_extra=_body_doc(ChatRequest))
    async def chat_completions(self, request: Request, credentials: Credentials) -> Any:
        return await self._openai(request, credentials, ChatRequest)

    @openai_router.post("/v1/completions", openapi_extra=_body_doc(CompletionRequest))
    async def completions(self, request: Request, credentials: Credentials) -> Any:
        return await self._openai(request, credentials, CompletionRequest)

    async def _openai(self, request: Request, credentials: Any, kind: type) -> Any:
        adapter = None
        try:
            self._label(request)
            self._authorize(credentials)
            body = await self._openai_body(request, kind)
            predictor = await self._serving(request)
            adapter = await self._openai_adapter(body.model, predictor, request)
            answering = adapter if adapter is not None else predictor
            items = self._openai_items(body, answering)
        except HTTPException as exc:
            self._openai_release(adapter)
            return _from_http(exc).response()
        except OpenAIError as exc:
            self._openai_release(adapter)
            return exc.response()
        self._openai_batching()
        prompt_tokens = sum(len(item.ids) for item in items[:: body.n])
        answer = _Answer(body, body.model, answering.model_version, prompt_tokens)
        streams = [self._generation_batch(item) for item in items]
        if body.stream:
            return StreamingResponse(
                _sse(answer, streams, lambda: self._openai_release(adapter)),
                media_type="text/event-stream",
                headers=_NO_BUFFERING,
            )
        try:
            deltas = await asyncio.gather(*(_collect(stream) for stream in streams))
        finally:
            self._openai_release(adapter)
        return answer.whole(deltas)

    async def _openai_body(self, request: Request, kind: type) -> Any:
        from serving.app import _check_json_content_type, _read_body

        _check_json_content_type(request)
        raw = await _read_body(request, self._config.max_body_bytes)
        try:
            body = kind.model_validate_json(raw)
        except ValidationError as exc:
            error = exc.errors(include_url=False)[0]
            param = ".".join(str(part) for part in error["loc"]) or None
            if error["type"] == "json_invalid":
                raise OpenAIError(400, "the body is not valid JSON", None, "invalid_json") from None
            if error["type"] == "extra_forbidden":
                raise OpenAIError(
                    400, f"unknown parameter {param!r}", param, "unknown_parameter"
                ) from None
            raise OpenAIError(400, f"{param}: {error['msg']}", param, "invalid_value") from None
        _named(body.model, self._served_name)  # another model: a 404 before any work
        _refuse_unsupported(body)
        return body

    async def _openai_adapter(self, model: str, predictor: Any, request: Request) -> Any:
        """The Adapter the `model` field names (held: release it), or None for the deployment's
        own version. `name` is the deployment's version (or the version in Serve's
        serve_multiplexed_model_id header), `name/3` version 3, `name@alias` the alias's."""
        version, alias = _named(model, self._served_name)
        if version is None and alias is None:
            version = serve.get_multiplexed_model_id() or None
        if version is not None and version.isdigit():
            version = str(int(version))
        try:
            if alias is not None:
                version = await self._adapters.alias_version(self._served_name, alias)
            if version is None or version == predictor.model_version:
                return None
            adapter = await self._adapters.adapter(version)
        except AdapterError as exc:
            request.state.model_version = version or ""
            code = "model_not_found" if exc.status == 404 else "model_not_compatible"
            raise OpenAIError(exc.status, exc.detail, "model", code) from None
        except Exception as exc:  # the registry is unreachable: this request only
            log.warning("could not look up %r: %s", model, exc)
            raise OpenAIError(
                503, f"the model registry could not be read: {exc}", "model", None
            ) from None
        request.state.model_version = adapter.model_version
        return adapter

    def _openai_release(self, adapter: Any) -> None:
        if adapter is not None:
            self._adapters.release(adapter)

    def _openai_items(self, body: Any, answering: Any) -> list[_Item]:
        limits = self._config.generation
        if isinstance(answering, Adapter):
            generator = answering.pool.generator(answering, limits)
        else:
            generator = answering.generator
        if generator is None:
            raise OpenAIError(
                400,
                f"{self._served_name!r} version {answering.model_version} classifies texts; it "
                f"does not generate. Use POST /v1/models/{self._served_name}/predict",
                "model",
                "model_not_generative",
            )
        prompts = _prompts(body)
        if len(prompts) * body.n > limits.max_prompts_per_request:
            raise OpenAIError(
                400,
                f"{len(prompts)} prompt(s) x n={body.n} is more than "
                f"{limits.max_prompts_per_request} (generation.max_prompts_per_request)",
                "n" if body.n > 1 else "prompt",
                "too_many_prompts",
            )
        items = []
        for j, (param, prompt) in enumerate(prompts):
            try:
                ids = _encode(generator, prompt, param)
                for i in range(body.n):
                    params = _sampling(body, limits, seed_offset=j * body.n + i)
                    generator.check(ids, params, param)
                    items.append(_Item(answering, generator, ids, params))
            except GenerationRequestError as exc:
                raise OpenAIError(400, str(exc), exc.param, exc.code) from None
        return items

    def _openai_batching(self) -> None:
        # The same batching settings as the predict route (serve.max_batch_size counts prompts
        # here), read again each time: reconfigure() may have changed them on a live replica.
        batching = getattr(self, "_batching", None) or {}
        self._generation_batch.set_max_batch_size(int(batching.get("max_batch_size", 16)))
        self._generation_batch.set_batch_wait_timeout_s(
            float(batching.get("batch_wait_timeout_s", 0.005))
        )

    # Sizes here are placeholders: _openai_batching sets them from the config.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _generation_batch(self, items: list[_Item]) -> AsyncIterator[list[Any]]:
        """Generate a batch of prompts; each step yields, per prompt, its Deltas of that step
        (StopIteration once the prompt has finished). Prompts for the deployment's version
        decode together, and so do prompts for any of the adapters (one pass, peft's
        adapter_names)."""
        loop = asyncio.get_running_loop()
        done: set[int] = set()
        for owner, rows in _by_owner(items):
            ids = [items[i].ids for i in rows]
            params = [items[i].params for i in rows]
            if isinstance(owner, Adapter):
                steps = owner.pool.generate_stream([items[i].generator for i in rows], ids, params)
            else:
                steps = owner.generate_stream(ids, params)
            while True:
                step = await loop.run_in_executor(self._model_thread, next, steps, None)
                if step is None:
                    break
                out: list[Any] = [StopIteration if i in done else [] for i in range(len(items))]
                for delta in step:
                    out[rows[delta.index]].append(delta)
                yield out
                done.update(rows[d.index] for d in step if d.finish_reason is not None)
        yield [StopIteration] * len(items)


# -- building answers -----------------------------------------------------------------------------

_NO_BUFFERING = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _from_http(exc: HTTPException) -> OpenAIError:
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    return OpenAIError(exc.status_code, detail, None, None, getattr(exc, "headers", None))


def _refuse_unsupported(body: Any) -> None:
    unsupported = {
        "logprobs": body.logprobs not in (None, False, 0),
        "presence_penalty": body.presence_penalty not in (None, 0, 0.0),
        "frequency_penalty": body.frequency_penalty not in (None, 0, 0.0),
        "echo": getattr(body, "echo", False),
        "best_of": getattr(body, "best_of", None) not in (None, 1),
        "suffix": getattr(body, "suffix", None) is not None,
    }
    for param, refused in unsupported.items():
        if refused:
            raise OpenAIError(
                400,
                f"{param} is not supported by this endpoint; leave it unset",
                param,
                "unsupported_parameter",
            )


def _prompts(body: Any) -> list[tuple[str, Any]]:
    """(request field, prompt) pairs: the messages of a chat, or each completion prompt."""
    if isinstance(body, ChatRequest):
        return [("messages", [m.model_dump(exclude={"name"}) for m in body.messages])]
    if isinstance(body.prompt, str):
        return [("prompt", body.prompt)]
    if not body.prompt:
        raise OpenAIError(400, "prompt is an empty list", "prompt", "invalid_value")
    return [(f"prompt.{j}", prompt) for j, prompt in enumerate(body.prompt)]


def _encode(generator: Any, prompt: Any, param: str) -> list[int]:
    """Token ids of one prompt; text the tokenizer or the chat template cannot take (a lone
    surrogate, a conversation the template refuses) is the request's fault: a 400."""
    try:
        return generator.encode(prompt)
    except GenerationRequestError:
        raise
    except Exception as exc:
        raise OpenAIError(
            400, f"{param} cannot be formatted or tokenized: {exc}", param, "invalid_value"
        ) from None


def _sampling(body: Any, limits: Any, seed_offset: int) -> SamplingParams:
    max_tokens = body.max_tokens
    if isinstance(body, ChatRequest) and body.max_completion_tokens is not None:
        max_tokens = body.max_completion_tokens
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    seed = body.seed if body.seed is not None else limits.seed
    return SamplingParams.from_config(
        limits,
        max_new_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=stop,
        seed=None if seed is None else seed + seed_offset,
    )


def _by_owner(items: list[_Item]) -> list[tuple[Any, list[int]]]:
    """Positions of a batch's prompts per Predictor (two only while a swap is under way); the
    prompts for adapters form one group, whatever their adapter (they share one model)."""
    groups: dict[int, tuple[Any, list[int]]] = {}
    for i, item in enumerate(items):
        key = id(item.owner.pool) if isinstance(item.owner, Adapter) else id(item.owner)
        groups.setdefault(key, (item.owner, []))[1].append(i)
    return list(groups.values())


def _named(model: str, served: str) -> tuple[str | None, str | None]:
    """(version, alias) that the `model` field names: (None, None) for the served name."""
    if model == served:
        return None, None
    for separator, kind in (("/", "version"), ("@", "alias")):
        prefix = f"{served}{separator}"
        if model.startswith(prefix) and model != prefix:
            rest = model[len(prefix) :]
            return (rest, None) if kind == "version" else (None, rest)
    raise OpenAIError(
        404,
        f"the model {model!r} does not exist here; this endpoint serves {served!r}, a version "
        f"of it as {served}/<version> or an alias as {served}@<alias> (GET /v1/models)",
        "model",
        "model_not_found",
    )


def _model_entry(model_id: str, version: str, parent: str | None) -> dict[str, Any]:
    """One model of GET /v1/models; `parent` is the served name for an adapter version."""
    entry = {"id": model_id, "object": "model", "created": 0, "owned_by": "raylift"}
    return {**entry, "root": model_id.split("@")[0], "parent": parent, "version": version}


async def _collect(stream: AsyncIterator[list[Delta]]) -> list[Delta]:
    return [delta async for step in stream for delta in step]


class _Answer:
    """Builds the response objects of one request (whole or streamed chunks)."""

    def __init__(self, body: Any, model: str, version: str, prompt_tokens: int):
        self.chat = isinstance(body, ChatRequest)
        prefix = "chatcmpl" if self.chat else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.fingerprint = f"version-{version}"
        # A prompt's tokens count once however many choices (n) it has, as OpenAI counts them.
        self.prompt_tokens = prompt_tokens

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": f"{kind}.chunk" if chunk and self.chat else kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
        }

    def whole(self, deltas: list[list[Delta]]) -> dict[str, Any]:
        choices = []
        for index, choice in enumerate(deltas):
            text = "".join(delta.text for delta in choice)
            finish = choice[-1].finish_reason if choice else "stop"
            if self.chat:
                message = {"role": "assistant", "content": text}
                choices.append(
                    {"index": index, "message": message, "finish_reason": finish, "logprobs": None}
                )
            else:
                choices.append(
                    {"index": index, "text": text, "finish_reason": finish, "logprobs": None}
                )
        return {**self._head(False), "choices": choices, "usage": self.usage(deltas)}

    def usage(self, deltas: list[list[Delta]]) -> dict[str, int]:
        prompt = self.prompt_tokens
        completion = sum(choice[-1].completion_tokens for choice in deltas if choice)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def chunk(self, index: int, text: str, finish: str | None, first: bool) -> dict[str, Any]:
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": index, "text": text, "finish_reason": finish, "logprobs": None}
        return {**self._head(True), "choices": [choice]}


async def _sse(
    answer: _Answer,
    streams: list[AsyncIterator[list[Delta]]],
    on_done: Callable[[], None] = lambda: None,
) -> AsyncIterator[str]:
    """Server-sent events: a chunk per choice per step with text, its finishing chunk, then a
    usage chunk and `data: [DONE]`; `on_done` runs when the stream ends (or the client goes)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[list[Delta]]) -> None:
        try:
            async for step in stream:
                for delta in step:
                    await queue.put((index, delta))
        except Exception as exc:  # the batch failed: tell the client in the stream
            await queue.put((index, exc))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    last: dict[int, Delta] = {}
    started: set[int] = set()
    open_streams = len(streams)
    try:
        while open_streams:
            index, event = await queue.get()
            if event is None:
                open_streams -= 1
                continue
            if isinstance(event, Exception):
                error = {"message": f"generation failed: {event}", "type": "server_error"}
                yield _event({"error": {**error, "param": None, "code": None}})
                continue
            last[index] = event
            first = index not in started
            started.add(index)
            yield _event(answer.chunk(index, event.text, event.finish_reason, first))
        usage = answer.usage([[last[i]] for i in sorted(last)])
        yield _event({**answer._head(True), "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"
    finally:
        for task in tasks:
            task.cancel()
        on_done()


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
