#!/usr/bin/env bash
# The fuzz campaign: builds the targets of fuzz/ with libFuzzer's coverage instrumentation
# (nightly Rust, the flags `cargo fuzz build -s none` uses, without its single codegen unit)
# and runs each for a bounded time from its committed seed corpus (fuzz/corpus/TARGET, copied:
# the committed one is not changed). Stops at the first crash, whose input is kept in
# fuzz/artifacts/TARGET/; fix it and add the input to fuzz/regressions/TARGET/, which
# `cargo test --test fuzz_corpora` replays on stable.
#
# Usage: bash scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   (default: 20, every target)
# Exit status 3: nightly Rust is not installed and cannot be.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/need-rust.sh

seconds=${1:-20}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(image_reference admission_review rails state_file policy_configmap pull_secrets cri_responses)
fi

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "nightly Rust is missing; installing it with rustup"
  if ! rustup toolchain install nightly --profile minimal; then
    echo "error: nightly Rust is needed for libFuzzer's instrumentation" >&2
    exit 3
  fi
fi

triple=$(rustc -vV | sed -n 's/^host: //p')
flags="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4"
flags+=" -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table"
flags+=" -Cllvm-args=-sanitizer-coverage-trace-compares -Cllvm-args=-sanitizer-coverage-stack-depth"
flags+=" -Cllvm-args=-simplifycfg-branch-fold-threshold=0 --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
started=$(date +%s)
# --target keeps the instrumentation off build scripts and proc macros.
RUSTFLAGS="$flags" cargo +nightly build --quiet --manifest-path fuzz/Cargo.toml --locked \
  --release --target "$triple" --bins --config 'profile.release.debug="line-tables-only"'
echo "fuzz targets built in $(( $(date +%s) - started )) s"

bin="fuzz/target/$triple/release"
total=0
for target in "${targets[@]}"; do
  corpus=$(mktemp -d)
  log=$(mktemp)
  cp fuzz/corpus/"$target"/* "$corpus"/
  mkdir -p fuzz/artifacts/"$target"
  status=0
  "$bin/$target" "$corpus" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix=fuzz/artifacts/"$target"/ >"$log" 2>&1 || status=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  coverage=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
  rm -rf "$corpus"
  if [ "$status" -ne 0 ]; then
    grep -B2 -A20 -m1 -E "panicked|ERROR: libFuzzer|SUMMARY" "$log" >&2 || tail -40 "$log" >&2
    echo "error: fuzz target $target failed; the input is in fuzz/artifacts/$target/" >&2
    rm -f "$log"
    exit 1
  fi
  rm -f "$log"
  rmdir fuzz/artifacts/"$target" 2>/dev/null || true
  total=$(( total + ${runs:-0} ))
  printf 'fuzz %-17s %10s executions in %s s, %s, no crash\n' "$target" "${runs:-0}" "$seconds" "${coverage:-cov: ?}"
done
rmdir fuzz/artifacts 2>/dev/null || true
echo "fuzzing: ${#targets[@]} targets, $total executions, no crash"
