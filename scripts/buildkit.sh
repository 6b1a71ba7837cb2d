#!/usr/bin/env bash
# Builds the pinned BuildKit (buildkitd with its runc worker, and buildctl) from the Go module
# in tools/buildkit with the machine's Go, into a cache directory keyed by its version, so that
# a second run builds nothing. The tests build the Coral image from the repository's Dockerfile
# with it; the build service runs the same BuildKit in its build pods. Prints the directory
# holding the two binaries on its last line.
#
# Exit status: 0 built (or cached); 3 Go is missing (the tests are then not run, and say so);
# anything else, the build failed.
set -euo pipefail
cd "$(dirname "$0")/.."
module=tools/buildkit
version=$(awk '$1 == "github.com/moby/buildkit" {print $2; exit} $1 == "require" && $2 == "github.com/moby/buildkit" {print $3; exit}' "$module/go.mod")
cache=${CORAL_BUILDKIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/coral/buildkit}
bin="$cache/buildkit-$version"
. scripts/go-tool.sh
go_tool_cached "buildkit $version" "$bin" "$bin" \
  "the image tests need it to build buildkitd and buildctl $version" buildkitd buildctl
. scripts/go-scratch-cache.sh
(
  cd "$module"
  ldflags="-s -w -X github.com/moby/buildkit/version.Version=$version -X github.com/moby/buildkit/version.Revision=$version"
  GOFLAGS="${GOFLAGS:-} -buildvcs=false" CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" \
    -o "$bin.partial/" github.com/moby/buildkit/cmd/buildkitd github.com/moby/buildkit/cmd/buildctl
)
go_tool_built "buildkit $version" "$bin" "$bin"
