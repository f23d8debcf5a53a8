"""Batch scoring throughput: the Ray Data pipeline (Iceberg in, Iceberg out) against the best
tight single-process torch loop and a plain `transformers.pipeline` loop, over the same rows and
the same model; plus bf16/fp32 agreement. Run by `make bench`; prints ratios, asserts nothing
about time.

Targets (DESIGN.md): Ray Data ≥ 0.8× tight loop, ≥ 5× pipeline loop; bf16 agrees with fp32 on
≥ 99.5% of rows.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.datasets import banking77_path
from jobs.modeling import load_checkpoint, resolve_base_model, save_checkpoint

ROWS = 10_003  # all of BANKING77's training texts
AGREEMENT_ROWS = 3_080  # bf16 is emulated (slow) on CPUs without native bf16
THREADS = 2  # the cores of this machine; every contender gets the same


def _texts(limit: int) -> tuple[list[str], list[str]]:
    with banking77_path().open() as handle:
        rows = list(csv.DictReader(handle))[:limit]
    return [r["text"] for r in rows], [r["category"] for r in rows]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """MiniLM-L6 with a classification head fitted on frozen features: a real model to score."""
    from transformers import AutoModelForSequenceClassification

    from jobs.modeling import load_tokenizer

    base = resolve_base_model("all-MiniLM-L6-v2")
    texts, categories = _texts(ROWS)
    labels = sorted(set(categories))
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(labels), use_safetensors=True
    )
    tokenizer = load_tokenizer(base)
    torch.set_num_threads(THREADS)
    features = _pooled_features(model, tokenizer, texts[::3])
    targets = torch.tensor([labels.index(c) for c in categories[::3]])
    _fit_head(model.classifier, features, targets)
    directory = tmp_path_factory.mktemp("bench-model")
    meta = {
        "task": "sequence-classification",
        "labels": labels,
        "base_model": base,
        "max_length": 64,
        "text_column": "text",
    }
    save_checkpoint(model, tokenizer, directory, meta)
    return str(directory)


@torch.no_grad()  # not inference_mode: the head is trained on these features afterwards
def _pooled_features(model, tokenizer, texts: list[str]) -> torch.Tensor:
    outputs = []
    for start in range(0, len(texts), 256):
        enc = tokenizer(
            texts[start : start + 256],
            padding=True,
            truncation=True,
            max_length=64,
            return_tensors="pt",
        )
        outputs.append(model.bert(**enc).pooler_output)
    return torch.cat(outputs)


def _fit_head(head: torch.nn.Linear, features: torch.Tensor, targets: torch.Tensor) -> None:
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(features), targets).backward()
        optimizer.step()


@torch.inference_mode()
def tight_loop(model_dir: str, texts: list[str], bf16: bool) -> tuple[np.ndarray, float]:
    """The best single-process loop: rows sorted by length within 1,024-row windows, batches of
    64 padded to their own longest row, bf16 autocast when asked."""
    loaded = load_checkpoint(model_dir)
    model, tokenizer = loaded.model, loaded.tokenizer
    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    predictions = np.empty(len(texts), dtype=np.int64)
    for w in range(0, len(texts), 1024):
        ids = tokenizer(texts[w : w + 1024], truncation=True, max_length=64)["input_ids"]
        order = np.argsort([len(x) for x in ids], kind="stable")
        for b in range(0, len(order), 64):
            picked = order[b : b + 64]
            batch = tokenizer.pad({"input_ids": [ids[i] for i in picked]}, return_tensors="pt")
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(**batch).logits
            predictions[w + picked] = logits.float().argmax(-1).numpy()
    return predictions, time.perf_counter() - start


def pipeline_loop(model_dir: str, texts: list[str]) -> float:
    """What a plain loop does: transformers.pipeline, fp32, batches of 128 in table order."""
    from transformers import pipeline

    torch.set_num_threads(THREADS)
    classify = pipeline("text-classification", model=model_dir, device="cpu")
    start = time.perf_counter()
    for b in range(0, len(texts), 128):
        classify(texts[b : b + 128], batch_size=128, truncation=True, max_length=64)
    return time.perf_counter() - start


def ray_data_scoring(model_dir: str, texts: list[str], root: Path) -> tuple[float, int]:
    """The product path: score.main over an Iceberg table into the predictions table."""
    from jobs import score, warehouse
    from jobs.config import validate_mapping

    source = root / "inbox.csv"
    with source.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "category"])
        writer.writerows([t, "x"] for t in texts)
    config = validate_mapping(
        {
            "name": "bench",
            "task": {"label_column": "category"},
            "catalog": {"uri": f"sqlite:///{root}/catalog.db", "warehouse": str(root / "wh")},
            "score": {
                "input_table": "bench.inbox",
                "output_table": "bench.predictions",
                "model_uri": model_dir,
                "precision": "bf16",
                "torch_threads": THREADS,
                "batch_size": 1024,
                "run_date": "2026-11-22",
            },
        }
    )
    warehouse.load_table_from_file(
        config.catalog,
        "bench.inbox",
        source,
        text_column="text",
        label_column="category",
        key_column="ticket_id",
    )
    score.main(config)  # warm: Ray workers imported, files cached, like a nightly cluster
    started = time.perf_counter()
    result = score.main(config)
    return time.perf_counter() - started, result.rows_scored


def test_batch_scoring_ratios(ray_session, checkpoint, tmp_path):
    from cluster.hardware import resolve_precision

    texts, _ = _texts(ROWS)
    precision = resolve_precision("auto", use_gpu=False)
    _, tight_s = tight_loop(checkpoint, texts, bf16=precision == "bf16")
    naive_s = pipeline_loop(checkpoint, texts)
    ray_s, scored = ray_data_scoring(checkpoint, texts, tmp_path)
    sample = texts[:AGREEMENT_ROWS]
    fp32, _ = tight_loop(checkpoint, sample, bf16=False)
    bf16, _ = tight_loop(checkpoint, sample, bf16=True)
    agreement = float((fp32 == bf16).mean())
    rates = {
        "tight": len(texts) / tight_s,
        "pipeline": len(texts) / naive_s,
        "ray": scored / ray_s,
    }
    print(
        f"\nbatch scoring, {len(texts)} BANKING77 rows, MiniLM-L6, {THREADS} threads, "
        f"precision {precision} (auto: bf16 only where the CPU has it natively)\n"
        f"  tight torch loop (length-sorted)        {rates['tight']:8.0f} rows/s\n"
        f"  transformers.pipeline loop (fp32)       {rates['pipeline']:8.0f} rows/s\n"
        f"  Ray Data, Iceberg -> Iceberg            {rates['ray']:8.0f} rows/s"
        f"  (end to end, {ray_s:.1f} s)\n"
        f"  ratio vs tight loop   {rates['ray'] / rates['tight']:.2f}x  (target >= 0.8)\n"
        f"  ratio vs pipeline     {rates['ray'] / rates['pipeline']:.2f}x  (target >= 5)\n"
        f"  bf16/fp32 agreement   {agreement:.4f} on {len(sample)} rows  (target >= 0.995)"
    )
    assert scored == len(texts)
