"""The per-worker training function Ray Train runs (and Ray Tune will call).

Each worker builds the model, wraps it in a DeepSpeed engine (ZeRO stage from the config), reads
its shard of the tokenized Ray Data stream, trains with per-batch padding over length-sorted
windows, evaluates on its validation shard, and reports metrics plus a safetensors checkpoint.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cluster.hardware import resolve_precision
from jobs.checkpoint import AdapterMeta, CheckpointMeta
from jobs.config import LifecycleConfig, TrainConfig
from jobs.modeling import build_model, load_tokenizer, resolve_base_model, save_checkpoint
from jobs.tasks import Task, get_task

__all__ = [
    "REPORTED_METRICS",
    "LoopInputs",
    "deepspeed_config",
    "pad_batch",
    "train_func",
    "windowed_batches",
]

INPUT_IDS = "input_ids"
TARGETS = "targets"
_LOG_EVERY_STEPS = 50

# What train_func reports each epoch: the metrics tracking, registry tags and Tune read.
REPORTED_METRICS = (
    "epoch",
    "train_loss",
    "train_steps",
    "train_rows_per_s",
    "data_wait_fraction",
    "learning_rate",
    "val_accuracy",
    "val_macro_f1",
    "val_loss",
    "val_rows",
)


@dataclass
class LoopInputs:
    """What the driver hands every worker (plain data: it travels by pickle)."""

    config: dict[str, Any]
    labels: list[str]
    train_rows: int
    meta: dict[str, Any] = field(default_factory=dict)
    tracking_uri: str | None = None  # MLflow run rank 0 logs each epoch to
    run_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def train_func(loop_config: dict[str, Any]) -> None:
    import ray.train

    inputs = LoopInputs(**loop_config)
    config = LifecycleConfig.model_validate(inputs.config)
    _configure_worker(config.train)
    context = ray.train.get_context()
    task = get_task(config.task.type)
    engine, precision = _setup_engine(config, task, inputs, context.get_world_size())
    tokenizer = load_tokenizer(
        resolve_base_model(config.model.base), config.model.trust_remote_code
    )
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")
    pad_id = tokenizer.pad_token_id
    for epoch in range(1, config.train.epochs + 1):
        stats = _train_epoch(engine, train_shard, config.train, pad_id, epoch)
        evaluation = _evaluate(engine, val_shard, task, config.train, len(inputs.labels), pad_id)
        metrics = {"epoch": epoch, **stats, **evaluation}
        if context.get_world_rank() == 0:
            _log_epoch(inputs, metrics, epoch)
        meta = _checkpoint_meta(inputs, config, metrics, precision)
        _report(engine, metrics, tokenizer, meta, config, context.get_world_rank())


def _log_epoch(inputs: LoopInputs, metrics: dict[str, Any], epoch: int) -> None:
    """Live per-epoch tracking (a Tune trial is tracked the same way)."""
    if not (inputs.tracking_uri and inputs.run_id):
        return
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    logged = [
        Metric(key, float(value), now, epoch)
        for key, value in metrics.items()
        if key != "epoch" and isinstance(value, int | float)
    ]
    MlflowClient(inputs.tracking_uri).log_batch(inputs.run_id, metrics=logged)


def _configure_worker(train: TrainConfig) -> None:
    # Ray sets OMP_NUM_THREADS from the task's CPUs; say what we want explicitly instead.
    torch.set_num_threads(train.torch_threads or max(1, math.ceil(train.cpus_per_worker)))
    if not train.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    random.seed(train.seed)
    np.random.seed(train.seed)
    torch.manual_seed(train.seed)


def deepspeed_config(train: TrainConfig, precision: str) -> dict[str, Any]:
    """DeepSpeed settings for one worker; `precision` is already resolved for its device.

    bf16 is torch autocast, not DeepSpeed's `bf16` mode: that mode casts every weight of the
    module to bf16, so a frozen base (method=frozen) would be saved in bf16, not as loaded, and
    a 4-bit base would be cast under bitsandbytes. Autocast keeps the weights and the optimizer
    in fp32 and runs the matmuls in bf16 (layer norms and softmax stay fp32, as in Hugging
    Face's Trainer). Measured on MiniLM-L6 LoRA, 1 thread, AVX512-BF16: fp32 67, autocast 92,
    DeepSpeed bf16 mode 108 rows/s; the checkpoint that is exactly what trained is worth it.
    fp16 (GPU only) keeps DeepSpeed's fp16 mode for its loss scaling.
    """
    return {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": train.zero_stage},
        "torch_autocast": {"enabled": precision == "bf16", "dtype": "bfloat16"},
        "fp16": {"enabled": precision == "fp16"},
        # The optimizer is torch's AdamW (DeepSpeed's fused Adam needs CUDA).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _setup_engine(config: LifecycleConfig, task: Task, inputs: LoopInputs, world_size: int):
    import deepspeed
    from transformers import get_linear_schedule_with_warmup

    train = config.train
    precision = resolve_precision(train.precision, train.use_gpu)
    model = build_model(config.model, task, inputs.labels, precision)
    steps_per_epoch = math.ceil(inputs.train_rows / world_size / train.batch_size)
    if train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, train.max_steps_per_epoch)
    total_steps = max(1, steps_per_epoch * train.epochs)
    optimizer = torch.optim.AdamW(_param_groups(model, train, task), lr=train.learning_rate)

    def schedule(opt):
        warmup = int(train.warmup_ratio * total_steps)
        return get_linear_schedule_with_warmup(opt, warmup, total_steps)

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=schedule,
        config=deepspeed_config(train, precision),
    )
    return engine, precision


def _param_groups(model: torch.nn.Module, train: TrainConfig, task: Task) -> list[dict[str, Any]]:
    head, body, no_decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if task.is_head_parameter(name):
            head.append(param)
        elif param.ndim < 2:  # biases and LayerNorm weights are not decayed
            no_decay.append(param)
        else:
            body.append(param)
    groups = [
        {"params": body, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": head, "weight_decay": train.weight_decay, "lr": _head_lr(train)},
    ]
    return [g for g in groups if g["params"]]


def _head_lr(train: TrainConfig) -> float:
    return train.head_learning_rate or train.learning_rate


def pad_batch(sequences: list[np.ndarray], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence of this batch only (not to max_length)."""
    longest = max(len(s) for s in sequences)
    ids = np.full((len(sequences), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), longest), dtype=np.int64)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}


def windowed_batches(
    window: dict[str, np.ndarray], batch_size: int, rng: random.Random | None
) -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
    """Sort a window of rows by length, cut it into batches, shuffle the batch order.

    Rows of similar length share a batch, so per-batch padding wastes little; the window (a few
    batches) keeps the length bucketing from undoing the shuffle of the stream.
    """
    sequences = list(window[INPUT_IDS])
    order = np.argsort([len(s) for s in sequences], kind="stable")
    starts = list(range(0, len(order), batch_size))
    if rng is not None:
        rng.shuffle(starts)
    for start in starts:
        picked = order[start : start + batch_size]
        yield [sequences[i] for i in picked], window[TARGETS][picked]


def _stream(shard, config: TrainConfig, rng: random.Random | None):
    """Batches of one shard; shuffled (rng given) through a local buffer, then length-bucketed.

    Warehouse tables are often sorted (by time, by class). A local shuffle buffer as large as a
    worker's shard is a full shuffle for small tables and a sliding one for large tables, at
    the cost of buffer memory, not of a cluster-wide shuffle on every epoch.
    """
    window_rows = config.batch_size * config.length_window
    buffer = config.shuffle_buffer_rows if rng is not None else None
    for window in shard.iter_batches(
        batch_size=window_rows, batch_format="numpy", local_shuffle_buffer_size=buffer or None
    ):
        yield from windowed_batches(window, config.batch_size, rng)


def _all_ranks_have(has_batch: bool) -> tuple[bool, bool]:
    """(any rank has a batch, every rank has one): keeps collectives in step on uneven shards."""
    import torch.distributed as dist

    flags = torch.tensor([int(has_batch), int(not has_batch)])
    dist.all_reduce(flags)
    return bool(flags[0] > 0), bool(flags[1] == 0)


def _train_epoch(engine, shard, train: TrainConfig, pad_id: int, epoch: int) -> dict[str, float]:
    engine.train()
    rng = random.Random(train.seed * 1000 + epoch)
    batches = _stream(shard, train, rng)
    loss_sum, rows, steps, waited = 0.0, 0, 0, 0.0
    start = time.perf_counter()
    while train.max_steps_per_epoch is None or steps < train.max_steps_per_epoch:
        fetch = time.perf_counter()
        item = next(batches, None)
        waited += time.perf_counter() - fetch
        _, all_have = _all_ranks_have(item is not None)
        if not all_have:  # a rank ran dry: stop together so ZeRO collectives never hang
            break
        sequences, targets = item
        inputs = pad_batch(sequences, pad_id)
        loss = engine(**inputs, labels=torch.from_numpy(targets)).loss
        engine.backward(loss)
        engine.step()
        loss_sum += float(loss.detach()) * len(sequences)
        rows += len(sequences)
        steps += 1
        if steps % _LOG_EVERY_STEPS == 0 and engine.global_rank == 0:
            rate = rows / (time.perf_counter() - start)
            # print, not logging: Ray forwards worker stdout to the driver and the job logs.
            print(
                f"raylift.train: epoch {epoch} step {steps} loss {float(loss):.4f} "
                f"{rate:.0f} rows/s/worker",
                flush=True,
            )
    elapsed = time.perf_counter() - start
    return {
        "train_loss": _global_mean(loss_sum, rows),
        "train_steps": steps,
        "train_rows_per_s": _global_sum(rows) / max(elapsed, 1e-9),
        "data_wait_fraction": waited / max(elapsed, 1e-9),
        "learning_rate": float(engine.get_lr()[0]),
    }


@torch.no_grad()
def _evaluate(
    engine, shard, task: Task, train: TrainConfig, n: int, pad_id: int
) -> dict[str, float]:
    engine.eval()
    batches = _stream(shard, train, rng=None)
    state = task.eval_state(n)
    loss_sum, rows = 0.0, 0
    dummy = None
    while True:
        item = next(batches, None)
        any_have, _ = _all_ranks_have(item is not None)
        if not any_have:
            break
        if item is None:  # ZeRO-3 gathers weights in forward: every rank must take part
            dummy = dummy or pad_batch([np.array([pad_id])], pad_id)
            engine(**dummy)
            continue
        sequences, targets = item
        labels = torch.from_numpy(targets)
        out = engine(**pad_batch(sequences, pad_id), labels=labels)
        loss_sum += float(out.loss) * len(sequences)
        rows += len(sequences)
        task.accumulate(state, out.logits, labels)
    import torch.distributed as dist

    dist.all_reduce(state)  # the task's state is a sum over batches, so over ranks too
    metrics = task.metrics(state.numpy())
    return {
        **{f"val_{k}": v for k, v in metrics.items()},
        "val_loss": _global_mean(loss_sum, rows),
        "val_rows": int(_global_sum(rows)),
    }


def _global_sum(value: float) -> float:
    import torch.distributed as dist

    tensor = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor[0])


def _global_mean(total: float, count: int) -> float:
    denominator = _global_sum(count)
    return _global_sum(total) / denominator if denominator else float("nan")


def _report(engine, metrics, tokenizer, meta: CheckpointMeta, config: LifecycleConfig, rank: int):
    import ray.train

    # Under ZeRO-3 the weights are partitioned: every rank joins the gather, rank 0 saves. The
    # gathered tensors keep the weights' dtype (fp32: mixed precision is autocast), so nothing
    # is rounded on the way to the checkpoint.
    state_dict = None
    if config.train.zero_stage == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="raylift-ckpt-") as directory:
        save_checkpoint(engine.module, tokenizer, directory, meta, state_dict=state_dict)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _checkpoint_meta(
    inputs: LoopInputs, config: LifecycleConfig, metrics: dict, precision: str
) -> CheckpointMeta:
    """What the checkpoint says about itself; `precision` is the one training resolved to."""
    lora = config.model.lora
    adapter = None
    if config.model.method in ("lora", "qlora"):
        adapter = AdapterMeta(
            r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules
        )
    return CheckpointMeta(
        task=config.task.type,
        labels=inputs.labels,
        base_model=config.model.base,
        method=config.model.method,
        adapter=adapter,
        max_length=config.task.max_length,
        text_column=config.task.text_column,
        trained_precision=precision,
        metrics={k: v for k, v in metrics.items() if isinstance(v, int | float)},
        config=inputs.config,
        lineage=inputs.meta,
    )
