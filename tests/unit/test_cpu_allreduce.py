"""train.shm_allreduce: DeepSpeed's shared-memory allreduce only when asked (it JIT-compiles C++
in each fresh worker whose build cache is cold); gloo's otherwise. The train loop's one-process
tests (tests/unit/test_causal_lm_methods.py) check that the engine they build has no shm op."""

from __future__ import annotations

import deepspeed.ops
import pytest

from jobs.config import validate_mapping
from jobs.train_loop import _choose_cpu_allreduce, _shm_op_probed

SHM_OP = "deepspeed_shm_comm"


def test_the_shm_op_is_off_by_default_and_deepspeeds_own_probe_when_asked():
    config = validate_mapping({"name": "t", "model": {"base": "/nowhere"}})
    assert config.train.shm_allreduce is False
    probed = _shm_op_probed()
    try:
        _choose_cpu_allreduce(True)
        assert deepspeed.ops.__compatible_ops__[SHM_OP] is probed  # what DeepSpeed found here
        _choose_cpu_allreduce(False)
        assert deepspeed.ops.__compatible_ops__[SHM_OP] is False
        _choose_cpu_allreduce(True)  # turned back on: the probe, not the last value written
        assert deepspeed.ops.__compatible_ops__[SHM_OP] is probed
    finally:
        _choose_cpu_allreduce(False)


def test_a_non_boolean_value_names_the_key():
    with pytest.raises(ValueError, match=r"train\.shm_allreduce"):
        validate_mapping({"name": "t", "model": {"base": "/x"}, "train": {"shm_allreduce": "fast"}})
