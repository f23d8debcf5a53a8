"""Unit tests never start Ray: a call to ray.init fails the test."""

import pytest

from tests.helpers import one_rank_process_group


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
