"""The endpoint follows the alias under load, on the shared Ray with a real MLflow registry
(SQLite): two registered tiny versions, two replicas; /readyz is 503 until the model is warm;
promote v2 then roll back to v1 while a bounded client keeps asking, without a failed request;
a replica killed under load (ray.kill) costs at most 0.5% of the requests and comes back on the
same version."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest

from serving import tags
from tests.helpers import SERVE_PORT as PORT
from tests.helpers import (
    biased_lora_copy,
    make_full_checkpoint,
    make_lora_checkpoint,
    session_ray_address,
)

LABELS = ["card_arrival", "lost_or_stolen_card", "refund_not_showing_up"]
MODEL = "swap-router"
REPLICAS = 2
SWITCH_BOUND_S = 30.0  # from the alias move to every replica answering with the new version
SAME_ROWS = {  # both versions evaluated on the same rows: promote compares stored figures
    tags.ICEBERG_TABLE: "support.tickets",
    tags.ICEBERG_SNAPSHOT_ID: "1",
    tags.VALIDATION_SPLIT: "fraction=0.1,seed=17",
}


# -- a bounded load client -----------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    sent: float  # time.monotonic() when the request left
    received: float
    status: int  # 0: no HTTP answer (connection error, client timeout)
    version: str | None
    label: str | None = None  # what the version answered: each version has its own


class LoadClient:
    """`threads` clients on 127.0.0.1, each sending one-text predict requests back to back
    until stopped, `max_requests` in all or `max_s` seconds; every answer is recorded."""

    def __init__(self, url: str, threads: int = 3, max_requests: int = 20_000, max_s=120.0):
        self._url, self._threads, self._max_s = url, threads, max_s
        self._left = max_requests
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.answers: list[Answer] = []
        self._workers = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> LoadClient:
        self._deadline = time.monotonic() + self._max_s
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=60)

    def _take(self) -> bool:
        with self._lock:
            self._left -= 1
            return self._left >= 0

    def _run(self) -> None:
        import httpx

        with httpx.Client(timeout=30) as http:
            while not self._stop.is_set() and time.monotonic() < self._deadline and self._take():
                sent = time.monotonic()
                version = label = None
                try:
                    response = http.post(self._url, json={"texts": ["card arrived late"]})
                    status = response.status_code
                    if status == 200:
                        body = response.json()
                        version, label = body["model_version"], body["predictions"][0]["label"]
                except httpx.HTTPError:
                    status = 0
                with self._lock:
                    self.answers.append(Answer(sent, time.monotonic(), status, version, label))

    def snapshot(self) -> list[Answer]:
        with self._lock:
            return list(self.answers)


# -- the registry and the app ----------------------------------------------------------------


def _config(root, tiny_bert: str):
    from jobs.config import validate_mapping

    return validate_mapping(
        {
            "name": "swap-test",
            "model": {"base": tiny_bert},
            "registry": {
                "tracking_uri": f"sqlite:///{root}/mlflow.db",
                "experiment": "swap-test",
                "model_name": MODEL,
                "build_engines": False,  # not about engines: spare the export at each version
            },
            "promote": {"min_value": 0.5, "max_regression": 0.05},
            "serve": {
                "port": PORT,
                "num_cpus": 0.5,
                "torch_threads": 1,
                "precision": "fp32",
                "max_batch_size": 8,
                "batch_wait_timeout_s": 0.01,
                # Only promote and rollback move the app here: a switch proves they told it.
                "model_poll_interval_s": None,
                "autoscaling": {"min_replicas": REPLICAS, "max_replicas": REPLICAS},
            },
        }
    )


def _register(config, checkpoint: str, accuracy: float) -> str:
    from jobs import tracking

    with tracking.tracked_run(config, SAME_ROWS) as run_id:
        metrics = {"val_accuracy": accuracy, "val_loss": 1 - accuracy, "epoch": 1}
        return tracking.register(config, run_id, checkpoint, SAME_ROWS, metrics)


# What each version answers for any text: a response's label shows which one computed it.
ANSWERS = {"1": LABELS[0], "2": LABELS[2]}


def _full_answering(tiny_bert: str, directory, label: int) -> str:
    """A whole-model checkpoint (method=full) whose head answers LABELS[label] for any text."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert, num_labels=len(LABELS), use_safetensors=True
    )
    with torch.no_grad():
        model.classifier.bias.zero_()
        model.classifier.bias[label] = 20.0
    return str(make_full_checkpoint(tiny_bert, directory, LABELS, model=model))


@pytest.fixture(scope="module")
def lifecycle(ray_session, tiny_bert, tmp_path_factory):
    """(config, v1, v2): v1 a LoRA adapter answering LABELS[0], v2 a whole model answering
    LABELS[2] (which the adapters' replicas cannot serve: asked of them, it is a 409), v1 at
    @production."""
    from jobs import promote

    root = tmp_path_factory.mktemp("swap")
    config = _config(root, tiny_bert)
    template = make_lora_checkpoint(tiny_bert, root / "tiny", LABELS)
    v1 = _register(config, biased_lora_copy(template, root / "v1", 0), 0.90)
    v2 = _register(config, _full_answering(tiny_bert, root / "v2", 2), 0.91)
    assert (v1, v2) == ("1", "2")
    promote.main(config, version=v1)
    return config, v1, v2


@pytest.fixture(scope="module")
def endpoint(lifecycle):
    """Base URL; the app is started without waiting, and /readyz polled from the first moment
    (the statuses and details seen are kept on the URL's `readiness` list)."""
    from ray import serve

    from serving.app import build_app

    config, _, _ = lifecycle
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    target = serve.RunTarget(build_app(config), name=MODEL, route_prefix="/")
    serve.run_many([target], wait_for_applications_running=False)
    url = f"http://127.0.0.1:{PORT}"
    readiness = _poll_readyz(url)
    _replica_versions(url, want=REPLICAS)  # every replica loaded
    yield url, readiness
    serve.delete(MODEL)  # Serve itself stays up for the next module (tests.helpers.SERVE_PORT)


def _poll_readyz(url: str, timeout_s: float = 120) -> list[tuple[int, str]]:
    import httpx

    seen: list[tuple[int, str]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/readyz", timeout=10)
            seen.append((response.status_code, response.text))
            if response.status_code == 200:
                return seen
        except httpx.HTTPError as exc:
            seen.append((0, str(exc)))
        time.sleep(0.05)
    raise AssertionError(f"/readyz not 200 after {timeout_s} s: last {seen[-3:]}")


def _replica_versions(url: str, want: int, timeout_s: float = 120) -> dict[str, str]:
    """{replica id: version} from GET /v1/models/{name}, once `want` replicas have answered."""
    import httpx

    found: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while len(found) < want:
        assert time.monotonic() < deadline, f"only replicas {found} answered in {timeout_s} s"
        info = httpx.get(f"{url}/v1/models/{MODEL}", timeout=30).json()
        found[info["replica"]] = info["version"]
    return found


def _wait_every_replica_on(url: str, version: str, timeout_s: float = SWITCH_BOUND_S) -> float:
    """The time every replica has been seen answering with `version` (asked again and again,
    since each GET reaches one replica)."""
    import httpx

    on_it: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while len(on_it) < REPLICAS:
        assert time.monotonic() < deadline, f"only {on_it} on version {version} in {timeout_s} s"
        info = httpx.get(f"{url}/v1/models/{MODEL}", timeout=30).json()
        if info["version"] == version:
            on_it.add(info["replica"])
        else:
            time.sleep(0.05)
    return time.monotonic()


# -- the tests -------------------------------------------------------------------------------


def test_readyz_is_503_until_the_model_is_warm(endpoint, lifecycle):
    import httpx

    url, readiness = endpoint
    _, v1, _ = lifecycle
    loading = [text for status, text in readiness if status == 503 and "loading" in text]

    assert loading, f"never saw a 503 while the model loaded: {readiness[:5]}"
    assert readiness[-1][0] == 200 and f'"model_version":"{v1}"' in readiness[-1][1]
    assert httpx.get(f"{url}/healthz", timeout=10).json() == {"status": "ok"}


def test_promote_and_rollback_swap_versions_under_load_without_a_failure(endpoint, lifecycle):
    """Clients of the plain route and of the alias route (/aliases/production/predict) alike:
    during the swap the alias names a version the replica is still loading, which it waits
    for rather than pass to the adapters' replicas (v2 is a whole model: a 409 there)."""
    from jobs import promote, rollback

    url, _ = endpoint
    config, v1, v2 = lifecycle
    routes = {
        "plain": f"{url}/v1/models/{MODEL}/predict",
        "alias": f"{url}/v1/models/{MODEL}/aliases/production/predict",
    }
    with LoadClient(routes["plain"], threads=2) as plain, LoadClient(routes["alias"], 2) as alias:
        time.sleep(2)
        promoted_at = time.monotonic()
        promote.main(config, version=v2)
        switched_at = _wait_every_replica_on(url, v2)
        time.sleep(2)
        rolled_back_at = time.monotonic()
        rollback.main(config, reason="hot swap test")
        back_at = _wait_every_replica_on(url, v1)
        time.sleep(2)
    print(
        f"swap: every replica on v2 {switched_at - promoted_at:.1f} s after promote, back on "
        f"v1 {back_at - rolled_back_at:.1f} s after rollback"
    )
    for route, answers in (("plain", plain.answers), ("alias", alias.answers)):
        failed = [a for a in answers if a.status != 200]
        print(f"swap, {route} route: {len(answers)} requests, {len(failed)} failed")
        assert not failed, f"{route}: {len(failed)} of {len(answers)} failed: {failed[:3]}"
        assert len(answers) > 30, f"{route}: too little load to mean anything: {len(answers)}"
        # every response carries the version that computed it
        assert {(a.version, a.label) for a in answers} <= set(ANSWERS.items()), route
        assert {a.version for a in answers if a.received < promoted_at} == {v1}, route
        first_v2 = min(a.received for a in answers if a.version == v2)
        assert first_v2 - promoted_at < SWITCH_BOUND_S, route
        after_promote = [a.version for a in answers if switched_at < a.sent < rolled_back_at]
        assert after_promote and set(after_promote) == {v2}, f"{route}: v1 after the switch"
        after_rollback = [a.version for a in answers if a.sent > back_at]
        assert after_rollback and set(after_rollback) == {v1}, f"{route}: v2 after the rollback"
    # ModelVersion kept each target where a restart of it finds the last one (Ray's KV)
    assert _kept_target()["version"] == v1


def _kept_target() -> dict:
    import json

    from ray.experimental import internal_kv

    found = internal_kv._internal_kv_get(f"{MODEL}/model-version", namespace="raylift-serve")
    assert found, "ModelVersion kept no target"
    return json.loads(found)["target"]


def _alive_replicas() -> list:
    from ray.util.state import list_actors

    return list_actors(
        filters=[
            ("class_name", "=", f"ServeReplica:{MODEL}:ModelServer"),
            ("state", "=", "ALIVE"),
        ],
        address=session_ray_address(),
    )


def _actor_state(actor_id: str) -> str:
    from ray.util.state import get_actor

    found = get_actor(actor_id, address=session_ray_address())
    return found.state if found is not None else "GONE"


def test_a_replica_killed_under_load_costs_under_half_a_percent(endpoint, lifecycle):
    import ray

    url, _ = endpoint
    config, v1, _ = lifecycle
    before = _alive_replicas()
    assert len(before) == REPLICAS, before
    victim = before[0]
    with LoadClient(f"{url}/v1/models/{MODEL}/predict", threads=2) as load:
        time.sleep(4)
        ray.kill(ray.get_actor(victim.name, namespace="serve"))
        deadline = time.monotonic() + 30
        while _actor_state(victim.actor_id) != "DEAD":
            assert time.monotonic() < deadline, "the killed replica is not DEAD after 30 s"
            time.sleep(0.2)
        new = _wait_for_replacement({a.actor_id for a in before}, timeout_s=60)
        versions = _replica_versions(url, want=REPLICAS)
        time.sleep(2)
    answers = load.answers

    failed = [a for a in answers if a.status != 200]
    print(f"kill: {len(answers)} requests, {len(failed)} failed {[a.status for a in failed]}")
    assert len(answers) >= 400, f"too few requests for a 0.5% bound: {len(answers)}"
    assert len(failed) <= 0.005 * len(answers), f"{len(failed)} of {len(answers)} failed"
    assert new.actor_id != victim.actor_id and new.state == "ALIVE"
    assert set(versions.values()) == {v1}, versions  # the new replica came back on v1
    assert {a.version for a in answers if a.status == 200} == {v1}


def _wait_for_replacement(old_ids: set[str], timeout_s: float):
    """The replica Serve started in place of the killed one, once it is ALIVE."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = _alive_replicas()
        fresh = [a for a in alive if a.actor_id not in old_ids]
        if len(alive) == REPLICAS and fresh:
            return fresh[0]
        assert time.monotonic() < deadline, f"no replacement replica after {timeout_s} s"
        time.sleep(0.5)
