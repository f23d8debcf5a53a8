"""Rebuild the vendored KubeRay schemas from a KubeRay checkout.

    python tests/unit/data/kuberay/prune_crds.py /path/to/kuberay v1.7.0
    cd tests/unit/data/kuberay && python prune_crds.py /path/to/kuberay v1.6.0 v1.6.0

The first writes next to this script (the release the manifests are checked against in full),
the second into a folder of its own (the oldest release the README says the manifests need).

Each CRD's ray.io/v1 openAPIV3Schema is kept whole except Kubernetes' own types: every pod
template (an object whose `spec` has `containers`) becomes a placeholder that marks it, and the
manifest test validates those templates with kubernetes-validate against Kubernetes' PodTemplate
schema instead. That takes the three CRDs from 3.3 MB to the size of KubeRay's own fields.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

CRDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}
POD_TEMPLATE = {"type": "object", "x-raylift-pod-template": True}


def _is_pod_template(node: dict) -> bool:
    spec = node.get("properties", {}).get("spec", {})
    return "containers" in spec.get("properties", {})


def prune(node):
    if isinstance(node, dict):
        if _is_pod_template(node):
            return dict(POD_TEMPLATE)
        return {key: prune(value) for key, value in node.items() if key != "description"}
    if isinstance(node, list):
        return [prune(item) for item in node]
    return node


def main(checkout: str, tag: str, out_dir: str | None = None) -> None:
    here = Path(out_dir) if out_dir else Path(__file__).parent
    here.mkdir(parents=True, exist_ok=True)
    commit = subprocess.check_output(
        ["git", "-C", checkout, "rev-parse", f"{tag}^{{commit}}"], text=True
    ).strip()
    for kind, plural in CRDS.items():
        path = f"ray-operator/config/crd/bases/ray.io_{plural}.yaml"
        text = subprocess.check_output(["git", "-C", checkout, "show", f"{tag}:{path}"], text=True)
        crd = yaml.safe_load(text)
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = prune(version["schema"]["openAPIV3Schema"])
        out = {"kind": kind, "source": f"ray-project/kuberay@{commit} ({tag}) {path}", **schema}
        (here / f"{plural}.schema.json").write_text(json.dumps(out, indent=1, sort_keys=True))


if __name__ == "__main__":
    main(*sys.argv[1:4])
