"""Tune: early stopping against a full-budget search (scheduler fifo) of the same trials. ASHA
(Ray's asynchronous scheduler), sha (jobs.halving: synchronous successive halving) and fifo each
run `jobs.tune.main` on configs/banking77/minilm_tune.yaml (MiniLM-L6 LoRA, the same search
space, seed and rung settings: grace 1, reduction factor 3) over a stratified sample of
BANKING77, 9 trials of at most 9 epochs, so that there are rungs at epochs 1 and 3 and the
three searches take about 47 minutes on 2 cores (AVX512-BF16 Zen 4, stop 40). Run by `make
bench`; prints a table and ratios and writes them to .raylift/bench/tune_asha.json; asserts
nothing about time.
RAYLIFT_TUNE_BENCH_SCHEDULERS=sha,fifo runs fewer of the early-stopping searches (fifo, the
baseline, always runs): on a CPU without native bf16, where training runs in fp32, the three
take far longer.

Why sha: the embedded Ray of a 2-core machine runs few trials at a time (two of this config's
1-worker trials), and asynchronous ASHA lets a trial go on when it is in the top third of the
trials that reached the rung *so far*: the first ones always go on. sha waits at each rung for
every trial.

Target (DESIGN.md): ASHA's best trial within 1 point of the full-budget best, with <= 40% of
the full-budget compute.

Compute is counted two ways: trial-epochs (epochs each trial trained: those Tune saw, or those
its MLflow history holds where a stopped trial finished one more while Tune was stopping it), and
CPU-seconds of the whole local Ray (driver, GCS, raylet, every trial's workers and data tasks),
sampled from /proc through psutil (TreeCpu). CPU used by other processes on the machine
meanwhile is printed beside it: large means the timing was contended. Run it through `make
bench`: where Python may not write bytecode (PYTHONDONTWRITEBYTECODE, which the Makefile clears),
every Ray process compiles each module it imports, and every trial's start costs more; the
report says so when that was the case.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import sys
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import pytest

from jobs import load, tune
from jobs.config import LifecycleConfig, load_config
from jobs.datasets import banking77_path

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs/banking77/minilm_tune.yaml"
REPORT = REPO / ".raylift/bench/tune_asha.json"
PER_CLASS = 26  # rows of each of the 77 intents: 2,002 rows, ~400 of them held out (0.2)
TRIALS = 9
EPOCHS = 9  # rungs (grace 1, reduction factor 3 as in the config) at epochs 1 and 3
MAX_LENGTH = 32  # BANKING77 texts average 16 tokens
SEED = 17
SAMPLE_S = 0.5
CORES = psutil.cpu_count() or 1  # the cores the local Ray is sized from (cluster/runtime.py)
SCHEDULERS = ("sha", "asha", "fifo")  # the early-stopping searches first: fifo finds the file
# cache warm


def _schedulers() -> tuple[str, ...]:
    wanted = os.environ.get("RAYLIFT_TUNE_BENCH_SCHEDULERS", ",".join(SCHEDULERS)).split(",")
    unknown = set(wanted) - set(SCHEDULERS)
    if unknown:
        raise ValueError(
            f"RAYLIFT_TUNE_BENCH_SCHEDULERS: unknown {sorted(unknown)}; use some of {SCHEDULERS}"
        )
    return tuple(name for name in SCHEDULERS if name in wanted or name == "fifo")


@dataclass
class SearchRun:
    scheduler: str
    wall_s: float
    cpu_s: float  # this process and every process under it (the local Ray)
    other_cpu_s: float  # the rest of the machine meanwhile: contention if large
    trial_epochs: int  # epochs trained: Tune's count, or MLflow's where a stopped trial
    # finished one more epoch while Tune was stopping it
    trial_epochs_seen: int  # epochs Tune received before it stopped the trial
    best: float
    stopped: int
    trials: list[dict]

    @property
    def cores_wall_s(self) -> float:
        return self.wall_s * CORES


def _stratified_csv(path: Path) -> Path:
    """PER_CLASS seeded rows of every BANKING77 intent, as the CSV `warehouse load` reads."""
    by_label: dict[str, list[dict]] = defaultdict(list)
    with banking77_path().open() as handle:
        for row in csv.DictReader(handle):
            by_label[row["category"]].append(row)
    rng = random.Random(SEED)
    rows = [r for label in sorted(by_label) for r in rng.sample(by_label[label], PER_CLASS)]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "category"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def _config(root: Path, scheduler: str) -> LifecycleConfig:
    return load_config(
        CONFIG,
        {
            "catalog.uri": f"sqlite:///{root}/catalog.db",
            "catalog.warehouse": str(root / "wh"),
            "data.source": str(root / "banking77_stratified.csv"),
            "data.inbox_rows": 0,
            "data.validation.fraction": 0.2,  # ~5 rows per intent: a less noisy accuracy
            "task.max_length": MAX_LENGTH,
            "train.epochs": EPOCHS,
            "train.checkpoint_dir": str(root / "checkpoints"),
            "tune.num_samples": TRIALS,
            "tune.scheduler": scheduler,
            "tune.seed": SEED,
            "tune.time_budget_s": None,
            "registry.tracking_uri": f"sqlite:///{root}/mlflow.db",
            "registry.experiment": "bench-tune",
            "registry.model_name": f"bench-tune-{scheduler}",
        },
    )


class TreeCpu:
    """CPU seconds this process and every process under it (the local Ray) use while active:
    each process's own user + system time, sampled every SAMPLE_S. A process that exits loses
    at most its last interval. Parents' children times cannot stand in for the dead: the raylet
    does not collect its workers' (measured: they missed 90% of a search's CPU)."""

    def __init__(self) -> None:
        self._start: dict[tuple[int, float], float] = {}
        self._last: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeCpu:
        self._start = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def seconds(self) -> float:
        return sum(t - self._start.get(key, 0.0) for key, t in self._last.items())

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._sample()

    def _sample(self) -> dict[tuple[int, float], float]:
        root = psutil.Process()
        seen = {}
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                t = proc.cpu_times()
                seen[(proc.pid, proc.create_time())] = t.user + t.system
        self._last.update(seen)
        return seen


def _machine_busy_s() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + t.steal


def _epochs_trained(client, run_id: str, metric: str) -> int:
    return max((m.step for m in client.get_metric_history(run_id, metric)), default=0)


def _search(config: LifecycleConfig) -> SearchRun:
    from mlflow import MlflowClient

    from serving.registry import absolute_tracking_uri

    busy, started = _machine_busy_s(), time.perf_counter()
    with TreeCpu() as tree:
        result = tune.main(config)
    wall, cpu, busy = time.perf_counter() - started, tree.seconds, _machine_busy_s() - busy
    metric = config.tune.metric_name(config.promote)
    client = MlflowClient(absolute_tracking_uri(config.registry.tracking_uri))
    trials = [
        {
            "params": t.params,
            "status": t.status,
            "epochs_seen": t.epochs,
            # MLflow may lack the epoch whose report ASHA stopped the trial at
            "epochs_trained": max(t.epochs, _epochs_trained(client, t.run_id, metric)),
            "stopped_early": t.stopped_early,
            "best": t.best_metric,
        }
        for t in result.trials
    ]
    return SearchRun(
        scheduler=config.tune.scheduler,
        wall_s=wall,
        cpu_s=cpu,
        other_cpu_s=max(0.0, busy - cpu),
        trial_epochs=sum(t["epochs_trained"] for t in trials),
        trial_epochs_seen=sum(t["epochs_seen"] for t in trials),
        best=float(result.metrics[metric]),
        stopped=sum(t["stopped_early"] for t in trials),
        trials=trials,
    )


def _key(params: dict) -> tuple:
    return tuple(sorted(params.items()))


def _report(runs: dict[str, SearchRun], cpu_kind: str) -> str:
    full = runs["fifo"]
    early = [name for name in runs if name != "fifo"]
    by_params = {name: {_key(t["params"]): t for t in runs[name].trials} for name in early}
    lines = [
        f"\ntune: early stopping vs full-budget search (fifo), {TRIALS} trials x {EPOCHS} epochs, "
        f"MiniLM-L6 LoRA, BANKING77 stratified {PER_CLASS * 77:,} rows (0.2 held out), "
        f"max_length {MAX_LENGTH}, {CORES} cores {cpu_kind}",
        f"  {'lr':>8} {'head lr':>8} {'r':>3} {'alpha':>5} | full: epochs  best | "
        + " | ".join(f"{name}: epochs  best" for name in early),
    ]
    for t in full.trials:
        p = t["params"]
        cells = [
            f"{by_params[name][_key(p)]['epochs_trained']:>{len(name) + 8}} "
            f"{by_params[name][_key(p)]['best']:.4f}"
            for name in early
        ]
        lines.append(
            f"  {p['train.learning_rate']:8.2e} {p['train.head_learning_rate']:8.2e} "
            f"{p['model.lora.r']:>3} {p['model.lora.alpha']:>5} | "
            f"{t['epochs_trained']:>12} {t['best']:.4f} | " + " | ".join(cells)
        )
    rows = [
        ("trial-epochs trained", "trial_epochs", "d", "  (target <= 0.40)"),
        ("CPU-s (local Ray)", "cpu_s", ".0f", "  (target <= 0.40)"),
        (f"wall s x {CORES} cores", "cores_wall_s", ".0f", ""),
    ]
    lines.append(
        f"  {'':22} {'full':>8} "
        + " ".join(f"{name:>8}" for name in early)
        + "  "
        + "  ".join(f"{name}/full" for name in early)
    )
    for label, attr, fmt, note in rows:
        values = {name: getattr(run, attr) for name, run in runs.items()}
        ratios = "  ".join(f"{values[name] / values['fifo']:>{len(name) + 5}.2f}" for name in early)
        lines.append(
            f"  {label:22} {values['fifo']:>8{fmt}} "
            + " ".join(f"{values[name]:>8{fmt}}" for name in early)
            + f"  {ratios}{note}"
        )
    lines.append(
        f"  best val_accuracy      {full.best:8.4f} "
        + " ".join(f"{runs[name].best:8.4f}" for name in early)
        + "  "
        + "  ".join(f"{name} {100 * (runs[name].best - full.best):+.2f} pts" for name in early)
        + "  (target >= -1)"
    )
    lines.append(
        "  stopped early: "
        + ", ".join(f"{name} {runs[name].stopped} of {TRIALS}" for name in early)
        + "; CPU-s of other processes on the machine meanwhile: "
        + ", ".join(f"{name} {run.other_cpu_s:.0f}" for name, run in runs.items())
    )
    if sys.flags.dont_write_bytecode:
        lines.append(
            "  NOTE: PYTHONDONTWRITEBYTECODE is set: every Ray process compiled what it imported, "
            "and the CPU-s include it (run through `make bench`)"
        )
    return "\n".join(lines)


def _cpu_kind() -> str:
    flags = Path("/proc/cpuinfo").read_text()
    return "AVX512-BF16" if "avx512_bf16" in flags else "AVX2 (no native bf16)"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench-tune")
    _stratified_csv(root / "banking77_stratified.csv")
    load.main(_config(root, "fifo"))
    return root


def test_early_stopping_against_full_budget_search(ray_session, root):
    tree = [psutil.Process(), *psutil.Process().children(recursive=True)]
    # the CPU count is only right if the local Ray lives under this process
    assert any("raylet" in p.name() for p in tree), "Ray was not started by this process"
    runs = {name: _search(_config(root, name)) for name in _schedulers()}
    report = _report(runs, _cpu_kind())
    print(report)
    full = runs["fifo"]
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(
        json.dumps(
            {
                "cpu": _cpu_kind(),
                "cores": CORES,
                "rows": PER_CLASS * 77,
                "trials": TRIALS,
                "epochs": EPOCHS,
                "bytecode_written": not sys.flags.dont_write_bytecode,
                "runs": {name: asdict(run) for name, run in runs.items()},
                "ratios": {
                    name: {
                        "best_diff_points": 100 * (run.best - full.best),
                        "trial_epochs": run.trial_epochs / full.trial_epochs,
                        "cpu_s": run.cpu_s / full.cpu_s,
                    }
                    for name, run in runs.items()
                    if name != "fifo"
                },
            },
            indent=2,
        )
    )
    for run in runs.values():
        assert len(run.trials) == TRIALS
        assert all(t["status"] == "TERMINATED" for t in run.trials), run.trials
        # the same seed samples the same trials: the comparison is of schedulers only
        assert sorted(_key(t["params"]) for t in run.trials) == sorted(
            _key(t["params"]) for t in full.trials
        )
    assert full.stopped == 0 and all(t["epochs_trained"] == EPOCHS for t in full.trials)
    if "asha" in runs:
        assert runs["asha"].stopped >= 1, "ASHA stopped no trial"
    if "sha" in runs:
        # sha keeps floor(9/3) = 3 trials at epoch 1 and 1 at epoch 3: 9 + 3*2 + 1*6 epochs
        assert runs["sha"].stopped == TRIALS - 1
        assert runs["sha"].trial_epochs_seen == 21
