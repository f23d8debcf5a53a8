"""The deployment manifests (cluster/kuberay/*.yaml, cluster/launcher/*.yaml), checked without a
cluster: every document parses; Kubernetes' own kinds validate against the Kubernetes 1.37
schemas (kubernetes-validate, strict: unknown fields fail); KubeRay's kinds validate against
the ray.io/v1 CRD schemas of KubeRay v1.7.0 and of v1.6.0, the oldest release the README says
they need (tests/unit/data/kuberay, pod templates checked as Kubernetes PodTemplates); the
launcher YAML against Ray's own schema. Then what the manifests promise: token auth on
everywhere with the token from the Secret, nothing of Ray's reachable from another namespace
but the KubeRay operator on the head's dashboard and Serve ports, requests and limits on every
container, placeholders only in Secrets, shared storage for every job, entrypoints naming
configs that exist and validate, a nightly CronJob that fails unless its Ray job SUCCEEDED,
and a RayService serveConfigV2 equal to what its generating command makes now.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from cluster import kuberay_gen
from jobs.config import ConfigError, LifecycleConfig, load_config, parse_overrides
from tests.unit.job_recorder import module_main_block_runs_its_main

REPO = Path(__file__).resolve().parents[2]
KUBERAY_DIR = REPO / "cluster" / "kuberay"
LAUNCHER = REPO / "cluster" / "launcher" / "aws-gpu.yaml"
SCHEMAS = Path(__file__).parent / "data" / "kuberay"
# The oldest KubeRay the README and the manifest headers name: the first release whose
# authOptions has secretName (v1.5.x has `mode` only). Its pruned CRDs are vendored too.
KUBERAY_MIN = "1.6.0"
MIN_SCHEMAS = SCHEMAS / f"v{KUBERAY_MIN}"
K8S_VERSION = "1.37.0"
KUBERAY_KINDS = {
    "RayCluster": "rayclusters.schema.json",
    "RayJob": "rayjobs.schema.json",
    "RayService": "rayservices.schema.json",
}
RAY_TOKEN_SECRET = "raylift-ray-token"
NAMESPACE = "raylift"  # where the README applies the manifests
# The KubeRay operator pod as its Helm chart installs it where the README says: its namespace
# and the labels chart v1.6.0 and v1.7.0 give it (name and component "kuberay-operator").
OPERATOR_NAMESPACE = "kuberay-operator"
OPERATOR = (
    OPERATOR_NAMESPACE,
    {
        "app.kubernetes.io/name": "kuberay-operator",
        "app.kubernetes.io/component": "kuberay-operator",
    },
)
RAY_PORTS = (6379, 8000, 8080, 8265, 10001, 52365)  # GCS, Serve, metrics, dashboard, client, agent
PLACEHOLDER = re.compile(r"^REPLACE_WITH_[A-Z0-9_]+$")
# Where a config keeps state: on a cluster each must be a server or object storage.
STORAGE_KEYS = ("catalog.uri", "catalog.warehouse", "registry.tracking_uri", "train.checkpoint_dir")


def _load_documents() -> list[tuple[str, dict[str, Any]]]:
    documents = []
    for path in sorted(KUBERAY_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                documents.append((path.name, doc))
    return documents


DOCUMENTS = _load_documents()


def _ids(documents: list[tuple[str, dict]]) -> list[str]:
    return [
        f"{name}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}" for name, doc in documents
    ]


def _of_kind(*kinds: str) -> list[dict[str, Any]]:
    return [doc for _, doc in DOCUMENTS if doc["kind"] in kinds]


CORE = [(name, doc) for name, doc in DOCUMENTS if doc["kind"] not in KUBERAY_KINDS]
KUBERAY = [(name, doc) for name, doc in DOCUMENTS if doc["kind"] in KUBERAY_KINDS]


# -- schemas --------------------------------------------------------------------------------


def test_manifests_are_there_and_every_document_names_itself():
    kinds = {doc["kind"] for _, doc in DOCUMENTS}
    assert {"RayCluster", "RayJob", "RayService", "CronJob", "Secret"} <= kinds
    for name, doc in DOCUMENTS:
        assert doc.get("apiVersion") and doc.get("metadata", {}).get("name"), name


@pytest.mark.parametrize(("file", "doc"), CORE, ids=_ids(CORE))
def test_core_kind_validates_against_the_kubernetes_schema(file, doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize(("file", "doc"), KUBERAY, ids=_ids(KUBERAY))
def test_kuberay_kind_validates_against_its_crd_schema(file, doc):
    templates = _validate_kuberay(doc)
    assert templates, "every KubeRay kind here carries at least one pod template"
    for template in templates:
        _validate_pod_template(template)


@pytest.mark.parametrize(("file", "doc"), KUBERAY, ids=_ids(KUBERAY))
def test_kuberay_kind_validates_against_the_oldest_kuberay_the_docs_name(file, doc):
    """A field newer than KUBERAY_MIN fails here: raise the minimum (README, manifest headers,
    the vendored CRDs) or do without the field."""
    _validate_kuberay(doc, MIN_SCHEMAS)


def test_the_docs_name_the_kuberay_minimum_the_manifests_are_checked_against():
    readme = (REPO / "README.md").read_text()
    assert f"Needs the KubeRay operator {KUBERAY_MIN} or newer" in readme
    stated = set(re.findall(r"KubeRay operator (\d+\.\d+\.\d+) or newer", readme))
    for name in ("raycluster.yaml", "rayservice.yaml"):
        header = (KUBERAY_DIR / name).read_text()
        stated |= set(re.findall(r"Needs KubeRay >= (\d+\.\d+\.\d+)", header))
        assert f"Needs KubeRay >= {KUBERAY_MIN}" in header, name
    assert stated == {KUBERAY_MIN}


def test_the_validators_can_fail():
    cluster = _of_kind("RayCluster")[0]
    broken = json.loads(json.dumps(cluster))
    broken["spec"]["authOption"] = broken["spec"].pop("authOptions")  # a typo'd field
    with pytest.raises(jsonschema.ValidationError, match="authOption"):
        _validate_kuberay(broken)
    no_head = json.loads(json.dumps(cluster))
    del no_head["spec"]["headGroupSpec"]
    with pytest.raises(jsonschema.ValidationError, match="headGroupSpec"):
        _validate_kuberay(no_head)
    template = json.loads(json.dumps(cluster["spec"]["headGroupSpec"]["template"]))
    template["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate_pod_template(template)
    secret = json.loads(json.dumps(_of_kind("Secret")[0]))
    secret["stringdata"] = secret.pop("stringData")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(secret, K8S_VERSION, strict=True)


def _validate_kuberay(doc: dict[str, Any], schemas: Path = SCHEMAS) -> list[dict[str, Any]]:
    """Validate `doc` against its CRD schema; return the pod templates found in it."""
    found: list[dict[str, Any]] = []
    schema = _strict(json.loads((schemas / KUBERAY_KINDS[doc["kind"]]).read_text()))

    def pod_template(validator, value, instance, schema):
        found.append(instance)
        return iter(())

    validator_class = jsonschema.validators.extend(
        jsonschema.Draft7Validator, {"x-raylift-pod-template": pod_template}
    )
    jsonschema.validate(doc, schema, cls=validator_class)
    return found


def _strict(schema: Any) -> Any:
    """The CRD schema as `kubectl apply` (strict field validation) reads it: an object with
    listed properties refuses others, unless it preserves unknown fields."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        strict["additionalProperties"] = False
    return strict


def _validate_pod_template(template: dict[str, Any]) -> None:
    wrapped = {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": "pod-template"},
        "template": template,
    }
    kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)


def test_vendored_schemas_say_where_they_come_from():
    notice = (SCHEMAS / "README.md").read_text()
    assert "Apache-2.0" in notice
    for name in KUBERAY_KINDS.values():
        source = json.loads((SCHEMAS / name).read_text())["source"]
        assert re.match(r"ray-project/kuberay@[0-9a-f]{40} \(v1\.7\.0\)", source), source
        source = json.loads((MIN_SCHEMAS / name).read_text())["source"]
        tag = re.escape(f"(v{KUBERAY_MIN})")
        assert re.match(rf"ray-project/kuberay@[0-9a-f]{{40}} {tag}", source), source
    assert f"`v{KUBERAY_MIN}/`" in notice


def test_launcher_yaml_validates_against_rays_schema():
    import ray.autoscaler

    config = yaml.safe_load(LAUNCHER.read_text())
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    node_types = config["available_node_types"]
    assert config["head_node_type"] in node_types
    gpu_types = [t for t in node_types.values() if "--gpus all" in _docker_options(t)]
    assert gpu_types and all(t["min_workers"] == 0 for t in gpu_types)


def _docker_options(node_type: dict[str, Any]) -> list[str]:
    return node_type.get("docker", {}).get("worker_run_options", [])


# -- what the manifests promise ---------------------------------------------------------------


def _ray_cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    specs = [(d["metadata"]["name"], d["spec"]) for d in _of_kind("RayCluster")]
    specs += [
        (d["metadata"]["name"], d["spec"]["rayClusterConfig"]) for d in _of_kind("RayService")
    ]
    specs += [
        (d["metadata"]["name"], d["spec"]["rayClusterSpec"])
        for d in _of_kind("RayJob")
        if "rayClusterSpec" in d["spec"]
    ]
    return specs


def _secret_keys() -> dict[str, set[str]]:
    return {
        d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {}))
        for d in _of_kind("Secret")
    }


def test_every_ray_cluster_has_token_auth_from_the_secret():
    assert _secret_keys().get(RAY_TOKEN_SECRET) == {"auth_token"}  # the key KubeRay reads
    for name, spec in _ray_cluster_specs():
        assert spec.get("authOptions") == {"mode": "token", "secretName": RAY_TOKEN_SECRET}, name
        version = tuple(int(p) for p in spec["rayVersion"].split("."))
        assert version >= (2, 52, 0), f"{name}: token auth needs Ray >= 2.52 in rayVersion"
    clusters = {d["metadata"]["name"] for d in _of_kind("RayCluster")}
    for job in _of_kind("RayJob"):
        selected = job["spec"].get("clusterSelector", {}).get("ray.io/cluster")
        assert selected in clusters or "rayClusterSpec" in job["spec"], job["metadata"]["name"]


def test_every_client_of_the_jobs_api_sends_the_token():
    clients = [
        c for d in _of_kind("RayJob") for c in _containers(d["spec"]["submitterPodTemplate"])
    ]
    clients += [c for d in _of_kind("CronJob") for c in _containers(_cronjob_template(d))]
    assert len(clients) == len(_of_kind("RayJob")) + len(_of_kind("CronJob"))
    for container in clients:
        env = {e["name"]: e for e in container.get("env", [])}
        assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
        source = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert source == {"name": RAY_TOKEN_SECRET, "key": "auth_token"}, container["name"]


def test_the_raylift_cluster_autoscales_a_cpu_and_a_gpu_group():
    (cluster,) = [d["spec"] for d in _of_kind("RayCluster") if d["metadata"]["name"] == "raylift"]
    assert cluster["enableInTreeAutoscaling"] is True
    groups = cluster["workerGroupSpecs"]
    gpus = [_gpus_per_pod(g) for g in groups]
    assert 0 in gpus and any(n > 0 for n in gpus)
    for group in groups:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def _gpus_per_pod(group: dict[str, Any]) -> int:
    limits = _containers(group["template"])[0]["resources"]["limits"]
    return int(limits.get("nvidia.com/gpu", 0))


def test_nothing_exposes_ray_outside_the_cluster():
    kinds = {doc["kind"] for _, doc in DOCUMENTS}
    assert not kinds & {"Ingress", "Gateway", "HTTPRoute", "Route"}
    for service in _of_kind("Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]
    texts = [v for _, doc in DOCUMENTS for v in _walk(doc) if isinstance(v, str)]
    assert not {"LoadBalancer", "NodePort"} & set(texts)
    for name, spec in _ray_cluster_specs():
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", name
        assert not head.get("enableIngress"), name
    for doc in _of_kind("RayService"):
        serve_service = doc["spec"].get("serveService", {}).get("spec", {})
        assert serve_service.get("type", "ClusterIP") == "ClusterIP"
    for template in _all_pod_templates():
        assert not template["spec"].get("hostNetwork")
        for container in _containers(template):
            ports = container.get("ports", [])
            assert not [p for p in ports if "hostPort" in p], container["name"]
    policies = [p["spec"] for p in _of_kind("NetworkPolicy")]
    assert any(p["podSelector"]["matchExpressions"][0]["key"] == "ray.io/cluster" for p in policies)


def test_only_the_kuberay_operator_gets_in_from_another_namespace_to_the_heads_dashboard():
    """The operator PUTs serveConfigV2 and polls RayJob status on the head's 8265 (and checks
    the head's Serve proxy on 8000); everything else of Ray admits this namespace only."""
    head, worker = _ray_pod("head"), _ray_pod("worker")
    assert _admits(head, OPERATOR, 8265), "no rule lets the KubeRay operator reach 8265"
    assert _admits(head, OPERATOR, 8000)
    strangers = [
        ("default", {}),
        (OPERATOR_NAMESPACE, {"app.kubernetes.io/name": "something-else"}),
        ("other", OPERATOR[1]),  # the operator's labels in the wrong namespace
    ]
    for port in RAY_PORTS:
        assert _admits(head, (NAMESPACE, {}), port) and _admits(worker, (NAMESPACE, {}), port)
        assert not _admits(worker, OPERATOR, port), port
        if port not in (8265, 8000):
            assert not _admits(head, OPERATOR, port), port
        for stranger in strangers:
            assert not _admits(head, stranger, port), (stranger, port)
            assert not _admits(worker, stranger, port), (stranger, port)
    readme = (REPO / "README.md").read_text()
    assert f"--namespace {OPERATOR_NAMESPACE} --create-namespace" in readme
    assert (
        f"kubernetes.io/metadata.name: {OPERATOR_NAMESPACE}"
        in (KUBERAY_DIR / "networkpolicy.yaml").read_text()
    )


def _ray_pod(node_type: str) -> dict[str, str]:
    """The labels KubeRay gives a Ray pod (ray.io/cluster, ray.io/node-type) and ours."""
    return {
        "ray.io/cluster": "raylift",
        "ray.io/node-type": node_type,
        "app.kubernetes.io/part-of": "raylift",
    }


def _admits(pod: dict[str, str], source: tuple[str, dict[str, str]], port: int) -> bool:
    """Whether this file's NetworkPolicies let a pod of `source` (namespace, labels) connect to
    TCP `port` of a pod labelled `pod` in NAMESPACE (Kubernetes' semantics: policies add up; a
    pod no Ingress policy selects is open)."""
    specs = [p["spec"] for p in _of_kind("NetworkPolicy")]
    selecting = [
        s for s in specs if "Ingress" in s["policyTypes"] and _selects(s["podSelector"], pod)
    ]
    if not selecting:
        return True
    rules = [rule for spec in selecting for rule in spec.get("ingress", [])]
    return any(_rule_admits(rule, source, port) for rule in rules)


def _rule_admits(rule: dict[str, Any], source: tuple[str, dict[str, str]], port: int) -> bool:
    ports = rule.get("ports")
    if ports and not any(
        p.get("protocol", "TCP") == "TCP" and p.get("port") == port for p in ports
    ):
        return False
    peers = rule.get("from")
    return not peers or any(_peer_matches(peer, *source) for peer in peers)


def _peer_matches(peer: dict[str, Any], namespace: str, labels: dict[str, str]) -> bool:
    if "ipBlock" in peer:
        return True  # addresses from anywhere: as open as it gets
    if "namespaceSelector" in peer:
        in_namespace = _selects(
            peer["namespaceSelector"], {"kubernetes.io/metadata.name": namespace}
        )
    else:
        in_namespace = namespace == NAMESPACE  # a podSelector alone: the policy's namespace
    return in_namespace and _selects(peer.get("podSelector", {}), labels)


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, values = expression["key"], expression.get("values", [])
        holds = {
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
        }[expression["operator"]]
        if not holds:
            return False
    return True


def _walk(node: Any) -> Iterator[Any]:
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    for child in children:
        yield from _walk(child)


def test_the_launcher_keeps_the_dashboard_on_localhost_behind_the_token():
    config = yaml.safe_load(LAUNCHER.read_text())
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), key
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}


def test_every_container_has_requests_and_limits():
    containers = [c for t in _all_pod_templates() for c in _containers(t, init=True)]
    assert len(containers) >= 9  # 5 Ray pods, 3 RayJob submitters, the CronJob's
    for container in containers:
        resources = container.get("resources", {})
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(part, {})), f"{container['name']} {part}"
    for name, spec in _ray_cluster_specs():
        if spec.get("enableInTreeAutoscaling"):
            resources = spec["autoscalerOptions"]["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) & set(resources["limits"]), name


def test_secrets_are_templates_with_placeholders_only():
    for file, doc in DOCUMENTS:
        if doc["kind"] == "Secret":
            assert file.endswith(".template.yaml"), file
            values = {**doc.get("stringData", {}), **doc.get("data", {})}
            assert values and all(PLACEHOLDER.match(v) for v in values.values()), values
    secret_like = re.compile(r"TOKEN|PASSWORD|SECRET|ACCESS_KEY", re.IGNORECASE)
    for template in _all_pod_templates():
        for container in _containers(template):
            for env in container.get("env", []):
                if secret_like.search(env["name"]) and env["name"] != "RAY_AUTH_MODE":
                    assert "value" not in env, f"{container['name']}: {env['name']} is literal"


def _all_pod_templates() -> list[dict[str, Any]]:
    templates = [t for _, doc in KUBERAY for t in _validate_kuberay(doc)]
    templates += [_cronjob_template(d) for d in _of_kind("CronJob")]
    return templates


def _cronjob_template(cronjob: dict[str, Any]) -> dict[str, Any]:
    return cronjob["spec"]["jobTemplate"]["spec"]["template"]


def _containers(template: dict[str, Any], init: bool = False) -> list[dict[str, Any]]:
    spec = template["spec"]
    return [*spec["containers"], *(spec.get("initContainers", []) if init else [])]


# -- entrypoints and configs ------------------------------------------------------------------

RUN_DATE = "2026-11-25"


def _entrypoints() -> list[tuple[str, str]]:
    """(where, `python -m jobs.X ...` command line) of every job the manifests start."""
    found = [
        (f"RayJob/{d['metadata']['name']}", d["spec"]["entrypoint"]) for d in _of_kind("RayJob")
    ]
    for cronjob in _of_kind("CronJob"):
        for container in _containers(_cronjob_template(cronjob)):
            script = " ".join([*container.get("command", []), *container.get("args", [])])
            submit = script.replace("\\\n", " ")
            line = submit[submit.index("ray job submit") :].split("\n")[0]
            found.append((f"CronJob/{cronjob['metadata']['name']}", line))
    return found


def _job_argv(line: str) -> tuple[str, str, list[str]]:
    words = shlex.split(line.replace("${run_date}", RUN_DATE))
    if "--" in words:
        words = words[words.index("--") + 1 :]
    assert words[:2] == ["python", "-m"] and words[3] == "--config", line
    return words[2], words[4], words[5:]


def _entrypoint_configs() -> list[tuple[str, LifecycleConfig]]:
    configs = []
    for where, line in _entrypoints():
        _, path, overrides = _job_argv(line)
        configs.append((where, load_config(REPO / path, parse_overrides(overrides))))
    return configs


@pytest.mark.parametrize(("where", "line"), _entrypoints(), ids=[w for w, _ in _entrypoints()])
def test_entrypoint_runs_a_job_module_on_a_config_that_exists_and_validates(where, line):
    module, path, overrides = _job_argv(line)
    assert module_main_block_runs_its_main(module), f"{where}: {module} has no run_job(main)"
    assert (REPO / path).is_file(), f"{where}: {path} does not exist (paths are from the repo root)"
    load_config(REPO / path, parse_overrides(overrides))


def test_the_nightly_scoring_job_scores_the_run_date():
    (line,) = [line for where, line in _entrypoints() if where.startswith("CronJob/")]
    module, _, overrides = _job_argv(line)
    assert module == "jobs.score"
    assert parse_overrides(overrides)["score.run_date"] == datetime.date.fromisoformat(RUN_DATE)
    (cronjob,) = _of_kind("CronJob")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    assert "http://raylift-head-svc:8265" in line  # the RayCluster's in-cluster head Service


class _JobStatusHandler(BaseHTTPRequestHandler):
    """The Jobs API calls the CronJob's status check makes: the version, then the job."""

    status = "SUCCEEDED"
    seen: list[tuple[str, str | None]] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        if self.path == "/api/version":
            body = {"ray_version": "2.60.0", "version": "4"}
        else:
            job_id = self.path.rsplit("/", 1)[-1]
            body = {"type": "SUBMISSION", "submission_id": job_id, "status": type(self).status}
            body["entrypoint"] = "python -m jobs.score"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(
    ("ray_exit", "final", "pod_exit"),
    [(0, "SUCCEEDED", 0), (0, "STOPPED", 1), (1, "FAILED", 1)],
)
def test_the_nightly_job_fails_unless_the_ray_job_succeeded(tmp_path, ray_exit, final, pod_exit):
    """The CronJob's script as the pod runs it, with `ray` a stand-in that exits as `ray job
    submit` does (0 for SUCCEEDED and STOPPED, 1 for FAILED) and the Jobs API a local server:
    the real JobSubmissionClient asks it for the final status, with the Secret's token."""
    (cronjob,) = _of_kind("CronJob")
    (container,) = _containers(_cronjob_template(cronjob))
    server = HTTPServer(("127.0.0.1", 0), _JobStatusHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _JobStatusHandler.status, _JobStatusHandler.seen = final, []
    address = f"http://127.0.0.1:{server.server_port}"
    script = container["args"][0].replace("http://raylift-head-svc:8265", address)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "ray", f'echo "$@" > {tmp_path}/ray_args\nexit {ray_exit}\n')
    _executable(bin_dir / "python", f'exec {sys.executable} "$@"\n')
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "tok-" + "5" * 32})
    try:
        done = subprocess.run(
            [*container["command"], script], env=env, capture_output=True, text=True, timeout=120
        )
    finally:
        server.shutdown()
    assert done.returncode == pod_exit, done.stdout + done.stderr
    submitted = (tmp_path / "ray_args").read_text().split()
    assert submitted[:4] == ["job", "submit", "--address", address]
    job_id = submitted[submitted.index("--submission-id") + 1]
    if ray_exit == 0:
        assert (f"/api/jobs/{job_id}", "Bearer tok-" + "5" * 32) in _JobStatusHandler.seen
        assert f"Ray job {job_id}: {final}" in done.stdout
    else:
        assert _JobStatusHandler.seen == []  # `ray job submit` failing ends the pod at once


def _executable(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body)
    os.chmod(path, 0o755)


def test_cluster_jobs_keep_state_on_shared_storage_and_agree_where():
    seen: dict[str, set[str]] = {key: set() for key in STORAGE_KEYS}
    for where, config in _entrypoint_configs():
        for key in STORAGE_KEYS:
            value = _dotted(config, key)
            assert not _is_pod_local(value), f"{where}: {key}={value!r} lives in one pod"
            seen[key].add(value)
    assert all(len(values) == 1 for values in seen.values()), seen


def _is_pod_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/", ".", "~")) or ":" not in uri


def _dotted(config: LifecycleConfig, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


def test_gpu_configs_are_the_documented_shapes_and_fit_the_gpu_group():
    qlora = load_config(REPO / "configs/gpu/llama8b_qlora_zero3.yaml")
    lora = load_config(REPO / "configs/gpu/llama8b_lora_zero2_2x8.yaml")
    assert (qlora.model.method, qlora.train.zero_stage, qlora.train.num_workers) == ("qlora", 3, 8)
    assert (lora.model.method, lora.train.zero_stage, lora.train.num_workers) == ("lora", 2, 16)
    (cluster,) = _of_kind("RayCluster")
    (group,) = [g for g in cluster["spec"]["workerGroupSpecs"] if _gpus_per_pod(g) > 0]
    gpus, cpus = _gpus_per_pod(group), _cpu_count(group)
    for config in (qlora, lora):
        assert config.train.use_gpu and not _is_pod_local(config.registry.tracking_uri)
        assert config.train.num_workers <= gpus * group["maxReplicas"], config.name
        assert config.train.cpus_per_worker * gpus < cpus, f"{config.name}: no CPU left for data"


def _cpu_count(group: dict[str, Any]) -> float:
    return float(_containers(group["template"])[0]["resources"]["requests"]["cpu"])


# -- the generated serveConfigV2 ----------------------------------------------------------------


def test_rayservice_serve_config_is_what_its_command_generates_now(monkeypatch):
    monkeypatch.chdir(REPO)  # the command names the config as the pods see it, from the repo root
    (service,) = _of_kind("RayService")
    committed = service["spec"]["serveConfigV2"]
    first = committed.splitlines()[0]
    assert first.startswith(kuberay_gen.GENERATED_BY), "serveConfigV2 must be generated"
    words = shlex.split(first.removeprefix(kuberay_gen.GENERATED_BY))
    assert words[:4] == ["python", "-m", "cluster.kuberay_gen", "serve-config"]
    args = kuberay_gen.build_parser().parse_args(words[3:])
    assert committed == kuberay_gen.serve_config(args.config, args.overrides)


def test_serve_config_matches_the_pods_and_the_secret(monkeypatch):
    monkeypatch.chdir(REPO)
    (service,) = _of_kind("RayService")
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    assert app["import_path"] == "serving.app:app_builder"
    config = load_config(app["args"]["config"], parse_overrides(_app_overrides(app["args"])))
    assert not _is_pod_local(config.registry.tracking_uri)
    head = _containers(service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"])[0]
    assert {"containerPort": serve["http_options"]["port"], "name": "serve"} in head["ports"]
    token_env = config.serve.auth_token_env
    assert token_env, "the public endpoint requires a bearer token"
    for template in _validate_kuberay(service):
        for container in _containers(template):
            env = {e["name"]: e for e in container.get("env", [])}
            ref = env[token_env]["valueFrom"]["secretKeyRef"]
            assert ref["key"] in _secret_keys()[ref["name"]], container["name"]


def _app_overrides(args: dict[str, str]) -> list[str]:
    return [f"{key}={value}" for key, value in args.items() if key not in ("config", "model_uri")]


def test_write_replaces_only_the_serve_config_block(tmp_path):
    manifest = (
        "# keep me\nspec:\n  serveConfigV2: |\n    old: 1\n\n    older: 2\n"
        "  rayClusterConfig:  # and me\n    rayVersion: '2.60.0'\n"
    )
    out = kuberay_gen.replace_serve_config(manifest, "# generated by: x\nnew: 3\n")
    assert out == (
        "# keep me\nspec:\n  serveConfigV2: |\n    # generated by: x\n    new: 3\n"
        "  rayClusterConfig:  # and me\n    rayVersion: '2.60.0'\n"
    )
    committed = (KUBERAY_DIR / "rayservice.yaml").read_text()
    block = yaml.safe_load(committed)["spec"]["serveConfigV2"]
    assert kuberay_gen.replace_serve_config(committed, block) == committed
    with pytest.raises(ValueError, match="one `serveConfigV2: |` block"):
        kuberay_gen.replace_serve_config("spec: {}\n", "x: 1\n")


def test_generator_refuses_a_registry_only_one_pod_can_see(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match="registry.tracking_uri='sqlite:///.raylift/mlflow.db'"):
        kuberay_gen.serve_config("configs/banking77/minilm_lora.yaml", [])
    argv = ["serve-config", "--config", "configs/banking77/minilm_lora.yaml", "serve.port=8001"]
    assert kuberay_gen.main(argv) == 2
    assert "MLFLOW_TRACKING_USERNAME" in capsys.readouterr().err


def test_the_command_with_write_rebuilds_the_committed_manifest(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    committed = (KUBERAY_DIR / "rayservice.yaml").read_text()
    stale = tmp_path / "rayservice.yaml"
    stale.write_text(committed.replace("request_timeout_s: 60.0", "request_timeout_s: 1.0"))
    (service,) = _of_kind("RayService")
    first = service["spec"]["serveConfigV2"].splitlines()[0]
    words = shlex.split(first.removeprefix(kuberay_gen.GENERATED_BY))
    assert kuberay_gen.main([*words[3:], "--write", str(stale)]) == 0
    assert stale.read_text() == committed
