#!/usr/bin/env bash
# Renders deploy/ and every overlay with kubectl kustomize, and validates every object offline:
# built-in kinds against the Kubernetes schemas (kubernetes-validate from PyPI, installed into
# target/validate-venv), Coral's custom resources (in deploy/ and examples/) against the CRDs.
# Then evaluates the CEL of the agent's ValidatingAdmissionPolicy on requests it must allow and
# deny (cel-python).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v kubectl >/dev/null 2>&1; then
  echo "error: kubectl is not installed; it renders deploy/ (kubectl kustomize)." >&2
  echo "Install it: https://kubernetes.io/docs/tasks/tools/#kubectl" >&2
  exit 1
fi
. scripts/need-packages.sh
need_packages python3:python3
venv=target/validate-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" 2>/dev/null || { need_packages python3-venv:python3-venv; python3 -m venv "$venv"; }
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r scripts/validate-requirements.txt
rendered=$(mktemp -d)
trap 'rm -rf "$rendered"' EXIT
files=()
for dir in deploy deploy/overlays/*/; do
  name=$(echo "${dir%/}" | tr / _)
  kubectl kustomize "$dir" > "$rendered/$name.yaml"
  echo "rendered ${dir%/}: $(grep -c '^kind:' "$rendered/$name.yaml") objects"
  files+=("$rendered/$name.yaml")
done
"$venv/bin/python" scripts/validate-manifests.py "${files[@]}" examples/imageset.yaml examples/workloads/*.yaml
"$venv/bin/python" scripts/check-agent-policy.py
