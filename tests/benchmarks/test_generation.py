"""Generation speed: tokens/s of the Predictor's generator (serving.generation: length-sorted,
left-padded, KV cache, finished rows leave the batch) against a plain `model.generate` loop over
the same prompts, at batch 1 and batch 16. Run by `make bench`; prints the table (and writes it
to $RAYLIFT_BENCH_OUT if set), asserts only that both produce the same greedy tokens.

The model: a random Llama, 4 layers, hidden 256 (about 3M weights), with the tiny word-level
tokenizer of tests.helpers; 16 prompts of 4 to 60 words, 32 new tokens each, greedy, fp32,
1 torch thread, best of 3 passes taken in turns (so a burst of load on the shared machine hits
every contender alike). Targets (issue 10): >= 1.0x the loop at batch 1, >= 3x the
batch-1 loop at batch 16. Measured 2026-11-26 (AVX512-BF16, 1 thread, shared box): 1.05x and
1.17x at batch 1, 5.05x and 5.67x at batch 16, in two runs (the loop at 470-570 tokens/s).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.helpers import WORDS, make_tiny_llama

NEW_TOKENS = 32
PROMPTS = 16
PASSES = 3
# One thread: on this shared 2-core box, two OpenMP threads competing with other processes made
# model.generate 10x slower from one call to the next (load average 8-15).
THREADS = 1


def _model(directory: Path):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = make_tiny_llama(directory)
    small = LlamaConfig.from_pretrained(path)
    config = LlamaConfig(
        **{
            **small.to_dict(),
            "hidden_size": 256,
            "intermediate_size": 688,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "max_position_embeddings": 512,
        }
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float().eval()
    return model, AutoTokenizer.from_pretrained(path)


def _prompts(tokenizer) -> list[list[int]]:
    texts = [" ".join((WORDS * 3)[i : i + 4 + 4 * i]) for i in range(PROMPTS)]
    return [tokenizer(text)["input_ids"] for text in texts]


def _best(runs: dict) -> dict[str, tuple[float, int]]:
    """Per name, (best seconds of PASSES, generated tokens) of its run(), which returns its
    token count; the runs take turns, pass after pass."""
    best: dict[str, tuple[float, int]] = {}
    for _ in range(PASSES):
        for name, run in runs.items():
            started = time.perf_counter()
            tokens = run()
            seconds = time.perf_counter() - started
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, tokens)
    return best


def test_generation_tokens_per_second(tmp_path):
    import torch

    from jobs.config import GenerationConfig
    from serving.generation import Generator, SamplingParams

    torch.set_num_threads(THREADS)
    model, tokenizer = _model(tmp_path / "llama")
    prompts = _prompts(tokenizer)
    eos = set(model.generation_config.eos_token_id or [])
    generator = Generator(model, tokenizer, GenerationConfig(), position_limit=512)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0)

    def plain_loop() -> int:
        produced = []
        with torch.inference_mode():
            for ids in prompts:
                out = model.generate(
                    torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
                )
                produced.append(out[0, len(ids) :].tolist())
        plain_loop.tokens = produced
        return sum(len(_until_eos(t, eos)) for t in produced)

    def predictor(batch: int) -> int:
        done = []
        for start in range(0, len(prompts), batch):
            chunk = prompts[start : start + batch]
            done += generator.generate(chunk, [params] * len(chunk))
        return sum(c.completion_tokens for c in done)

    rows = _best(
        {
            "plain model.generate loop, batch 1": plain_loop,
            "Predictor generate, batch 1": lambda: predictor(1),
            "Predictor generate, batch 16": lambda: predictor(16),
        }
    )
    reference = rows["plain model.generate loop, batch 1"]
    lines = [
        f"generation, random Llama 4x256, {PROMPTS} prompts x {NEW_TOKENS} new tokens, "
        f"fp32, {THREADS} threads ({_cpu()})"
    ]
    for name, (seconds, tokens) in rows.items():
        ratio = (tokens / seconds) / (reference[1] / reference[0])
        lines.append(
            f"  {name:38s} {tokens / seconds:8.1f} tokens/s  {ratio:5.2f}x  ({tokens} tokens)"
        )
    report = "\n".join(lines)
    print("\n" + report)
    if os.environ.get("RAYLIFT_BENCH_OUT"):
        with open(os.environ["RAYLIFT_BENCH_OUT"], "a") as out:
            out.write(report + "\n")
    # Same work on both sides: the same greedy tokens, so the same count.
    assert {tokens for _, tokens in rows.values()} == {reference[1]}, rows


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens


def _cpu() -> str:
    from cluster import hardware

    return "AVX512-BF16" if hardware.cpu_has_native_bf16() else "no native bf16"


pytestmark = pytest.mark.filterwarnings("ignore")
