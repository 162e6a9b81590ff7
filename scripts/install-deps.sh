#!/usr/bin/env bash
# Installs what the build and the tests need, only when it is missing.
# Today: a Rust toolchain with rustfmt and clippy (the machine image has them).
set -euo pipefail
missing=()
command -v cargo >/dev/null || missing+=("cargo (install Rust with rustup)")
command -v python3 >/dev/null || missing+=("python3")
cargo fmt --version >/dev/null 2>&1 || missing+=("rustfmt (rustup component add rustfmt)")
cargo clippy --version >/dev/null 2>&1 || missing+=("clippy (rustup component add clippy)")
if ((${#missing[@]})); then
  printf 'missing: %s\n' "${missing[@]}" >&2
  exit 1
fi
