#!/usr/bin/env python3
"""Validates the custom resources of a rendered kustomize build (ServiceMonitor), which
kubernetes-validate only warns about: it ships schemas for Kubernetes' own kinds, none for CRDs.

Each custom resource is checked against the CRD schema committed next to this file (its source
is in README.md), strictly: an object that lists its properties allows no other property (unless
the schema says otherwise), as an API server with field validation Strict rejects an unknown
field. Its metadata is checked against ObjectMeta from kubernetes-validate's own schemas.
Every other document must have a built-in schema in kubernetes-validate, so that no kind goes
unchecked. Needs the kubernetes-validate package (it brings jsonschema and PyYAML).

Usage: validate_custom_resources.py KUBERNETES_VERSION RENDERED.yaml
"""

import copy
import json
import pathlib
import sys

import jsonschema
import referencing
import yaml
from kubernetes_validate import utils

HERE = pathlib.Path(__file__).resolve().parent

# (apiVersion, kind) -> schema file in this directory.
SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
}

OBJECT_META = "/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


def strict(node):
    """The schema with additionalProperties: false on every object that lists properties and
    neither sets additionalProperties nor keeps unknown fields."""
    if isinstance(node, list):
        return [strict(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: strict(sub) for name, sub in value.items()}
        else:
            out[key] = strict(value)
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields", False)
    ):
        out["additionalProperties"] = False
    return out


def crd_validator(schema_file, api_version, kind, version):
    schema = strict(json.loads((HERE / schema_file).read_text()))
    schema = copy.deepcopy(schema)
    props = schema["properties"]
    props["apiVersion"] = {"const": api_version}
    props["kind"] = {"const": kind}
    props["metadata"] = {"$ref": OBJECT_META}
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
    schema["$id"] = "https://kubernetes.io/api/custom/" + schema_file
    definitions = utils.schema_contents(
        f"kubernetes-json-schema/v{version}-local-strict/_definitions.json", version
    )
    registry = referencing.Registry().with_resource(
        "https://kubernetes.io/api/_definitions.json",
        referencing.Resource.from_contents(definitions),
    )
    return jsonschema.Draft202012Validator(schema, registry=registry)


def main(argv):
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    version, path = argv[1], argv[2]
    docs = [d for d in yaml.safe_load_all(pathlib.Path(path).read_text()) if d]
    failures = 0
    custom = 0
    for doc in docs:
        api_version, kind = doc.get("apiVersion"), doc.get("kind")
        name = f"{str(kind).lower()}/{doc.get('metadata', {}).get('name')}"
        schema_file = SCHEMAS.get((api_version, kind))
        if schema_file is None:
            try:
                utils.validate(doc, version, strict=True)
            except utils.SchemaNotFoundError:
                print(f"ERROR {path}: {name} ({api_version}): no schema, neither in "
                      f"kubernetes-validate nor in {HERE}")
                failures += 1
            except jsonschema.ValidationError:
                pass  # kubernetes-validate itself reports these
            continue
        custom += 1
        errors = sorted(
            crd_validator(schema_file, api_version, kind, version).iter_errors(doc),
            key=lambda e: list(e.path),
        )
        for e in errors:
            where = ".".join(str(p) for p in e.path) or "(top)"
            print(f"ERROR {path}: {name} against {schema_file}: {where}: {e.message}")
        if errors:
            failures += 1
        else:
            print(f"INFO {path} passed for resource {name} against {schema_file} (strict)")
    if custom == 0:
        print(f"ERROR {path}: no custom resource found; expected {sorted(k for _, k in SCHEMAS)}")
        failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
