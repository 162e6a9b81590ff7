#!/usr/bin/env bash
# Installs what the build and the tests need, only when it is missing:
# a Rust toolchain with rustfmt and clippy (the machine image has them), python3,
# protoc (the etcd client's build generates its gRPC code with it), and the
# nats-server and etcd servers the runtime tests start (Debian packages).
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

apt_pkgs=()
command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || apt_pkgs+=(nats-server)
command -v etcd >/dev/null || apt_pkgs+=(etcd-server)
command -v protoc >/dev/null || apt_pkgs+=(protobuf-compiler)
if ((${#apt_pkgs[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install as root: apt-get install -y ${apt_pkgs[*]}" >&2
    exit 1
  fi
  echo "installing ${apt_pkgs[*]} (Debian packages)…" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_pkgs[@]}" >/dev/null
fi
# Debian puts nats-server in /usr/sbin, which a non-login PATH may lack.
command -v nats-server >/dev/null || { echo "nats-server is installed in /usr/sbin; add it to PATH" >&2; exit 1; }
