#!/usr/bin/env bash
# Fetch the newest Debian cloud kernel image the archive offers (apt-get download + dpkg -x) into
# the ignored cache folder and link it as $CACHE/vmlinuz. Cached: a second run does nothing.
set -euo pipefail
CACHE=${1:-.cache/linux}
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
if [ -e "$CACHE/vmlinuz" ]; then
  exit 0
fi
pick() {
  apt-cache search --names-only '^linux-image-[0-9].*-cloud-amd64$' | awk '{print $1}' | sort -V | tail -1
}
pkg=$(pick)
if [ -z "$pkg" ]; then
  [ "$(id -u)" -eq 0 ] && apt-get update -qq || sudo apt-get update -qq
  pkg=$(pick)
fi
[ -n "$pkg" ] || { echo "fetch-kernel: no linux-image-*-cloud-amd64 package found" >&2; exit 1; }
echo "fetch-kernel: $pkg"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
chmod 755 "$tmp"
(cd "$tmp" && apt-get download -q "$pkg" >/dev/null)
dpkg -x "$tmp"/*.deb "$CACHE/$pkg"
img=$(ls "$CACHE/$pkg"/boot/vmlinuz-* | head -1)
ln -sf "${img#"$CACHE"/}" "$CACHE/vmlinuz"
echo "$pkg" > "$CACHE/PACKAGE"
echo "fetch-kernel: $CACHE/vmlinuz -> $img"
