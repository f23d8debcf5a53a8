import os
import pickle
import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from jobs.config import ModelConfig, TrainConfig, validate_mapping
from jobs.modeling import build_model
from jobs.tasks import get_task
from jobs.train_loop import (
    INPUT_IDS,
    STATE_DIR,
    TARGETS,
    EpochLog,
    FirstBatchAhead,
    LoopInputs,
    TrainProgress,
    _belongs_to,
    _choose_cpu_allreduce,
    _consolidated_weights,
    _load_rng,
    _load_trainable_weights,
    _mid_epoch_checkpoint_due,
    _setup_engine,
    _steps_per_epoch,
    _train_epoch,
    deepspeed_config,
    epoch_stream,
    load_engine_state,
    pad_batch,
    read_progress,
    save_engine_state,
    windowed_batches,
)


def test_pad_batch_pads_to_longest_in_batch_only():
    out = pad_batch([np.array([5, 6, 7]), np.array([8])], pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_windowed_batches_bucket_by_length_and_keep_pairs():
    lengths = [5, 1, 4, 2, 3, 6]
    window = {
        INPUT_IDS: np.array([np.full(n, n) for n in lengths], dtype=object),
        TARGETS: np.array(lengths),
    }
    batches = list(windowed_batches(window, batch_size=2, rng=random.Random(0)))
    assert sorted(len(b[0]) for b in batches) == [2, 2, 2]
    seen = []
    for sequences, targets in batches:
        assert [len(s) for s in sequences] == list(targets)  # row and target stay together
        assert max(targets) - min(targets) == 1  # neighbours in length share a batch
        seen.extend(targets)
    assert sorted(seen) == sorted(lengths)


def test_deepspeed_config_follows_train_settings():
    config = deepspeed_config(TrainConfig(zero_stage=3, batch_size=8), "fp32")
    assert config["zero_optimization"]["stage"] == 3
    assert config["train_micro_batch_size_per_gpu"] == 8
    assert not config["torch_autocast"]["enabled"] and not config["fp16"]["enabled"]
    # bf16 is autocast over fp32 weights, never DeepSpeed's bf16 mode (which casts the weights).
    bf16 = deepspeed_config(TrainConfig(), "bf16")
    assert bf16["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "bf16" not in bf16 and not bf16["fp16"]["enabled"]


def test_precision_resolves_per_cpu_kind(monkeypatch):
    from cluster import hardware

    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    assert hardware.resolve_precision("auto", use_gpu=False) == "bf16"
    assert hardware.resolve_precision("fp32", use_gpu=False) == "fp32"
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    assert hardware.resolve_precision("auto", use_gpu=False) == "fp32"
    assert hardware.resolve_precision("bf16", use_gpu=False) == "fp32"  # emulated: refused


def test_native_bf16_can_be_forced_off_to_check_the_avx2_choices(monkeypatch):
    from cluster import hardware

    for forced, native in (("0", False), ("1", True)):
        monkeypatch.setenv(hardware.NATIVE_BF16_ENV, forced)
        hardware.cpu_has_native_bf16.cache_clear()
        assert hardware.cpu_has_native_bf16() is native
        assert hardware.resolve_precision("auto", use_gpu=False) == ("bf16" if native else "fp32")
    hardware.cpu_has_native_bf16.cache_clear()


# --- resuming: the state a checkpoint holds, and where an epoch picks up -----------------------


def _engine(base: str, method: str, stage: int, seed: int):
    import deepspeed

    torch.manual_seed(seed)
    config = ModelConfig(base=base, method=method, lora={"target_modules": ["query", "value"]})
    model = build_model(config, get_task("sequence-classification"), ["a", "b", "c"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _choose_cpu_allreduce(False)  # as _setup_engine does: gloo, no C++ op compiled
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: get_linear_schedule_with_warmup(opt, 2, 20),
        config=deepspeed_config(TrainConfig(zero_stage=stage, batch_size=4), "fp32"),
    )
    return engine


def _step(engine, seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 30, (4, 7), generator=generator)
    loss = engine(input_ids=ids, labels=torch.tensor([0, 1, 2, 0])).loss
    engine.backward(loss)
    engine.step()
    return float(loss)


def _trainable(engine) -> dict[str, torch.Tensor]:
    from deepspeed.utils import safe_get_full_fp32_param

    return {
        name: safe_get_full_fp32_param(param).clone()
        if hasattr(param, "ds_id")
        else param.detach().clone()
        for name, param in engine.module.named_parameters()
        if param.requires_grad
    }


@pytest.mark.parametrize(("method", "stage"), [("lora", 0), ("lora", 2), ("lora", 3), ("full", 2)])
def test_engine_state_resumes_training_exactly(process_group, tiny_bert, tmp_path, method, stage):
    """Saved after 3 steps and loaded into an engine built from another seed, the next step is
    the same step: weights, Adam moments, LR schedule, step count and dropout RNG all came back."""
    trained = _engine(tiny_bert, method, stage, seed=0)
    for i in range(3):
        _step(trained, seed=i)
    progress = TrainProgress(epoch=2, batches=3, loss_sum=4.5, rows=12, global_step=3)
    save_engine_state(trained, tmp_path / STATE_DIR, progress, rank=0)
    saved = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert {"state/progress.json", "state/rng-rank0.safetensors"} <= saved
    assert read_progress(tmp_path / STATE_DIR) == progress

    resumed = _engine(tiny_bert, method, stage, seed=99)
    assert not _same(_trainable(resumed), _trainable(trained))
    load_engine_state(resumed, tmp_path / STATE_DIR)
    _load_rng(tmp_path / STATE_DIR, rank=0)
    rng = torch.get_rng_state()
    assert _same(_trainable(resumed), _trainable(trained))
    assert resumed.global_steps == trained.global_steps == 3
    assert resumed.get_lr() == trained.get_lr()

    torch.set_rng_state(rng)
    expected = _step(trained, seed=7)
    torch.set_rng_state(rng)
    assert _step(resumed, seed=7) == pytest.approx(expected, abs=1e-6)
    assert _same(_trainable(resumed), _trainable(trained))  # the optimizer moments matched


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/raylift-pickle-ran",))


def test_engine_state_is_loaded_without_running_pickled_code(process_group, tiny_bert, tmp_path):
    engine = _engine(tiny_bert, "lora", 0, seed=0)
    save_engine_state(engine, tmp_path / STATE_DIR, TrainProgress(), rank=0)
    states = tmp_path / STATE_DIR / "engine" / "mp_rank_00_model_states.pt"
    tampered = torch.load(states, weights_only=False)
    tampered["payload"] = _Payload()
    torch.save(tampered, states)
    marker = Path("/tmp/raylift-pickle-ran")
    marker.unlink(missing_ok=True)
    with pytest.raises(pickle.UnpicklingError, match="weights_only|Unsupported global"):
        load_engine_state(_engine(tiny_bert, "lora", 0, seed=1), tmp_path / STATE_DIR)
    assert not marker.exists()
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # restored after loading


def test_engine_state_of_another_model_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].requires_grad_(False)
    saved = {"1.weight": torch.zeros(2, 2), "1.bias": torch.zeros(2)}
    _load_trainable_weights(saved, model)  # the frozen layer may be missing: it comes from base
    assert model[1].weight.abs().sum() == 0
    with pytest.raises(RuntimeError, match=r"missing \['1.bias'\]"):
        _load_trainable_weights({"1.weight": torch.zeros(2, 2)}, model)
    with pytest.raises(RuntimeError, match=r"unexpected \['2.weight'\]"):
        _load_trainable_weights({**saved, "2.weight": torch.zeros(2, 2)}, model)


def test_a_frozen_4bit_weights_quantization_state_is_not_loaded():
    frozen = {"base.layer.weight"}
    assert _belongs_to("base.layer.weight.absmax", frozen)
    assert _belongs_to("base.layer.weight.quant_state.bitsandbytes__nf4", frozen)
    assert not _belongs_to("base.layer.bias", frozen)
    assert not _belongs_to("base.layer.weight", frozen)  # itself: missing, never extra


def test_a_checkpoint_without_progress_says_it_cannot_be_resumed(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot be resumed from"):
        read_progress(tmp_path / STATE_DIR)


def test_a_finished_epoch_resumes_at_the_next_one():
    mid = TrainProgress(epoch=2, batches=5, loss_sum=3.0, rows=40, global_step=17, world_size=2)
    assert mid.resume_point() is mid
    done = TrainProgress(epoch=2, batches=9, epoch_done=True, global_step=21, world_size=2)
    assert done.resume_point() == TrainProgress(epoch=3, global_step=21, world_size=2)


def test_every_attempt_on_a_run_logs_each_epoch_once(tmp_path):
    """A first attempt logs epoch 1 and dies before its checkpoint reaches the driver; the next
    starts over (a Tune trial resumed without that checkpoint) on the same MLflow run and trains
    epochs 1 and 2: the run's history holds each epoch once, the first attempt's epoch 1."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("epochs")).info.run_id
    inputs = LoopInputs(config={}, labels=["a"], train_rows=1, tracking_uri=uri, run_id=run_id)

    EpochLog(inputs, TrainProgress()).log({"train_loss": 0.9, "epoch": 1}, 1)
    again = EpochLog(inputs, TrainProgress())
    again.log({"train_loss": 0.8, "epoch": 1}, 1)
    again.log({"train_loss": 0.5, "epoch": 2}, 2)
    # and one resumed from epoch 2's checkpoint logs epoch 3 only
    EpochLog(inputs, TrainProgress(epoch=3, global_step=6)).log({"train_loss": 0.4}, 3)

    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train_loss"))
    assert history == [(1, 0.9), (2, 0.5), (3, 0.4)]
    assert "epoch" not in client.get_run(run_id).data.metrics


def test_mid_epoch_checkpoints_follow_the_setting():
    every = TrainConfig(checkpoint_every_steps=3, max_steps_per_epoch=9)
    assert [s for s in range(1, 10) if _mid_epoch_checkpoint_due(every, s)] == [3, 6]
    assert not any(_mid_epoch_checkpoint_due(TrainConfig(), s) for s in range(1, 10))


class _Shard:
    """A training shard whose pass yields the same rows in the same order (preserve_order)."""

    def __init__(self, rows: int):
        self.rows = rows

    def iter_batches(self, *, batch_size, batch_format, local_shuffle_buffer_size, **kwargs):
        assert kwargs["local_shuffle_seed"] is not None  # seeded: the same order every pass
        rng = np.random.default_rng(kwargs["local_shuffle_seed"])
        order = rng.permutation(self.rows)
        for start in range(0, self.rows, batch_size):
            picked = order[start : start + batch_size]
            yield {
                INPUT_IDS: np.array([np.arange(1 + i % 5) + 5 for i in picked], dtype=object),
                TARGETS: picked,
            }


class _Engine:
    """Records the target rows of each step; the loss is a function of the batch."""

    global_rank, dp_world_size = 0, 1

    def __init__(self):
        self.steps: list[list[int]] = []
        self.global_steps = 0

    def train(self):
        pass

    def __call__(self, input_ids, attention_mask, labels):
        self._batch = labels.tolist()
        loss = torch.tensor(float(sum(self._batch)) / 100)
        return type("Out", (), {"loss": loss})()

    def backward(self, loss):
        pass

    def step(self):
        self.steps.append(self._batch)
        self.global_steps += 1

    def get_lr(self):
        return [0.1]


def test_a_resumed_epoch_skips_exactly_the_batches_already_trained(process_group):
    train = TrainConfig(batch_size=4, length_window=2, checkpoint_every_steps=2)
    saved: list[TrainProgress] = []
    whole = _Engine()
    full = _train_epoch(whole, _Shard(30), train, 0, TrainProgress(epoch=3), saved.append)
    assert full["train_steps"] == len(whole.steps) == 8
    # Every 2 steps, but not after step 8, the last: the epoch-end checkpoint comes next.
    assert [p.batches for p in saved] == [2, 4, 6]

    at = saved[1]  # a checkpoint after batch 4 of epoch 3
    assert (at.epoch, at.rows, at.global_step) == (3, sum(len(b) for b in whole.steps[:4]), 4)
    rest = _Engine()
    resumed = _train_epoch(rest, _Shard(30), train, 0, at, lambda progress: None)
    assert rest.steps == whole.steps[4:]  # the same batches, in the same order
    assert resumed["train_steps"] == 8  # the epoch's planned steps, counted across the restart
    assert resumed["train_loss"] == pytest.approx(full["train_loss"])  # over the whole epoch


class _ColdShard(_Shard):
    """A shard that says when its first window has been read (a cold Ray Data pass)."""

    def __init__(self, rows: int):
        super().__init__(rows)
        self.first_window_read = threading.Event()

    def iter_batches(self, **kwargs):
        for window in super().iter_batches(**kwargs):
            self.first_window_read.set()
            yield window


def test_the_first_batch_is_read_while_the_caller_works_and_the_epoch_is_unchanged(process_group):
    train = TrainConfig(batch_size=4, length_window=2)
    plain = _Engine()
    expected = _train_epoch(plain, _Shard(30), train, 0, TrainProgress(epoch=1), print)

    shard = _ColdShard(30)
    ahead = FirstBatchAhead(epoch_stream(shard, train, epoch=1))
    # Read on its own thread while this one builds the engine: nobody has asked for a batch.
    assert shard.first_window_read.wait(timeout=30)
    engine = _Engine()
    stats = _train_epoch(engine, shard, train, 0, TrainProgress(epoch=1), print, None, ahead)
    assert engine.steps == plain.steps  # the same batches in the same order
    assert stats["train_steps"] == expected["train_steps"] == 8
    assert stats["train_loss"] == pytest.approx(expected["train_loss"])


def test_first_batch_ahead_hands_on_errors_and_empty_streams():
    def broken():
        yield from ()
        raise OSError("the split coordinator died")

    failing = FirstBatchAhead(broken())
    with pytest.raises(OSError, match="coordinator died"):
        next(failing)
    assert list(FirstBatchAhead(iter(()))) == []
    assert list(FirstBatchAhead(iter([1, 2, 3]))) == [1, 2, 3]


# --- the LR schedule plans the steps the epochs run -------------------------------------------


def test_the_lr_schedule_ends_at_zero_on_the_last_step_trained(process_group, tiny_bert):
    """129 training rows over 2 workers, batches of 32: Ray Train's equal split gives each
    worker 64 rows, so an epoch is 2 steps, and the linear schedule planned from the row count
    ends at 0 after the 4 steps of 2 epochs (it planned 3 an epoch before, and ended at a third
    of the peak)."""
    config = validate_mapping(
        {
            "name": "schedule",
            "model": {"base": tiny_bert, "lora": {"target_modules": ["query", "value"]}},
            "train": {"batch_size": 32, "epochs": 2, "warmup_ratio": 0.0, "precision": "fp32"},
        }
    )
    inputs = LoopInputs(
        config=config.model_dump(mode="json"), labels=["a", "b", "c"], train_rows=129
    )
    engine, _ = _setup_engine(config, get_task("sequence-classification"), inputs, world_size=2)
    lrs = []
    for i in range(4):
        _step(engine, seed=i)
        lrs.append(engine.get_lr()[0])
    assert lrs[0] > 0 and lrs[-2] > 0
    assert engine.get_lr() == [0.0] * len(engine.get_lr())  # every group, the head's too


@pytest.mark.parametrize(
    ("rows", "workers", "batch", "window", "cap"),
    [
        (129, 2, 32, 8, None),  # 64 rows a worker: 2 full batches (planned 3 before)
        (130, 4, 8, 2, None),  # 32 a worker: 4 batches, windows of 16 rows
        (23, 2, 4, 1, None),  # 11 a worker: 2 full batches and one of 3
        (100, 1, 32, 2, None),  # one worker reads the whole split
        (129, 2, 8, 2, 5),  # capped below the 8 batches a worker's rows hold
    ],
)
def test_the_planned_steps_are_the_steps_an_epoch_runs(
    process_group, rows, workers, batch, window, cap
):
    train = TrainConfig(batch_size=batch, length_window=window, max_steps_per_epoch=cap)
    engine = _Engine()
    # One worker's shard of Ray Train's equal split: rows // workers (the split drops the rest).
    stats = _train_epoch(engine, _Shard(rows // workers), train, 0, TrainProgress(), print)
    assert stats["train_steps"] == len(engine.steps) == _steps_per_epoch(rows, workers, train)


def test_an_epoch_that_trains_no_batch_is_refused(process_group):
    """Fewer training rows than workers: every shard is empty and the epoch would report no
    step and a NaN loss, and its untrained model would be checkpointed and registered."""
    expected = r"epoch 1 trained no batch: .* load more rows or lower train\.num_workers"
    with pytest.raises(RuntimeError, match=expected):
        _train_epoch(_Engine(), _Shard(0), TrainConfig(batch_size=4), 0, TrainProgress(), print)


# --- what the epoch-end checkpoint gathers under ZeRO-3 ---------------------------------------


@pytest.mark.parametrize("method", ["lora", "frozen", "full"])
def test_zero3_gathers_the_weights_the_method_saves(process_group, tiny_bert, method):
    """An adapter checkpoint keeps trainable weights only, so rank 0 gathers those and not the
    frozen base; full and frozen checkpoints save every weight, so every weight is gathered,
    whole (each parameter at its full shape, not this rank's ZeRO-3 part)."""
    engine = _engine(tiny_bert, method, 3, seed=0)
    config = validate_mapping(
        {
            "name": "gather",
            "model": {"base": tiny_bert, "method": method},
            "train": {"zero_stage": 3},
        }
    )
    gathered = _consolidated_weights(engine, config)
    params = dict(engine.module.named_parameters())
    trainable = {name for name, param in params.items() if param.requires_grad}
    assert (len(trainable) < len(params)) == (method != "full")
    expected = trainable if method == "lora" else set(params)
    assert set(gathered) & set(params) == expected
    for name in expected:
        assert gathered[name].shape == params[name].ds_shape


@pytest.mark.parametrize(("buffer", "said"), [(16, True), (10_000, False)])
def test_a_cap_that_never_reaches_most_of_a_shard_is_said_once(
    process_group, tiny_bert, capsys, buffer, said
):
    """2 steps of 8 rows an epoch over a worker's 100 rows: every epoch reads its shard from the
    start, so with a 16-row shuffle buffer rows past about the 32nd are never trained on, and
    the run says so once. A buffer as large as the shard draws each epoch's 16 rows from all
    of it: nothing to say."""
    config = validate_mapping(
        {
            "name": "capped",
            "model": {"base": tiny_bert, "lora": {"target_modules": ["query", "value"]}},
            "train": {
                "batch_size": 8,
                "epochs": 2,
                "max_steps_per_epoch": 2,
                "shuffle_buffer_rows": buffer,
                "precision": "fp32",
            },
        }
    )
    inputs = LoopInputs(config=config.model_dump(mode="json"), labels=["a", "b"], train_rows=200)
    capsys.readouterr()
    _setup_engine(config, get_task("sequence-classification"), inputs, world_size=2)
    out = capsys.readouterr().out
    expected = "rows past about the first 32 of the 100 in each worker's shard are never trained"
    assert out.count(expected) == int(said)
