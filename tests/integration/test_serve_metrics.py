"""The endpoint's Prometheus metrics, scraped where Ray exports its own (the node's metrics
export port, `serving.app.metrics_url`): the request counter grows by the requests sent, by
route, status and model version; latency, batch size, queue length and the model's runtime
are there too."""

from __future__ import annotations

import time

import pytest

from tests.helpers import make_lora_checkpoint

LABELS = ["card_arrival", "lost_or_stolen_card", "refund_not_showing_up"]
PORT = 8127
MODEL = "metrics-router"
PREDICT_ROUTE = "/v1/models/{model_name}/predict"
# Ray records metrics in each worker and exports them every few seconds (10 s by default).
EXPORT_BOUND_S = 45.0


@pytest.fixture(scope="module")
def endpoint(ray_session, tiny_bert, tmp_path_factory):
    from ray import serve

    from serving.app import deploy
    from tests.integration.test_serve_app import _config

    root = tmp_path_factory.mktemp("metrics")
    checkpoint = make_lora_checkpoint(tiny_bert, root / "tiny", LABELS)
    url = deploy(_config(MODEL, port=PORT), model_uri=checkpoint)
    yield url
    serve.delete(MODEL)
    serve.shutdown()


def _samples(metrics_url: str) -> list:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(metrics_url, timeout=30).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def _requests_counted(samples: list, status: str) -> float:
    return sum(
        s.value
        for s in samples
        if s.name == "ray_raylift_requests_total"
        and s.labels.get("application") == MODEL
        and s.labels.get("route") == PREDICT_ROUTE
        and s.labels.get("status") == status
        and s.labels.get("model_version") == "local"
    )


def test_the_request_counter_grows_by_the_requests_sent(endpoint):
    import httpx

    from serving.app import metrics_url

    url = metrics_url()
    assert url and url.startswith("http://") and url.endswith("/metrics"), url
    before = _requests_counted(_samples(url), "200")
    predict = f"{endpoint}/v1/models/{MODEL}/predict"
    for _ in range(5):
        assert httpx.post(predict, json={"texts": ["card arrived"]}, timeout=30).status_code == 200
    assert httpx.post(predict, json={"texts": []}, timeout=30).status_code == 422

    deadline = time.monotonic() + EXPORT_BOUND_S
    while (samples := _samples(url)) and _requests_counted(samples, "200") < before + 5:
        assert time.monotonic() < deadline, f"counter not up by 5 after {EXPORT_BOUND_S} s"
        time.sleep(1)
    deadline = time.monotonic() + EXPORT_BOUND_S
    while _requests_counted(samples, "422") < 1:
        assert time.monotonic() < deadline, "the 422 was not counted"
        time.sleep(1)
        samples = _samples(url)

    names = {s.name for s in samples if s.labels.get("application") == MODEL}
    assert {
        "ray_raylift_request_latency_s_bucket",
        "ray_raylift_batch_texts_bucket",
        "ray_raylift_queued_texts",
        "ray_raylift_model_info",
    } <= names, sorted(n for n in names if "raylift" in n)
    runtime = httpx.get(f"{endpoint}/v1/models/{MODEL}", timeout=30).json()
    info = [s for s in samples if s.name == "ray_raylift_model_info" and s.value == 1]
    assert info and {s.labels["engine"] for s in info} == {runtime["engine"]}
    assert {s.labels["precision"] for s in info} == {runtime["precision"]} == {"fp32"}
