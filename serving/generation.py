"""Text generation for causal-lm versions: what the Predictor runs when its task generates.

One decode loop serves the Serve routes (plain and streaming) and Ray Data batch generation:
- prompts are tokenized once (chat messages as `jobs.instruct.prompt_text` formats them for
  training: the tokenizer's chat template, or the plain template for a model trained with it),
  sorted by
  length and split into sub-batches whose KV cache (rows x (longest prompt + max_new_tokens))
  stays within `generation.sub_batch_tokens`, as classification sorts under a token budget;
- a sub-batch is left-padded (position ids counted from each row's first real token) and
  decoded with the KV cache, one token per row per step; a row that finishes leaves the batch
  (its cache rows are dropped), so a long answer does not make short ones pay;
- each row samples with its own seeded `torch.Generator`: the same prompt, parameters and seed
  give the same text whatever it is batched with (at temperature 0, greedy, there is no seed);
- stop sequences end a row at their first occurrence and are left out of its text; streamed text
  holds back any tail that could still become a stop sequence, so no client sees one.

Every result carries usage: prompt tokens (after the template) and completion tokens (those
generated, the end-of-sequence token or the one that completed a stop sequence included).
Requests are checked against `GenerationConfig` limits before any work
(`GenerationRequestError`, which names the request field and the config key).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # imported where used: the Serve app imports this module in processes
    import torch  # that never generate (ModelVersion, a classifier's replica)

__all__ = [
    "Completion",
    "Delta",
    "GenerationRequestError",
    "Generator",
    "SamplingParams",
    "completion_columns",
    "is_generative",
    "stream_together",
]

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
_MAX_SUB_BATCH_ROWS = 64


def is_generative(task: Any) -> bool:
    """Whether `task` (a jobs.tasks.Task) generates text rather than scoring it."""
    return bool(getattr(task, "generative", False))


class GenerationRequestError(ValueError):
    """A request the limits refuse: `param` is the request field, `code` a short reason."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class SamplingParams:
    """How one prompt is generated."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @classmethod
    def from_config(cls, config: Any, **given: Any) -> SamplingParams:
        """Parameters from a GenerationConfig, each overridden by `given` where not None."""
        chosen = {
            "max_new_tokens": config.max_new_tokens,
            "temperature": config.temperature,
            "top_p": config.top_p,
            "stop": tuple(config.stop),
            "seed": config.seed,
        }
        chosen.update({key: value for key, value in given.items() if value is not None})
        chosen["stop"] = tuple(chosen["stop"])
        return cls(**chosen)


@dataclass
class Completion:
    """One prompt's finished answer."""

    text: str
    finish_reason: str  # "stop" (end of sequence or a stop sequence) or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Delta:
    """What one prompt added in one decode step (streaming); `finish_reason` set on its last."""

    index: int
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _Row:
    index: int
    ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    owner: Generator  # whose tokenizer, stop ids and adapter the row decodes with
    out: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already handed out
    finish: str | None = None


class Generator:
    """Generates with a causal LM and its tokenizer, under `limits` (a GenerationConfig)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        limits: Any,
        *,
        precision: str = "fp32",
        position_limit: int | None = None,
        template: str = "auto",
        adapter_name: str | None = None,
    ):
        """`adapter_name`: the peft adapter of `model` (a PeftModel holding several) that this
        Generator's prompts run with; rows of Generators sharing one model, each with its
        adapter, decode in one batch (`stream_together`)."""
        from jobs.instruct import resolve_template

        self._template = resolve_template(tokenizer, template)
        self._model = model
        self._tokenizer = tokenizer
        self._limits = limits
        self._precision = precision
        self._position_limit = position_limit
        pad = tokenizer.pad_token_id
        self._pad_id = int(pad if pad is not None else (tokenizer.eos_token_id or 0))
        self._eos_ids = _eos_ids(model, tokenizer)
        self.adapter_name = adapter_name

    @property
    def limits(self) -> Any:
        return self._limits

    @property
    def model(self) -> Any:
        return self._model

    # -- prompts --------------------------------------------------------------------------

    def encode(self, prompt: str | Sequence[Mapping[str, Any]]) -> list[int]:
        """Token ids of a plain prompt, or of chat messages through the chat template."""
        if isinstance(prompt, str):
            return list(self._tokenizer(prompt, add_special_tokens=True)["input_ids"])
        text = self.chat_text(prompt)
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat_text(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The prompt text of `messages`, ending where the assistant's answer begins: a system
        message and one user turn exactly as training formatted them (`jobs.instruct`)."""
        from jobs.instruct import prompt_text

        _check_messages(messages)
        roles = [m["role"] for m in messages]
        if roles in (["user"], ["system", "user"]):
            system = messages[0]["content"] if roles[0] == "system" else None
            return prompt_text(self._tokenizer, messages[-1]["content"], system, self._template)
        if self._template == "plain":
            raise GenerationRequestError(
                f"this model was trained with the plain prompt template, which holds one user "
                f"turn after an optional system message; got roles {roles}",
                "messages",
            )
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        return self._tokenizer.apply_chat_template(
            plain, tokenize=False, add_generation_prompt=True
        )

    def check(self, ids: Sequence[int], params: SamplingParams, param: str = "prompt") -> None:
        """Raise GenerationRequestError when `params` or the prompt pass a limit."""
        limits = self._limits
        if not ids:
            raise GenerationRequestError(f"{param} is empty", param, "empty_prompt")
        if len(ids) > limits.max_prompt_tokens:
            raise GenerationRequestError(
                f"{param} has {len(ids)} tokens; the limit is {limits.max_prompt_tokens} "
                "(generation.max_prompt_tokens): shorten it",
                param,
                "context_length_exceeded",
            )
        _check_params(params, limits)
        room = self._position_limit
        if room is not None and len(ids) + params.max_new_tokens > room:
            raise GenerationRequestError(
                f"{param} has {len(ids)} tokens and max_tokens is {params.max_new_tokens}: "
                f"{len(ids) + params.max_new_tokens} positions, more than the model's {room}; "
                "lower max_tokens or shorten the prompt",
                "max_tokens",
                "context_length_exceeded",
            )

    # -- generating -----------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]
    ) -> list[Completion]:
        """One Completion per tokenized prompt, in order (each checked with `check` first)."""
        done: dict[int, Completion] = {}
        texts: dict[int, list[str]] = {}
        for step in self.stream(prompts, params):
            for delta in step:
                texts.setdefault(delta.index, []).append(delta.text)
                if delta.finish_reason is not None:
                    done[delta.index] = Completion(
                        "".join(texts[delta.index]),
                        delta.finish_reason,
                        delta.prompt_tokens,
                        delta.completion_tokens,
                    )
        return [done[i] for i in range(len(prompts))]

    def stream(
        self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]
    ) -> Iterator[list[Delta]]:
        """Per decode step, the Deltas of the prompts that produced text or finished.

        Prompts are sorted by length and generated in sub-batches under the token budget; every
        prompt ends with exactly one Delta whose finish_reason is set."""
        return stream_together([self] * len(prompts), prompts, params)

    def _advance(self, row: _Row, token: int) -> Delta | None:
        row.out.append(token)
        if token in self._eos_ids:
            row.finish = "stop"
        else:
            text = self._tokenizer.decode(
                [t for t in row.out if t not in self._eos_ids], skip_special_tokens=True
            )
            row.text = text
            cut = _first_stop(text, row.params.stop, row.sent)
            if cut is not None:
                row.text, row.finish = text[:cut], "stop"
            elif len(row.out) >= row.params.max_new_tokens:
                row.finish = "length"
        safe = len(row.text) if row.finish else _safe_end(row.text, row.params.stop)
        new = row.text[row.sent : max(safe, row.sent)]
        row.sent = max(safe, row.sent)
        if not new and row.finish is None:
            return None
        return Delta(row.index, new, row.finish, len(row.ids), len(row.out))

    def warm_up(self) -> None:
        """One short generation: the first forward pass picks kernels, pay it at load."""
        ids = self.encode("warm up")
        self.generate([ids], [SamplingParams(max_new_tokens=2, temperature=0.0)])


def stream_together(
    generators: Sequence[Generator],
    prompts: Sequence[Sequence[int]],
    params: Sequence[SamplingParams],
) -> Iterator[list[Delta]]:
    """`Generator.stream` of prompts that may belong to different Generators over one model
    (`generators[i]` encoded prompt i): each row is checked against, decoded and stopped by its
    own Generator and runs with its peft adapter (`adapter_name`), so requests for several
    adapters of one base share sub-batches, as rows of one Generator do."""
    if not (len(generators) == len(prompts) == len(params)):
        raise ValueError(
            f"{len(generators)} generators, {len(prompts)} prompts and {len(params)} sampling "
            "parameters: give one of each per prompt"
        )
    if not prompts:
        return
    models = {id(g.model) for g in generators}
    if len(models) > 1:
        raise ValueError("prompts of Generators over different models cannot share a batch")
    for owner, ids, chosen in zip(generators, prompts, params, strict=True):
        owner.check(ids, chosen)
    rows = [
        _Row(i, list(ids), chosen, _seeded(chosen), owner)
        for i, (owner, ids, chosen) in enumerate(zip(generators, prompts, params, strict=True))
    ]
    for chunk in _sub_batches(rows, generators[0].limits.sub_batch_tokens):
        yield from _decode(chunk)


def _sub_batches(rows: list[_Row], budget: int) -> Iterator[list[_Row]]:
    from serving.predictor import _sub_batches as token_budget_runs

    prompt_lengths = np.array([len(row.ids) for row in rows], dtype=np.int64)
    cache_lengths = prompt_lengths + [row.params.max_new_tokens for row in rows]
    order = np.argsort(prompt_lengths, kind="stable")
    for chunk in token_budget_runs(order, cache_lengths, budget):
        for start in range(0, len(chunk), _MAX_SUB_BATCH_ROWS):
            yield [rows[i] for i in chunk[start : start + _MAX_SUB_BATCH_ROWS]]


def _decode(rows: list[_Row]) -> Iterator[list[Delta]]:
    import torch

    first = rows[0].owner
    model = first.model
    ids, mask = _left_pad([row.ids for row in rows], first._pad_id)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    active = list(rows)
    cache = None
    # Rows without an adapter run on the base ("__base__", peft's name for it).
    mixed = any(row.owner.adapter_name is not None for row in rows)
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if first._precision == "bf16"
        else contextlib.nullcontext()
    )
    with torch.inference_mode(), autocast:
        while True:
            adapters = (
                {"adapter_names": [row.owner.adapter_name or "__base__" for row in active]}
                if mixed
                else {}
            )
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                **adapters,
            )
            cache = out.past_key_values
            tokens = _next_tokens(out.logits[:, -1, :].float(), active)
            deltas = [
                row.owner._advance(row, token) for row, token in zip(active, tokens, strict=True)
            ]
            yield [delta for delta in deltas if delta is not None]
            keep = [i for i, row in enumerate(active) if row.finish is None]
            if not keep:
                return
            if len(keep) < len(active):
                index = torch.tensor(keep, dtype=torch.long)
                cache.batch_select_indices(index)
                mask, positions = mask[index], positions[index]
                tokens = [tokens[i] for i in keep]
            active = [active[i] for i in keep]
            ids = torch.tensor(tokens, dtype=torch.long)[:, None]
            mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype)], dim=1)
            positions = positions[:, -1:] + 1


def _next_tokens(logits: torch.Tensor, rows: list[_Row]) -> list[int]:
    tokens = logits.argmax(dim=-1).tolist()
    for i, row in enumerate(rows):
        if row.params.temperature > 0:
            tokens[i] = _sample(logits[i], row.params, row.generator)
    return tokens


def completion_columns(generator: Generator, prompts: Sequence[Any]) -> dict[str, np.ndarray]:
    """Batch generation (Ray Data rows): each prompt is one user turn through the chat template
    (as training formatted its prompt column), generated with the limits' defaults; a seeded
    sampler's seed is mixed with the prompt's CRC-32, so a row's text does not depend on the
    rows batched with it. Columns: completion, finish_reason, prompt_tokens,
    completion_tokens and error (why a row has no completion: unusable text, over a limit)."""
    from serving.text import UNUSABLE_REASON, usable_mask

    n = len(prompts)
    columns = {
        "completion": np.full(n, None, dtype=object),
        "finish_reason": np.full(n, None, dtype=object),
        "prompt_tokens": np.zeros(n, dtype=np.int64),
        "completion_tokens": np.zeros(n, dtype=np.int64),
        "error": np.full(n, None, dtype=object),
    }
    usable = usable_mask(prompts)
    rows, encoded, params = [], [], []
    for i, prompt in enumerate(prompts):
        if not usable[i]:
            columns["error"][i] = UNUSABLE_REASON
            continue
        chosen = _row_params(generator.limits, str(prompt))
        try:
            ids = generator.encode([{"role": "user", "content": str(prompt)}])
            generator.check(ids, chosen)
        except GenerationRequestError as exc:
            columns["error"][i] = str(exc)
            continue
        rows.append(i)
        encoded.append(ids)
        params.append(chosen)
    for i, done in zip(rows, generator.generate(encoded, params), strict=True):
        columns["completion"][i] = done.text
        columns["finish_reason"][i] = done.finish_reason
        columns["prompt_tokens"][i] = done.prompt_tokens
        columns["completion_tokens"][i] = done.completion_tokens
    return columns


def _row_params(limits: Any, prompt: str) -> SamplingParams:
    params = SamplingParams.from_config(limits)
    if params.seed is None or params.temperature == 0:
        return params
    import zlib

    return dataclasses.replace(params, seed=params.seed ^ zlib.crc32(prompt.encode()))


def _check_messages(messages: Any) -> None:
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
        raise GenerationRequestError(
            "messages must be a non-empty list of {role, content} objects", "messages"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise GenerationRequestError(f"messages[{i}] is not an object", "messages")
        if message.get("role") not in ROLES:
            raise GenerationRequestError(
                f"messages[{i}].role is {message.get('role')!r}; use one of {', '.join(ROLES)}",
                "messages",
            )
        if not isinstance(message.get("content"), str):
            raise GenerationRequestError(f"messages[{i}].content must be a string", "messages")


def _check_params(params: SamplingParams, limits: Any) -> None:
    if not 1 <= params.max_new_tokens <= limits.max_new_tokens_limit:
        raise GenerationRequestError(
            f"max_tokens is {params.max_new_tokens}; it must be between 1 and "
            f"{limits.max_new_tokens_limit} (generation.max_new_tokens_limit)",
            "max_tokens",
            "max_tokens_over_limit",
        )
    if not 0.0 <= params.temperature <= 2.0:
        raise GenerationRequestError(
            f"temperature is {params.temperature}; it must be between 0 and 2", "temperature"
        )
    if not 0.0 < params.top_p <= 1.0:
        raise GenerationRequestError(
            f"top_p is {params.top_p}; it must be more than 0 and at most 1", "top_p"
        )
    if len(params.stop) > limits.max_stop_sequences:
        raise GenerationRequestError(
            f"{len(params.stop)} stop sequences; the limit is {limits.max_stop_sequences} "
            "(generation.max_stop_sequences)",
            "stop",
        )
    if any(not isinstance(stop, str) or not stop for stop in params.stop):
        raise GenerationRequestError("stop sequences must be non-empty strings", "stop")


def _seeded(params: SamplingParams) -> torch.Generator | None:
    import torch

    if params.temperature == 0:
        return None
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return torch.Generator().manual_seed(int(seed))


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    import torch

    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
        sorted_probs[before >= params.top_p] = 0.0  # the most likely token always stays
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _first_stop(text: str, stops: Sequence[str], sent: int) -> int | None:
    """Where the first stop sequence in `text` starts (never before the text already sent)."""
    found = [text.find(stop) for stop in stops]
    starts = [start for start in found if start >= 0]
    return max(min(starts), sent) if starts else None


def _safe_end(text: str, stops: Sequence[str]) -> int:
    """How much of `text` can be sent: not a tail that may still grow into a stop sequence, nor
    an incomplete character (a byte-level token decodes to U+FFFD until its bytes complete)."""
    end = len(text)
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                end = min(end, len(text) - size)
                break
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    return end


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    found = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, list | tuple):
            found.update(int(v) for v in value)
    return frozenset(found)
