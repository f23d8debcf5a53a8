"""Shared fixtures: tiny models built in a temp dir, one local Ray per test session."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train's controller collects each worker's report (and notices a dead worker) once per
# health check, every 2 s by default, and a worker's next report waits for that collection:
# every checkpoint of a short test run waited about 1 s. Measured on the resilience run
# (2 cores, AVX512-BF16): 105 s at the default, 79 s at 0.25 s. A slow poll is an error only
# after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S (10 min), so polling often is safe.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Base models and checkpoints downloaded from object storage (cluster.storage.cached_folder)
# go to this session's folder, not ~/.cache/raylift; set at import, so every Ray process
# started later inherits it, and removed at the session's end.
_CACHE_DIR = tempfile.mkdtemp(prefix="raylift-test-cache-")
os.environ.setdefault("RAYLIFT_CACHE_DIR", _CACHE_DIR)

from tests.helpers import METRICS_EXPORT_INTERVAL_S, make_tiny_bert  # noqa: E402

# Ray's metrics export (its config read from the environment by every Ray process as it
# starts): a faster one only shortens the waits of the tests that scrape /metrics.
os.environ.setdefault("RAY_metrics_report_interval_ms", str(int(METRICS_EXPORT_INTERVAL_S * 1000)))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`make test` runs two pytest-xdist workers: one runs every test that uses Ray, in
    collection order, on the session's one Ray (ray_session; module fixtures, and a Serve
    instance handed from module to module), while the other runs the unit tests, which never
    start Ray and use one core. The Ray tests leave about a quarter of the 2 cores idle (waits
    on processes starting, on polls), and the unit tests alone took about 110 s of one core
    (AVX512-BF16, 2 cores). pytest-xdist's own --dist loadgroup would express this with
    markers, but it cannot rename test ids under pytest 9.2, so the Ray tests are one scope of
    its loadscope scheduling instead: the largest, handed out first.

    Tried and measured (2 cores, AVX512-BF16): the two-node test (its own cluster, no session
    Ray) on the unit tests' worker, beside the Ray tests. Four runs took 859-1,011 s against
    948-1,083 s for this split, on a machine that slowed through the session; fitted against
    the time, -27 +- 36 s. The two cores are busy enough that the tests beside it slowed by
    about what it saved."""
    from xdist.scheduler import LoadScopeScheduling

    class RayTestsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.startswith("tests/unit/"):
                return super()._split_scope(nodeid)
            return "tests using Ray"

    return RayTestsTogether(config, log)


# Serve's controller, proxy and replicas poll while idle: with one small app up, an idle Ray
# used 10.3 CPU-s a minute against 4.6 without Serve (2 cores, AVX512-BF16). The modules that
# serve therefore run last, together, so the one Serve they hand on is up only while they and
# the e2e tests (which serve too) run: the limits module first, since it needs a Serve of its
# own settings and shuts it down, then the ones sharing tests.helpers.SERVE_PORT.
_SERVING_LAST = ("tests/integration/test_serve_limits.py", "tests/integration/test_serve_")


def _run_order(item) -> int:
    path = item.nodeid.split("::")[0]
    if path.startswith("tests/e2e/"):
        return 3
    for rank, prefix in enumerate(_SERVING_LAST, start=1):
        if path.startswith(prefix):
            return rank
    return 0


def pytest_collection_modifyitems(config, items):
    items.sort(key=_run_order)  # stable: collection order within each group


@pytest.fixture(scope="session", autouse=True)
def _remove_the_download_cache():
    yield
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A random 2-layer BERT with a word-level tokenizer, saved as safetensors."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every integration and e2e test (starting Ray costs ~5 s here)."""
    import ray

    from cluster import init_ray

    init_ray()
    yield ray
    # A Serve handle this process used (the last modules leave their apps up) pushes metrics
    # from Serve's own thread; after ray.shutdown() that push called ray.init() again
    # (auto-connect) as the interpreter exited, and logged into closed streams (seen once in
    # three clean runs). serve.shutdown() shuts those handles down first.
    from ray import serve

    serve.shutdown()
    ray.shutdown()
