"""GPU tests (`make test-gpu`): skipped, with the reason, where torch sees no CUDA GPU.

They never start Ray, which a GPU machine may not have: the train loop's own functions run in a
one-rank NCCL process group on cuda:0, as one Ray Train worker with train.use_gpu runs them, and
the Predictor runs in this process. Nothing here imports ray, mlflow or pyiceberg.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import one_rank_process_group

NO_GPU = "needs a CUDA GPU: torch.cuda.is_available() is False here (run make test-gpu on one)"


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here not in item.path.parents:
            continue
        item.add_marker(pytest.mark.gpu)
        if not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason=NO_GPU))


@pytest.fixture(scope="module")
def nccl_group():
    """A one-rank NCCL process group on cuda:0, as DeepSpeed and the loop's collectives need
    (tests/unit/conftest.py's process_group, with the backend a GPU worker gets)."""
    torch.cuda.set_device(0)
    with one_rank_process_group("nccl"):
        yield
