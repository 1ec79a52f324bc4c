#!/usr/bin/env bash
# Extract the uncompressed vmlinux (an ELF with a PVH entry note) from a bzImage whose payload is
# zstd-compressed, as Debian's are. On machines where the guest's kernel mode is emulated, the
# bzImage decompressor stops on an instruction the emulator does not know (BMI2 shlx), so the
# early-boot test boots the very same kernel through its PVH entry instead.
set -euo pipefail
in=$1 out=$2
[ -s "$out" ] && exit 0
off=$(LC_ALL=C grep -obUaP '\x28\xb5\x2f\xfd' "$in" | head -1 | cut -d: -f1)
[ -n "$off" ] || { echo "extract-vmlinux: no zstd payload in $in" >&2; exit 1; }
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
# The payload is followed by a few trailing bytes; zstd complains about them after writing
# the whole frame, so judge the result by its ELF magic, not by zstd's exit code.
tail -c +$((off + 1)) "$in" | zstd -d -q -c > "$tmp" 2>/dev/null || true
if [ "$(head -c 4 "$tmp" | od -An -tx1 | tr -d ' ')" != "7f454c46" ]; then
  echo "extract-vmlinux: decompressed payload of $in is not an ELF" >&2
  exit 1
fi
mv "$tmp" "$out"
trap - EXIT
