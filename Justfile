# Developer tasks. `just --list` shows them.

# Format the code.
fmt:
    cargo fmt --all

# Lints, as CI runs them.
lint:
    cargo fmt --all -- --check
    cargo clippy --all-targets --locked -- -D warnings

# The whole test suite (what CI runs).
test:
    bash scripts/test.sh

# Policy tests only, verbose, with coverage.
policy-test:
    cargo run --quiet -- policy test policies/ policy-tests/ -v --coverage

# The policy tests under coral policy test and the real OPA engine, compared test for test.
opa-test:
    bash scripts/opa-policy-test.sh

# Build (or find cached) the control plane of the control-plane tests, and run them.
control-plane-test:
    CORAL_CONTROL_PLANE_BIN="$(bash scripts/control-plane.sh)" CORAL_HELM_BIN="$(bash scripts/helm.sh)" cargo test --test control_plane -- --ignored --test-threads=1

# Build (or find cached) Helm, and check the chart against deploy/.
helm-test:
    CORAL_HELM_BIN="$(bash scripts/helm.sh)" cargo test --test helm -- --ignored

# Regenerate committed files: the CRDs in crds/, and their copies and the policies' in deploy/.
generate:
    cargo run --quiet -- crd --output-dir crds
    cp crds/*.yaml deploy/base/crds/
    cp policies/*.rego deploy/base/policies/

# Render deploy/ and its overlays and validate every object offline.
check-deploy:
    bash scripts/check-deploy.sh

# Benchmarks; each prints its figures.
bench:
    cargo bench --bench decision
    CORAL_CONTROL_PLANE_BIN="$(bash scripts/control-plane.sh || true)" cargo bench --bench webhook_load
    cargo bench --bench pull
    cargo bench --bench aggregate
    cargo bench --bench mirror

# The demo: the webhook over HTTPS with the embedded policies, sent the example workloads.
demo:
    bash scripts/demo.sh
