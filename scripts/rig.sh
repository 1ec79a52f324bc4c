#!/usr/bin/env bash
# Two hosts on one machine: two network namespaces joined by a veth pair, the link shaped like
# 10 GbE or 1 GbE, cut and healed at will. Root only.
#
#   rig.sh up NAME INDEX          namespaces NAME-src (10.213.INDEX.1) and NAME-dst (.2)
#   rig.sh shape NAME 10g|1g|none 10g: 10 Gbit/s, 0.2 ms RTT; 1g: 1 Gbit/s, 2 ms RTT, 0.1% loss
#   rig.sh cut NAME               the link goes down at both ends (no reset: packets vanish)
#   rig.sh heal NAME              the link comes back up
#   rig.sh down NAME              everything removed (namespaces, shaping, delay lines)
#   rig.sh exec NAME src|dst CMD… runs CMD in that namespace
#   rig.sh check                  says which shaper this kernel allows
#
# NAME is at most 11 characters (interface names are NAME-s, NAME-d). Shaping is a token
# bucket (tbf) for the rate under the delay and loss, both directions alike. The delay and
# loss come from sch_netem where the kernel has it; else (RIG_SHAPER=netdelay, or netem
# missing) from `netdelay` (target/release/netdelay, $NETDELAY to override), a delay line
# that holds each outgoing packet in the kernel's NFQUEUE for half the RTT, queued to it by
# an iptables rule in each namespace.
set -euo pipefail

die() { echo "rig: $*" >&2; exit 1; }
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
state_root=/run/minivmm-rig
ipt() { if command -v iptables-legacy >/dev/null; then iptables-legacy "$@"; else iptables "$@"; fi; }

name_ok() {
  [[ "${1:-}" =~ ^[a-z0-9][a-z0-9-]{0,10}$ ]] || die "NAME must be 1-11 of [a-z0-9-], got '${1:-}'"
}

netem_ok() {
  # Try it on a throwaway namespace's loopback.
  local ns="rigcheck$$"
  ip netns add "$ns" 2>/dev/null || return 1
  local ok=1
  ip netns exec "$ns" tc qdisc add dev lo root netem delay 1us 2>/dev/null && ok=0
  ip netns del "$ns"
  return $ok
}

shaper() {
  case "${RIG_SHAPER:-auto}" in
    netem|netdelay) echo "$RIG_SHAPER" ;;
    auto) if netem_ok; then echo netem; else echo netdelay; fi ;;
    *) die "RIG_SHAPER must be netem, netdelay or auto" ;;
  esac
}

netdelay_bin() {
  local b="${NETDELAY:-$here/../target/release/netdelay}"
  [ -x "$b" ] || die "$b is missing: build it (cargo build --release -p e2e --bin netdelay)"
  echo "$b"
}

up() {
  local n=$1 idx=$2
  [[ "$idx" =~ ^[0-9]+$ ]] && [ "$idx" -ge 1 ] && [ "$idx" -le 254 ] || die "INDEX must be 1..254"
  ip netns add "$n-src"
  ip netns add "$n-dst"
  ip link add "$n-s" netns "$n-src" type veth peer name "$n-d" netns "$n-dst"
  ip -n "$n-src" addr add "10.213.$idx.1/24" dev "$n-s"
  ip -n "$n-dst" addr add "10.213.$idx.2/24" dev "$n-d"
  for side in src dst; do ip -n "$n-$side" link set lo up; done
  ip -n "$n-src" link set "$n-s" up
  ip -n "$n-dst" link set "$n-d" up
  mkdir -p "$state_root/$n"
  echo "rig $n: $n-src 10.213.$idx.1 <-> $n-dst 10.213.$idx.2"
}

unshape() {
  local n=$1
  for pair in "src:$n-s" "dst:$n-d"; do
    local side=${pair%%:*} dev=${pair#*:}
    ip -n "$n-$side" link show "$dev" >/dev/null 2>&1 || continue
    tc -n "$n-$side" qdisc del dev "$dev" root 2>/dev/null || true
    ip netns exec "$n-$side" bash -c "$(declare -f ipt); while ipt -D OUTPUT -o $dev -j NFQUEUE --queue-num 0 2>/dev/null; do :; done" || true
  done
  for pid in "$state_root/$n"/netdelay-*.pid; do
    [ -f "$pid" ] || continue
    kill "$(cat "$pid")" 2>/dev/null || true
    rm -f "$pid"
  done
}

shape() {
  local n=$1 link=$2 rate delay_us loss
  case "$link" in
    10g) rate=10gbit; delay_us=100; loss=0 ;;
    1g) rate=1gbit; delay_us=1000; loss=0.001 ;;
    none) unshape "$n"; echo "rig $n: unshaped"; return ;;
    *) die "link must be 10g, 1g or none" ;;
  esac
  unshape "$n"
  local how; how=$(shaper)
  for pair in "src:$n-s" "dst:$n-d"; do
    local side=${pair%%:*} dev=${pair#*:}
    local tbf="tbf rate $rate burst 256kb limit 16mb"
    if [ "$how" = netem ]; then
      tc -n "$n-$side" qdisc add dev "$dev" root handle 1: netem delay "${delay_us}us" \
        loss "$(awk "BEGIN{print $loss*100}")%" limit 100000
      tc -n "$n-$side" qdisc add dev "$dev" parent 1:1 handle 10: $tbf
    else
      tc -n "$n-$side" qdisc add dev "$dev" root $tbf
      local bin; bin=$(netdelay_bin)
      ip netns exec "$n-$side" "$bin" --queue 0 --delay-us "$delay_us" --loss "$loss" \
        </dev/null >"$state_root/$n/netdelay-$side.log" 2>&1 &
      echo $! >"$state_root/$n/netdelay-$side.pid"
      # The rule only once the delay line is bound: packets queued to nobody are dropped.
      for _ in $(seq 100); do grep -q "netdelay: queue" "$state_root/$n/netdelay-$side.log" && break; sleep 0.02; done
      kill -0 "$(cat "$state_root/$n/netdelay-$side.pid")" 2>/dev/null \
        || die "netdelay in $n-$side failed: $(cat "$state_root/$n/netdelay-$side.log")"
      ip netns exec "$n-$side" bash -c "$(declare -f ipt); ipt -A OUTPUT -o $dev -j NFQUEUE --queue-num 0"
    fi
  done
  echo "rig $n: $link ($rate, RTT $((delay_us * 2)) us, loss $loss, delay and loss by $how)"
}

cut() {
  local n=$1
  ip -n "$n-src" link set "$n-s" down
  ip -n "$n-dst" link set "$n-d" down
  echo "rig $n: cut"
}

heal() {
  local n=$1 idx
  ip -n "$n-src" link set "$n-s" up
  ip -n "$n-dst" link set "$n-d" up
  echo "rig $n: healed"
}

down() {
  local n=$1
  unshape "$n" 2>/dev/null || true
  ip netns del "$n-src" 2>/dev/null || true
  ip netns del "$n-dst" 2>/dev/null || true
  rm -rf "${state_root:?}/$n"
  echo "rig $n: down"
}

[ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, tc, iptables)"
cmd=${1:-}; shift || true
case "$cmd" in
  up) name_ok "${1:-}"; up "$1" "${2:?INDEX}" ;;
  shape) name_ok "${1:-}"; shape "$1" "${2:?10g|1g|none}" ;;
  cut) name_ok "${1:-}"; cut "$1" ;;
  heal) name_ok "${1:-}"; heal "$1" ;;
  down) name_ok "${1:-}"; down "$1" ;;
  exec) name_ok "${1:-}"; n=$1; side=${2:?src|dst}; shift 2; exec ip netns exec "$n-$side" "$@" ;;
  check) command -v tc >/dev/null || die "tc is missing (iproute2)"; echo "shaper: $(shaper)" ;;
  *) die "usage: rig.sh up NAME INDEX | shape NAME 10g|1g|none | cut NAME | heal NAME | down NAME | exec NAME src|dst CMD... | check" ;;
esac
