"""The Adapters deployment: versions other than the one the app serves, as LoRA adapters on one
copy of the base per replica, behind Ray Serve's model multiplexing.

The ModelServer (the app's ingress, `serving.app`) answers its own version itself. A request
that names another version (a path, an alias, Serve's `serve_multiplexed_model_id` header or
the OpenAI `model` field) is passed on, through a DeploymentHandle with
`multiplexed_model_id=<version>`, to this deployment: Serve's router sends it to a replica that
already holds that adapter where one does, and `@serve.multiplexed` keeps each replica's LRU
cache (serve.max_adapters_per_replica). This is the layout Serve supports behind its HAProxy and
direct ingress, where multiplexing on the ingress deployment is not (ray-project/ray#61227).

- `predict(texts, home_uri)`: texts of concurrent requests for any adapters are batched
  together (`serving.batching.TextBatcher`) into one forward pass (peft's `adapter_names=`);
- `generate(body, home_uri)`: an OpenAI request's prompts, streamed back as (prompt, step)
  messages; prompts for different adapters decode in one batch;
- `stats()`: the replica's adapters (LRU order), cache hits and misses, RSS.

`home_uri` is the ModelServer's version: its `model.base` is the base the adapters go on. A
replica loads that base as it starts (the version ModelVersion names), before any request.
Refusals (an unknown version, one over another base) come back as values, not exceptions, so
the ingress answers them with their own 4xx; `RemoteAdapters` is the ingress's side.

With `serve.adapters_min_replicas: 0` (the default) the deployment has no replica until the
first request for an adapter; Serve starts one at once for it (cold start), and scales back to
zero after its downscale delay without adapter traffic.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from serving.adapters import GENERATES, Adapter, AdapterError, AdapterPool, AdapterRouter
from serving.batching import BatchMetrics, TextBatcher
from serving.openai_api import GenerationBatching, OpenAIError

__all__ = ["AdapterServer", "RemoteAdapters", "RemoteGeneration"]

log = logging.getLogger(__name__)


def _refusal(exc: AdapterError) -> dict[str, Any]:
    return {"error": {"status": exc.status, "detail": exc.detail}}


@serve.deployment(name="Adapters")  # its options: serving.app._adapter_server
class AdapterServer(GenerationBatching):
    """One replica: the base model once, the adapters Serve's LRU holds, one model thread."""

    def __init__(
        self,
        versions: Any,
        *,
        served_name: str,
        serve_config: Any,
        tracking_uri: str | None = None,
        trust_remote_code: bool = False,
    ):
        from ray.serve import metrics

        self._served_name = served_name
        self._config = serve_config
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict")
        self._load_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load")
        self._home_uri: str | None = None
        self._pool = AdapterPool(
            model_name=served_name,
            tracking_uri=tracking_uri,
            model_thread=self._model_thread,
            torch_threads=serve_config.torch_threads,
            trust_remote_code=trust_remote_code,
        )
        self._router = AdapterRouter(
            self._pool,
            max_adapters=serve_config.max_adapters_per_replica,
            load_thread=self._load_thread,
            home_uri=lambda: self._home_uri,
            hits=metrics.Counter(
                "raylift_adapter_cache_hits_total",
                description="Adapter requests found in the LRU cache.",
            ),
            misses=metrics.Counter(
                "raylift_adapter_cache_misses_total",
                description="Adapter requests that had to load.",
            ),
        )
        self._batching = {
            "max_batch_size": serve_config.max_batch_size,
            "batch_wait_timeout_s": serve_config.batch_wait_timeout_s,
        }
        self._batcher = TextBatcher(self._predict_batch, 1, 0.0)  # sizes: reconfigure()
        self.reconfigure(self._batching)
        self._metrics = BatchMetrics(lambda: self._batcher.waiting)
        loop = asyncio.get_running_loop()
        self._gauges = loop.create_task(self._metrics.keep_fresh())
        self._warming = loop.create_task(self._warm(versions))

    async def _warm(self, versions: Any) -> None:
        """Load the base of the app's current version in the background, so that the first
        request for an adapter waits for the adapter only, or for the rest of this."""
        try:
            target = await versions.current.remote()
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._load_thread, self._pool.warm, target["uri"])
        except Exception as exc:  # the first adapter request loads it, or says why it cannot
            log.warning("could not load the adapters' base ahead of requests: %s", exc)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """The ModelServer's batching settings (the same user_config)."""
        self._batching = {**self._batching, **user_config}
        self._batcher.configure(
            int(self._batching["max_batch_size"]), float(self._batching["batch_wait_timeout_s"])
        )

    def check_health(self) -> None:
        """Serve's health check: a replica whose base no longer fits the app's version (a
        promotion to another base, task or head size) is replaced by one that loads it."""
        if self._pool.replaced_by:
            raise RuntimeError(self._pool.replaced_by)

    def stats(self) -> dict[str, Any]:
        """Adapters this replica holds (LRU order), cache hits and misses, its RSS in MiB."""
        return {"replica": self._replica, **self._router.stats()}

    async def _adapter(self, home_uri: str) -> Adapter:
        self._home_uri = home_uri
        return await self._router.adapter(serve.get_multiplexed_model_id())

    async def predict(self, texts: list[str], home_uri: str) -> dict[str, Any]:
        """{"answers": one per text, "model_version"}, or {"error": {"status", "detail"}}."""
        try:
            adapter = await self._adapter(home_uri)
        except AdapterError as exc:
            return _refusal(exc)
        if self._pool.generative:
            self._router.release(adapter)
            return _refusal(AdapterError(400, GENERATES.format(name=self._served_name)))
        try:
            answers = await asyncio.gather(*(self._batcher.submit(t, adapter) for t in texts))
        finally:
            self._router.release(adapter)
        return {"answers": answers, "model_version": adapter.model_version}

    async def _predict_batch(self, texts: list[str], adapters: list[Adapter]) -> list[dict]:
        self._metrics.batch(len(texts))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._model_thread, self._pool.predict, adapters, texts)

    async def generate(self, body: Any, home_uri: str) -> AsyncIterator[Any]:
        """First {"model_version", "prompt_tokens", "items"} (or {"error": ...}), then
        (prompt, its Deltas of a step), and (prompt, None) when it is done or (prompt, "why")
        when its batch failed."""
        try:
            adapter = await self._adapter(home_uri)
        except AdapterError as exc:
            yield _refusal(exc)
            return
        try:
            try:
                items = self._openai_items(body, adapter)
            except OpenAIError as exc:
                yield {"error": {"status": exc.status, "detail": exc.message,
                                 "param": exc.param, "code": exc.code}}  # fmt: skip
                return
            self._openai_batching()
            yield {
                "model_version": adapter.model_version,
                "prompt_tokens": sum(len(item.ids) for item in items[:: body.n]),
                "items": len(items),
            }
            async for index, step in self._item_steps(items):
                # An exception travels as its text: the ingress fails that prompt's stream.
                failed = isinstance(step, Exception)
                yield index, f"{type(step).__name__}: {step}" if failed else step
        finally:
            self._router.release(adapter)


# -- the ingress's side ------------------------------------------------------------------------


@dataclass
class RemoteGeneration:
    """An OpenAI request generating on the Adapters deployment: one stream per prompt (lists
    of Deltas, as the ModelServer's own batches give them); `close` stops it."""

    model_version: str
    prompt_tokens: int
    streams: list[AsyncIterator[list[Any]]]
    _pump: asyncio.Task | None = field(default=None, repr=False)

    def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()


class RemoteAdapters:
    """How the ModelServer asks the Adapters deployment: by handle, with the version as
    Serve's multiplexed model id. Refusals are raised here as AdapterError."""

    def __init__(self, handle: Any):
        self._handle = handle

    def _for(self, version: str) -> Any:
        return self._handle.options(multiplexed_model_id=version)

    async def predict(self, version: str, texts: list[str], home_uri: str) -> dict[str, Any]:
        found = await self._for(version).predict.remote(texts, home_uri)
        if "error" in found:
            raise AdapterError(found["error"]["status"], found["error"]["detail"])
        return found

    async def generate(self, version: str, body: Any, home_uri: str) -> RemoteGeneration:
        messages = self._for(version).options(stream=True).generate.remote(body, home_uri)
        head = await messages.__anext__()
        if "error" in head:
            error = head["error"]
            if "code" in error:
                raise OpenAIError(error["status"], error["detail"], error["param"], error["code"])
            raise AdapterError(error["status"], error["detail"])
        queues: list[asyncio.Queue] = [asyncio.Queue() for _ in range(head["items"])]

        async def pump() -> None:
            try:
                async for index, step in messages:
                    queues[index].put_nowait(step)
            except Exception as exc:  # the replica went away: every open prompt fails
                for queue in queues:
                    queue.put_nowait(f"the adapters' replica failed: {exc}")
            finally:
                messages.cancel()

        async def stream(queue: asyncio.Queue) -> AsyncIterator[list[Any]]:
            while True:
                step = await queue.get()
                if step is None:
                    return
                if isinstance(step, str):
                    raise RuntimeError(step)
                yield step

        task = asyncio.get_running_loop().create_task(pump())
        return RemoteGeneration(
            model_version=head["model_version"],
            prompt_tokens=head["prompt_tokens"],
            streams=[stream(queue) for queue in queues],
            _pump=task,
        )

    async def stats(self) -> dict[str, Any]:
        return await self._handle.stats.remote()
