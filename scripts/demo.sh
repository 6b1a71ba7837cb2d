#!/usr/bin/env bash
# Builds coral and runs `coral demo`: the embedded default policies on the example workloads.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/need-rust.sh
. scripts/need-packages.sh
# protoc builds the CRI types.
need_packages protoc:protobuf-compiler
cargo run --release --quiet -- demo "$@"
