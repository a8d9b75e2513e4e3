"""Writes the strict Kubernetes schemas kept here, one folder per minor.

    pip install kubernetes-validate==1.37.0   # a tool only, not a dependency
    python deploy/kubernetes/schemas/update.py

For each Kubernetes minor version kerasdist supports (`VERSIONS`) and each
kind the manifests use (`KINDS`), takes the *strict* schema (unknown fields
rejected) that kubernetes-validate ships, generated from that release's
OpenAPI definitions, and keeps only the definitions it reaches, so each
file stands alone: `vX.Y/<kind>.json`. The JobSet and TFJob CRD schemas
beside them come from those projects (see their `$comment`);
tests/test_kubernetes_manifests.py makes them strict the same way.
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# Kubernetes minors kerasdist's manifests are validated against (the first
# with podFailurePolicy GA, to the newest released).
VERSIONS = ("1.31", "1.32", "1.33", "1.34", "1.35")
KINDS = {
    "job-batch-v1": "io.k8s.api.batch.v1.Job",
    "jobspec-batch-v1": "io.k8s.api.batch.v1.JobSpec",
    "podtemplatespec-v1": "io.k8s.api.core.v1.PodTemplateSpec",
    "service-v1": "io.k8s.api.core.v1.Service",
    "persistentvolumeclaim-v1": "io.k8s.api.core.v1.PersistentVolumeClaim",
}


def _refs(node, found):
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            found.add(ref.rsplit("/", 1)[-1])
        for value in node.values():
            _refs(value, found)
    elif isinstance(node, list):
        for value in node:
            _refs(value, found)


def _strip(node):
    """Drops the descriptions (most of the size; validation ignores them)."""
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def standalone(definitions: dict, name: str) -> dict:
    """`name`'s schema with only the definitions it reaches."""
    keep, todo = {}, [name]
    while todo:
        current = todo.pop()
        if current in keep:
            continue
        keep[current] = _strip(definitions[current])
        found: set = set()
        _refs(keep[current], found)
        todo.extend(found - set(keep))
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$ref": f"#/$defs/{name}", "$defs": keep}


def main() -> None:
    import importlib.util

    # Located, not imported: only its data files are used.
    spec = importlib.util.find_spec("kubernetes_validate")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("pip install kubernetes-validate==1.37.0 first")
    package = spec.submodule_search_locations[0]
    source = os.path.join(package, "kubernetes-json-schema")
    with open(os.path.join(package, "version.py")) as f:
        tool = f.read().split("=")[-1].strip().strip("'\"")
    for version in VERSIONS:
        path = os.path.join(source, f"v{version}.0-local-strict",
                            "_definitions.json")
        with open(path) as f:
            definitions = json.load(f)["$defs"]
        out = os.path.join(HERE, f"v{version}")
        os.makedirs(out, exist_ok=True)
        for kind, name in KINDS.items():
            schema = standalone(definitions, name)
            schema["$comment"] = (
                f"Kubernetes v{version} {name}, strict, from "
                f"kubernetes-validate {tool}")
            with open(os.path.join(out, f"{kind}.json"), "w") as f:
                json.dump(schema, f, sort_keys=True, separators=(",", ":"))
        print(f"v{version}: {len(KINDS)} schemas", file=sys.stderr)


if __name__ == "__main__":
    main()
