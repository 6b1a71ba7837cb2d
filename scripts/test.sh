#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and integration tests (which run the real
# coral binary), and the default policies' own tests with full coverage.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/need-rust.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --all-targets --locked
echo "== coral policy test policies/ policy-tests/"
cargo run --quiet --locked -- policy test policies/ policy-tests/ --coverage --threshold 100
echo "== coral crd matches crds/"
diff <(cargo run --quiet --locked -- crd) <(cat crds/*.yaml)
echo "all tests passed"
