"""Unit tests never start Ray: a call to ray.init fails the test.

Under `make test` they run on their own pytest-xdist worker beside the one that runs every Ray
test (tests/conftest.py), at a lower CPU priority: the Ray tests wait on processes and polls for
about a fifth of the suite, and the unit tests should fill those gaps, not slow the Ray tests,
whose chain is the suite's wall time."""

import contextlib
import os

import pytest

from tests.helpers import one_rank_process_group

# Linux schedules autogroups (one per session, /proc/sys/kernel/sched_autogroup_enabled) fairly
# against each other before it looks at a process's nice value, and a local Ray's processes run
# in sessions of their own. A nice value on this worker alone therefore changed nothing against
# them (it shares its session with the worker that drives the Ray tests). The worker takes a
# session of its own and lowers that autogroup's priority: nice 10 is a CPU weight of 110
# against 1024, about a tenth of a core while Ray's processes want both cores.
UNIT_WORKER_NICENESS = 10


@pytest.fixture(scope="session", autouse=True)
def _yield_the_cpu_to_the_ray_tests():
    if os.environ.get("PYTEST_XDIST_WORKER"):  # alone, there is nobody to yield to
        # Opened first: a session of its own at full priority would compete harder than before.
        with contextlib.suppress(OSError), open("/proc/self/autogroup", "w") as autogroup:
            os.setsid()
            autogroup.write(str(UNIT_WORKER_NICENESS))
        os.nice(UNIT_WORKER_NICENESS)  # within the session, and where autogroups are off
    yield


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch):
    import ray

    def _refuse(*args, **kwargs):
        raise RuntimeError("unit tests must not start Ray; move this test to tests/integration")

    monkeypatch.setattr(ray, "init", _refuse)


@pytest.fixture(scope="module")
def process_group():
    """A one-rank gloo process group, as DeepSpeed and the train loop's collectives need."""
    with one_rank_process_group("gloo", {"DS_ACCELERATOR": "cpu"}):
        yield
