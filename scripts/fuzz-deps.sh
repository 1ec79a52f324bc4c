#!/usr/bin/env bash
# What `make fuzz` needs beyond `make deps`, installed only when missing: a nightly toolchain
# (cargo-fuzz instruments with nightly-only flags) and cargo-fuzz itself, from crates.io at a
# fixed version. Idempotent: does nothing when both are there.
set -euo pipefail
cargo=${CARGO:-cargo}
version=0.13.2
if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz-deps: installing the nightly toolchain"
  rustup toolchain install nightly --profile minimal
fi
if ! "$cargo" fuzz --version 2>/dev/null | grep -q "$version"; then
  echo "fuzz-deps: installing cargo-fuzz $version"
  "$cargo" install cargo-fuzz --locked --version "$version"
fi
