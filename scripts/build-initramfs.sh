#!/usr/bin/env bash
# Build the Linux guest's initramfs: busybox-static, our static workload program and /init.
set -euo pipefail
out=$1
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$(dirname "$out")"
# The workload is a static Rust binary (std, glibc static), built for the host target.
RUSTFLAGS='-C target-feature=+crt-static' cargo build -q --release \
  --manifest-path "$root/guest/workload/Cargo.toml" \
  --target x86_64-unknown-linux-gnu --target-dir "$root/target/workload"
wl="$root/target/workload/x86_64-unknown-linux-gnu/release/workload"
bb=/bin/busybox # from busybox-static (scripts/deps.sh)
"$root/guest/mkinitramfs.sh" "$bb" "$wl" "$root/guest/initramfs/init" "$out"
