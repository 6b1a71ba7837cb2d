#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and integration tests (which run the real
# coral binary, containerd and an OCI registry), and the default policies' own tests with full
# coverage. Installs the packages the tests need when run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
# A one-off build: incremental compilation would only add gigabytes to target/.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
. scripts/need-rust.sh
. scripts/need-packages.sh
# protoc builds the CRI types; the rest run for real in the tests: containerd with its CRI
# plugin and runc, an OCI registry, umoci and skopeo to build and push images, htpasswd for
# registry auth; the real nodes' pod network (the CNI plugins, ip, unshare); strip for the
# binary the Coral image is built from.
need_packages protoc:protobuf-compiler containerd:containerd runc:runc \
  docker-registry:docker-registry umoci:umoci skopeo:skopeo htpasswd:apache2-utils \
  /usr/lib/cni/bridge:containernetworking-plugins ip:iproute2 unshare:util-linux strip:binutils

echo "== fuzz/Cargo.lock matches the crate's dependencies"
if ! cargo metadata --quiet --locked --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null; then
  echo "error: fuzz/Cargo.lock is out of date: run cargo metadata --manifest-path fuzz/Cargo.toml and commit it" >&2
  exit 1
fi
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --all-targets --locked
echo "== coral policy test policies/ policy-tests/"
cargo run --quiet --locked -- policy test policies/ policy-tests/ --coverage --threshold 100
echo "== the same policy tests under the real OPA engine"
bash scripts/opa-policy-test.sh policies/ policy-tests/
echo "== the Helm chart renders what deploy/ renders, and passes helm lint --strict"
status=0
helm=$(bash scripts/helm.sh) || status=$?
if [ "$status" -eq 0 ]; then
  CORAL_HELM_BIN="$helm" cargo test --locked --test helm -- --ignored
elif [ "$status" -eq 3 ]; then
  echo "Helm chart tests: NOT RUN (Go is missing; see above)"
else
  echo "error: helm did not build" >&2
  exit "$status"
fi
echo "== control plane and real nodes: kube-apiserver, etcd, kube-scheduler, kube-controller-manager, kubelet; BuildKit"
status=0
started=$(date +%s)
bin=$(bash scripts/control-plane.sh) || status=$?
echo "control plane and kubelet: ready in $(( $(date +%s) - started )) s"
if [ "$status" -eq 0 ]; then
  started=$(date +%s)
  buildkit=$(bash scripts/buildkit.sh)
  echo "BuildKit: ready in $(( $(date +%s) - started )) s"
  cargo test --locked --no-run --test control_plane
  # One control plane at a time: two would share the two cores. The tests run in a network
  # namespace of their own, holding only loopback and the real nodes' veths and bridges: no
  # packet of theirs can leave the machine. The real-node tests (nodes::) second, timed apart.
  for part in "--skip nodes::" "nodes::"; do
    started=$(date +%s)
    # shellcheck disable=SC2086 # $part is two words or one
    CORAL_CONTROL_PLANE_BIN="$bin" CORAL_HELM_BIN="$helm" CORAL_BUILDKIT_BIN="$buildkit" \
      unshare --net -- sh -c 'ip link set lo up && exec "$@"' sh \
      cargo test --locked --offline --test control_plane -- --ignored --test-threads=1 --nocapture $part
    case "$part" in
      nodes::) echo "real-node tests (each building the Coral image it runs) ran in $(( $(date +%s) - started )) s" ;;
      *) echo "control-plane tests ran in $(( $(date +%s) - started )) s" ;;
    esac
  done
elif [ "$status" -eq 3 ]; then
  echo "control-plane tests: NOT RUN (Go is missing; see above)"
else
  echo "error: the control plane did not build" >&2
  exit "$status"
fi
echo "== fuzzing: every target of fuzz/ for 15 s from its seed corpus"
status=0
bash scripts/fuzz.sh 15 || status=$?
if [ "$status" -eq 3 ]; then
  echo "fuzzing: NOT RUN (nightly Rust is missing; the corpora were replayed by cargo test)"
elif [ "$status" -ne 0 ]; then
  exit "$status"
fi
echo "== coral crd matches crds/"
diff <(cargo run --quiet --locked -- crd) <(cat crds/*.yaml)
echo "== deploy/: render with kubectl kustomize, validate offline"
bash scripts/check-deploy.sh
echo "disk used: target/ $(du -sh target | cut -f1), fuzz/target/ $(du -sh fuzz/target 2>/dev/null | cut -f1 || echo none)"
echo "all tests passed"
