# Sourced by the scripts that build a pinned Go tool into a cache directory keyed by its
# version (control-plane.sh, helm.sh, buildkit.sh).
#
# `go_tool_cached WHAT DIR RESULT NEEDS BINARY...` prints RESULT and exits 0 when every BINARY
# is in DIR already. Otherwise, when Go is missing, it says that WHAT needs it (NEEDS: for
# what) and exits 3, which the suite reports as tests not run. Otherwise it makes DIR.partial
# for the build and returns; `go_tool_built WHAT DIR RESULT` then puts the build in place,
# says how long it took and prints RESULT.
go_tool_cached() {
  local what=$1 dir=$2 result=$3 needs=$4 binary cached=yes
  shift 4
  for binary in "$@"; do
    [ -x "$dir/$binary" ] || cached=no
  done
  if [ "$cached" = yes ]; then
    echo "$what: cached" >&2
    echo "$result"
    exit 0
  fi
  if ! command -v go >/dev/null 2>&1; then
    echo "$what: Go is not installed; $needs." >&2
    echo "Install Go 1.26 or newer (https://go.dev/doc/install) and run this again." >&2
    exit 3
  fi
  go_tool_started=$(date +%s)
  mkdir -p "$dir.partial"
}

go_tool_built() {
  local what=$1 dir=$2 result=$3
  rm -rf "$dir"
  mv "$dir.partial" "$dir"
  echo "$what: built in $(( $(date +%s) - go_tool_started )) s" >&2
  echo "$result"
}
