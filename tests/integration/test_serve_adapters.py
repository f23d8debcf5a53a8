"""Many LoRA versions on one base in one replica of the app's Adapters deployment
(serving.adapter_server, Serve model multiplexing), on the shared Ray with a real MLflow
registry (SQLite): that deployment has no replica until a request names another version; each
version picked by path, alias or Serve's header answers with its own adapter and head; an LRU
cache of 2 holds 2 of 3 adapters and frees the evicted one; unknown versions and aliases are
404s, a version over another base or a full model a 409, and the replica keeps serving; the
Adapters replica's batches, queue and cache hits and misses are on Ray's /metrics page."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers import (
    METRICS_EXPORT_BOUND_S,
    biased_lora_copy,
    make_full_checkpoint,
    make_lora_checkpoint,
    make_tiny_bert,
    scrape_metrics,
)
from tests.helpers import SERVE_PORT as PORT

LABELS = ["card_arrival", "lost_or_stolen_card", "refund_not_showing_up", "exchange_rate"]
MODEL = "adapter-router"
CACHE = 2  # serve.max_adapters_per_replica
TEXT = {"texts": ["card arrived late"]}


def _config(root: Path, tiny_bert: str):
    from jobs.config import validate_mapping

    return validate_mapping(
        {
            "name": "adapters-test",
            "model": {"base": tiny_bert},
            "registry": {
                "tracking_uri": f"sqlite:///{root}/mlflow.db",
                "experiment": "adapters-test",
                "model_name": MODEL,
                "build_engines": False,
            },
            "serve": {
                "port": PORT,
                "num_cpus": 0.5,
                "torch_threads": 1,
                "precision": "fp32",
                "max_batch_size": 16,
                "batch_wait_timeout_s": 0.01,
                "max_adapters_per_replica": CACHE,
                "model_poll_interval_s": None,
                "autoscaling": {"min_replicas": 1, "max_replicas": 1},
            },
        }
    )


@pytest.fixture(scope="module")
def registry(ray_session, tiny_bert, tmp_path_factory):
    """(config, {version: expected label or None}): v1..v4 LoRA over the tiny base, each biased
    to its own label (v1 is @production, v4 @challenger), v5 LoRA over another base, v6 a full
    model."""
    from jobs import tracking
    from serving.registry import set_alias

    root = tmp_path_factory.mktemp("adapters")
    config = _config(root, tiny_bert)
    other_base = make_tiny_bert(root / "other-base")
    template = make_lora_checkpoint(tiny_bert, root / "template", LABELS)
    checkpoints = [biased_lora_copy(template, root / f"lora{k}", k) for k in range(4)]
    other = make_lora_checkpoint(other_base, root / "other-template", LABELS)
    checkpoints.append(biased_lora_copy(other, root / "other", 0))
    checkpoints.append(str(make_full_checkpoint(tiny_bert, root / "full", LABELS)))
    versions = []
    for checkpoint in checkpoints:
        with tracking.tracked_run(config, {}) as run_id:
            versions.append(tracking.register(config, run_id, checkpoint, {}, {}))
    assert versions == ["1", "2", "3", "4", "5", "6"], versions
    set_alias(MODEL, "production", "1")
    set_alias(MODEL, "challenger", "4")
    return config, {str(k + 1): LABELS[k] for k in range(4)}


@pytest.fixture(scope="module")
def endpoint(registry):
    from ray import serve

    from serving.app import deploy

    config, _ = registry
    url = deploy(config)
    yield url
    serve.delete(MODEL)  # Serve stays up for the next module (tests.helpers.SERVE_PORT)


def _post(url: str, path: str, headers: dict | None = None):
    import httpx

    return httpx.post(f"{url}/v1/models/{MODEL}/{path}", json=TEXT, headers=headers, timeout=60)


def _stats() -> dict:
    from ray import serve

    return serve.get_app_handle(MODEL).adapter_stats.remote().result(timeout_s=30)


def _running_replicas(deployment: str) -> int:
    from ray import serve

    states = serve.status().applications[MODEL].deployments[deployment].replica_states
    return states.get("RUNNING", 0)


def test_the_adapters_deployment_starts_with_the_first_request_for_another_version(endpoint):
    """The app's own version is answered by the ModelServer alone; the first request for
    another version starts an Adapters replica (serve.adapters_min_replicas 0), which answers
    it, not the ModelServer."""
    import httpx

    assert _post(endpoint, "predict").json()["model_version"] == "1"
    assert _running_replicas("Adapters") == 0, "an Adapters replica before any adapter request"
    answer = _post(endpoint, "versions/2/predict")
    assert answer.status_code == 200 and answer.json()["model_version"] == "2", answer.text
    assert _running_replicas("Adapters") == 1 and _running_replicas("ModelServer") == 1
    ingress = httpx.get(f"{endpoint}/v1/models/{MODEL}", timeout=30).json()["replica"]
    stats = _stats()
    assert stats["replica"] != ingress and stats["resident_versions"] == ["2"], stats


def test_each_version_answers_with_its_own_adapter(endpoint, registry):
    _, expected = registry
    for version, label in expected.items():
        answer = _post(endpoint, f"versions/{version}/predict")
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["model_version"] == version, body
        assert body["predictions"][0]["label"] == label, (version, body)

    plain = _post(endpoint, "predict").json()
    assert (plain["model_version"], plain["predictions"][0]["label"]) == ("1", LABELS[0])
    alias = _post(endpoint, "aliases/challenger/predict").json()
    assert (alias["model_version"], alias["predictions"][0]["label"]) == ("4", LABELS[3])
    header = _post(endpoint, "predict", headers={"serve_multiplexed_model_id": "3"}).json()
    assert (header["model_version"], header["predictions"][0]["label"]) == ("3", LABELS[2])


def test_concurrent_requests_for_different_adapters_share_batches(endpoint, registry):
    _, expected = registry
    asked = [str(1 + i % 3) for i in range(48)]  # the deployment's v1 and adapters v2, v3
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda v: _post(endpoint, f"versions/{v}/predict"), asked))
    for version, answer in zip(asked, answers, strict=True):
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert (body["model_version"], body["predictions"][0]["label"]) == (
            version,
            expected[version],
        )


def test_lru_cache_of_two_evicts_and_frees_the_least_recently_used(endpoint, registry):
    _, expected = registry

    def ask(version: str) -> float:
        started = time.perf_counter()
        answer = _post(endpoint, f"versions/{version}/predict")
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"][0]["label"] == expected[version]
        return time.perf_counter() - started

    ask("2"), ask("3")  # both resident now (cache of 2), whatever came before
    before = _stats()
    assert sorted(before["resident_versions"]) == ["2", "3"], before
    ask("2")  # a hit: 2 is now the most recently used
    cold = ask("4")  # a miss: evicts 3, the least recently used
    warm = ask("4")
    after = _stats()
    assert after["resident_versions"] == ["2", "4"], after
    assert (after["hits"] - before["hits"], after["misses"] - before["misses"]) == (2, 1)
    deadline = time.monotonic() + 10  # the evicted adapter is freed on the model thread
    while len(after["adapters_in_model"]) > CACHE:
        assert time.monotonic() < deadline, f"evicted adapter still in the model: {after}"
        time.sleep(0.2)
        after = _stats()
    assert after["frees"] > before["frees"], after
    ask("3")  # evicted, so loaded again (and 2 goes)
    again = _stats()
    assert again["misses"] - after["misses"] == 1 and again["resident_versions"] == ["4", "3"]
    print(
        f"\nadapters (tiny BERT): first request to a cold adapter {cold * 1000:.0f} ms, "
        f"warm {warm * 1000:.0f} ms; replica RSS {again['rss_mib']:.0f} MiB"
    )


# Versions and header values the refusals below name: none may become a metric label.
REFUSED_NAMES = ("99", "nowhere", "5", "6", "abc", "made-up-by-a-client")


def test_bad_versions_are_refused_with_the_reason_and_the_replica_keeps_serving(endpoint):
    before = _stats()
    unknown = _post(endpoint, "versions/99/predict")
    assert unknown.status_code == 404 and "no version 99" in unknown.json()["detail"], unknown.text
    alias = _post(endpoint, "aliases/nowhere/predict")
    assert alias.status_code == 404 and "alias 'nowhere'" in alias.json()["detail"], alias.text
    other_base = _post(endpoint, "versions/5/predict")
    assert other_base.status_code == 409, other_base.text
    assert "this deployment's base" in other_base.json()["detail"]
    full = _post(endpoint, "versions/6/predict")
    assert full.status_code == 409 and "not a LoRA adapter" in full.json()["detail"], full.text
    assert _post(endpoint, "versions/abc/predict").status_code == 422
    header = _post(endpoint, "predict", headers={"serve_multiplexed_model_id": "99"})
    assert header.status_code == 404, header.text
    made_up = _post(endpoint, "predict", headers={"serve_multiplexed_model_id": REFUSED_NAMES[-1]})
    assert made_up.status_code == 404, made_up.text
    # Refused at the ingress: the adapters' replica loaded nothing and freed nothing (Serve's
    # multiplexer frees its least recently used adapter before it loads another).
    after = _stats()
    same = ("resident_versions", "loads", "frees", "misses")
    assert {k: after[k] for k in same} == {k: before[k] for k in same}, (before, after)
    for version in ("1", "2"):
        assert _post(endpoint, f"versions/{version}/predict").status_code == 200


# The last test: the batches above have had time to be exported (METRICS_EXPORT_BOUND_S).


def test_the_adapters_batches_queue_and_cache_are_on_the_metrics_page(endpoint):
    """The Adapters replica records its own batches and queue (beside the ModelServer's, told
    apart by Serve's deployment tag) and its LRU cache's hits and misses."""
    from serving.app import metrics_url

    url = metrics_url()
    assert url, "no metrics export port on the session's Ray"

    def adapters(samples: list, name: str) -> float:
        return sum(
            s.value
            for s in samples
            if s.name == name
            and s.labels.get("application") == MODEL
            and s.labels.get("deployment") == "Adapters"
        )

    wanted = (
        "ray_raylift_batch_texts_count",
        "ray_raylift_batched_texts_total",
        "ray_raylift_adapter_cache_hits_total",
        "ray_raylift_adapter_cache_misses_total",
    )
    # Every text of the adapter requests above went through a batch: 32 of the 48 concurrent
    # ones alone asked for adapters (v2 and v3). An export can hold an earlier state of the
    # replica's series: wait for one that holds them all. The texts are counted by the
    # counter: the histogram's _sum is Ray's estimate from bucket midpoints (a batch of 1
    # adds 0.5), and a run with 45 adapter texts exported a _sum of 31.
    deadline = time.monotonic() + METRICS_EXPORT_BOUND_S
    while True:
        samples = scrape_metrics(url)
        seen = {name: adapters(samples, name) for name in wanted}
        if all(seen.values()) and seen["ray_raylift_batched_texts_total"] >= 32:
            break
        assert time.monotonic() < deadline, f"Adapters series missing or short: {seen}"
        time.sleep(1)
    stats = _stats()
    # each request of this module named one text: every adapter lookup is a text batched
    assert seen["ray_raylift_batched_texts_total"] <= stats["hits"] + stats["misses"], (
        seen,
        stats,
    )
    assert seen["ray_raylift_batch_texts_count"] <= seen["ray_raylift_batched_texts_total"]
    assert seen["ray_raylift_adapter_cache_misses_total"] <= stats["misses"], (seen, stats)
    queued = [
        s
        for s in samples
        if s.name == "ray_raylift_queued_texts" and s.labels.get("deployment") == "Adapters"
    ]
    assert queued and all(s.value >= 0 for s in queued), queued
    # Requests are counted under the version that answered, or the app's own for a refusal:
    # never under a version or header value a client made up (a label each, without end).
    labels = {
        s.labels.get("model_version")
        for s in samples
        if s.name == "ray_raylift_requests_total" and s.labels.get("application") == MODEL
    }
    assert labels and not labels & set(REFUSED_NAMES), labels
