"""The per-worker training function Ray Train runs (and Ray Tune will call).

Each worker builds the model, wraps it in a DeepSpeed engine (ZeRO stage from the config), reads
its shard of the tokenized Ray Data stream, trains with per-batch padding over length-sorted
windows, evaluates on its validation shard, and reports metrics plus a safetensors checkpoint.
With train.use_gpu (NCCL, one GPU per worker) each batch and the loop's own collectives (stop
flags, loss and row sums, the evaluation state) go to the rank's GPU, and the sums come back.

Every checkpoint also holds `state/`: what resuming needs (the DeepSpeed engine's trainable
weights, optimizer and LR schedule as `engine.save_checkpoint` writes them, one shard per rank;
each rank's torch RNG, CUDA's too on a GPU; and `progress.json`: epoch, batches of it already
trained, the epoch's running loss). Checkpoints come at each epoch end (weights + tokenizer +
raylift.json + state/) and, with train.checkpoint_every_steps, within epochs (state/ only). A
restarted worker group (Ray Train FailureConfig) or a resumed run (`raylift finetune --resume`)
gets the latest one from `ray.train.get_checkpoint()`, loads it on every rank, skips the batches
of the epoch already trained and carries on. Registration never takes state/
(jobs.finetune.registrable_directory).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import random
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cluster.hardware import native_bf16, resolve_precision
from jobs import instruct
from jobs.checkpoint import AdapterMeta, CheckpointMeta, InstructMeta
from jobs.config import LifecycleConfig, TrainConfig
from jobs.modeling import build_model, load_tokenizer, resolve_base_model, save_checkpoint
from jobs.rung_gate import RungGate
from jobs.tasks import Task, get_task, is_generative

__all__ = [
    "REPORTED_METRICS",
    "RESUME_METRIC",
    "STATE_DIR",
    "LoopInputs",
    "BatchInputs",
    "TrainProgress",
    "deepspeed_config",
    "pad_batch",
    "read_progress",
    "train_func",
    "windowed_batches",
]

INPUT_IDS = "input_ids"
TARGETS = "targets"
_LOG_EVERY_STEPS = 50

STATE_DIR = "state"  # inside a checkpoint: what resuming needs; never registered
_PROGRESS_FILE = "progress.json"
_ENGINE_TAG = "engine"  # DeepSpeed's checkpoint tag: state/engine/
# Logged (step = optimizer step) each time training resumes from a checkpoint.
RESUME_METRIC = "train_resumed_at_step"

# DeepSpeed's ZeRO gathers call torch's all_gather_into_tensor, which torch deprecates with a
# FutureWarning: a line from every rank of every run that no user of raylift can act on.
warnings.filterwarnings(
    "ignore",
    message="`torch.distributed.all_gather_into_tensor` is deprecated",
    category=FutureWarning,
)

# What train_func reports each epoch: the metrics tracking, registry tags and Tune read.
REPORTED_METRICS = (
    "epoch",
    "train_loss",
    "train_steps",
    "global_step",
    "train_rows_per_s",
    "train_tokens_per_s",
    "data_wait_fraction",
    "learning_rate",
    "val_accuracy",
    "val_macro_f1",
    "val_loss",
    "val_perplexity",
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
    # The metric Ray Train keeps checkpoints by, and which way it improves; mid-epoch
    # checkpoints report its worst finite value. None: promote.metric.
    checkpoint_metric: str | None = None
    checkpoint_mode: str = "max"
    # A trial of the sha scheduler: after a rung's epoch, wait for the rung's verdict
    rung_gate: RungGate | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TrainProgress:
    """Where a checkpoint stands (state/progress.json, written by rank 0)."""

    epoch: int = 1  # the epoch being trained, from 1
    batches: int = 0  # batches of that epoch already trained on every rank: the data position
    epoch_done: bool = False  # the epoch was trained, evaluated and reported: resume at the next
    loss_sum: float = 0.0  # summed over every rank's rows of those batches (the epoch's loss)
    rows: int = 0  # what the loss is averaged over: rows, or scored tokens (BatchInputs.weight)
    global_step: int = 0  # optimizer steps since the start of the run
    world_size: int = 1
    metrics: dict[str, Any] = field(default_factory=dict)  # what the epoch reported (epoch ends)

    def resume_point(self) -> TrainProgress:
        """Where training goes on from: the next epoch when this one was done."""
        if not self.epoch_done:
            return self
        return TrainProgress(
            epoch=self.epoch + 1, global_step=self.global_step, world_size=self.world_size
        )


def train_func(loop_config: dict[str, Any]) -> None:
    import ray.train

    inputs = LoopInputs(**loop_config)
    config = LifecycleConfig.model_validate(inputs.config)
    _configure_worker(config.train)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")
    # A fresh run's first batch is read while the engine is built: Ray Data's first pass
    # starts cold (split coordinator, read and tokenize tasks in new processes), and without
    # this the first step waited for all of it after the model was ready.
    first_epoch = None
    if ray.train.get_checkpoint() is None:
        first_epoch = FirstBatchAhead(epoch_stream(train_shard, config.train, epoch=1))
    task = get_task(config.task.type)  # imports peft: after the first batch is on its way
    engine, precision = _setup_engine(config, task, inputs, world_size)
    tokenizer = load_tokenizer(
        resolve_base_model(config.model.base), config.model.trust_remote_code
    )
    if task.generative:  # refuses a tokenizer with no eos: a generator learns to end with it
        tokenizer = instruct.prepare_tokenizer(tokenizer)
    start = _restore(engine, inputs, rank, world_size)
    # eos where the tokenizer defines no pad (Llama's), as saved with the checkpoint; a
    # classifier's config.pad_token_id, which its head pools by, is this id (build_model).
    pad_id = tokenizer.pad_token_id
    collate = BatchInputs(task, pad_id, config.task.packing, config.task.max_length)
    metric = inputs.checkpoint_metric or config.promote.metric

    def save_mid_epoch(progress: TrainProgress) -> None:
        _report_state(engine, progress, metric, inputs.checkpoint_mode, rank)

    epoch_log = EpochLog(inputs, start) if rank == 0 else None
    for epoch in range(start.epoch, config.train.epochs + 1):
        begin = start if epoch == start.epoch else TrainProgress(epoch=epoch)
        ahead = first_epoch if epoch == 1 else None
        stats = _train_epoch(
            engine, train_shard, config.train, pad_id, begin, save_mid_epoch, collate, ahead
        )
        evaluation = _evaluate(
            engine, val_shard, task, config.train, len(inputs.labels), pad_id, collate
        )
        metrics = {"epoch": epoch, **stats, **evaluation}
        meta = _checkpoint_meta(inputs, config, metrics, precision, tokenizer)
        done = _progress(engine, epoch, stats["train_steps"], 0.0, 0, epoch_done=True)
        done.metrics = metrics
        # Logged before it is reported: a Tune trial that ASHA stops at this report is torn
        # down while report() returns, and an epoch logged after it was lost (seen in CI).
        if epoch_log is not None:
            epoch_log.log(metrics, epoch)
        _report(engine, metrics, tokenizer, meta, config, rank, done)
        if inputs.rung_gate is not None and epoch < config.train.epochs:
            inputs.rung_gate.wait(epoch, rank)  # held there until the rung keeps the trial


def _restore(engine, inputs: LoopInputs, rank: int, world_size: int) -> TrainProgress:
    """Load the latest checkpoint's state on this rank, if the run has one; where to start."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return TrainProgress(world_size=world_size)
    with checkpoint.as_directory() as directory:
        state = Path(directory) / STATE_DIR
        progress = read_progress(state)
        _require_same_world(progress, world_size, checkpoint.path)
        started = time.perf_counter()
        load_engine_state(engine, state)
        _load_rng(state, rank)
    if rank == 0:
        print(
            f"raylift.train: resumed from {Path(checkpoint.path).name}: epoch {progress.epoch} "
            f"{'done' if progress.epoch_done else f'after batch {progress.batches}'}, "
            f"step {progress.global_step} (loaded in {time.perf_counter() - started:.1f} s)",
            flush=True,
        )
        _log_resume(inputs, progress)
    return progress.resume_point()


def read_progress(state: str | Path) -> TrainProgress:
    """The progress.json of a checkpoint's state/ folder."""
    path = Path(state) / _PROGRESS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path.parent.parent} has no {STATE_DIR}/{_PROGRESS_FILE}: it was not written by "
            "this raylift's train loop and cannot be resumed from; delete the run folder "
            "(train.checkpoint_dir) to start over"
        )
    return TrainProgress(**json.loads(path.read_text()))


def _require_same_world(progress: TrainProgress, world_size: int, where: str) -> None:
    # ZeRO shards the optimizer state per rank, and each rank's data position is in its shard.
    if progress.world_size != world_size:
        raise ValueError(
            f"the checkpoint at {where} was saved by {progress.world_size} worker(s), and this "
            f"run has {world_size}; resume with train.num_workers={progress.world_size}"
        )


def _log_resume(inputs: LoopInputs, progress: TrainProgress) -> None:
    """Record the resume in MLflow, and log the checkpointed epoch if its log was lost."""
    if not (inputs.tracking_uri and inputs.run_id):
        return
    from mlflow import MlflowClient

    client = MlflowClient(inputs.tracking_uri)
    client.log_metric(inputs.run_id, RESUME_METRIC, progress.global_step, step=progress.global_step)
    # An epoch is logged just before its checkpoint is reported; a worker that died in between
    # left it logged but not checkpointed (trained again, not logged twice), and an older run may
    # have left it checkpointed but not logged.
    if progress.epoch_done and not _epoch_logged(client, inputs.run_id, progress.epoch):
        _log_epoch(inputs, progress.metrics, progress.epoch)


class EpochLog:
    """Rank 0's per-epoch MLflow log of one run, each epoch logged once.

    An attempt that follows one that died trains again the epoch the dead attempt logged but did
    not checkpoint, and does not log it twice. It follows a dead one when it resumes from a
    checkpoint, and when it starts over on a run that already has epochs logged: a Tune trial
    whose killed driver's experiment state lacked the trial's checkpoint restarts from scratch
    on `--resume`, in the same MLflow run (seen in CI: val_loss at steps 1, 1, 2, 3, 4)."""

    def __init__(self, inputs: LoopInputs, start: TrainProgress) -> None:
        self._inputs = inputs
        self._retried = (
            start.global_step > 0 or start.epoch > 1 or _epoch_logged_in(inputs, start.epoch)
        )

    def log(self, metrics: dict[str, Any], epoch: int) -> None:
        if self._retried and _epoch_logged_in(self._inputs, epoch):
            return
        _log_epoch(self._inputs, metrics, epoch)


def _epoch_logged_in(inputs: LoopInputs, epoch: int) -> bool:
    if not (inputs.tracking_uri and inputs.run_id):
        return False
    from mlflow import MlflowClient

    return _epoch_logged(MlflowClient(inputs.tracking_uri), inputs.run_id, epoch)


def _epoch_logged(client, run_id: str, epoch: int) -> bool:
    return any(m.step == epoch for m in client.get_metric_history(run_id, "train_loss"))


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
    _quiet_ray_train_checkpoint_lines()
    random.seed(train.seed)
    np.random.seed(train.seed)
    torch.manual_seed(train.seed)


def _quiet_ray_train_checkpoint_lines() -> None:
    """Ray Train logs two INFO lines per checkpoint from every rank ("Checkpoint successfully
    created at ...", "Reporting training result N: TrainingReport(...)"); the loop logs its own
    one line per checkpoint (size, save time), so theirs go to WARNING. Their loggers are named
    after Ray's internal modules (one by its file path): if Ray moves them, nothing is quieted."""
    try:
        from ray.train.v2._internal.execution import context, storage
    except ImportError:
        return
    for name in (context.__file__, storage.__name__):
        logging.getLogger(name).setLevel(logging.WARNING)


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


def _choose_cpu_allreduce(shm: bool) -> None:
    """gloo's allreduce between CPU ranks unless train.shm_allreduce: DeepSpeed otherwise
    JIT-compiles its shared-memory op in each fresh worker whose build cache is cold or was
    built by another ninja (20-70 s of C++ on 2 cores). DeepSpeed reads this table when its
    communication backend starts; GPU ranks use NCCL either way."""
    import deepspeed.ops

    usable = _shm_op_probed()
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = shm and usable


@functools.cache
def _shm_op_probed() -> bool:
    """Whether DeepSpeed found its shared-memory op usable here (read before it is changed)."""
    import deepspeed.ops

    return bool(deepspeed.ops.__compatible_ops__.get("deepspeed_shm_comm", False))


def _setup_engine(config: LifecycleConfig, task: Task, inputs: LoopInputs, world_size: int):
    import deepspeed
    from transformers import get_linear_schedule_with_warmup

    train = config.train
    if not train.use_gpu:  # reading DeepSpeed's op table probes every op (compilers, on a GPU)
        _choose_cpu_allreduce(train.shm_allreduce)
    precision = _agreed_precision(train)
    model = build_model(config.model, task, inputs.labels, precision, zero_stage=train.zero_stage)
    total_steps = max(1, _steps_per_epoch(inputs.train_rows, world_size, train) * train.epochs)
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
    note = _capped_epoch_note(train, inputs.train_rows, world_size)
    if note and engine.global_rank == 0:
        print(f"raylift.train: {note}", flush=True)
    return engine, precision


def _capped_epoch_note(train: TrainConfig, train_rows: int, world_size: int) -> str | None:
    """What to say once when train.max_steps_per_epoch leaves most of a shard out of reach.

    Every epoch reads a worker's shard from its start (in the same order, with preserve_order),
    drawing batches from a shuffle buffer of train.shuffle_buffer_rows rows, so a capped epoch
    only ever trains on about the first cap x batch_size + buffer rows of it."""
    cap, shard = train.max_steps_per_epoch, train_rows // world_size
    reach = (cap or 0) * train.batch_size + train.shuffle_buffer_rows
    if not cap or reach >= shard:
        return None
    return (
        f"train.max_steps_per_epoch={cap} trains {cap * train.batch_size} rows an epoch, and "
        f"every epoch reads its shard from the start: rows past about the first {reach} of the "
        f"{shard} in each worker's shard are never trained on; raise train.shuffle_buffer_rows "
        f"(now {train.shuffle_buffer_rows}) toward {shard} to draw each epoch's rows from the "
        "whole shard, or raise or drop the cap"
    )


def _steps_per_epoch(train_rows: int, world_size: int, train: TrainConfig) -> int:
    """Optimizer steps of one epoch, as the LR schedule plans them: Ray Train's equal split
    gives every worker train_rows // world_size rows (the remainder is dropped), each batch at
    most train.batch_size of them; train.max_steps_per_epoch caps it."""
    steps = math.ceil((train_rows // world_size) / train.batch_size)
    if train.max_steps_per_epoch:
        steps = min(steps, train.max_steps_per_epoch)
    return steps


def _agreed_precision(train: TrainConfig) -> str:
    """The precision every rank trains in (a collective: every rank calls it): bf16 only where
    every rank's device computes it natively. Each rank resolving `auto` on its own hardware
    would build DeepSpeed engines of different precisions on a mixed cluster (AVX512-BF16 and
    AVX2-only nodes, or Ampere and older GPUs)."""
    here = native_bf16(train.use_gpu)
    _, everywhere = _all_ranks_have(here)
    precision = resolve_precision(train.precision, train.use_gpu, native=everywhere)
    if here and not everywhere:
        print(
            f"raylift.train: another worker's {'GPU' if train.use_gpu else 'CPU'} has no native "
            f"bf16: every worker trains in {precision} (train.precision={train.precision})",
            flush=True,
        )
    return precision


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


@dataclass(frozen=True)
class BatchInputs:
    """Model inputs of one batch of (token ids, targets) for the task, and its loss weight.

    Classification: padded rows, one label per row; the loss is a mean over rows. causal-lm:
    jobs.instruct.collate (padded, or packed when training with task.packing), per-token labels;
    the loss is a mean over the scored response tokens, so it is weighted by their count.
    Evaluation never packs: its figures do not depend on the layout.
    """

    task: Task | None  # None: classification
    pad_id: int
    packing: bool = False
    max_length: int | None = None

    def __call__(self, item, training: bool = True) -> tuple[dict[str, torch.Tensor], int]:
        sequences, targets = item
        if self.task is None or not self.task.generative:
            labels = torch.from_numpy(np.asarray(targets, dtype=np.int64))
            return {**pad_batch(sequences, self.pad_id), "labels": labels}, len(sequences)
        batch = instruct.collate(
            sequences,
            list(targets),
            self.pad_id,
            packing=self.packing and training,
            max_length=self.max_length,
        )
        return batch, int((batch["labels"][:, 1:] != instruct.IGNORE_INDEX).sum())


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


def _stream(shard, config: TrainConfig, rng: random.Random | None, seed: int | None = None):
    """Batches of one shard; shuffled (rng given) through a local buffer, then length-bucketed.

    Warehouse tables are often sorted (by time, by class). A local shuffle buffer as large as a
    worker's shard is a full shuffle for small tables and a sliding one for large tables, at
    the cost of buffer memory, not of a cluster-wide shuffle on every epoch. The buffer is
    seeded (`seed`), so with the stream's order preserved (train.checkpoint_every_steps) an
    epoch's batches come in the same order every time, which is what lets a resumed epoch skip
    the ones already trained.
    """
    window_rows = config.batch_size * config.length_window
    buffer = config.shuffle_buffer_rows if rng is not None else None
    for window in shard.iter_batches(
        batch_size=window_rows,
        batch_format="numpy",
        local_shuffle_buffer_size=buffer or None,
        local_shuffle_seed=seed if buffer else None,
    ):
        yield from windowed_batches(window, config.batch_size, rng)


def epoch_stream(shard, config: TrainConfig, epoch: int) -> Iterator:
    """An epoch's training batches: the shard shuffled and bucketed with the epoch's own seed,
    so a resumed epoch sees its batches in the same order."""
    seed = config.seed * 1000 + epoch
    return _stream(shard, config, random.Random(seed), seed)


class FirstBatchAhead:
    """A stream whose first batch is fetched on a thread from the moment it is made.

    Only the first item: the rest is read where it is consumed, so no pass of the shard ever
    runs ahead of the loop (a rank reading the next pass early stalls the split). The wait that
    remains when the first batch is asked for is still the caller's to count.
    """

    def __init__(self, batches: Iterator) -> None:
        self._batches = batches
        self._first: Any = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = threading.Thread(
            target=self._fetch, name="raylift-first-batch", daemon=True
        )
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._first = next(self._batches, None)
        except BaseException as error:  # re-raised in the loop's own thread
            self._error = error

    def __iter__(self) -> FirstBatchAhead:
        return self

    def __next__(self) -> Any:
        if self._thread is None:
            return next(self._batches)
        self._thread.join()
        self._thread = None
        if self._error is not None:
            raise self._error
        if self._first is None:
            raise StopIteration
        first, self._first = self._first, None
        return first


def _all_ranks_have(has_batch: bool) -> tuple[bool, bool]:
    """(any rank has a batch, every rank has one): keeps collectives in step on uneven shards."""
    flags = _summed_over_ranks(torch.tensor([int(has_batch), int(not has_batch)]))
    return bool(flags[0] > 0), bool(flags[1] == 0)


def _rank_device() -> torch.device:
    """Where this rank's model inputs and collectives go: its GPU under NCCL, which reduces CUDA
    tensors only (the current device: DeepSpeed's engine set it from LOCAL_RANK and put the
    model there), else the CPU (gloo)."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _summed_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over every rank, on the CPU (reduced on the rank's device)."""
    import torch.distributed as dist

    on_device = tensor.to(_rank_device())  # the tensor itself on the CPU
    dist.all_reduce(on_device)
    return on_device.cpu()


def _on_device(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch's model inputs on `device`; flags (use_cache) stay as they are."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


@dataclass
class _EpochTally:
    loss_sum: float = 0.0  # this rank's rows (rank 0 also carries the resumed part's total)
    rows: int = 0
    steps: int = 0
    fresh_rows: int = 0  # trained by this attempt: the throughput
    fresh_tokens: int = 0  # their tokens, padding excluded
    waited: float = 0.0
    checkpointing: float = 0.0
    last_loss: float = 0.0


def _train_epoch(
    engine,
    shard,
    train: TrainConfig,
    pad_id: int,
    begin: TrainProgress,
    save_state: Callable[[TrainProgress], None],
    collate: BatchInputs | None = None,
    batches: Iterator | None = None,
) -> dict[str, float]:
    """Train one epoch from `begin` (batch 0, or the data position a checkpoint saved);
    `batches`: the epoch's stream already started (epoch_stream), else it starts here."""
    engine.train()
    collate = collate or BatchInputs(None, pad_id)
    epoch = begin.epoch
    if batches is None:
        batches = epoch_stream(shard, train, epoch)
    tally = _EpochTally(steps=begin.batches)
    if engine.global_rank == 0:  # the resumed part's loss, summed over ranks when saved
        tally.loss_sum, tally.rows = begin.loss_sum, begin.rows
    for skipped in range(begin.batches):  # trained before the checkpoint: same order, skipped
        if next(batches, None) is None:
            raise RuntimeError(
                f"epoch {epoch} ran out of batches at {skipped} while skipping the "
                f"{begin.batches} trained before the checkpoint: the training stream changed"
            )
    start = time.perf_counter()
    checkpoint_due = False  # after the last step; written once the next batch shows up
    while train.max_steps_per_epoch is None or tally.steps < train.max_steps_per_epoch:
        fetch = time.perf_counter()
        item = next(batches, None)
        tally.waited += time.perf_counter() - fetch
        _, all_have = _all_ranks_have(item is not None)
        if not all_have:  # a rank ran dry: stop together so ZeRO collectives never hang
            break
        if checkpoint_due:  # not the epoch's last step: no epoch-end checkpoint follows it
            _save_mid_epoch(engine, epoch, tally, save_state)
        _train_step(engine, collate(item), tally, item[0])
        if tally.steps % _LOG_EVERY_STEPS == 0 and engine.global_rank == 0:
            rate = tally.fresh_rows / (time.perf_counter() - start - tally.checkpointing)
            # print, not logging: Ray forwards worker stdout to the driver and the job logs.
            print(
                f"raylift.train: epoch {epoch} step {tally.steps} loss {tally.last_loss:.4f} "
                f"{rate:.0f} rows/s/worker",
                flush=True,
            )
        checkpoint_due = _mid_epoch_checkpoint_due(train, tally.steps)
    if tally.steps == 0:  # every rank stops at the same step, so every rank raises here
        raise RuntimeError(
            f"epoch {epoch} trained no batch: the training shards of the "
            f"{engine.dp_world_size} worker(s) are empty (Ray Train gives each worker "
            "train_rows // train.num_workers rows of the training split); load more rows or "
            "lower train.num_workers"
        )
    elapsed = max(time.perf_counter() - start - tally.checkpointing, 1e-9)
    return {
        "train_loss": _global_mean(tally.loss_sum, tally.rows),
        "train_steps": tally.steps,
        "global_step": int(engine.global_steps),  # optimizer steps since the run began
        "train_rows_per_s": _global_sum(tally.fresh_rows) / elapsed,
        "train_tokens_per_s": _global_sum(tally.fresh_tokens) / elapsed,
        "data_wait_fraction": tally.waited / elapsed,
        "learning_rate": float(engine.get_lr()[0]),
    }


def _save_mid_epoch(
    engine, epoch: int, tally: _EpochTally, save_state: Callable[[TrainProgress], None]
) -> None:
    """The state after tally.steps batches (the next one is fetched, not yet trained)."""
    saving = time.perf_counter()
    save_state(_progress(engine, epoch, tally.steps, tally.loss_sum, tally.rows))
    tally.checkpointing += time.perf_counter() - saving


def _train_step(engine, batch, tally: _EpochTally, sequences: list[np.ndarray]) -> None:
    inputs, weight = batch
    loss = engine(**_on_device(inputs, _rank_device())).loss
    engine.backward(loss)
    engine.step()
    tally.last_loss = float(loss.detach())
    tally.loss_sum += tally.last_loss * weight
    tally.rows += weight
    tally.fresh_rows += len(sequences)
    tally.fresh_tokens += sum(len(s) for s in sequences)
    tally.steps += 1


def _mid_epoch_checkpoint_due(train: TrainConfig, steps: int) -> bool:
    every = train.checkpoint_every_steps
    # The epoch-end checkpoint follows the last step of a capped epoch anyway.
    return bool(every) and steps % every == 0 and steps != train.max_steps_per_epoch


def _progress(
    engine, epoch: int, batches: int, loss_sum: float, rows: int, epoch_done: bool = False
) -> TrainProgress:
    """Where this step stands, over all ranks (a collective: every rank calls it)."""
    return TrainProgress(
        epoch=epoch,
        batches=batches,
        epoch_done=epoch_done,
        loss_sum=_global_sum(loss_sum),
        rows=int(_global_sum(rows)),
        global_step=int(engine.global_steps),
        world_size=engine.dp_world_size,
    )


@torch.no_grad()
def _evaluate(
    engine,
    shard,
    task: Task,
    train: TrainConfig,
    n: int,
    pad_id: int,
    collate: BatchInputs | None = None,
) -> dict[str, float]:
    """Validation metrics over every rank's shard; the task's own figures (a causal LM's
    token-weighted val_loss and val_perplexity) take precedence over the row-weighted loss."""
    engine.eval()
    collate = collate or BatchInputs(task, pad_id)
    batches = _stream(shard, train, rng=None)
    device = _rank_device()
    state = task.eval_state(n)  # on the CPU: accumulate moves each batch's figures to it
    # A causal LM's own loss is the mean NLL of the scored tokens: accumulate takes the sum
    # from it instead of a second full-vocabulary cross-entropy in fp32.
    with_loss = task.generative and instruct.loss_is_mean_token_nll(
        getattr(engine, "module", engine)
    )
    loss_sum, rows = 0.0, 0
    dummy = None
    while True:
        item = next(batches, None)
        any_have, _ = _all_ranks_have(item is not None)
        if not any_have:
            break
        if item is None:  # ZeRO-3 gathers weights in forward: every rank must take part
            dummy = dummy or _on_device(pad_batch([np.array([pad_id])], pad_id), device)
            engine(**dummy)
            continue
        inputs, _ = collate(item, training=False)
        inputs = _on_device(inputs, device)
        out = engine(**inputs)
        loss_sum += float(out.loss) * len(item[0])
        rows += len(item[0])
        if with_loss:
            task.accumulate(state, out.logits, inputs["labels"], loss=out.loss)
        else:
            task.accumulate(state, out.logits, inputs["labels"])
    state = _summed_over_ranks(state)  # a sum over batches, so over ranks too
    metrics = task.metrics(state.numpy())
    return {
        "val_loss": _global_mean(loss_sum, rows),
        "val_rows": int(_global_sum(rows)),
        **{f"val_{k}": v for k, v in metrics.items()},
    }


def _global_sum(value: float) -> float:
    return float(_summed_over_ranks(torch.tensor([float(value)], dtype=torch.float64))[0])


def _global_mean(total: float, count: int) -> float:
    denominator = _global_sum(count)
    return _global_sum(total) / denominator if denominator else float("nan")


def _report(
    engine,
    metrics: dict[str, Any],
    tokenizer,
    meta: CheckpointMeta,
    config: LifecycleConfig,
    rank: int,
    progress: TrainProgress,
) -> None:
    """The epoch-end checkpoint: weights, tokenizer and raylift.json (rank 0), state/ (all)."""
    import ray.train

    state_dict = _consolidated_weights(engine, config)
    with tempfile.TemporaryDirectory(prefix="raylift-ckpt-") as directory:
        started = time.perf_counter()
        if rank == 0:
            save_checkpoint(engine.module, tokenizer, directory, meta, state_dict=state_dict)
        save_engine_state(engine, Path(directory) / STATE_DIR, progress, rank)
        _log_saved(directory, rank, started, f"epoch {progress.epoch} end")
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=f"epoch{progress.epoch:03d}-end",
        )
    if rank == 0:
        # MLflow gets the epoch only once Ray Train holds its checkpoint: a resume never trains
        # an epoch that MLflow already shows (_log_resume fills the other gap).
        ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED
        )


def _consolidated_weights(engine, config: LifecycleConfig) -> dict[str, torch.Tensor] | None:
    """What rank 0's checkpoint saves under ZeRO-3, where the weights are partitioned (a
    collective: every rank joins the gather; None on the other ranks, and below ZeRO-3, where
    rank 0 holds every weight itself). The gathered tensors keep the weights' dtype (fp32:
    mixed precision is autocast), so nothing is rounded on the way to the checkpoint.

    An adapter checkpoint (lora, qlora) holds trainable weights only (peft saves its adapters
    and a new head), so rank 0 keeps only those: DeepSpeed still gathers each layer in turn,
    but no longer copies the whole frozen base into rank 0's memory for peft to drop. full and
    frozen save every weight, so every weight is kept."""
    if config.train.zero_stage != 3:
        return None
    adapters = config.model.method in ("lora", "qlora")
    return engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=adapters)


# A mid-epoch checkpoint's score: ranked last in either mode, so Ray Train keeps it only while it
# is the latest. Finite on purpose: a run's checkpoint list is saved as JSON, where NaN and inf
# come back as null, and a resumed driver's Ray Train then failed to rank its checkpoints.
_RANKED_LAST = {"max": -1e300, "min": 1e300}


def _report_state(engine, progress: TrainProgress, metric: str, mode: str, rank: int) -> None:
    """A mid-epoch checkpoint: state/ only, its `metric` the worst value (_RANKED_LAST); Tune's
    schedulers skip it (no "epoch"), and registration takes epoch ends only."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="raylift-state-") as directory:
        started = time.perf_counter()
        save_engine_state(engine, Path(directory) / STATE_DIR, progress, rank)
        _log_saved(directory, rank, started, f"epoch {progress.epoch} batch {progress.batches}")
        ray.train.report(
            {
                metric: _RANKED_LAST[mode],
                "checkpoint_epoch": progress.epoch,
                "checkpoint_batches": progress.batches,
            },
            checkpoint=ray.train.Checkpoint.from_directory(directory),
            checkpoint_dir_name=f"epoch{progress.epoch:03d}-batch{progress.batches:06d}",
        )


def _log_saved(directory: str, rank: int, started: float, what: str) -> None:
    if rank != 0:
        return
    size = sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())
    print(
        f"raylift.train: checkpoint at {what}: {size / 2**20:.1f} MiB on rank 0, "
        f"saved in {time.perf_counter() - started:.2f} s",
        flush=True,
    )


def save_engine_state(engine, state: Path, progress: TrainProgress, rank: int) -> None:
    """What resuming needs, into `state` (a collective: every rank calls it).

    DeepSpeed writes the trainable weights, the optimizer (each rank its ZeRO partition) and the
    LR schedule; frozen weights are left out (they come back from model.base). Each rank adds
    its torch RNG (dropout) and rank 0 the progress.
    """
    from safetensors.torch import save_file

    state.mkdir(parents=True, exist_ok=True)  # DeepSpeed creates it on rank 0 only
    engine.save_checkpoint(
        str(state), tag=_ENGINE_TAG, save_latest=False, exclude_frozen_parameters=True
    )
    save_file(_rng_state(), str(state / f"rng-rank{rank}.safetensors"))
    if rank == 0:
        (state / _PROGRESS_FILE).write_text(json.dumps(asdict(progress), allow_nan=True))


def load_engine_state(engine, state: Path) -> None:
    """Load what save_engine_state wrote into a freshly built engine (every rank)."""
    with _deepspeed_weights_only_load():
        path, _ = engine.load_checkpoint(
            str(state), tag=_ENGINE_TAG, custom_load_fn=_load_trainable_weights
        )
    if path is None:
        raise FileNotFoundError(f"{state} holds no DeepSpeed state under {_ENGINE_TAG}/")


def _load_trainable_weights(src: dict[str, torch.Tensor], dst: torch.nn.Module) -> None:
    """Load the saved trainable weights; anything else missing must be a frozen weight."""
    frozen = {name for name, param in dst.named_parameters() if not param.requires_grad}
    # A frozen 4-bit weight leaves its quantization state (weight.absmax, ...) in the saved
    # state dict: it is rebuilt from model.base with the weight, so it is not loaded.
    kept = {key: value for key, value in src.items() if not _belongs_to(key, frozen)}
    result = dst.load_state_dict(kept, strict=False)
    missing = sorted(set(result.missing_keys) - frozen)
    if missing or result.unexpected_keys:
        raise RuntimeError(
            "the checkpoint's engine state does not match the model: missing "
            f"{missing[:5]}, unexpected {sorted(result.unexpected_keys)[:5]}; was it saved "
            "with another model.* setting?"
        )


def _belongs_to(key: str, frozen: set[str]) -> bool:
    parts = key.split(".")
    return any(".".join(parts[:i]) in frozen for i in range(len(parts) - 1, 0, -1))


@contextlib.contextmanager
def _deepspeed_weights_only_load() -> Iterator[None]:
    """DeepSpeed 0.19 loads its files with torch's full unpickler, under which a pickle could
    run any code. Force torch's weights-only unpickler, allowing the few plain DeepSpeed classes
    its optimizer state holds (checked on ZeRO 0/2/3 by tests/unit/test_train_loop.py)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _load_rng(state: Path, rank: int) -> None:
    from safetensors.torch import load_file

    path = state / f"rng-rank{rank}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint is incomplete")
    saved = load_file(str(path))
    torch.set_rng_state(saved["torch"])
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["cuda"])


def _checkpoint_meta(
    inputs: LoopInputs, config: LifecycleConfig, metrics: dict, precision: str, tokenizer=None
) -> CheckpointMeta:
    """What the checkpoint says about itself; `precision` is the one training resolved to, and
    a causal LM's prompt template the one its `tokenizer` resolved to (what generation repeats)."""
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
        text_column=config.task.input_column,
        trained_precision=precision,
        instruct=_instruct_meta(config, tokenizer),
        metrics={k: v for k, v in metrics.items() if isinstance(v, int | float)},
        config=inputs.config,
        lineage=inputs.meta,
    )


def _instruct_meta(config: LifecycleConfig, tokenizer) -> InstructMeta | None:
    task = config.task
    if not is_generative(task.type) or tokenizer is None:
        return None
    return InstructMeta(
        template=instruct.resolve_template(tokenizer, task.prompt_template),
        prompt_column=task.prompt_column,
        response_column=task.response_column,
        system_column=task.system_column,
        packing=task.packing,
    )
