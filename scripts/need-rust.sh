# Sourced by the scripts in this directory: stops with a clear message when Rust is missing.
if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo is not installed." >&2
  echo "Install the Rust toolchain (1.85 or newer) with rustup:" >&2
  echo "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh" >&2
  exit 1
fi
