"""Validates Kubernetes manifests offline: built-in objects against the Kubernetes schemas of
the oldest supported version (kubernetes-validate, strict: unknown fields are errors), Coral's
custom resources against the CRD schemas in crds/, strict too (the API server would prune an
unknown field without a word). Usage: validate-manifests.py FILE..."""

import glob
import sys

import jsonschema
import kubernetes_validate
import yaml

KUBERNETES_VERSION = "1.33.0"
# Custom resources of other projects (the cert-manager and monitoring overlays): their CRDs
# are not here.
FOREIGN_GROUPS = {"cert-manager.io", "monitoring.coreos.com"}


def strict(schema):
    """The schema with unknown fields refused wherever it lists the fields an object has."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
            # apiVersion, kind and metadata are every object's, whatever its schema lists.
            for field in ("apiVersion", "kind", "metadata"):
                schema["properties"].setdefault(field, {})
    elif isinstance(schema, list):
        schema = [strict(item) for item in schema]
    return schema


def crd_schemas():
    schemas = {}
    for path in sorted(glob.glob("crds/*.yaml")):
        with open(path) as f:
            crd = yaml.safe_load(f)
        spec = crd["spec"]
        for version in spec["versions"]:
            key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
            schemas[key] = strict(version["schema"]["openAPIV3Schema"])
    return schemas


def main(files):
    schemas = crd_schemas()
    checked, skipped, failed = 0, 0, 0
    for path in files:
        with open(path) as f:
            documents = list(yaml.safe_load_all(f))
        for doc in documents:
            if not doc:
                continue
            api_version, kind = doc.get("apiVersion", ""), doc.get("kind", "")
            where = f"{path}: {kind} {doc.get('metadata', {}).get('name', '?')}"
            try:
                if (api_version, kind) in schemas:
                    jsonschema.validate(doc, schemas[(api_version, kind)])
                elif api_version.split("/")[0] in FOREIGN_GROUPS:
                    skipped += 1
                    continue
                else:
                    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
                checked += 1
            except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as error:
                failed += 1
                print(f"INVALID {where}: {error.message}", file=sys.stderr)
            except kubernetes_validate.SchemaNotFoundError:
                failed += 1
                print(f"UNKNOWN {where}: no schema for {api_version} {kind}", file=sys.stderr)
    print(f"{checked} object(s) valid, {skipped} of other projects not checked, {failed} invalid")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
