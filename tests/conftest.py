"""Shared fixtures: tiny models built in a temp dir, one local Ray per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

from tests.helpers import make_tiny_bert  # noqa: E402


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
    ray.shutdown()
