# The coral image: one static-enough binary on a distroless base with no shell.
#   docker build -t REGISTRY/coral:0.1.0 .
# Then point deploy/ at it: (cd deploy/base && kustomize edit set image coral=REGISTRY/coral:0.1.0)

FROM rust:1.95-bookworm AS build
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

# distroless/cc: glibc and libgcc, no shell, no package manager; nonroot (65532) by default.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/coral /coral
USER 65532:65532
ENTRYPOINT ["/coral"]
