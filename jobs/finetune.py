"""Fine-tune a pretrained model on a warehouse table with Ray Train + DeepSpeed; register it.

python -m jobs.finetune --config configs/banking77/minilm_lora.yaml [key=value ...]

Give --resume as well to continue the training run of this config whose driver died.

A run is named by the config (name and hash), so a new driver finds it: its Ray Train folder
(train.checkpoint_dir/<name>-<hash>) holds the checkpoints and `raylift_finetune.json` (the
MLflow run, the pinned snapshot, whether it finished). Dead workers are restarted by Ray Train
(train.max_failures) from the latest checkpoint; a dead driver's run is continued by --resume,
in the same folder and the same MLflow run. The MLflow run ends FAILED when the driver fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster import init_ray
from cluster.storage import (
    delete_folder,
    filesystem_uri,
    read_json,
    worker_visible_uri,
    write_json,
)
from jobs import tracking
from jobs.config import LifecycleConfig, config_hash, with_overrides
from jobs.modeling import check_base_model
from jobs.train_loop import STATE_DIR, LoopInputs, train_func
from jobs.training_data import (
    EveryEvalRowConfig,
    PreparedData,
    plan_split,
    prepare_training_data,
    scan_training_rows,
)
from serving import registry

__all__ = [
    "FinetuneResult",
    "build_trainer",
    "loop_inputs",
    "main",
    "register_once",
    "registrable_directory",
    "run_name",
    "train_env",
]

log = logging.getLogger(__name__)

_STATE_FILE = "raylift_finetune.json"


@dataclass
class FinetuneResult:
    run_id: str
    model_name: str
    version: str
    metrics: dict[str, Any]
    checkpoint_path: str  # the best epoch's checkpoint: a local folder, or an s3:// URI
    wall_s: float


def main(config: LifecycleConfig, resume: bool = False) -> FinetuneResult:
    started = time.perf_counter()
    check_base_model(config.model.base)  # fail before touching the cluster
    run_path = _run_path(config)
    state = _run_state(run_path, resume)
    # pyiceberg only: unusable data is refused before Ray. Resuming, training goes on over the
    # snapshot the first driver pinned (the config itself, and so its hash, stay as given).
    pinned = {"data.snapshot_id": state["snapshot_id"]} if resume else {}
    rows = scan_training_rows(with_overrides(config, pinned))
    split = plan_split(config, rows)  # a training split too small for the workers: refused
    init_ray()
    data = prepare_training_data(config, rows, split)
    tags = tracking.lineage_tags(config, data.lineage())
    with _sigterm_raises(), _mlflow_run(config, tags, state.get("run_id")) as run_id:
        _write_state(run_path, run_id, data.snapshot_id, finished=False)
        result = _train(config, data, tags, run_id, run_path)
        checkpoint, metrics = _best_checkpoint(result, config.promote.metric, config.promote.mode)
        version = register_once(config, run_id, checkpoint, tags, metrics)
        _write_state(run_path, run_id, data.snapshot_id, finished=True)
    finished = FinetuneResult(
        run_id=run_id,
        model_name=config.registry.model_name,
        version=version,
        metrics=metrics,
        checkpoint_path=filesystem_uri(checkpoint.filesystem, checkpoint.path),  # s3://...
        wall_s=time.perf_counter() - started,
    )
    log.info("registered %s version %s (%s)", finished.model_name, version, _fmt(metrics))
    return finished


def run_name(config: LifecycleConfig) -> str:
    """Deterministic: the same config names the same run, which is how --resume finds it. The
    snapshot is not in the name: it is pinned in the run's state file, so data loaded after a
    crash does not hide the run from its resume."""
    return f"{config.name}-{config_hash(config)}"


def _run_path(config: LifecycleConfig) -> str:
    return checkpoint_folder(config, run_name(config))


def checkpoint_folder(config: LifecycleConfig, name: str) -> str:
    """`name` under train.checkpoint_dir, as every worker sees it (made if it is local)."""
    storage = worker_visible_uri(
        config.train.checkpoint_dir, key="train.checkpoint_dir", create=True
    )
    return f"{storage.rstrip('/')}/{name}"


# --- run state: what --resume needs besides Ray Train's own files ----------------------------


def _read_state(run_path: str) -> dict[str, Any] | None:
    return read_json(run_path, _STATE_FILE)


def _write_state(run_path: str, run_id: str, snapshot_id: int, finished: bool) -> None:
    body = {"run_id": run_id, "snapshot_id": snapshot_id, "finished": finished}
    write_json(run_path, _STATE_FILE, body)


def _run_state(run_path: str, resume: bool) -> dict[str, Any]:
    """The saved state to resume from; {} for a fresh start (a finished run's folder is
    cleared: its model is in the registry)."""
    state = _read_state(run_path)
    unfinished = state is not None and not state.get("finished")
    if resume:
        if not unfinished:
            raise ValueError(
                f"nothing to resume at {run_path}: no unfinished finetune of this config (same "
                "name and model settings); start one with raylift finetune --config FILE "
                "(without --resume)"
            )
        log.info("resuming the training run at %s (MLflow run %s)", run_path, state["run_id"])
        return state
    if unfinished:
        raise ValueError(
            f"an unfinished finetune of this config is at {run_path} (MLflow run "
            f"{state['run_id']}): continue it with raylift finetune --config FILE --resume, or "
            "delete that folder to start over"
        )
    delete_folder(run_path)
    return {}


@contextlib.contextmanager
def _mlflow_run(
    config: LifecycleConfig, run_tags: dict[str, str], run_id: str | None
) -> Iterator[str]:
    """The run's MLflow run: a new one, or (resuming) the one the dead driver started. Either
    ends FAILED if the body raises, FINISHED otherwise."""
    import mlflow

    if run_id is None:
        with tracking.tracked_run(config, run_tags) as new_run_id:
            yield new_run_id
        return
    registry.configure_tracking(config.registry.tracking_uri, config.registry.experiment)
    with mlflow.start_run(run_id=run_id):
        yield run_id


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM (`ray job stop`, a pod deleted) unwinds like an error, so the MLflow run is ended
    FAILED rather than left RUNNING. Only SIGKILL skips that; --resume then reopens the run."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- training ---------------------------------------------------------------------------------


def _train(
    config: LifecycleConfig, data: PreparedData, tags: dict[str, str], run_id: str, run_path: str
):
    inputs = loop_inputs(config, data, tags, run_id)
    storage, _, name = run_path.rpartition("/")
    trainer = build_trainer(
        config, data, inputs, name=name, storage_path=storage, mode=config.promote.mode
    )
    with _environment(train_env()):
        return trainer.fit()


_PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def train_env() -> dict[str, str]:
    """Ray Train settings for a run on the local Ray this process started (no RAY_ADDRESS, one
    node): no preemption watcher. Ray Train starts one more actor per run to watch for nodes
    being drained, which cannot happen there; its start was about 2 CPU-s of each run's
    (AVX512-BF16, 2 cores, measured). Its documented switch is Ray Train's
    RAY_TRAIN_ENABLE_PREEMPTION_WATCHER; a value the user set is kept, and a cluster keeps
    Ray Train's default. Ray Train passes these from the process that calls fit() on to the
    run's controller and workers."""
    import ray

    if _PREEMPTION_WATCHER in os.environ or os.environ.get("RAY_ADDRESS"):
        return {}
    if not ray.is_initialized():
        return {}
    if len([node for node in ray.nodes() if node.get("Alive")]) != 1:
        return {}
    return {_PREEMPTION_WATCHER: "0"}


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """`values` in os.environ for the block only (a driver may run more than one job)."""
    added = {name: value for name, value in values.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def loop_inputs(
    config: LifecycleConfig, data: PreparedData, tags: dict[str, str], run_id: str
) -> LoopInputs:
    """What every worker of one training run is handed; rank 0 logs epochs to `run_id`."""
    return LoopInputs(
        config=config.model_dump(mode="json"),
        labels=data.labels,
        train_rows=data.train_rows,
        meta=tags,
        tracking_uri=registry.absolute_tracking_uri(config.registry.tracking_uri),
        run_id=run_id,
    )


def build_trainer(
    config: LifecycleConfig,
    data: PreparedData,
    inputs: LoopInputs,
    *,
    name: str,
    storage_path: str,
    metric: str | None = None,
    mode: str = "max",
    callbacks: list | None = None,
):
    """The TorchTrainer running `train_func` over the pinned data: one per finetune or trial.

    Checkpoints are kept by `metric` (promote.metric by default) in `mode` order: the best two
    epochs, plus the latest checkpoint (Ray Train never deletes it), which is what a restart
    resumes from. Ray Train restarts dead workers train.max_failures times; the run's folder
    is storage_path/name, and a trainer with the same name continues from its checkpoints.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    train = config.train
    metric = metric or config.promote.metric
    inputs = dataclasses.replace(inputs, checkpoint_metric=metric, checkpoint_mode=mode)
    return TorchTrainer(
        train_func,
        train_loop_config=inputs.as_dict(),
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker={
                **train.resources_per_worker,
                "CPU": train.cpus_per_worker,
                **({"GPU": 1} if train.use_gpu else {}),
            },
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(
                num_to_keep=2,
                checkpoint_score_attribute=metric,
                checkpoint_score_order=mode,
            ),
            failure_config=FailureConfig(max_failures=train.max_failures),
            callbacks=callbacks,
        ),
        datasets=data.datasets,
        dataset_config=_data_config(config),
    )


def _data_config(config: LifecycleConfig) -> EveryEvalRowConfig:
    """train.preserve_order: Ray Data keeps the training stream's order (blocks in read order,
    and the split among workers made in that order, not by which worker asks first), so every
    pass over the stream yields the same batches in the same order. Runs of one config then
    repeat, and mid-epoch checkpoints (which require it) resume at a data position that means
    something. Without it, the order need not repeat."""
    if not config.train.preserve_order:
        return EveryEvalRowConfig()
    import copy

    from ray.data import DataContext

    ordered = copy.deepcopy(DataContext.get_current().execution_options)
    ordered.preserve_order = True
    return EveryEvalRowConfig(execution_options={"train": ordered})


def _best_checkpoint(result, metric: str, mode: str = "max"):
    ranked = [  # epoch ends only: mid-epoch checkpoints hold state/, no model files
        (c, m)
        for c, m in (result.best_checkpoints or [])
        if "epoch" in m and isinstance(m.get(metric), int | float) and not math.isnan(m[metric])
    ]
    if not ranked:
        raise RuntimeError(f"training reported no checkpoint with metric {metric!r}")
    pick = min if mode == "min" else max  # promote.mode: val_perplexity improves downward
    return pick(ranked, key=lambda item: item[1][metric])


# --- registration -----------------------------------------------------------------------------


@contextlib.contextmanager
def registrable_directory(checkpoint) -> Iterator[str]:
    """A Ray Train checkpoint's files as the registry takes them: weights, tokenizer and
    raylift.json, never the state/ folder that resuming needs (optimizer state, RNG)."""
    with checkpoint.as_directory() as directory, tempfile.TemporaryDirectory() as staging:
        target = Path(staging) / "checkpoint"
        shutil.copytree(directory, target, ignore=_top_level(Path(directory), STATE_DIR))
        yield str(target)


def _top_level(root: Path, name: str):
    def ignore(folder: str, entries: list[str]) -> list[str]:
        return [name] if Path(folder) == root and name in entries else []

    return ignore


def register_once(
    config: LifecycleConfig,
    run_id: str,
    checkpoint,
    tags: dict[str, str],
    metrics: dict,
    same_tags: tuple[str, ...] = (),
) -> str:
    """Register the checkpoint, unless this run already did (a driver that died after
    registering, resumed): a version of the run whose `same_tags` match `tags` (raylift tune:
    the search's parent run) is returned instead."""
    from mlflow import MlflowClient

    name = config.registry.model_name
    found = MlflowClient().search_model_versions(f"name='{name}' and run_id='{run_id}'")
    existing = [v for v in found if all(v.tags.get(k) == tags[k] for k in same_tags)]
    if existing:
        version = str(max(int(v.version) for v in existing))
        log.info("run %s already registered %s version %s", run_id, name, version)
        return version
    with registrable_directory(checkpoint) as directory:
        return tracking.register(config, run_id, directory, tags, metrics)


def _fmt(metrics: dict[str, Any]) -> str:
    keys = ("epoch", "val_accuracy", "val_macro_f1", "train_rows_per_s")
    return ", ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)


if __name__ == "__main__":
    import functools
    import sys

    from jobs.cli import run_job

    if "--resume" in sys.argv:  # run_job parses --config and overrides only
        sys.argv.remove("--resume")
        main = functools.partial(main, resume=True)
    run_job(main, __doc__)
