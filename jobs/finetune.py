"""Fine-tune a pretrained model on a warehouse table with Ray Train + DeepSpeed; register it.

python -m jobs.finetune --config configs/banking77/minilm_lora.yaml [key=value ...]
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from cluster import init_ray
from cluster.storage import worker_visible_uri
from jobs import tracking
from jobs.config import LifecycleConfig, config_hash
from jobs.modeling import resolve_base_model
from jobs.train_loop import LoopInputs, train_func
from jobs.training_data import (
    EveryEvalRowConfig,
    PreparedData,
    prepare_training_data,
    scan_training_rows,
)
from serving import registry

__all__ = ["FinetuneResult", "build_trainer", "loop_inputs", "main"]

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    run_id: str
    model_name: str
    version: str
    metrics: dict[str, Any]
    checkpoint_path: str
    wall_s: float


def main(config: LifecycleConfig) -> FinetuneResult:
    started = time.perf_counter()
    resolve_base_model(config.model.base)  # fail before touching the cluster
    rows = scan_training_rows(config)  # pyiceberg only: unusable data is refused before Ray
    init_ray()
    data = prepare_training_data(config, rows)
    tags = tracking.lineage_tags(config, data.lineage())
    with tracking.tracked_run(config, tags) as run_id:
        result = _train(config, data, tags, run_id)
        checkpoint, metrics = _best_checkpoint(result, config.promote.metric)
        with checkpoint.as_directory() as directory:
            version = tracking.register(config, run_id, directory, tags, metrics)
    finished = FinetuneResult(
        run_id=run_id,
        model_name=config.registry.model_name,
        version=version,
        metrics=metrics,
        checkpoint_path=checkpoint.path,
        wall_s=time.perf_counter() - started,
    )
    log.info("registered %s version %s (%s)", finished.model_name, version, _fmt(metrics))
    return finished


def _train(config: LifecycleConfig, data: PreparedData, tags: dict[str, str], run_id: str):
    inputs = loop_inputs(config, data, tags, run_id)
    trainer = build_trainer(
        config,
        data,
        inputs,
        name=f"{config.name}-{config_hash(config)}-{int(time.time())}",
        storage_path=_storage_path(config.train.checkpoint_dir),
    )
    return trainer.fit()


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

    Checkpoints are kept by `metric` (promote.metric by default) in `mode` order, so the best
    epoch of the run is always among the two kept.
    """
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    train = config.train
    return TorchTrainer(
        train_func,
        train_loop_config=inputs.as_dict(),
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker={
                "CPU": train.cpus_per_worker,
                **({"GPU": 1} if train.use_gpu else {}),
            },
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(
                num_to_keep=2,
                checkpoint_score_attribute=metric or config.promote.metric,
                checkpoint_score_order=mode,
            ),
            callbacks=callbacks,
        ),
        datasets=data.datasets,
        dataset_config=EveryEvalRowConfig(),
    )


def _storage_path(checkpoint_dir: str) -> str:
    return worker_visible_uri(checkpoint_dir, key="train.checkpoint_dir", create=True)


def _best_checkpoint(result, metric: str):
    ranked = [(c, m) for c, m in (result.best_checkpoints or []) if metric in m]
    if not ranked:
        raise RuntimeError(f"training reported no checkpoint with metric {metric!r}")
    return max(ranked, key=lambda item: item[1][metric])


def _fmt(metrics: dict[str, Any]) -> str:
    keys = ("epoch", "val_accuracy", "val_macro_f1", "train_rows_per_s")
    return ", ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)


if __name__ == "__main__":
    from jobs.cli import run_job

    run_job(main, __doc__)
