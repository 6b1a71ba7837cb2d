# The coral image: one static-enough binary on a distroless base with no shell.
#   docker build -t REGISTRY/coral:0.1.0 .
# Then point deploy/ at it: (cd deploy/base && kustomize edit set image coral=REGISTRY/coral:0.1.0)
#
# The bases are build arguments (their defaults are what the image is built from), so that a
# machine that cannot reach those registries gives bases of its own. The stage `prebuilt`
# packages a coral binary built already (a release pipeline's, or the test suite's) instead
# of building one: give the directory holding it as the build context `binary`:
#   docker buildx build --target prebuilt --build-context binary=target/release -t … .
# The default target builds the binary here, from the source.
ARG RUST_IMAGE=rust:1.95-bookworm
# distroless/cc: glibc and libgcc, no shell, no package manager; nonroot (65532) by default.
ARG BASE_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, so that source changes rebuild only the crate.
COPY Cargo.toml Cargo.lock ./
COPY benches benches
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && cargo build --release --locked --bin coral \
 && rm -rf src
COPY src src
COPY policies policies
COPY examples examples
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin coral

FROM ${BASE_IMAGE} AS prebuilt
COPY --from=binary coral /coral
USER 65532:65532
ENTRYPOINT ["/coral"]

FROM ${BASE_IMAGE} AS release
COPY --from=build /src/target/release/coral /coral
USER 65532:65532
ENTRYPOINT ["/coral"]
