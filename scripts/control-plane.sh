#!/usr/bin/env bash
# Builds the pinned Kubernetes control plane the control-plane tests run: kube-apiserver,
# kube-scheduler and kube-controller-manager (module k8s.io/kubernetes) and an etcd server
# (go.etcd.io/etcd/server/v3), and the kubelet of the real nodes from the same module, from the
# Go module in tools/control-plane, with the machine's Go, in one build (the five share most of
# their packages), into a cache directory keyed by those versions, so that a second run builds
# nothing. Prints the directory holding the five binaries on its last line.
#
# Exit status: 0 built (or cached); 3 Go is missing (the tests are then not run, and say so);
# anything else, the build failed.
set -euo pipefail
cd "$(dirname "$0")/.."
module=tools/control-plane
kubernetes=$(awk '$1 == "k8s.io/kubernetes" {print $2; exit}' "$module/go.mod")
etcd=$(awk '$1 == "go.etcd.io/etcd/server/v3" {print $2; exit}' "$module/go.mod")
cache=${CORAL_CONTROL_PLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/coral/control-plane}
bin="$cache/kubernetes-$kubernetes-etcd-$etcd"
binaries=(etcd kube-apiserver kube-scheduler kube-controller-manager kubelet)

. scripts/go-tool.sh
go_tool_cached "control plane $kubernetes (etcd $etcd)" "$bin" "$bin" \
  "the control-plane tests need it to build kube-apiserver, kube-scheduler, kube-controller-manager, etcd and the kubelet" \
  "${binaries[@]}"
minor=${kubernetes#v1.}
minor=${minor%%.*}
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$kubernetes -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
. scripts/go-scratch-cache.sh
(
  cd "$module"
  GOFLAGS="${GOFLAGS:-} -buildvcs=false" go build -trimpath -ldflags "$ldflags" -o "$bin.partial/" \
    ./cmd/etcd \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kubelet
)
go_tool_built "control plane $kubernetes (etcd $etcd)" "$bin" "$bin"
