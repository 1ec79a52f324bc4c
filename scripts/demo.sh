#!/usr/bin/env bash
# `make demo`: boot the built-in test guest, report the time from start to its first VERIFY-OK,
# show a few more rounds, shut it down over the control socket and show how to boot Linux.
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
echo "status: $(printf '{"cmd":"status"}\n' | timeout 5 python3 -c '
import socket,sys
s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(sys.stdin.buffer.read()); print(s.makefile().readline().strip())' "$api")"
printf '{"cmd":"shutdown"}\n' | timeout 5 python3 -c '
import socket,sys
s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(sys.stdin.buffer.read()); s.makefile().readline()' "$api"
wait $pid || true
cat <<MSG

To boot Linux:
  make guest-linux        # Debian cloud kernel + busybox/workload initramfs, cached in .cache/linux
  $bin run --kernel .cache/linux/vmlinuz --initrd .cache/linux/initramfs.cpio.gz \\
      --cmdline "console=ttyS0" --mem 512M --cpus 2
(On nested KVM without hardware support for guest kernel mode, the kernel's early boot is emulated:
  $bin run --kernel .cache/linux/vmlinux --cmdline "console=ttyS0 earlyprintk=ttyS0"
 prints the boot log until the emulator meets an instruction it does not know.)
MSG
