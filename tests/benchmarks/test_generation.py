"""Generation speed (issue 10), run by `make bench`; each test prints its table (and appends it
to $RAYLIFT_BENCH_OUT if set) and asserts correctness only, never a time.

1. Tokens/s of the Predictor's generator (serving.generation: length-sorted, left-padded, KV
   cache, finished rows leave the batch) against a plain `model.generate` loop over the same
   prompts, at batch 1 and batch 16; both must produce the same greedy tokens.
2. Serve's streaming time to first token (SSE from /v1/completions on the real endpoint, one
   replica) at 1 and 8 concurrent clients. The issue names no baseline for it; the reference
   printed beside it is the same model's first token in-process (one prompt, and 8 prompts
   decoding together): what Serve, HTTP, batching and queueing add.
3. Ray Data batch generation (`raylift score` on a causal-lm config: jobs.score, Iceberg in and
   out, Predictor actors) against a tight in-process loop of the same Predictor (same
   precision, threads, generation limits and batch size) over the same 1,000 prompts.
   Target >= 0.8x.

Measured 2026-11-26 (AVX512-BF16, 2 cores shared with other sessions' work), random Llama 4x256:
TTFT p50 28 ms at 1 client (in-process first token 4 ms), 552 ms at 8 clients (p90 691 ms;
in-process, 8 prompts together, 11 ms): a request that arrives while a batch decodes waits for
that batch to finish, since @serve.batch runs one batch at a time (no continuous batching).
Batch generation: tight loop 263 prompts/s (3.8 s); `raylift score` 81 prompts/s with 1 actor,
85 with 2 (12.4 s, 11.7 s end to end): 0.31x and 0.32x, under the 0.8x target. At 1,000
prompts the run's fixed cost (actor start, model load and warm-up, Iceberg read and commit)
outweighs the 3.8 s of generation; a second actor added little on these 2 shared cores (the
1,000 rows are read as 8 blocks, so both actors get work; each loads and warms its own model).

After the fixed-cost cuts (actors no longer import peft, jobs.score no pyiceberg, quarantine beside
scoring), measured 2026-11-26 (AVX512-BF16, shared box, lock queue busy): 4x256: loop 315
prompts/s (3.2 s), 1 actor 0.41x (7.8 s), 2 actors 0.35x (9.0 s): start still dominates (torch +
transformers imports and load, ~3-5 s per actor). 8x768: loop 32.4 prompts/s (30.9 s), 1 actor
0.95x (32.7 s), 2 actors 1.32x (23.3 s).

The model: a random Llama, 4 layers, hidden 256 (about 3M weights), with the tiny word-level
tokenizer of tests.helpers; 16 prompts of 4 to 60 words, 32 new tokens each, greedy, fp32,
1 torch thread, best of 3 passes taken in turns (so a burst of load on the shared machine hits
every contender alike). Tests 2 and 3 save the same model as a causal-lm checkpoint. Targets of
test 1 (issue 10): >= 1.0x the loop at batch 1, >= 3x the
batch-1 loop at batch 16. Measured 2026-11-26 (AVX512-BF16, 1 thread, shared box): 1.05x and
1.17x at batch 1, 5.05x and 5.67x at batch 16, in two runs (the loop at 470-570 tokens/s).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import WORDS, make_tiny_llama

NEW_TOKENS = 32
PROMPTS = 16
PASSES = 3
# One thread: on this shared 2-core box, two OpenMP threads competing with other processes made
# model.generate 10x slower from one call to the next (load average 8-15).
THREADS = 1


def _model(directory: Path, tokenizer_dir: Path | None = None, layers: int = 4, hidden: int = 256):
    """A random Llama, `layers` x `hidden` (4 x 256 unless asked), with the tiny word-level
    tokenizer of tests.helpers."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = make_tiny_llama(tokenizer_dir or directory)
    small = LlamaConfig.from_pretrained(path)
    config = LlamaConfig(
        **{
            **small.to_dict(),
            "hidden_size": hidden,
            "intermediate_size": hidden * 688 // 256,
            "num_hidden_layers": layers,
            "num_attention_heads": hidden // 64,
            "num_key_value_heads": hidden // 64,
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


def _report(report: str) -> None:
    print("\n" + report)
    if os.environ.get("RAYLIFT_BENCH_OUT"):
        with open(os.environ["RAYLIFT_BENCH_OUT"], "a") as out:
            out.write(report + "\n")


def _checkpoint(root: Path, layers: int = 4, hidden: int = 256) -> str:
    """The random Llama of `_model` (4 x 256 unless asked), saved as a full causal-lm checkpoint
    (chat template)."""
    from jobs.checkpoint import CheckpointMeta, InstructMeta
    from jobs.modeling import save_checkpoint

    model, tokenizer = _model(root / "weights", root / "tokenizer", layers, hidden)
    meta = CheckpointMeta(
        task="causal-lm",
        labels=[],
        base_model=str(root / "tokenizer"),
        method="full",
        max_length=512,
        text_column="prompt",
        instruct=InstructMeta(template="chat", prompt_column="prompt", response_column="answer"),
    )
    return str(save_checkpoint(model, tokenizer, root / "checkpoint", meta))


def _texts(count: int) -> list[str]:
    """`count` prompts of 3 to 26 words, in no length order."""
    return [
        " ".join((WORDS * 4)[(7 * i) % 50 : (7 * i) % 50 + 3 + (11 * i) % 24]) for i in range(count)
    ]


# -- 2. Serve's streaming time to first token ---------------------------------------------------

TTFT_PORT = 8131
TTFT_MODEL = "bench-assistant"
TTFT_TOKENS = 32
TTFT_REQUESTS = 6  # per client, after one warm-up request each


async def _first_tokens(url: str, clients: int, prompts: list[str]) -> tuple[list[float], int]:
    """`clients` closed-loop workers, each streaming TTFT_REQUESTS completions after a warm-up
    one; (seconds to the first chunk with text, per request; tokens streamed in all)."""
    import httpx

    firsts: list[float] = []
    tokens = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=120) as http:

        async def one(prompt: str) -> tuple[float, int]:
            body = {
                "model": TTFT_MODEL,
                "prompt": prompt,
                "max_tokens": TTFT_TOKENS,
                "temperature": 0,
                "stream": True,
            }
            began = time.perf_counter()
            first, usage = None, None
            async with http.stream("POST", f"{url}/v1/completions", json=body) as answer:
                assert answer.status_code == 200, await answer.aread()
                async for line in answer.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[len("data: ") :])
                    assert "error" not in chunk, chunk
                    if chunk["choices"] and first is None:
                        first = time.perf_counter() - began
                    if not chunk["choices"]:
                        usage = chunk["usage"]
            assert first is not None, "the stream ended without a chunk of text"
            assert usage and 0 < usage["completion_tokens"] <= TTFT_TOKENS, usage
            return first, usage["completion_tokens"]

        async def worker(k: int) -> None:
            nonlocal tokens
            await one(prompts[k])  # warm-up: not counted
            for r in range(TTFT_REQUESTS):
                first, produced = await one(prompts[(k + clients * (r + 1)) % len(prompts)])
                firsts.append(first)
                tokens += produced

        await asyncio.gather(*(worker(k) for k in range(clients)))
    return firsts, tokens


def _in_process_first_token(predictor, prompts: list[str], together: int) -> float:
    """Median seconds to the first decode step of `together` prompts in one batch."""
    from serving.generation import SamplingParams

    generator = predictor.generator
    params = SamplingParams(max_new_tokens=TTFT_TOKENS, temperature=0.0)
    times = []
    for start in range(0, 5 * together, together):
        ids = [generator.encode(p) for p in prompts[start : start + together]]
        began = time.perf_counter()
        steps = predictor.generate_stream(ids, [params] * len(ids))
        next(steps)
        times.append(time.perf_counter() - began)
        steps.close()
    return float(np.median(times))


def test_streaming_time_to_first_token(ray_session, tmp_path):
    from ray import serve

    from jobs.config import LifecycleConfig
    from serving.app import deploy
    from serving.predictor import Predictor

    checkpoint = _checkpoint(tmp_path)
    config = LifecycleConfig(
        name="bench",
        registry={"model_name": TTFT_MODEL},
        serve={
            "port": TTFT_PORT,
            "num_cpus": 1,
            "torch_threads": THREADS,
            "precision": "fp32",
            "max_batch_size": 8,
            "batch_wait_timeout_s": 0.01,
            "autoscaling": {"min_replicas": 1, "max_replicas": 1},
            "generation": {
                "max_new_tokens": TTFT_TOKENS,
                "max_new_tokens_limit": TTFT_TOKENS,
                "temperature": 0.0,
            },
        },
    )
    prompts = _texts(64)
    serve.start(http_options={"host": "127.0.0.1", "port": TTFT_PORT})
    url = deploy(config, model_uri=checkpoint)
    try:
        levels = {clients: asyncio.run(_first_tokens(url, clients, prompts)) for clients in (1, 8)}
    finally:
        serve.delete(TTFT_MODEL)
        serve.shutdown()
    local = Predictor(
        checkpoint,
        precision="fp32",
        torch_threads=THREADS,
        generation_config=config.serve.generation,
    )
    reference = {clients: _in_process_first_token(local, prompts, clients) for clients in (1, 8)}

    lines = [
        f"streaming time to first token, Serve /v1/completions (SSE), random Llama 4x256, "
        f"{TTFT_TOKENS} new tokens, greedy, fp32, 1 replica x {THREADS} thread ({_cpu()}; "
        "the client shares the cores)"
    ]
    for clients, (firsts, tokens) in levels.items():
        p50, p90 = np.percentile(firsts, [50, 90])
        lines.append(
            f"  {clients} client(s): TTFT p50 {p50 * 1000:6.1f} ms, p90 {p90 * 1000:6.1f} ms "
            f"over {len(firsts)} requests ({tokens} tokens streamed); in-process first token "
            f"of {clients} prompt(s) together {reference[clients] * 1000:6.1f} ms: "
            f"{p50 / reference[clients]:.1f}x"
        )
    _report("\n".join(lines))
    for firsts, tokens in levels.values():
        assert len(firsts) > 0 and tokens > 0


# -- 3. Ray Data batch generation against a tight loop -------------------------------------------

BATCH_PROMPTS = 1_000
BATCH_TOKENS = 16
BATCH_SIZE = 64
CORES = 2  # every contender gets the machine's 2 cores: as threads, or as actors
# (layers, hidden) of the two models: 4 x 256 (3M weights) generates the 1,000 prompts in about
# 4 s, less than a run's fixed cost (actor start and model load, Iceberg read and commit), so it
# measures mostly that; 8 x 768 (57M weights, a small Llama's shape; the tokenizer is the tiny
# word-level one, so there is no 32k-vocab head) takes 30-60 s in the loop here, nearer to
# what a nightly batch spends generating.
SIZES = {"4x256": (4, 256), "8x768": (8, 768)}


def _score_config(root: Path, checkpoint: str, actors: int = CORES):
    from jobs.config import validate_mapping

    return validate_mapping(
        {
            "name": "bench-generate",
            "task": {"type": "causal-lm", "key_column": "ticket_id"},
            "model": {"base": checkpoint, "method": "full"},
            "promote": {"metric": "val_perplexity", "mode": "min", "max_value": None},
            "catalog": {"uri": f"sqlite:///{root}/catalog.db", "warehouse": str(root / "wh")},
            "score": {
                "input_table": "bench.prompts",
                "output_table": "bench.completions",
                "quarantine_table": "bench.prompts_quarantine",
                "model_uri": checkpoint,
                "concurrency": actors,
                "num_cpus": 1,
                "torch_threads": 1,
                "batch_size": BATCH_SIZE,
                "precision": "fp32",
                "run_date": "2026-11-26",
                "generation": {"max_new_tokens": BATCH_TOKENS, "temperature": 0.0},
            },
        }
    )


# Every Predictor has 1 torch thread (score.torch_threads): on this shared 2-core box one
# Predictor with 2 threads generated 128 prompts in 10 s against 0.4 s with 1 (OpenMP threads
# spinning against other processes; again 2026-11-26: 4x256 at 12 prompts/s with 2 threads
# against 175 with 1, 8x1024 at 10 against 17), so the loop gets the threads the actors get.
def _tight_loop(checkpoint: str, config, prompts: list[str], passes: int) -> tuple[float, list]:
    """The same Predictor (precision, threads, generation limits) in this process over the same
    prompts in batches of the same size; (best seconds of `passes`, completions), the model
    load excluded."""
    from serving.predictor import Predictor

    predictor = Predictor(
        checkpoint,
        precision=config.score.precision,
        torch_threads=config.score.torch_threads,
        generation_config=config.score.generation,
    )
    best = float("inf")
    for _ in range(passes):
        started = time.perf_counter()
        completions: list = []
        for start in range(0, len(prompts), BATCH_SIZE):
            batch = np.array(prompts[start : start + BATCH_SIZE], dtype=object)
            completions += list(predictor({"prompt": batch})["completion"])
        best = min(best, time.perf_counter() - started)
    return best, completions


def _ray_data(root: Path, checkpoint: str, prompts: list[str], actors: int) -> tuple[float, Any]:
    """`raylift score` (jobs.score.main) over a prompts table: (seconds end to end, result)."""
    from jobs import score
    from tests.helpers import load_prompts_table

    root.mkdir()
    config = _score_config(root, checkpoint, actors)
    load_prompts_table(config, "bench.prompts", root, prompts)
    started = time.perf_counter()
    result = score.main(config)
    return time.perf_counter() - started, (config, result)


@pytest.mark.parametrize("size", SIZES)
def test_ray_data_batch_generation_against_a_tight_loop(ray_session, tmp_path, size):
    from jobs import warehouse

    layers, hidden = SIZES[size]
    checkpoint = _checkpoint(tmp_path, layers, hidden)
    prompts = _texts(BATCH_PROMPTS)
    _ray_data(tmp_path / "warm", checkpoint, prompts[:BATCH_SIZE], 1)  # imports, file cache
    config = _score_config(tmp_path, checkpoint)
    passes = 2 if size == "4x256" else 1  # one pass of the large model is 30-60 s already
    tight_s, expected = _tight_loop(checkpoint, config, prompts, passes)
    runs = {
        actors: _ray_data(tmp_path / f"x{actors}", checkpoint, prompts, actors)
        for actors in (1, CORES)
    }

    lines = [
        f"batch generation, random Llama {size}, {BATCH_PROMPTS} prompts x {BATCH_TOKENS} new "
        f"tokens, greedy, fp32, batches of {BATCH_SIZE}, 1 torch thread per Predictor "
        f"({_cpu()}, {CORES} cores shared with other work)",
        f"  tight loop, 1 Predictor in-process        {BATCH_PROMPTS / tight_s:7.1f} prompts/s  "
        f"({tight_s:.1f} s, best of {passes})",
    ]
    for actors, (seconds, _) in runs.items():
        # What the run spent besides generating: end to end less the loop's time shared out
        # over the actors (an estimate: it takes the actors to generate as fast as the loop).
        fixed = seconds - tight_s / actors
        lines.append(
            f"  Ray Data (raylift score), {actors} actor(s)       "
            f"{BATCH_PROMPTS / seconds:7.1f} prompts/s  ({seconds:.1f} s end to end, of which "
            f"about {fixed:.1f} s not generating: actor start, model load, Iceberg read and "
            f"write)  {tight_s / seconds:.2f}x"
        )
    lines.append("  target: Ray Data >= 0.8x the tight loop")
    _report("\n".join(lines))

    for _, (run_config, result) in runs.values():
        assert result.rows_scored == BATCH_PROMPTS and result.rows_quarantined == 0
        table = warehouse.load_catalog(run_config.catalog).load_table("bench.completions")
        rows = {r["ticket_id"]: r["completion"] for r in table.scan().to_arrow().to_pylist()}
        assert [rows[k] for k in sorted(rows)] == expected  # the same greedy text, row for row


pytestmark = pytest.mark.filterwarnings("ignore")
