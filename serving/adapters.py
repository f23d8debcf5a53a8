"""Many LoRA versions of one base model in one Serve replica (Ray Serve model multiplexing).

A request that names a registry version (`/v1/models/{name}/versions/{v}/predict`, or Serve's
`serve_multiplexed_model_id: v` header) or an alias (`/v1/models/{name}/aliases/{a}/predict`)
other than the version the app serves is answered by an `Adapter` from an `AdapterPool`, in a
replica of the app's Adapters deployment (`serving.adapter_server`); the ingress reads the
registry only (`AdapterCatalog`: what an alias names, what is servable):

- the base model is loaded once per replica, the first time a request names another version:
  `model.base` of the deployment's own version, with its head size (peft `PeftModel`);
- each version is one named peft adapter on it: its LoRA weights and its own classifier head
  (peft's modules_to_save), loaded with `load_adapter` on a cache miss and freed with
  `delete_adapter` when evicted;
- the cache is Serve's `@serve.multiplexed` LRU, `serve.max_adapters_per_replica` big; the
  ingress's handle calls carry the version as the multiplexed model id, so Serve routes them to
  replicas that hold the adapter;
- texts of one batch (`serving.batching`) that name different adapters run in one forward
  pass (peft's mixed-batch `adapter_names=`, which covers LoRA layers and the modules_to_save
  head);
- an evicted adapter still in use by a request in flight is freed when that request is done.

Refusals, each a 4xx naming why: an unknown version or alias (404), a version that is not a
LoRA adapter over this replica's base, or has another task or head size (409). The deployment's
own version keeps its merged, engine-selected Predictor; this pool runs the others on torch in
fp32, on the replica's one model thread (loads and frees too, so the model is never changed
under a forward pass).

A causal-lm base generates instead: the OpenAI routes (`serving.openai_api`) pick a version
with the request's `model` field (`name/3`, `name@alias`), and prompts for different adapters
decode in one batch (`serving.generation.stream_together`, peft's `adapter_names=`), each
formatted with its own version's tokenizer and prompt template. `AdapterCatalog.servable` lists
what the `model` field can name: the registry's LoRA versions over the same base and task, and
their aliases.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Adapter",
    "AdapterCatalog",
    "AdapterError",
    "AdapterPool",
    "AdapterRouter",
    "normalized_version",
    "replica_rss_mib",
]

log = logging.getLogger(__name__)

_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class AdapterError(Exception):
    """A request's version or alias cannot be served here: `status` (404 or 409) and why."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _unknown(detail: str) -> AdapterError:
    return AdapterError(404, detail)


def _conflict(detail: str) -> AdapterError:
    return AdapterError(409, detail)


def replica_rss_mib() -> float:
    """Resident memory of this process, MiB (Linux /proc; psutil elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import psutil

    return psutil.Process().memory_info().rss / 2**20


@dataclass(eq=False)
class Adapter:
    """One registry version loaded as a named adapter of the pool's PeftModel."""

    pool: AdapterPool
    name: str  # the peft adapter name: unique per load, never reused
    version: str
    labels: list[str]
    max_length: int
    tokenizer: Any = field(default=None, repr=False)  # its own (a causal-lm adapter's)
    template: str = "auto"  # how its training formatted prompts (causal-lm)
    users: int = 0
    evicted: bool = False
    counted: bool = False  # its first request was counted as the cache miss
    freed: bool = field(default=False, repr=False)
    _generator: Any = field(default=None, repr=False)

    @property
    def model_version(self) -> str:
        return self.version

    def __del__(self) -> None:
        # Serve's multiplexer calls this when the LRU cache evicts the adapter (and Python may
        # call it again at collection): free it now, or when its last request is done.
        pool = self.__dict__.get("pool")
        if pool is not None:
            pool.evict(self)


class AdapterPool:
    """The base model (loaded once) and the adapters on it, in one replica.

    `load` runs on a loading thread except the peft calls that change the model, which it
    hands to `model_thread` (where every forward pass runs too)."""

    def __init__(
        self,
        *,
        model_name: str,
        tracking_uri: str | None,
        model_thread: Executor,
        torch_threads: int | None = None,
        trust_remote_code: bool = False,
    ):
        self._model_name = model_name
        self._tracking_uri = tracking_uri
        self._model_thread = model_thread
        self._torch_threads = torch_threads
        self._trust_remote_code = trust_remote_code
        self._lock = threading.Lock()
        self._base_lock = threading.Lock()
        self._names = itertools.count(1)
        self._model: Any = None  # peft.PeftModel, built with the first adapter
        self._tokenizer: Any = None
        self._task: Any = None
        self._base: str | None = None  # model.base of the deployment's version
        self._home_uri: str | None = None
        self._head_size = 0
        self._max_positions_cfg: Any = None
        self._paths: dict[str, str] = {}  # version -> downloaded checkpoint directory
        self.loads = 0
        self.frees = 0

    # -- loading ------------------------------------------------------------------------------

    def load(self, version: str, home_uri: str) -> Adapter:
        """Version `version` of the model as an adapter (blocking: call it off the event loop).
        AdapterError (404/409) when it cannot be served here."""
        from jobs.checkpoint import refuse_remote_code
        from jobs.modeling import read_checkpoint_meta

        path = self._checkpoint(version)
        meta = read_checkpoint_meta(path, self._trust_remote_code)
        self._ensure_base(home_uri)
        where = f"version {version} of {self._model_name!r}"
        if not all((Path(path) / name).is_file() for name in _ADAPTER_FILES):
            raise _conflict(
                f"{where} is not a LoRA adapter (model.method={meta.method}, no "
                "adapter_model.safetensors): only LoRA versions over the deployment's base can be "
                "picked per request; serve it as its own deployment (serve.model_uri)"
            )
        if meta.task != self._task.name:
            raise _conflict(
                f"{where} is a {meta.task!r} model; this replica's base serves {self._task.name!r}"
            )
        if not _same_base(meta.base_model, self._base):
            raise _conflict(
                f"{where} is an adapter over model.base={meta.base_model!r}, but this replica's "
                f"base is {self._base!r}: only adapters over the same base share a replica; serve "
                "it as its own deployment (serve.model_uri)"
            )
        if len(meta.labels) != self._head_size:
            raise _conflict(
                f"{where} has {len(meta.labels)} labels, the replica's base head has "
                f"{self._head_size}: adapters sharing a base need heads of the same size"
            )
        refuse_remote_code(path, self._trust_remote_code)
        from serving.predictor import _clamp_max_length

        adapter = Adapter(
            pool=self,
            name=f"v{version}_{next(self._names)}",
            version=version,
            labels=list(meta.labels),
            max_length=_clamp_max_length(meta.max_length, self._max_positions_cfg),
        )
        if self.generative:
            from jobs.modeling import load_tokenizer

            # Its prompts are formatted as its training formatted them (jobs.instruct).
            adapter.tokenizer = load_tokenizer(path, self._trust_remote_code)
            adapter.template = meta.instruct.template if meta.instruct else "auto"
        started = time.perf_counter()
        self._model_thread.submit(self._attach, path, adapter.name).result()
        self.loads += 1
        log.info(
            "adapter: loaded version %s as %s in %.2f s",
            version,
            adapter.name,
            time.perf_counter() - started,
        )
        return adapter

    def _checkpoint(self, version: str) -> str:
        if version in self._paths and Path(self._paths[version]).is_dir():
            return self._paths[version]
        from serving.registry import resolve_model

        uri = f"models:/{self._model_name}/{version}"
        try:
            path = resolve_model(uri, self._tracking_uri).path
        except LookupError:
            raise _unknown(
                f"no version {version} of {self._model_name!r} in the registry; list them with "
                "the MLflow UI or `raylift report`"
            ) from None
        self._paths[version] = path
        return path

    def warm(self, home_uri: str) -> None:
        """Load the base of `home_uri` and import peft now, before any adapter is asked for
        (blocking: call it off the event loop)."""
        import peft  # noqa: F401  (what the first _attach imports)

        self._ensure_base(home_uri)

    def _ensure_base(self, home_uri: str) -> None:
        """Load the base of the deployment's version once (the first adapter pays for it)."""
        with self._base_lock:
            if self._model is not None:
                return
            from jobs.modeling import (
                _load_head_model,
                load_tokenizer,
                resolve_base_model,
            )
            from jobs.tasks import get_task

            home = _home_meta(home_uri, self._tracking_uri, self._trust_remote_code)
            task = get_task(home.task)
            base_path = resolve_base_model(home.base_model)
            started = time.perf_counter()
            # The head is each adapter's own (modules_to_save): the base's is never used.
            model = _load_head_model(base_path, task, home.labels, self._trust_remote_code, "full")
            model = model.float().eval()
            self._tokenizer = load_tokenizer(base_path, self._trust_remote_code)
            self._task = task
            self._base = home.base_model
            self._home_uri = home_uri
            self._head_size = len(home.labels)
            self._max_positions_cfg = model.config
            self._model = model  # wrapped by peft with the first adapter (_attach)
            log.info(
                "adapter: base %s loaded once for this replica in %.1f s",
                home.base_model,
                time.perf_counter() - started,
            )

    def _attach(self, path: str, name: str) -> None:
        """On the model thread: add the adapter at `path` as `name`."""
        import peft

        with self._lock:
            if isinstance(self._model, peft.PeftModel):
                self._model.load_adapter(path, adapter_name=name, is_trainable=False)
            else:
                self._model = peft.PeftModel.from_pretrained(
                    self._model, path, adapter_name=name, is_trainable=False
                )
            self._model.eval()

    # -- freeing ---------------------------------------------------------------------------

    def evict(self, adapter: Adapter) -> None:
        """The cache let `adapter` go: free it once no request uses it."""
        with self._lock:
            adapter.evicted = True
            free = adapter.users == 0 and not adapter.freed
            if free:
                adapter.freed = True
        if free:
            self._model_thread.submit(self._detach, adapter.name)

    def acquire(self, adapter: Adapter) -> bool:
        """Hold `adapter` for one request (False when it is already freed)."""
        with self._lock:
            if adapter.freed:
                return False
            adapter.users += 1
            return True

    def release(self, adapter: Adapter) -> None:
        with self._lock:
            adapter.users -= 1
            free = adapter.evicted and adapter.users == 0 and not adapter.freed
            if free:
                adapter.freed = True
        if free:
            self._model_thread.submit(self._detach, adapter.name)

    def _detach(self, name: str) -> None:
        with self._lock:
            if name in getattr(self._model, "peft_config", {}):
                self._model.delete_adapter(name)
                self.frees += 1
                log.info("adapter: freed %s", name)

    # -- inference -------------------------------------------------------------------------

    @property
    def generative(self) -> bool:
        """Whether the base generates text (causal-lm): known once the base is loaded."""
        from serving.generation import is_generative

        return self._task is not None and is_generative(self._task)

    def generator(self, adapter: Adapter, limits: Any) -> Any:
        """The Generator of `adapter` over the shared model, under `limits` (the deployment's
        serve.generation), built on first use; None when the base classifies."""
        if not self.generative:
            return None
        if adapter._generator is None or adapter._generator.limits is not limits:
            from serving.generation import Generator
            from serving.predictor import _position_limit

            adapter._generator = Generator(
                self._model,
                adapter.tokenizer,
                limits,
                position_limit=_position_limit(self._max_positions_cfg),
                template=adapter.template,
                adapter_name=adapter.name,
            )
        return adapter._generator

    def generate_stream(
        self, generators: Sequence[Any], prompts: Sequence[Sequence[int]], params: Sequence[Any]
    ) -> Any:
        """Decode steps (`serving.generation.stream_together`) of prompts for several adapters
        in one batch; iterate it on the model thread."""
        from serving.generation import stream_together

        def steps() -> Any:
            self._apply_threads()
            yield from stream_together(generators, prompts, params)

        return steps()

    def _apply_threads(self) -> None:
        import torch

        if self._torch_threads and torch.get_num_threads() != self._torch_threads:
            torch.set_num_threads(self._torch_threads)

    def predict(self, adapters: Sequence[Adapter], texts: Sequence[str]) -> list[dict[str, Any]]:
        """Answers for `texts[i]` by `adapters[i]`, in one forward pass (on the model thread)."""
        import torch

        from serving.predictor import NON_FINITE_REASON

        if self.generative:
            raise TypeError(
                f"{self._model_name!r} generates text: ask /v1/completions or "
                "/v1/chat/completions with the version in the model field"
            )
        self._apply_threads()
        ids: list[list[int]] = [[] for _ in texts]
        for adapter, rows in _group(adapters):
            encoded = self._tokenizer(
                [texts[i] for i in rows],
                truncation=True,
                max_length=adapter.max_length,
                padding=False,
                return_attention_mask=False,
                return_token_type_ids=False,
            )["input_ids"]
            for i, row in zip(rows, encoded, strict=True):
                ids[i] = row
        width = max(map(len, ids))
        pad = self._tokenizer.pad_token_id or 0
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        with self._lock, torch.inference_mode():
            logits = self._model(
                input_ids=input_ids,
                attention_mask=mask,
                adapter_names=[adapter.name for adapter in adapters],
            ).logits
        logits = logits.float().numpy()
        answers: list[dict[str, Any]] = [{}] * len(texts)
        for adapter, rows in _group(adapters):
            found, scores = self._task.postprocess(logits[rows], adapter.labels)
            for i, label, score in zip(rows, found.tolist(), scores.tolist(), strict=True):
                ok = label is not None and np.isfinite(score) and np.isfinite(logits[i]).all()
                answers[i] = (
                    {"label": label, "score": float(score), "error": None}
                    if ok
                    else {"label": None, "score": None, "error": NON_FINITE_REASON}
                )
        return answers

    def stats(self) -> dict[str, Any]:
        names = list(getattr(self._model, "peft_config", {}) or {})
        return {
            "base": self._base,
            "adapters_in_model": names,
            "loads": self.loads,
            "frees": self.frees,
        }


def _group(adapters: Sequence[Adapter]) -> list[tuple[Adapter, list[int]]]:
    groups: dict[int, tuple[Adapter, list[int]]] = {}
    for i, adapter in enumerate(adapters):
        groups.setdefault(id(adapter), (adapter, []))[1].append(i)
    return list(groups.values())


def _same_base(one: str, other: str | None) -> bool:
    if other is None or one == other:
        return other is not None
    from jobs.modeling import resolve_base_model

    try:
        return Path(resolve_base_model(one)) == Path(resolve_base_model(other))
    except FileNotFoundError:
        return False


def _servable(model_name: str, home_version: str, tracking_uri: str | None) -> dict[str, Any]:
    from mlflow import MlflowClient

    from serving import tags
    from serving.registry import configure_tracking

    if tracking_uri:
        configure_tracking(tracking_uri)
    client = MlflowClient()
    versions = {
        str(v.version): v.tags or {} for v in client.search_model_versions(f"name = '{model_name}'")
    }
    home = versions.get(home_version, {})
    task, base = home.get(tags.TASK), home.get(tags.BASE_MODEL)
    adapters = sorted(
        (
            number
            for number, found in versions.items()
            if number != home_version
            and found.get(tags.METHOD) in ("lora", "qlora")
            and found.get(tags.TASK) == task
            and task is not None
            and _same_base(found.get(tags.BASE_MODEL, ""), base)
        ),
        key=int,
    )
    named = {home_version, *adapters}
    aliases = client.get_registered_model(model_name).aliases or {}
    return {
        "versions": adapters,
        "aliases": {a: str(v) for a, v in sorted(aliases.items()) if str(v) in named},
    }


def _home_meta(home_uri: str, tracking_uri: str | None, trust_remote_code: bool) -> Any:
    """raylift.json of the deployment's version (only that file is downloaded)."""
    from jobs.modeling import read_checkpoint_meta

    if Path(home_uri).is_dir():
        return read_checkpoint_meta(home_uri, trust_remote_code)
    import mlflow

    from serving.registry import resolve_version

    source = resolve_version(home_uri, tracking_uri).source
    with tempfile.TemporaryDirectory(prefix="raylift-home-") as scratch:
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"{source.rstrip('/')}/raylift.json", dst_path=scratch
        )
        return read_checkpoint_meta(scratch, trust_remote_code)


# -- what the replica calls ---------------------------------------------------------------------

_VERSION_FORMAT = "a registry version number such as 3"


class AdapterCatalog:
    """What a request may name besides the deployment's version, read from the registry (no
    model): the version an alias names and the servable LoRA versions, each re-read after
    `ttl_s`. The ingress asks it; the adapters' replicas hold the adapters."""

    def __init__(self, model_name: str, tracking_uri: str | None, ttl_s: float = 5.0):
        self._model_name = model_name
        self._tracking_uri = tracking_uri
        self._ttl_s = ttl_s
        self._aliases: dict[str, tuple[str, float]] = {}
        self._servable: tuple[str, dict[str, Any], float] | None = None

    async def alias_version(self, alias: str) -> str:
        """The version `alias` names now (re-read from the registry after ttl_s)."""
        cached = self._aliases.get(alias)
        if cached is not None and time.monotonic() - cached[1] < self._ttl_s:
            return cached[0]
        from serving.registry import resolve_version

        try:
            resolved = await asyncio.to_thread(
                resolve_version, f"models:/{self._model_name}@{alias}", self._tracking_uri
            )
        except (LookupError, ValueError):
            raise _unknown(
                f"alias {alias!r} of {self._model_name!r} names no version in the registry; set it "
                "with `raylift promote` (or MLflow's set_registered_model_alias)"
            ) from None
        self._aliases[alias] = (str(resolved.version), time.monotonic())
        return str(resolved.version)

    async def servable(self, home_version: str) -> dict[str, Any]:
        """What a request can name besides the deployment's version `home_version`, from the
        registry (re-read after ttl_s): {"versions": [...], "aliases": {alias: version}}.
        A version counts when its lineage tags say it is a LoRA adapter with the task and base
        of `home_version` (loading it still checks its files); an alias when it names one of
        them or `home_version`."""
        cached = self._servable
        if (
            cached is not None
            and cached[0] == home_version
            and time.monotonic() - cached[2] < self._ttl_s
        ):
            return cached[1]
        found = await asyncio.to_thread(
            _servable, self._model_name, home_version, self._tracking_uri
        )
        self._servable = (home_version, found, time.monotonic())
        return found


def normalized_version(version: str) -> str:
    """`version` as the registry numbers it ("03" is "3"); AdapterError (404) if it is not a
    version number."""
    if not version.isdigit() or int(version) < 1:
        raise _unknown(f"version {version!r} is not {_VERSION_FORMAT}")
    return str(int(version))


class AdapterRouter:
    """The adapters' replica side of multiplexing: the Adapter of a version from Serve's LRU
    cache (`@serve.multiplexed`), counting hits and misses."""

    def __init__(
        self,
        pool: AdapterPool,
        *,
        max_adapters: int,
        load_thread: Executor,
        home_uri: Callable[[], str],
        hits: Any = None,
        misses: Any = None,
    ):
        from ray import serve

        self._pool = pool
        self._load_thread = load_thread
        self._home_uri = home_uri
        self._hits_metric, self._misses_metric = hits, misses
        # What Serve's LRU holds, least recently used first (mirrored: its cache is private).
        self._resident: OrderedDict[str, Adapter] = OrderedDict()
        self.max_adapters = max_adapters
        self.hits = 0
        self.misses = 0

        async def load_registry_version(version: str) -> Adapter:
            loop = asyncio.get_running_loop()
            adapter = await loop.run_in_executor(
                self._load_thread, self._pool.load, version, self._home_uri()
            )
            return adapter

        # Decorated here, not on the class: the cache size comes from the config.
        self._cached = serve.multiplexed(max_num_models_per_replica=max_adapters)(
            load_registry_version
        )

    async def adapter(self, version: str) -> Adapter:
        """The Adapter of `version`, loaded on a miss and held for the caller, who must
        `release` it; AdapterError when it cannot be served here."""
        version = normalized_version(version)
        warm = self._is_resident(version)
        while True:
            adapter = await self._cached(version)
            # Serve evicts on a worker thread: one freed between the cache lookup and here
            # is loaded again rather than used.
            if self._pool.acquire(adapter):
                break
        self._resident[version] = adapter
        self._resident.move_to_end(version)
        if warm or adapter.counted:
            self.hits += 1
            if self._hits_metric is not None:
                self._hits_metric.inc()
        else:
            adapter.counted = True
            self.misses += 1
            if self._misses_metric is not None:
                self._misses_metric.inc()
        return adapter

    def _is_resident(self, version: str) -> bool:
        adapter = self._resident.get(version)
        if adapter is not None and adapter.evicted:
            del self._resident[version]
            return False
        return adapter is not None

    def release(self, adapter: Adapter) -> None:
        self._pool.release(adapter)

    def stats(self) -> dict[str, Any]:
        resident = [v for v, a in self._resident.items() if not a.evicted]
        return {
            "max_adapters": self.max_adapters,
            "resident_versions": resident,
            "hits": self.hits,
            "misses": self.misses,
            "rss_mib": round(replica_rss_mib(), 1),
            **self._pool.stats(),
        }
