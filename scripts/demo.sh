#!/usr/bin/env bash
# `make demo`: boot the built-in test guest, report the time from start to its first VERIFY-OK,
# show a few more rounds, live-migrate it into a second minivmm process, show it going on there,
# shut it down over the control socket and show how to boot Linux.
set -euo pipefail
bin=${MINIVMM_BIN:-target/release/minivmm}
dir=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
api=$dir/api.sock
start=$(date +%s%N)
"$bin" run --mem 1G --cmdline "touch=64M rate=1000 seed=1" --api-socket "$api" </dev/null >"$dir/console" 2>"$dir/stderr" &
pid=$!
first=""
for _ in $(seq 1 600); do
  if grep -q "VERIFY-OK" "$dir/console" 2>/dev/null; then
    first=$(( ($(date +%s%N) - start) / 1000000 ))
    break
  fi
  kill -0 $pid 2>/dev/null || break
  sleep 0.01
done
sleep 2
echo "---- test guest console (minivmm run --mem 1G --cmdline 'touch=64M rate=1000 seed=1') ----"
head -n 12 "$dir/console"
echo "----"
if [ -z "$first" ]; then
  echo "demo: the test guest did not report VERIFY-OK" >&2
  cat "$dir/stderr" >&2
  exit 1
fi
echo "time from start to first VERIFY-OK: ${first} ms"
ask() { # ask SOCKET JSON: one control request, one reply line
  printf '%s\n' "$2" | timeout 5 python3 -c '
import socket,sys
s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(sys.stdin.buffer.read()); print(s.makefile().readline().strip())' "$1"
}
echo "status: $(ask "$api" '{"cmd":"status"}')"

echo
echo "---- live migration to a second minivmm process ----"
dapi=$dir/dst-api.sock
"$bin" receive --listen "unix:$dir/m.sock" --api-socket "$dapi" --mem 1G --cpus 1 \
  </dev/null >"$dir/dst-console" 2>"$dir/dst-stderr" &
dpid=$!
trap 'kill $pid $dpid 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 1 500); do [ -S "$dapi" ] && break; sleep 0.01; done
echo "\$ minivmm receive --listen unix:\$dir/m.sock --mem 1G --cpus 1"
echo "\$ minivmm migrate --to unix:\$dir/m.sock"
if ! "$bin" migrate --to "unix:$dir/m.sock" --api-socket "$api"; then
  echo "demo: the migration failed" >&2
  cat "$dir/dst-stderr" >&2
  exit 1
fi
wait $pid || true
for _ in $(seq 1 300); do
  [ "$(grep -c VERIFY-OK "$dir/dst-console" || true)" -ge 2 ] && break
  sleep 0.01
done
echo "---- the guest goes on at the destination ----"
tail -n 2 "$dir/dst-console"
echo "destination status: $(ask "$dapi" '{"cmd":"status"}')"
ask "$dapi" '{"cmd":"shutdown"}' >/dev/null
wait $dpid || true
cat <<MSG

To boot Linux:
  make guest-linux        # Debian cloud kernel + busybox/workload initramfs, cached in .cache/linux
  $bin run --kernel .cache/linux/vmlinuz --initrd .cache/linux/initramfs.cpio.gz \\
      --cmdline "console=ttyS0" --mem 512M --cpus 2
(On nested KVM without hardware support for guest kernel mode, the kernel's early boot is emulated:
  $bin run --kernel .cache/linux/vmlinux --cmdline "console=ttyS0 earlyprintk=ttyS0"
 prints the boot log until the emulator meets an instruction it does not know.)
MSG
