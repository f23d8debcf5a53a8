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
    "GENERATES",
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
# A predict route asked of a causal LM: a 400 saying where to ask instead.
GENERATES = (
    "{name!r} generates text: ask /v1/completions or /v1/chat/completions, with the version in "
    "the model field"
)


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


def _not_an_adapter(where: str, method: str | None) -> AdapterError:
    return _conflict(
        f"{where} is not a LoRA adapter (model.method={method}): only LoRA versions over the "
        "deployment's base can be picked per request; serve it as its own deployment "
        "(serve.model_uri)"
    )


def _other_task(where: str, task: str | None, served: str | None) -> AdapterError:
    return _conflict(f"{where} is a {task!r} model; this deployment serves {served!r}")


def _other_base(where: str, base: str | None, served: str | None) -> AdapterError:
    return _conflict(
        f"{where} is an adapter over model.base={base!r}, but this deployment's base is "
        f"{served!r}: only adapters over the same base share a replica; serve it as its own "
        "deployment (serve.model_uri)"
    )


def _unknown_version(model_name: str, version: str) -> AdapterError:
    return _unknown(
        f"no version {version} of {model_name!r} in the registry; list them with the MLflow UI "
        "or `raylift report`"
    )


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
        self.replaced_by: str | None = None  # why this replica can no longer serve adapters
        self.loads = 0
        self.frees = 0

    # -- loading ------------------------------------------------------------------------------

    def load(self, version: str, home_uri: str) -> Adapter:
        """Version `version` of the model as an adapter (blocking: call it off the event loop).
        AdapterError (404/409/503) when it cannot be served here."""
        path, meta = self._checked(version, home_uri)
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

    def check(self, version: str, home_uri: str) -> None:
        """AdapterError (404/409/503) unless `version` can be served here, without loading it
        (blocking). Asked before Serve's cache is: its multiplexer frees its least recently
        used adapter before it loads another, so a version refused there would have cost a
        cached one."""
        self._checked(version, home_uri)

    def _checked(self, version: str, home_uri: str) -> tuple[str, Any]:
        """The checkpoint folder and raylift.json of `version`, once it is known to be a LoRA
        adapter this replica's base can hold."""
        from jobs.checkpoint import refuse_remote_code
        from jobs.modeling import read_checkpoint_meta
        from serving.registry import RegistryUnavailable

        where = f"version {version} of {self._model_name!r}"
        try:
            self._ensure_base(home_uri)
            path = self._checkpoint(version)
            meta = read_checkpoint_meta(path, self._trust_remote_code)
            refuse_remote_code(path, self._trust_remote_code)
        except RegistryUnavailable as exc:
            raise AdapterError(503, str(exc)) from None
        except (FileNotFoundError, ValueError) as exc:  # not raylift's, damaged, remote code
            raise _conflict(f"{where} cannot be served: {exc}") from None
        if not all((Path(path) / name).is_file() for name in _ADAPTER_FILES):
            raise _not_an_adapter(where, meta.method)
        if meta.task != self._task.name:
            raise _other_task(where, meta.task, self._task.name)
        if not _same_base(meta.base_model, self._base):
            raise _other_base(where, meta.base_model, self._base)
        if len(meta.labels) != self._head_size:
            raise _conflict(
                f"{where} has {len(meta.labels)} labels, this deployment's base head has "
                f"{self._head_size}: adapters sharing a base need heads of the same size"
            )
        return path, meta

    def _checkpoint(self, version: str) -> str:
        if version in self._paths and Path(self._paths[version]).is_dir():
            return self._paths[version]
        from serving.registry import resolve_model

        uri = f"models:/{self._model_name}/{version}"
        try:
            path = resolve_model(uri, self._tracking_uri).path
        except LookupError:
            raise _unknown_version(self._model_name, version) from None
        self._paths[version] = path
        return path

    def warm(self, home_uri: str) -> None:
        """Load the base of `home_uri` and import peft now, before any adapter is asked for
        (blocking: call it off the event loop)."""
        import peft  # noqa: F401  (what the first _attach imports)

        self._ensure_base(home_uri)

    @property
    def home_uri(self) -> str | None:
        """The deployment's version this pool's base came from (or was last checked against)."""
        return self._home_uri

    def _ensure_base(self, home_uri: str) -> None:
        """Load the base of the deployment's version once (the first adapter pays for it).
        When the deployment moves to a version over another base, task or head size, the
        replica cannot hold its adapters: AdapterError 503 from then on, and `replaced_by`
        says why (the Adapters deployment's health check then fails, and Serve replaces the
        replica with one that loads the new base)."""
        with self._base_lock:
            if self._model is not None:
                if home_uri != self._home_uri and not self.replaced_by:
                    self._follow_home(home_uri)
                if self.replaced_by:
                    raise AdapterError(503, self.replaced_by)
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

    def _follow_home(self, home_uri: str) -> None:
        home = _home_meta(home_uri, self._tracking_uri, self._trust_remote_code)
        same = (
            home.task == self._task.name
            and _same_base(home.base_model, self._base)
            and len(home.labels) == self._head_size
        )
        if same:  # its adapters fit the base this replica holds
            self._home_uri = home_uri
            return
        self.replaced_by = (
            f"the app now serves {home_uri} ({home.task}, model.base={home.base_model!r}, "
            f"{len(home.labels)} labels); this adapters' replica holds {self._base!r} "
            f"({self._task.name}, {self._head_size} labels) and is being replaced: ask again "
            "in a few seconds"
        )
        log.warning("adapter: %s", self.replaced_by)

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
            raise TypeError(GENERATES.format(name=self._model_name))
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
    adapters: list[str] = []
    refused: dict[str, str] = {}
    for number, found in versions.items():
        if number == home_version:
            continue
        refusal = _refusal_by_tags(f"version {number} of {model_name!r}", found, task, base)
        if refusal is not None:
            refused[number] = refusal.detail
        elif None not in (task, base) and all(
            found.get(k) for k in (tags.METHOD, tags.TASK, tags.BASE_MODEL)
        ):
            adapters.append(number)  # its tags say it fits (those without tags are not listed)
    adapters.sort(key=int)
    named = {home_version, *adapters}
    aliases = client.get_registered_model(model_name).aliases or {}
    return {
        "versions": adapters,
        "aliases": {a: str(v) for a, v in sorted(aliases.items()) if str(v) in named},
        "refused": refused,
        "known": sorted(versions, key=int),
    }


def _refusal_by_tags(
    where: str, found: dict[str, str], task: str | None, base: str | None
) -> AdapterError | None:
    """Why a version's lineage tags rule it out as an adapter beside a version of `task` over
    `base`; None where they do not, or are missing (loading checks its files and head size).
    `versions` above lists only those whose tags say they fit."""
    from serving import tags

    method, its_task, its_base = (found.get(k) for k in (tags.METHOD, tags.TASK, tags.BASE_MODEL))
    if method is not None and method not in ("lora", "qlora"):
        return _not_an_adapter(where, method)
    if task is not None and its_task is not None and its_task != task:
        return _other_task(where, its_task, task)
    if base is not None and its_base is not None and not _same_base(its_base, base):
        return _other_base(where, its_base, base)
    return None


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
# The least time between two listings of the registry's versions forced by an unknown version.
_RELIST_S = 1.0


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

    async def servable(self, home_version: str, max_age_s: float | None = None) -> dict[str, Any]:
        """What a request can name besides the deployment's version `home_version`, from the
        registry (re-read after ttl_s, or `max_age_s`): {"versions": [...], "aliases": {alias:
        version}, "refused": {version: why}, "known": every version}. A version is listed when
        its lineage tags say it is a LoRA adapter with the task and base of `home_version`
        (loading it still checks its files), refused when they say it is not; an alias is
        listed when it names a listed version or `home_version`."""
        cached = self._servable
        if (
            cached is not None
            and cached[0] == home_version
            and time.monotonic() - cached[2] < min(self._ttl_s, max_age_s or self._ttl_s)
        ):
            return cached[1]
        found = await asyncio.to_thread(
            _servable, self._model_name, home_version, self._tracking_uri
        )
        self._servable = (home_version, found, time.monotonic())
        return found

    async def check(self, version: str, home_version: str) -> None:
        """AdapterError 404 (no such version) or 409 (its tags rule it out) unless `version`
        may be asked of the Adapters deployment beside `home_version`. Checked at the ingress,
        so a wrong version never reaches (or starts) an adapters' replica, whose cache would
        free an adapter before refusing it. A version the cached listing does not know is
        looked up again, at most once a second (it may have been registered since)."""
        if not home_version.isdigit():  # a checkpoint folder: no lineage tags to go by
            return
        found = await self.servable(home_version)
        if version not in found["known"]:
            found = await self.servable(home_version, max_age_s=_RELIST_S)
        if version in found["refused"]:
            raise _conflict(found["refused"][version])
        if version not in found["known"]:
            raise _unknown_version(self._model_name, version)

    def forget_aliases(self) -> None:
        """Read every alias again on its next use (the app's version just changed: aliases
        have probably moved with it)."""
        self._aliases.clear()


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
        home = self._home_uri()
        if not warm or home != self._pool.home_uri or self._pool.replaced_by:
            # Before Serve's cache is asked: it frees an adapter before it loads another.
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._load_thread, self._pool.check, version, home)
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
