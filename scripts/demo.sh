#!/usr/bin/env bash
# Builds coral and runs `coral demo`: the embedded default policies on the example workloads.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/need-rust.sh
cargo run --release --quiet -- demo "$@"
