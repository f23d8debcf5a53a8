"""Search hyperparameters with Ray Tune; register the winning trial's best checkpoint.

python -m jobs.tune --config configs/banking77/minilm_tune.yaml [key=value ...]

Give --resume as well to continue the search of this config whose driver died.

Every trial is one Ray Train run of the same `jobs.train_loop.train_func` (the TorchTrainer of
`jobs.finetune.build_trainer`, DeepSpeed included) over the same pinned Iceberg snapshot,
prepared once here; the trial's sample (random, or Optuna's TPE: tune.searcher) is applied to the
config as dotted-key overrides. ASHA stops weak trials on the per-epoch metric. One MLflow parent
run holds a nested run per trial.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from ray.tune import Callback

from cluster import init_ray
from cluster.runtime import progress_bars_wanted
from cluster.storage import delete_folder, filesystem_uri, read_json, write_json
from jobs import tracking
from jobs.config import LifecycleConfig, config_hash, with_overrides
from jobs.finetune import (
    build_trainer,
    checkpoint_folder,
    loop_inputs,
    register_once,
    train_env,
)
from jobs.halving import SyncHalving, rungs
from jobs.modeling import check_base_model
from jobs.rung_gate import NAMESPACE as _RUNS_NAMESPACE  # the rung gates' prefix too
from jobs.rung_gate import RungGate
from jobs.scheduler_stops import SchedulerStop, recorded_stop
from jobs.train_loop import REPORTED_METRICS
from jobs.training_data import (
    PreparedData,
    plan_split,
    prepare_training_data,
    scan_training_rows,
)
from jobs.warehouse._ray_internal import start_data_stats_actor
from serving import registry, tags

__all__ = ["TrialSummary", "TuneResult", "concurrent_trials", "experiment_name", "main"]

log = logging.getLogger(__name__)

# Ray Data stages each trial runs beside its workers: the Iceberg read task (1 CPU) and the
# tokenize tasks (0.5 CPU each). Ray schedules by logical CPUs, and each trial's Ray Data
# budget only leaves out its own trial's workers, so trials × (workers + data stages) must fit
# the cluster's CPUs, or a trial's read task waits behind another trial's workers. The
# embedded Ray advertises 2 logical CPUs per core (cluster/runtime.py): on 2 cores (4 logical
# CPUs) that is one trial of one 1-CPU worker (2.5), or two trials of 0.5-CPU workers (2 each).
# Measured on 2 cores with 4 tiny-BERT trials of one 0.5-CPU worker: 2 at a time (this rule)
# took 92 s; all 4 at once (the cap not applied) did not hang but took 125 s, the trials
# fighting for the same 2 cores.
_DATA_STAGE_CPUS = 1.5
_READ_TASK_CPUS = 1.0  # what must stay free for some trial's read task, whatever else waits
_TRIAL_DRIVER_CPUS = 0.01
_HOLD_FREE_MEMORY = 0.25  # of the node's memory, left free by holds (memory_allows_holding)
_STATE_FILE = "raylift_tune.json"
_OVERRIDES = "overrides"


@dataclass
class TrialSummary:
    trial_id: str
    run_id: str | None  # the trial's nested MLflow run
    status: str  # TERMINATED, ERROR
    epochs: int  # epochs the trial reported
    stopped_early: bool  # its scheduler (asha, sha) stopped it at a rung: jobs.scheduler_stops
    # ended before train.epochs without an error, and not by its scheduler: tune.time_budget_s
    # ran out (Tune stops the running trials itself), or it never reported
    cut_short: bool
    best_metric: float | None
    params: dict[str, Any]


@dataclass
class TuneResult:
    parent_run_id: str
    experiment_path: str
    model_name: str
    version: str
    winner_trial_id: str
    winner_run_id: str
    winner_params: dict[str, Any]
    metrics: dict[str, Any]
    checkpoint_path: str
    trials: list[TrialSummary] = field(default_factory=list)
    wall_s: float = 0.0


@dataclass(frozen=True)
class _TrialSetup:
    """What every trial needs besides its sample and the data (plain data: pickled to trials)."""

    base_config: dict[str, Any]
    tracking_uri: str
    mlflow_experiment_id: str
    parent_run_id: str
    lineage: dict[str, str]
    train_storage: str
    metric: str
    mode: str
    # Ray Train settings for each trial's run (set in the trial's actor, which Ray Train passes
    # on to the run's controller and workers): jobs.finetune.train_env
    train_env: dict[str, str] = field(default_factory=dict)


def main(config: LifecycleConfig, resume: bool = False) -> TuneResult:
    started = time.perf_counter()
    _require_search_space(config)
    check_base_model(config.model.base)  # fail before touching the cluster (lists an s3:// base)
    experiment = _experiment_path(config)
    state = _experiment_state(config, experiment, resume)
    # pyiceberg only: unusable data is refused before Ray. Resuming, the rest of the trials see
    # the snapshot the finished ones saw (the config itself, and so its hash, stay as given).
    pinned = {"data.snapshot_id": state["snapshot_id"]} if resume else {}
    rows = scan_training_rows(with_overrides(config, pinned))
    split = plan_split(config, rows)  # a training split too small for the workers: refused
    init_ray()
    start_data_stats_actor()  # from here, not from a trial: it would die with the trial
    data = prepare_training_data(config, rows, split)
    lineage = tracking.lineage_tags(config, data.lineage())
    with _parent_run(config, lineage, state.get("parent_run_id")) as parent_run_id:
        _write_state(experiment, parent_run_id, data.snapshot_id, finished=False)
        setup = _trial_setup(config, lineage, parent_run_id, experiment)
        try:
            grid = _tuner(config, data, setup, experiment, resume).fit()
        finally:
            _forget_assigned_runs(setup)
        trials = _summarize_trials(config, grid, setup)
        result = _register_winner(config, data, grid, setup, trials)
        _write_state(experiment, parent_run_id, data.snapshot_id, finished=True)
    result.wall_s = time.perf_counter() - started
    log.info(
        "tune: %d trials (%d stopped early by the scheduler, %d cut short by the search's end), "
        "winner %s registered as %s version %s (%s=%.4g)",
        len(trials),
        sum(t.stopped_early for t in trials),
        sum(t.cut_short for t in trials),
        result.winner_trial_id,
        result.model_name,
        result.version,
        setup.metric,
        result.metrics[setup.metric],
    )
    return result


def _require_search_space(config: LifecycleConfig) -> None:
    if not config.tune.search_space:
        raise ValueError(
            "tune.search_space is empty: add the keys to search, e.g. tune: {search_space: "
            "{train.learning_rate: {type: loguniform, low: 1.0e-4, high: 3.0e-3}}}"
        )


def experiment_name(config: LifecycleConfig) -> str:
    """Deterministic: the same config (model-shaping settings and tune section) names the same
    experiment, which is how `--resume` finds it."""
    search = json.dumps(config.tune.model_dump(mode="json"), sort_keys=True).encode()
    return f"{config.name}-tune-{config_hash(config)}-{hashlib.sha256(search).hexdigest()[:8]}"


def _experiment_path(config: LifecycleConfig) -> str:
    return checkpoint_folder(config, experiment_name(config))


# --- experiment state: what --resume needs besides Tune's own files ---------------------------


def _read_state(experiment: str) -> dict[str, Any] | None:
    return read_json(experiment, _STATE_FILE)


def _write_state(experiment: str, parent_run_id: str, snapshot_id: int, finished: bool) -> None:
    body = {"parent_run_id": parent_run_id, "snapshot_id": snapshot_id, "finished": finished}
    write_json(experiment, _STATE_FILE, body)


def _experiment_state(config: LifecycleConfig, experiment: str, resume: bool) -> dict[str, Any]:
    """The saved state to resume from; {} for a fresh start (a finished experiment is cleared)."""
    from ray import tune

    state = _read_state(experiment)
    restorable = state is not None and tune.Tuner.can_restore(experiment)
    if resume:
        if not restorable or state.get("finished"):
            raise ValueError(
                f"nothing to resume at {experiment}: no unfinished search of this config "
                "(same name, model settings and tune section); start one with raylift tune "
                "--config FILE (without --resume)"
            )
        log.info("resuming the search at %s (parent run %s)", experiment, state["parent_run_id"])
        return state
    if restorable and not state.get("finished"):
        raise ValueError(
            f"an unfinished search of this config is at {experiment}: continue it with "
            "raylift tune --config FILE --resume, or delete that folder to start over"
        )
    delete_folder(experiment)  # a finished search's trials are in MLflow and the registry
    return {}


@contextlib.contextmanager
def _parent_run(
    config: LifecycleConfig, lineage: dict[str, str], parent_run_id: str | None
) -> Iterator[str]:
    """The search's MLflow run: a new one, or (resuming) the one the dead driver started."""
    import mlflow

    if parent_run_id is not None:
        registry.configure_tracking(config.registry.tracking_uri, config.registry.experiment)
        with mlflow.start_run(run_id=parent_run_id):
            yield parent_run_id
        return
    with tracking.tracked_run(config, lineage) as run_id:
        mlflow.log_params(search_params(config))
        yield run_id


def search_params(config: LifecycleConfig) -> dict[str, str]:
    """The tune section as the parent run's params, with the metric and mode the search ranks
    by filled in where the config leaves them to promote (raylift report reads them)."""
    section = config.model_dump(mode="json", include={"tune"})
    section["tune"]["metric"] = config.tune.metric_name(config.promote)
    section["tune"]["mode"] = config.tune.mode_name(config.promote)
    return tracking.flat_params(section)


def _trial_setup(
    config: LifecycleConfig, lineage: dict[str, str], parent_run_id: str, experiment: str
) -> _TrialSetup:
    tracking_uri = registry.absolute_tracking_uri(config.registry.tracking_uri)
    base_config = config.model_dump(mode="json")
    # Tune runs each trial in its own working directory, so a relative sqlite URI would name a
    # new, empty database there: trials get the absolute one the driver resolved.
    base_config["registry"]["tracking_uri"] = tracking_uri
    return _TrialSetup(
        base_config=base_config,
        tracking_uri=tracking_uri,
        mlflow_experiment_id=registry.configure_tracking(
            config.registry.tracking_uri, config.registry.experiment
        ),
        parent_run_id=parent_run_id,
        lineage={
            **lineage,
            tags.TUNE_EXPERIMENT: experiment,
            tags.TUNE_PARENT_RUN_ID: parent_run_id,
        },
        train_storage=f"{experiment}/train",
        metric=config.tune.metric_name(config.promote),
        mode=config.tune.mode_name(config.promote),
        train_env=train_env(),
    )


# --- the search -------------------------------------------------------------------------------


def concurrent_trials(config: LifecycleConfig, cluster: dict[str, float]) -> int:
    """Trials at once: as many as the cluster's CPUs (and GPUs) fit, workers and data stages
    together (see _DATA_STAGE_CPUS), at most tune.max_concurrent_trials.

    A cap, as Ray Tune's own max_concurrent_trials is: never more than fit. Tune cannot hold
    the others back itself, since a trial asks it for a token CPU only (_TRIAL_DRIVER_CPUS);
    past what fits, every trial's workers are placed and no CPU is left for any trial's read
    task: they all wait, without an error (the hang cluster/runtime.py describes)."""
    train = config.train
    per_trial = train.num_workers * train.cpus_per_worker + _DATA_STAGE_CPUS
    fits = math.floor(cluster.get("CPU", 0.0) / per_trial)
    if train.use_gpu:
        fits = min(fits, math.floor(cluster.get("GPU", 0.0) / train.num_workers))
    fits = max(1, fits)
    wanted = config.tune.max_concurrent_trials or fits
    if wanted > fits:
        log.warning(
            "tune.max_concurrent_trials=%d: the cluster's %g CPUs fit %d trial(s) of %.1f CPUs "
            "(train.num_workers x train.cpus_per_worker + %.1f for its data stages) at once; "
            "running %d at a time. For more, add CPUs or give each trial fewer",
            wanted,
            cluster.get("CPU", 0.0),
            fits,
            per_trial,
            _DATA_STAGE_CPUS,
            fits,
        )
    return min(wanted, fits, config.tune.num_samples)


def _param_space(config: LifecycleConfig) -> dict[str, Any]:
    from ray import tune

    space = {}
    for key, dim in config.tune.search_space.items():
        if dim.type == "loguniform":
            space[key] = tune.loguniform(dim.low, dim.high)
        elif dim.type == "uniform":
            space[key] = tune.uniform(dim.low, dim.high)
        elif dim.type == "randint":
            space[key] = tune.randint(int(dim.low), int(dim.high) + 1)  # high included
        else:
            space[key] = tune.choice(dim.values)
    return {_OVERRIDES: space}


def held_trials(config: LifecycleConfig, cluster: dict[str, float], concurrent: int) -> int:
    """Trials the sha scheduler may park at rungs beside the `concurrent` running ones
    (jobs.halving). A parked trial keeps its workers' CPUs (and GPUs), and its data stages are
    idle; what the running trials' workers leave, less one read task's CPU (the running trials'
    read tasks must always find one, or they wait without an error), is what parked trials may
    keep. Their tokenize tasks then take turns, which the bench's epochs did not notice: data
    waits stayed about 1% of a step. At most what the first rung keeps, and at most
    tune.max_held_trials. On 2 cores (4 logical CPUs) with minilm_tune.yaml's trials of one
    0.5-CPU worker, 9 trials and factor 3: 3."""
    train, tune_config = config.train, config.tune
    per_worker_set = train.num_workers * train.cpus_per_worker + _TRIAL_DRIVER_CPUS
    spare = cluster.get("CPU", 0.0) - concurrent * per_worker_set - _READ_TASK_CPUS
    fits = math.floor(spare / per_worker_set + 1e-9)
    if train.use_gpu:
        gpus = cluster.get("GPU", 0.0) - concurrent * train.num_workers
        fits = min(fits, math.floor(gpus / train.num_workers))
    first_keep = max(1, math.floor(tune_config.num_samples / tune_config.asha.reduction_factor))
    wanted = first_keep if tune_config.max_held_trials is None else tune_config.max_held_trials
    return max(0, min(fits, wanted))


def memory_allows_holding() -> bool:
    """Whether this node can keep another held trial's memory (about 3.3 GB on
    minilm_tune.yaml): a quarter of its memory stays free. The driver's node: the embedded Ray's
    only one; on a cluster of several nodes, tune.max_held_trials caps the holds."""
    import psutil

    memory = psutil.virtual_memory()
    return memory.available >= _HOLD_FREE_MEMORY * memory.total


def _scheduler(
    config: LifecycleConfig, cluster: dict[str, float], concurrent: int, gate_prefix: str
):
    from ray.tune.schedulers import FIFOScheduler

    if config.tune.scheduler == "fifo":
        return FIFOScheduler()
    # Time is counted in epochs (the "epoch" metric train_func reports), not in Tune iterations:
    # a trial that continues its Train run after a pause or a failure reports the epochs it
    # really trained.
    if config.tune.scheduler == "sha":
        return SyncHalving(
            time_attr="epoch",
            max_t=config.train.epochs,
            grace_period=config.tune.asha.grace_period,
            reduction_factor=config.tune.asha.reduction_factor,
            num_trials=config.tune.num_samples,
            max_running=concurrent,
            gate_prefix=gate_prefix,  # each trial's workers wait there (_rung_gate)
            max_held=held_trials(config, cluster, concurrent),
            memory_allows=memory_allows_holding,
        )
    from jobs.asha import ResumableASHA  # ASHA whose rungs survive --resume

    return ResumableASHA(
        time_attr="epoch",
        max_t=config.train.epochs,
        grace_period=config.tune.asha.grace_period,
        reduction_factor=config.tune.asha.reduction_factor,
    )


def _search_alg(config: LifecycleConfig, concurrent: int):
    """What samples the trials, at most `concurrent` at once. The cap goes on the search
    algorithm: Tune ignores max_concurrent_trials (with a warning) beside a BasicVariantGenerator,
    and 4 tiny trials then all ran at once. Both kinds are saved in the experiment and restored
    by --resume (Tuner.restore) with what they had sampled and learned.

    Under scheduler sha the scheduler caps the running trials instead: a searcher counts paused
    trials as live, and a rung that waits for every trial would never see the last ones."""
    if config.tune.scheduler == "sha":
        concurrent = config.tune.num_samples
    if config.tune.searcher == "optuna":
        return _optuna_search(config, concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=config.tune.seed, max_concurrent=concurrent)


def _optuna_search(config: LifecycleConfig, concurrent: int):
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    # TPE models the results of finished trials, so it needs some to start from: Optuna's
    # default of 10 random trials would make a search of 10 or fewer plain random search.
    startup = min(10, max(1, math.ceil(config.tune.num_samples / 2)))
    sampler = optuna.samplers.TPESampler(seed=config.tune.seed, n_startup_trials=startup)
    # No space, metric or mode here: Tune hands over the TuneConfig's and converts the tune.*
    # domains of _param_space (keys "overrides/<dotted key>") into Optuna distributions.
    return ConcurrencyLimiter(OptunaSearch(sampler=sampler), max_concurrent=concurrent)


def _trainable(data: PreparedData, setup: _TrialSetup):
    from ray import tune

    # The trial's own actor only drives its Train run (waits on it), so it holds a token CPU
    # (Tune refuses an empty resource request) and the CPUs go to the workers and data stages
    # that concurrent_trials counts.
    trainable = tune.with_parameters(_run_trial, data=data, setup=setup)
    return tune.with_resources(trainable, {"cpu": _TRIAL_DRIVER_CPUS})


def _tuner(
    config: LifecycleConfig,
    data: PreparedData,
    setup: _TrialSetup,
    experiment: str,
    resume: bool,
):
    import ray
    from ray import tune

    trainable = _trainable(data, setup)
    if resume:
        # Finished trials keep their results; unfinished ones start their Train run again.
        return tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True)
    cluster = ray.cluster_resources()
    concurrent = concurrent_trials(config, cluster)
    log.info("tune: %d trials, %d at a time", config.tune.num_samples, concurrent)
    tables, epochs = progress_bars_wanted(), config.train.epochs
    storage, _, name = experiment.rpartition("/")
    return tune.Tuner(
        trainable,
        param_space=_param_space(config),
        tune_config=tune.TuneConfig(
            metric=setup.metric,
            mode=setup.mode,
            num_samples=config.tune.num_samples,
            scheduler=_scheduler(config, cluster, concurrent, setup.parent_run_id),
            search_alg=_search_alg(config, concurrent),
            time_budget_s=config.tune.time_budget_s,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=config.tune.max_failures),
            # On a terminal, Tune's own status tables; in a log (`ray job logs`, CI), where a
            # 30 s table of every trial and a boxed config per trial start bury the run, one
            # line per trial event instead (_TrialLines). Saved with the experiment: --resume
            # keeps the choice the search started with.
            verbose=1 if tables else 0,
            callbacks=[_TrialRuns(setup), *([] if tables else [_TrialLines(setup.metric, epochs)])],
        ),
    )


def _run_trial(sample: dict[str, Any], *, data: PreparedData, setup: _TrialSetup) -> None:
    """One trial: the base config with this sample applied, trained by one Ray Train run."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    overrides = dict(sample[_OVERRIDES])
    config = _trial_config(setup, overrides)
    trial_id = tune.get_context().get_trial_id()
    os.environ.update(setup.train_env)  # read by trainer.fit(), passed on to the run
    # A trial started again (after the sha scheduler paused it at a rung, after a failure, or
    # by --resume) continues its own MLflow run and its own Train run: a trainer of the same
    # name resumes from the latest checkpoint (engine state, epoch, data position), and
    # train_func reports the epochs that follow it. The driver picked the run (_TrialRuns).
    run_id = _assigned_run(setup, trial_id)
    meta = {**setup.lineage, tags.CONFIG_HASH: config_hash(config), tags.TUNE_TRIAL_ID: trial_id}
    gate = _rung_gate(config, setup, trial_id)
    trainer = build_trainer(
        config,
        data,
        replace(loop_inputs(config, data, meta, run_id), rung_gate=gate),
        name=f"{trial_id}-{run_id[:8]}",
        storage_path=setup.train_storage,
        metric=setup.metric,
        mode=setup.mode,
        callbacks=[TuneReportCallback()],
    )
    # The run's end status is the driver's to set (_summarize_trials), from Tune's verdict: a
    # trial the scheduler stops is torn down while its fit() unwinds, and a FAILED written from
    # here could land after the driver had already closed the run as FINISHED (seen in CI).
    trainer.fit()


def _rung_gate(config: LifecycleConfig, setup: _TrialSetup, trial_id: str) -> RungGate | None:
    """Where the trial's workers wait at each rung for the sha scheduler's verdict (a rung it
    holds them at, jobs.halving); other schedulers decide without holding anyone."""
    if config.tune.scheduler != "sha":
        return None
    asha = config.tune.asha
    epochs = rungs(asha.grace_period, asha.reduction_factor, config.train.epochs)
    return RungGate(prefix=setup.parent_run_id, trial_id=trial_id, epochs=tuple(epochs))


def _trial_config(setup: _TrialSetup, overrides: dict[str, Any]) -> LifecycleConfig:
    """The search's config with a trial's sample applied."""
    return with_overrides(LifecycleConfig.model_validate(setup.base_config), overrides)


def _run_key(setup: _TrialSetup, trial_id: str) -> bytes:
    return f"{setup.parent_run_id}/{trial_id}".encode()


def _assigned_run(setup: _TrialSetup, trial_id: str) -> str:
    """The trial's MLflow run, which the driver chose before the trial started."""
    from ray.experimental import internal_kv

    run_id = internal_kv._internal_kv_get(_run_key(setup, trial_id), namespace=_RUNS_NAMESPACE)
    if run_id is None:
        raise RuntimeError(f"trial {trial_id}: the tune driver assigned it no MLflow run")
    return run_id.decode()


def _forget_assigned_runs(setup: _TrialSetup) -> None:
    from ray.experimental import internal_kv

    prefix = _run_key(setup, "")
    internal_kv._internal_kv_del(prefix, del_by_prefix=True, namespace=_RUNS_NAMESPACE)


class _TrialRuns(Callback):
    """In the driver, as Tune starts a trial and before its function runs: the trial's nested
    MLflow run (its own earlier one when it is started again, or a new one with its params),
    handed to the trial through Ray's key-value store. The driver has MLflow open already; each
    trial's actor opening it cost about 2.3 CPU-s per trial start (import, SQLite store, run;
    AVX512-BF16, 2 cores)."""

    def __init__(self, setup: _TrialSetup):
        self._setup = setup
        self._client = None

    def __getstate__(self) -> dict:  # saved with the experiment, restored by --resume
        return {**self.__dict__, "_client": None}

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        from mlflow import MlflowClient
        from ray.experimental import internal_kv

        setup = self._setup
        self._client = self._client or MlflowClient(setup.tracking_uri)
        earlier = _trial_runs(self._client, setup, trial.trial_id).get(trial.trial_id)
        if earlier:
            run_id = earlier[0].info.run_id
            log.info("trial %s: continuing run %s from its latest checkpoint", trial, run_id)
        else:
            overrides = dict(trial.config[_OVERRIDES])
            config = _trial_config(setup, overrides)
            run_id = _start_trial_run(self._client, setup, trial.trial_id, config, overrides)
        internal_kv._internal_kv_put(
            _run_key(setup, trial.trial_id), run_id, overwrite=True, namespace=_RUNS_NAMESPACE
        )


class _TrialLines(Callback):
    """One log line per trial event, in the driver: started (with its sample), each epoch's
    metric, ended (all its epochs, or stopped early by the scheduler) or failed, with how many
    trials are running, waiting and done."""

    def __init__(self, metric: str, epochs: int):
        self._metric = metric
        self._epochs = epochs

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        sample = ", ".join(f"{k}={_short(v)}" for k, v in trial.config[_OVERRIDES].items())
        log.info("tune: trial %s started: %s (%s)", trial.trial_id, sample, _others(trials, trial))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        value = result.get(self._metric)
        if value is not None:
            epoch = result.get("epoch", result.get("training_iteration"))
            log.info("tune: trial %s epoch %s: %s %.4g", trial.trial_id, epoch, self._metric, value)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        epoch = result.get("epoch")
        stop = _scheduler_stop(trial)
        if stop is not None:
            how = f"stopped early after epoch {stop.epoch} by {stop.scheduler}"
        elif epoch is None:  # stopped before its first report
            how = "stopped before its first epoch"
        elif epoch == self._epochs:
            how = f"finished its {epoch} epochs"
        else:
            how = f"ended after epoch {epoch}, not stopped by its scheduler"
        value = _short(result.get(self._metric, "-"))
        others = _others(trials, trial)
        log.info("tune: trial %s %s, %s %s (%s)", trial.trial_id, how, self._metric, value, others)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        log.warning("tune: trial %s failed (%s)", trial.trial_id, _others(trials, trial))


def _scheduler_stop(trial: Any) -> SchedulerStop | None:
    try:
        return recorded_stop(trial.path, trial.storage.storage_filesystem)
    except (OSError, AttributeError, RuntimeError):  # no trial folder yet: it never reported
        return None


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _others(trials: list, trial: Any) -> str:
    """How many trials besides `trial` run, wait (pending or paused) and are done (failed ones
    included, and counted apart)."""
    statuses = [t.status for t in trials if t is not trial]
    running = statuses.count("RUNNING")
    waiting = statuses.count("PENDING") + statuses.count("PAUSED")
    failed = statuses.count("ERROR")
    done = statuses.count("TERMINATED") + failed
    counts = f"others: {running} running, {waiting} waiting, {done} done"
    return f"{counts} ({failed} failed)" if failed else counts


def _start_trial_run(
    client, setup: _TrialSetup, trial_id: str, config: LifecycleConfig, overrides: dict
) -> str:
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    run = client.create_run(
        setup.mlflow_experiment_id,
        run_name=f"trial-{trial_id}",
        tags={MLFLOW_PARENT_RUN_ID: setup.parent_run_id, tags.TUNE_TRIAL_ID: trial_id},
    )
    params = tracking.flat_params(config.model_dump(include={"model", "train", "data", "task"}))
    params.update({f"search.{key}": str(value) for key, value in overrides.items()})
    from mlflow.entities import Param

    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    return run.info.run_id


# --- after the search -------------------------------------------------------------------------


def _trial_runs(client, setup: _TrialSetup, trial_id: str | None = None) -> dict[str, list[Any]]:
    """trial id → its nested runs, newest first (one trial, or every trial of the search)."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    query = f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{setup.parent_run_id}'"
    if trial_id is not None:
        query += f" and tags.`{tags.TUNE_TRIAL_ID}` = '{trial_id}'"
    runs = client.search_runs([setup.mlflow_experiment_id], filter_string=query, max_results=10_000)
    by_trial: dict[str, list[Any]] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time, reverse=True):
        by_trial.setdefault(run.data.tags.get(tags.TUNE_TRIAL_ID, ""), []).append(run)
    return by_trial


def _summarize_trials(config: LifecycleConfig, grid, setup: _TrialSetup) -> list[TrialSummary]:
    """Close each trial's nested run with how it ended (a stopped trial's actor never could)."""
    from mlflow import MlflowClient

    client = MlflowClient(setup.tracking_uri)
    runs = _trial_runs(client, setup)
    summaries = []
    for result in grid:
        summary = _summary(config, result, setup, runs)
        summaries.append(summary)
        for stale in runs.get(summary.trial_id, [])[1:]:  # attempts a dead driver left behind
            if stale.info.status == "RUNNING":
                client.set_terminated(stale.info.run_id, "KILLED")
        if summary.run_id is None:
            continue
        client.set_tag(summary.run_id, tags.TUNE_TRIAL_EPOCHS, str(summary.epochs))
        client.set_tag(summary.run_id, tags.TUNE_STOPPED_EARLY, str(summary.stopped_early).lower())
        # A trial the scheduler stopped had its Train run cut short (its actor may have marked
        # it FAILED on the way out): Tune's verdict is the one recorded.
        client.set_terminated(summary.run_id, "FAILED" if summary.status == "ERROR" else "FINISHED")
    return summaries


def _summary(config: LifecycleConfig, result, setup: _TrialSetup, runs) -> TrialSummary:
    frame = result.metrics_dataframe
    trial_id = str((result.metrics or {}).get("trial_id") or result.path.rsplit("/", 1)[-1])
    epochs = int(frame["epoch"].max()) if frame is not None and "epoch" in frame else 0
    best = None
    if frame is not None and setup.metric in frame:
        values = frame[setup.metric].dropna()
        best = float(values.max() if setup.mode == "max" else values.min()) if len(values) else None
    attempts = runs.get(trial_id, [])
    # What its scheduler decided, not the epochs: a trial tune.time_budget_s cut also has fewer.
    stopped = recorded_stop(result.path, result.filesystem) is not None
    return TrialSummary(
        trial_id=trial_id,
        run_id=attempts[0].info.run_id if attempts else None,
        status="ERROR" if result.error else "TERMINATED",
        epochs=epochs,
        stopped_early=stopped,
        cut_short=not stopped and result.error is None and epochs < config.train.epochs,
        best_metric=best,
        params=dict((result.config or {}).get(_OVERRIDES, {})),
    )


def _best_report(grid, setup: _TrialSetup) -> tuple[Any, dict[str, Any]]:
    """(result, reported row) of the best epoch of any trial, among rows with a checkpoint."""
    best = None
    for result in grid:
        frame = result.metrics_dataframe
        if frame is None or setup.metric not in frame or "checkpoint_path" not in frame:
            continue
        for row in frame.dropna(subset=[setup.metric, "checkpoint_path"]).to_dict("records"):
            value = row[setup.metric]
            if best is None or (value > best[1][setup.metric]) == (setup.mode == "max"):
                best = (result, row)
    if best is None:
        raise RuntimeError(
            f"no trial reported {setup.metric!r} with a checkpoint; see the trial errors above "
            "(tune.metric must be a metric the task reports, e.g. val_accuracy)"
        )
    return best


def _register_winner(
    config: LifecycleConfig,
    data: PreparedData,
    grid,
    setup: _TrialSetup,
    trials: list[TrialSummary],
) -> TuneResult:
    from ray.train import Checkpoint

    _, row = _best_report(grid, setup)
    winner = next(t for t in trials if t.trial_id == row["trial_id"])
    winner_config = with_overrides(config, winner.params)
    version_tags = {
        **tracking.lineage_tags(winner_config, data.lineage()),
        tags.TUNE_EXPERIMENT: setup.lineage[tags.TUNE_EXPERIMENT],
        tags.TUNE_PARENT_RUN_ID: setup.parent_run_id,
        tags.TUNE_TRIAL_ID: winner.trial_id,
    }
    metrics = {k: v for k, v in row.items() if isinstance(v, int | float) and k in REPORTED_METRICS}
    import pyarrow.fs

    fs, _ = pyarrow.fs.FileSystem.from_uri(setup.train_storage)
    checkpoint = Checkpoint(row["checkpoint_path"], filesystem=fs)
    # Once: a driver that died while registering (the state is marked finished after it), and
    # was resumed, finds the version it made from this trial's run for this search.
    version = register_once(
        config,
        winner.run_id,
        checkpoint,
        version_tags,
        metrics,
        same_tags=(tags.TUNE_PARENT_RUN_ID,),
    )
    return TuneResult(
        parent_run_id=setup.parent_run_id,
        experiment_path=setup.lineage[tags.TUNE_EXPERIMENT],
        model_name=config.registry.model_name,
        version=version,
        winner_trial_id=winner.trial_id,
        winner_run_id=winner.run_id,
        winner_params=winner.params,
        metrics=metrics,
        checkpoint_path=filesystem_uri(fs, row["checkpoint_path"]),  # s3://... on S3
        trials=trials,
    )


if __name__ == "__main__":
    import functools
    import sys

    from jobs.cli import run_job

    if "--resume" in sys.argv:  # run_job parses --config and overrides only
        sys.argv.remove("--resume")
        main = functools.partial(main, resume=True)
    run_job(main, __doc__)
