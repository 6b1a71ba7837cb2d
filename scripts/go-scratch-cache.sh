# Sourced by the scripts that build a pinned Go tool into a cache keyed by its version
# (control-plane.sh, helm.sh): Go's build cache is of no use after such a build, so unless
# GOCACHE is set it lives in a scratch directory removed when the script exits (several GB
# otherwise, on a machine whose disk CI shares).
if [ -z "${GOCACHE:-}" ]; then
  go_scratch_cache=$(mktemp -d)
  export GOCACHE="$go_scratch_cache"
  trap 'chmod -R u+w "$go_scratch_cache" 2>/dev/null; rm -rf "$go_scratch_cache"' EXIT
fi
