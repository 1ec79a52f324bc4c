#!/bin/bash
# One migration of the 20,000 pages/s writer (1 GiB) across the two-host rig, for looking at
# one figure by hand: scripts/rig-one.sh SHAPE [MIGRATE ARGS...], SHAPE 10g|1g|none.
# Prints total, downtime, the final pass's and "destination running"'s microseconds and the
# final pass's pages. Needs root, `make build` and the rig (scripts/rig.sh).
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
B="${MINIVMM_BIN:-$here/../target/release/minivmm}"
R="$here/rig.sh"
shape=${1:?10g|1g|none}; shift
N=one$$
"$R" up "$N" 77 >/dev/null || exit 1
trap '"$R" down "$N" >/dev/null 2>&1; rm -rf "$D"' EXIT
"$R" shape "$N" "$shape" >/dev/null
D=$(mktemp -d)
ip netns exec "$N-src" "$B" run --mem 1G --cpus 1 --cmdline "touch=256M rate=20000 seed=3" \
  --api-socket "$D/src.sock" >"$D/src.out" 2>"$D/src.err" &
ip netns exec "$N-dst" "$B" receive --listen tcp:10.213.77.2:4000 --insecure-plaintext \
  --mem 1G --cpus 1 --api-socket "$D/dst.sock" >"$D/dst.out" 2>"$D/dst.err" &
for _ in $(seq 100); do grep -q VERIFY-OK "$D/src.out" 2>/dev/null && break; sleep 0.1; done
sleep 0.3
ip netns exec "$N-src" "$B" migrate --to tcp:10.213.77.2:4000 --api-socket "$D/src.sock" --json "$@" \
  >"$D/mig.json" 2>"$D/mig.err"
python3 - "$D/mig.json" "$shape $*" <<'PY' || tail -3 "$D/mig.err"
import json, sys
d = json.load(open(sys.argv[1])); s = d["stats"]; ph = dict(s["downtime_phases_us"])
print(sys.argv[2].ljust(20), "total", d["total_ms"], "downtime", d["downtime_ms"],
      "final pass us", ph.get("final pass"), "destination running us",
      ph.get("destination running"), "final pages", s["passes"][-1]["pages_scanned"])
PY
pkill -f "api-socket $D/"
sleep 0.3
