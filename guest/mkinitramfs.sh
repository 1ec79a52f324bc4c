#!/usr/bin/env bash
# Build minivmm's Linux test initramfs (gzip'd newc cpio).
# usage: mkinitramfs.sh BUSYBOX WORKLOAD INIT OUTPUT
#   BUSYBOX   a static busybox (Debian busybox-static: /bin/busybox)
#   WORKLOAD  the static workload binary (guest/workload), installed as /bin/minivmm-workload
#   INIT      the /init script (guest/initramfs/init)
#   OUTPUT    where to write the .cpio.gz
# Every applet of the busybox gets a symlink in /bin or /sbin (as `busybox --list-full` says).
set -euo pipefail

if [ $# -ne 4 ]; then
    echo "usage: $0 BUSYBOX WORKLOAD INIT OUTPUT" >&2
    exit 2
fi
busybox=$1 workload=$2 init=$3 out=$4
for f in "$busybox" "$workload" "$init"; do
    if [ ! -f "$f" ]; then
        echo "$0: no such file: $f" >&2
        exit 1
    fi
done
if ! "$busybox" --list-full >/dev/null 2>&1; then
    echo "$0: $busybox is not a busybox that can list its applets" >&2
    exit 1
fi
if file -L "$busybox" "$workload" 2>/dev/null | grep -q "dynamically linked"; then
    echo "$0: busybox and the workload must be statically linked" >&2
    exit 1
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,root,etc}
install -m 0755 "$busybox" "$root/bin/busybox"
install -m 0755 "$workload" "$root/bin/minivmm-workload"
install -m 0755 "$init" "$root/init"
"$busybox" --list-full | while read -r applet; do
    [ -e "$root/$applet" ] && continue
    mkdir -p "$root/$(dirname "$applet")"
    ln -s /bin/busybox "$root/$applet"
done
# The kernel opens /dev/console before /init runs; devtmpfs replaces /dev later.
if [ "$(id -u)" = 0 ]; then
    mknod -m 600 "$root/dev/console" c 5 1
    mknod -m 666 "$root/dev/null" c 1 3
fi

mkdir -p "$(dirname "$out")"
tmp="$out.tmp.$$"
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -9 -n >"$tmp"
mv "$tmp" "$out"
echo "$out: $(stat -c %s "$out") bytes, $(find "$root" -mindepth 1 | wc -l) entries"
