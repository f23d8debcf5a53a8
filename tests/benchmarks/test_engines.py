"""Inference engines on MiniLM-L6 / BANKING77: rows/s per engine variant at 2 threads and at 1,
two 1-thread processes side by side (the actors x threads split), top-1 agreement with fp32
torch and accuracy on held-out rows, and what `auto` picks. Run by `make bench`; prints the
table (and writes it to $RAYLIFT_BENCH_OUT if set), asserts nothing about time.

The model: the quality config's registered version (LoRA merged into MiniLM-L6, 0.935
validation accuracy) when this checkout's .raylift registry holds one, checked on its own
validation split (1,003 rows of the pinned snapshot, through `tracking.engine_rows`, as
registration does); otherwise MiniLM-L6 with a linear head fitted on frozen features (a probe,
lower accuracy), checked on rows it was not fitted on. Speed is measured on the first 3,080
BANKING77 texts through the Predictor (its length-sorted batching, <= 1,024 padded tokens per
forward pass), model load excluded, best of 2 passes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from serving import engines

SPEED_ROWS = int(os.environ.get("RAYLIFT_ENGINE_BENCH_ROWS", "3080"))  # smaller for a smoke run
BATCH = 1_024  # score.batch_size: rows per Predictor call
PASSES = 2
VARIANTS = engines.VARIANTS  # every engine x precision a version can offer
QUALITY_CONFIG = "configs/banking77/minilm_quality.yaml"


def _banking77(limit: int | None = None) -> tuple[list[str], list[str]]:
    import csv

    from jobs.datasets import banking77_path

    with banking77_path().open() as handle:
        rows = list(csv.DictReader(handle))[:limit]
    return [r["text"] for r in rows], [r["category"] for r in rows]


def _quality_version() -> tuple[str, dict[str, str]] | None:
    """(checkpoint dir, lineage) of the newest quality-config version in .raylift, if any."""
    found = []
    for meta_path in Path(".raylift/mlartifacts").glob("*/artifacts/checkpoint/raylift.json"):
        meta = json.loads(meta_path.read_text())
        if meta.get("lineage", {}).get("raylift.config_name") == "banking77-minilm-quality":
            found.append((meta_path.stat().st_mtime, str(meta_path.parent), meta["lineage"]))
    return max(found)[1:] if found else None


def _probe_version(directory: Path, layers: int | None = None) -> tuple[str, engines.EngineRows]:
    """MiniLM-L6 with a head fitted on every third text's frozen features (as the batch
    scoring bench builds it); checked on 3,080 of the other texts. `layers` keeps only the
    encoder's first layers: a cheaper model, for measuring what surrounds it."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from jobs.checkpoint import CheckpointMeta
    from jobs.modeling import load_tokenizer, resolve_base_model, save_checkpoint
    from tests.benchmarks.test_batch_scoring import _fit_head, _pooled_features

    base = resolve_base_model("all-MiniLM-L6-v2")
    texts, categories = _banking77()
    labels = sorted(set(categories))
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(labels), use_safetensors=True
    )
    if layers is not None:
        model.bert.encoder.layer = model.bert.encoder.layer[:layers]
        model.config.num_hidden_layers = layers
    tokenizer = load_tokenizer(base)
    features = _pooled_features(model, tokenizer, texts[::3])
    _fit_head(model.classifier, features, torch.tensor([labels.index(c) for c in categories[::3]]))
    meta = CheckpointMeta(
        task="sequence-classification",
        labels=labels,
        base_model=base,
        method="frozen",
        max_length=64,
        text_column="text",
    )
    save_checkpoint(model, tokenizer, directory / "probe", meta)
    held_out = [i for i in range(len(texts)) if i % 3][:SPEED_ROWS]
    rows = engines.EngineRows(
        texts=[texts[i] for i in held_out],
        labels=[categories[i] for i in held_out],
        source=f"{len(held_out)} BANKING77 rows the probe head was not fitted on",
    )
    return str(directory / "probe"), rows


@pytest.fixture(scope="module")
def version(tmp_path_factory) -> Path:
    """A staged version with engines built and gated."""
    staged, _ = engine_version(tmp_path_factory.mktemp("engines-bench"))
    return staged


def engine_version(tmp: Path) -> tuple[Path, str]:
    """(checkpoint dir, what it is) of a version as registration stages it, engines built and
    gated, the artifacts of refused variants restored (the benches measure them too): the
    quality config's registered version when .raylift holds one, else the probe.

    RAYLIFT_BENCH_STAGED names a folder to keep it in and reuse while it holds one (the export
    and gate of every variant take a minute on 2 cores); unset, it is built under `tmp`."""
    from jobs import tracking
    from jobs.config import load_config

    keep = os.environ.get("RAYLIFT_BENCH_STAGED")
    root = Path(keep) if keep else tmp
    staged, note = root / "stage" / "checkpoint", root / "what.txt"
    if keep and (staged / engines.REPORT_FILE).is_file() and note.is_file():
        print(f"\nmodel (reused from {keep}): {note.read_text()}")
        return staged, note.read_text()
    quality, rows = _quality_version(), None
    if quality is not None:
        model_dir, lineage = quality
        rows = tracking.engine_rows(load_config(QUALITY_CONFIG), lineage)
        what = f"quality version {model_dir} (LoRA merged into MiniLM-L6)"
    if rows is None:
        model_dir, rows = _probe_version(root)
        what = "MiniLM-L6 + linear probe head (no quality version in .raylift)"
    shutil.rmtree(root / "stage", ignore_errors=True)  # a build cut short
    started = time.perf_counter()
    staged, _ = engines.stage_with_engines(model_dir, root / "stage", rows)
    what += f"; gate rows: {rows.source}, {len(rows.texts)} rows"
    print(f"\nmodel: {what}")
    print(f"export + gate of every variant at registration: {time.perf_counter() - started:.1f} s")
    _restore_refused_artifacts(staged)
    note.write_text(what)
    return staged, what


def _restore_refused_artifacts(staged: Path) -> None:
    """Registration deletes the artifacts of refused variants; the table measures them too."""
    from jobs.modeling import load_checkpoint

    if not (staged / engines.ONNX_FILE).is_file():
        engines.export_onnx(load_checkpoint(staged).model, staged / engines.ONNX_FILE)
    if not (staged / engines.INT8_FILE).is_file():
        engines.quantize_int8(staged / engines.ONNX_FILE, staged / engines.INT8_FILE)


def _rate(directory: Path, engine: str, precision: str, threads: int, texts: list[str]):
    """Best-of-PASSES rows/s of one variant through the Predictor's batching (load excluded),
    and what ran. Refused variants are measured too: the table shows what the gate turned down.
    """
    predictor, runner = _load(directory, engine, precision, threads)
    return len(texts) / _best_pass(predictor, runner, texts), engines.runtime(runner)


def _load(directory: Path, engine: str, precision: str, threads: int):
    from serving.predictor import Predictor

    predictor = Predictor(str(directory), engine="torch", precision="fp32", torch_threads=threads)
    runner = engines.open_variant(engine, precision, directory, predictor.engine.model, threads)
    predictor.predict_labels(["warm up"] * 64, engine=runner)  # kernels picked and compiled
    return predictor, runner


def _best_pass(predictor, runner, texts: list[str]) -> float:
    batches = [texts[i : i + BATCH] for i in range(0, len(texts), BATCH)]
    best = float("inf")
    for _ in range(PASSES):
        started = time.perf_counter()
        for batch in batches:
            predictor.predict_labels(batch, engine=runner)
        best = min(best, time.perf_counter() - started)
    return best


def _auto_rate(directory: Path, threads: int, texts: list[str]):
    from serving.predictor import Predictor

    predictor = Predictor(str(directory), engine="auto", precision="auto", torch_threads=threads)
    batches = [np.array(texts[i : i + BATCH], dtype=object) for i in range(0, len(texts), BATCH)]
    best = float("inf")
    for _ in range(PASSES):
        started = time.perf_counter()
        for batch in batches:
            predictor({"text": batch})
        best = min(best, time.perf_counter() - started)
    return len(texts) / best, predictor.runtime


def _one_actor(args) -> float:
    directory, engine, precision, texts, ready, go = args
    predictor, runner = _load(directory, engine, precision, 1)
    ready.wait()  # both processes loaded before either starts
    go.wait()
    return _best_pass(predictor, runner, texts)


def _two_actors(directory: Path, engine: str, precision: str, texts: list[str]) -> float:
    """Rows/s of two 1-thread processes each scoring half the rows at the same time (loads
    excluded: both start together once both are loaded)."""
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        ready, go = manager.Barrier(3), manager.Barrier(3)
        halves = [texts[: len(texts) // 2], texts[len(texts) // 2 :]]
        with context.Pool(2) as pool:
            pending = pool.map_async(
                _one_actor, [(directory, engine, precision, h, ready, go) for h in halves]
            )
            ready.wait()
            go.wait()
            seconds = max(pending.get())
    return len(texts) / seconds


def test_engine_table(version):
    from cluster import hardware

    staged = version
    report = json.loads((staged / "engines" / "engines.json").read_text())
    figures = {(v["engine"], v["precision"]): v for v in report["variants"]}
    texts, _ = _banking77(SPEED_ROWS)
    native = hardware.cpu_has_native_bf16()
    cpu = "AVX512-BF16" if native else "AVX2 (no native bf16)"
    lines = [
        f"CPU: {cpu}, {os.cpu_count()} logical cores; {len(texts)} rows, best of {PASSES}",
        "| engine | 2 threads | 1 thread | 2 procs x 1 thread | agreement | accuracy | offered |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    results = {}
    for engine, precision in VARIANTS:
        meta = figures[(engine, precision)]
        if precision == "bf16" and not native:
            lines.append(f"| {engine} {precision} | skipped: no native bf16 | | | | | no |")
            continue
        two, runtime = _rate(staged, engine, precision, 2, texts)
        assert runtime["engine"] == engine, f"{engine}-{precision} fell back: {runtime}"
        one, _ = _rate(staged, engine, precision, 1, texts)
        pair = _two_actors(staged, engine, precision, texts)
        results[f"{engine}-{precision}"] = {"2t": two, "1t": one, "2x1t": pair, **meta}
        lines.append(
            f"| {engine} {precision} | {two:,.0f} | {one:,.0f} | {pair:,.0f} | "
            f"{_fmt(meta['agreement'])} | {_fmt(meta['accuracy'])} | "
            f"{'yes' if meta['offered'] else 'no: ' + str(meta['reason'])} |"
        )
    auto, runtime = _auto_rate(staged, 2, texts)
    results["auto-2t"] = {"rate": auto, "runtime": runtime}
    torch_best = max(results["torch-" + ("bf16" if native else "fp32")]["2t"], 1e-9)
    lines.append(
        f"auto (2 threads) picked {runtime['engine']}-{runtime['precision']}: {auto:,.0f} rows/s,"
        f" {auto / torch_best:.2f}x torch {'bf16' if native else 'fp32'}"
    )
    table = "\n".join(lines)
    print("\n" + table)
    if os.environ.get("RAYLIFT_BENCH_OUT"):
        Path(os.environ["RAYLIFT_BENCH_OUT"]).write_text(
            json.dumps({"table": table, "results": results}, indent=2, default=str)
        )


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"
