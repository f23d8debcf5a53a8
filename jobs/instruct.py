"""Instruction data for causal LMs: format, tokenize, mask, pack, and score by token.

One formatting for training and generation. An example is a prompt (with an optional system
message) and its response. The *prompt text* is what a generator is given; the *response text*
is what training teaches the model to continue it with, end-of-turn marker included:

- **chat** (the tokenizer has a chat template): the prompt text is
  `apply_chat_template([system?, user], add_generation_prompt=True)`; the response text is what
  the template adds after it when the assistant turn is appended (the answer and the template's
  end-of-turn tokens).
- **plain** (no chat template, or `task.prompt_template: plain`): `PLAIN_TEMPLATE`, below, with
  the tokenizer's bos token in front; the response text is the answer followed by the eos token.

Both texts are tokenized with `add_special_tokens=False` (the prompt text already holds what
the model expects in front). The labels are the token ids on the response and -100 on the prompt
and on padding, so the loss counts response tokens only. A generator tokenizes `prompt_text(...)`
the same way and stops at the eos token(s) (the chat template's end-of-turn token among them).

Packing (`task.packing`) puts several examples of a batch in one row of at most
`task.max_length` tokens. Position ids restart at 0 for each example and no 2D attention mask
is passed, which transformers (5.x, sdpa and eager) reads as packed sequences: its causal mask
becomes block-diagonal, so no token attends across an example boundary (checked against each
example's logits run alone in tests/unit/test_causal_lm.py). Only without a KV cache, though:
transformers skips the packed-sequence check when a cache exists, and Llama makes one by
default, in training mode too (measured: logits of the second packed example off by 0.17). So
every batch says `use_cache=False`. The first label of
each packed example is -100, so no example is scored on predicting the next one's first token:
a packed batch has exactly the loss of the same batch unpacked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from jobs.modeling import pad_with_eos

__all__ = [
    "IGNORE_INDEX",
    "PLAIN_TEMPLATE",
    "SYSTEM_BLOCK",
    "collate",
    "encode_example",
    "pack_rows",
    "perplexity_metrics",
    "prepare_tokenizer",
    "prompt_text",
    "loss_is_mean_token_nll",
    "resolve_template",
    "scored_tokens",
    "token_nll",
]

IGNORE_INDEX = -100  # torch cross-entropy's ignore_index: prompt and padding positions

# The plain template (no chat template in the tokenizer). The system block only when a system
# message is given; the model answers after "### Response:\n".
SYSTEM_BLOCK = "### System:\n{system}\n\n"
PLAIN_TEMPLATE = "{system_block}### Instruction:\n{prompt}\n\n### Response:\n"

Template = Literal["chat", "plain"]


def prepare_tokenizer(tokenizer):
    """`tokenizer` with a pad token: its eos token when it has none (Llama's has none), as
    jobs.modeling.load_tokenizer already pads. Padding is never trained on (label -100,
    attention off), so which token pads does not matter. Refused without an eos token, pad
    token or not: the plain template ends every answer with it, and a generator stops at it."""
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "the tokenizer of model.base has no eos token; a causal LM needs one to learn "
            "where an answer ends: use a base whose tokenizer defines one (eos_token in its "
            "tokenizer_config.json)"
        )
    return pad_with_eos(tokenizer)


def resolve_template(tokenizer, setting: str = "auto") -> Template:
    """'chat' or 'plain' for task.prompt_template `setting` (auto: chat when the tokenizer has
    a chat template)."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if setting == "chat" and not has_chat:
        raise ValueError(
            "task.prompt_template=chat, but the tokenizer of model.base has no chat template; "
            "use prompt_template: plain (or auto)"
        )
    if setting == "plain" or (setting == "auto" and not has_chat):
        return "plain"
    return "chat"


def _messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": prompt}]


def prompt_text(tokenizer, prompt: str, system: str | None = None, template: Template = "chat"):
    """The text a generator is given for `prompt`: the model's answer follows it."""
    if template == "chat":
        return tokenizer.apply_chat_template(
            _messages(prompt, system), tokenize=False, add_generation_prompt=True
        )
    block = SYSTEM_BLOCK.format(system=system) if system else ""
    bos = tokenizer.bos_token or ""
    return bos + PLAIN_TEMPLATE.format(system_block=block, prompt=prompt)


def _response_text(tokenizer, prompt: str, response: str, system: str | None, template: Template):
    if template == "plain":
        return response + (tokenizer.eos_token or "")
    head = prompt_text(tokenizer, prompt, system, "chat")
    whole = tokenizer.apply_chat_template(
        [*_messages(prompt, system), {"role": "assistant", "content": response}], tokenize=False
    )
    if not whole.startswith(head):
        raise ValueError(
            "the chat template of model.base does not render a conversation as its generation "
            "prompt followed by the answer, so the prompt tokens cannot be masked; set "
            "task.prompt_template: plain"
        )
    return whole[len(head) :]


def encode_example(
    tokenizer,
    prompt: str,
    response: str,
    system: str | None = None,
    *,
    template: Template,
    max_length: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(input ids, labels) of one example; labels are -100 on the prompt.

    Over `max_length`, the response keeps at least half the budget (all of it if shorter) and is
    cut at its end; the prompt gets the rest and is cut at its start, so the tokens that
    introduce the answer (the generation prompt) stay next to it.
    """
    head = prompt_text(tokenizer, prompt, system, template)
    tail = _response_text(tokenizer, prompt, response, system, template)
    p_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    if len(p_ids) + len(r_ids) > max_length:
        keep_r = min(len(r_ids), max(max_length - len(p_ids), max_length // 2))
        keep_p = max_length - keep_r
        p_ids, r_ids = (p_ids[len(p_ids) - keep_p :] if keep_p else []), r_ids[:keep_r]
    ids = np.asarray([*p_ids, *r_ids], dtype=np.int32)
    labels = np.asarray([IGNORE_INDEX] * len(p_ids) + list(r_ids), dtype=np.int32)
    return ids, labels


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of examples per row: first fit, longest first, each row at most `capacity`
    tokens (an example longer than `capacity` gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        size = lengths[index]
        slot = next((r for r, free in enumerate(room) if free >= size), None)
        if slot is None:
            rows.append([index])
            room.append(capacity - size)
        else:
            rows[slot].append(index)
            room[slot] -= size
    return rows


def collate(
    sequences: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    pad_id: int,
    *,
    packing: bool = False,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Model inputs of one batch: padded rows (input_ids, attention_mask, labels), or with
    `packing` rows of at most `max_length` tokens (input_ids, position_ids, labels); both with
    use_cache=False (see the module docstring)."""
    if not packing:
        return _padded(sequences, labels, pad_id)
    capacity = max_length or max(len(s) for s in sequences)
    rows = pack_rows([len(s) for s in sequences], capacity)
    longest = max(sum(len(sequences[i]) for i in row) for row in rows)
    ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    targets = np.full((len(rows), longest), IGNORE_INDEX, dtype=np.int64)
    # Padding is one more "example" from position 0: it never joins the one before it.
    positions = np.tile(np.arange(longest, dtype=np.int64), (len(rows), 1))
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(sequences[i])
            ids[r, at : at + n] = sequences[i]
            targets[r, at : at + n] = labels[i]
            targets[r, at] = IGNORE_INDEX  # not predicted from the example before it
            positions[r, at : at + n] = np.arange(n)
            at += n
        positions[r, at:] = np.arange(longest - at)
    return {
        "input_ids": torch.from_numpy(ids),
        "position_ids": torch.from_numpy(positions),
        "labels": torch.from_numpy(targets),
        "use_cache": False,
    }


def _padded(sequences, labels, pad_id: int) -> dict[str, Any]:
    longest = max(len(s) for s in sequences)
    ids = np.full((len(sequences), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), longest), dtype=np.int64)
    targets = np.full((len(sequences), longest), IGNORE_INDEX, dtype=np.int64)
    for row, (seq, lab) in enumerate(zip(sequences, labels, strict=True)):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
        targets[row, : len(lab)] = lab
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask),
        "labels": torch.from_numpy(targets),
        "use_cache": False,
    }


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, tokens scored) of next-token prediction: the
    logits at position t score the label at t + 1; -100 labels are not scored."""
    shifted = logits[..., :-1, :].float()
    targets = labels[..., 1:].to(shifted.device, torch.long)
    nll = torch.nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return float(nll), scored_tokens(labels)


def scored_tokens(labels: torch.Tensor) -> int:
    """Tokens next-token prediction scores in a batch: the labels after the first that are not
    IGNORE_INDEX."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def loss_is_mean_token_nll(model) -> bool:
    """Whether `model`'s own loss (given labels, and no num_items_in_batch) is the mean of what
    token_nll sums, in fp32: transformers' ForCausalLMLoss (logits upcast, labels shifted by
    one, mean over those not IGNORE_INDEX) on a model class transformers ships (remote code
    computes its loss as it likes), with no auxiliary loss added to it (a mixture of experts'
    router loss, config.output_router_logits). A peft model's loss is its base model's."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    shipped = type(base).__module__.startswith("transformers.models.")
    router_loss = bool(getattr(base.config, "output_router_logits", False))
    return shipped and getattr(base, "loss_function", None) is ForCausalLMLoss and not router_loss


def perplexity_metrics(nll_sum: float, tokens: float) -> dict[str, float]:
    """Token-weighted loss (mean nats per response token) and its perplexity, exp(loss)."""
    if not tokens:
        return {"loss": float("nan"), "perplexity": float("nan")}
    loss = nll_sum / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}  # exp(710) overflows
