#!/usr/bin/env bash
# Install the Debian packages the build, the tests and the benchmarks need (zstd: `make kernel`
# decompresses the vmlinux out of the bzImage with it; g++: libfuzzer-sys compiles libFuzzer
# for `make fuzz`; iproute2 and iptables: the two-host rig, scripts/rig.sh; openssl: the
# certificates of the TLS benchmarks). Idempotent: does nothing when everything is already
# installed, runs `apt-get update` only when something is missing.
set -euo pipefail
pkgs=(qemu-system-x86 busybox-static cpio gzip zstd g++ iproute2 iptables openssl)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "deps: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
