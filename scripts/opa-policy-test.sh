#!/usr/bin/env bash
# Runs the policy tests under `coral policy test` and under the real OPA engine
# (opa-golib-python-bindings from PyPI, installed into target/opa-venv) and fails unless both
# give the same result for every test. Arguments: the paths, as for `coral policy test`
# (default: policies/ policy-tests/).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/need-packages.sh
need_packages python3:python3
paths=("$@")
[ ${#paths[@]} -gt 0 ] || paths=(policies/ policy-tests/)
venv=target/opa-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" 2>/dev/null || { need_packages python3-venv:python3-venv; python3 -m venv "$venv"; }
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check --ignore-requires-python \
  -r scripts/opa-requirements.txt
results=$(mktemp)
trap 'rm -f "$results"' EXIT
# coral policy test exits 1 when a test fails; the comparison is what decides here.
cargo run --quiet --locked -- policy test "${paths[@]}" --format json > "$results" || true
"$venv/bin/python" scripts/opa-policy-test.py "$results" "${paths[@]}"
