"""GPU tests (`make test-gpu`): skipped, with the reason, where torch sees no CUDA GPU.

They never start Ray, which a GPU machine may not have: the train loop's own functions run in a
one-rank NCCL process group on cuda:0, as one Ray Train worker with train.use_gpu runs them, and
the Predictor runs in this process. Nothing here imports ray, mlflow or pyiceberg.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

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
    import torch.distributed as dist

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}
    before = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    # DeepSpeed caches a clone of the world group: left stale, the next group's engines fail.
    from deepspeed.utils import groups

    groups._WORLD_GROUP = None
    groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None
    for key, value in before.items():
        if value is None:
            os.environ.pop(key)
        else:
            os.environ[key] = value
