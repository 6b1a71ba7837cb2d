#!/usr/bin/env bash
# Builds the pinned Helm the chart's tests run (helm template, helm lint), from the Go module in
# tools/helm with the machine's Go, into a cache directory keyed by its version, so that a
# second run builds nothing. Prints the path of the helm binary on its last line.
#
# Exit status: 0 built (or cached); 3 Go is missing (the tests are then not run, and say so);
# anything else, the build failed.
set -euo pipefail
cd "$(dirname "$0")/.."
module=tools/helm
version=$(awk '$1 == "helm.sh/helm/v3" {print $2; exit} $1 == "require" && $2 == "helm.sh/helm/v3" {print $3; exit}' "$module/go.mod")
cache=${CORAL_HELM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/coral/helm}
bin="$cache/helm-$version"
. scripts/go-tool.sh
go_tool_cached "helm $version" "$bin" "$bin/helm" "the chart's tests need it to build helm $version" helm
. scripts/go-scratch-cache.sh
(
  cd "$module"
  # As Helm's own build does: the Kubernetes version it assumes without a cluster (helm
  # template, helm lint) follows its client-go, v0.N being Kubernetes 1.N.
  client_go=$(go list -m -f '{{.Version}}' k8s.io/client-go)
  minor=${client_go#v0.}
  minor=${minor%%.*}
  ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$version -X helm.sh/helm/v3/internal/version.metadata= -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for package in chartutil lint/rules; do
    ldflags="$ldflags -X helm.sh/helm/v3/pkg/$package.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/$package.k8sVersionMinor=$minor"
  done
  GOFLAGS="${GOFLAGS:-} -buildvcs=false" go build -trimpath -ldflags "$ldflags" \
    -o "$bin.partial/" helm.sh/helm/v3/cmd/helm
)
go_tool_built "helm $version" "$bin" "$bin/helm"
