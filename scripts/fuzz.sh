#!/usr/bin/env bash
# Runs each cargo-fuzz target of migration/fuzz for a fixed time, FUZZ_JOBS (default 2) at a
# time, and prints per target the executions, the corpus size and the coverage; exits
# non-zero if any target crashed, timed out or ran out of memory (the input is left in
# migration/fuzz/artifacts/<target>/).
#
#   scripts/fuzz.sh SECONDS TARGET...
#
# New inputs go to migration/fuzz/work/<target>/ (ignored by git); the committed seeds in
# migration/fuzz/corpus/<target>/ are read, never written. Environment: CARGO (default
# cargo), FUZZ_SANITIZER (default none: the guard pages of the fake VM catch stray writes),
# FUZZ_JOBS.
set -euo pipefail
secs=$1
shift
cargo=${CARGO:-cargo}
sanitizer=${FUZZ_SANITIZER:-none}
jobs=${FUZZ_JOBS:-2}
cd "$(dirname "$0")/../migration"

run() {
  local t=$1
  mkdir -p "fuzz/work/$t" "fuzz/corpus/$t"
  local status=0
  "$cargo" +nightly fuzz run -s "$sanitizer" "$t" "fuzz/work/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$secs" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 >"fuzz/work/$t.log" 2>&1 || status=$?
  echo "$status" >"fuzz/work/$t.status"
}

targets=("$@")
for ((i = 0; i < ${#targets[@]}; i += jobs)); do
  for t in "${targets[@]:i:jobs}"; do
    run "$t" &
  done
  wait
done

failed=0
lines=()
for t in "${targets[@]}"; do
  log="fuzz/work/$t.log"
  status=$(cat "fuzz/work/$t.status")
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
  cov=$(sed -n 's/.* cov: \([0-9]*\) .*/\1/p' <<<"$last")
  files=$(find "fuzz/work/$t" "fuzz/corpus/$t" -type f | wc -l)
  kib=$(find "fuzz/work/$t" "fuzz/corpus/$t" -type f -printf '%s\n' |
    awk '{ s += $1 } END { printf "%.0f", s / 1024 }')
  line=$(printf '%-16s %9s runs in %ss (%6s/s)  corpus %5s inputs %6s KiB  cov %5s' \
    "$t" "${runs:-?}" "$secs" "${rate:-?}" "$files" "$kib" "${cov:-?}")
  if [ "$status" -ne 0 ]; then
    failed=1
    echo "fuzz: $t FAILED (exit $status); its log ends:" >&2
    grep -v '^ *[0-9]*: \|^ *at ' "$log" | tail -30 >&2
    echo "fuzz: the input is in migration/fuzz/artifacts/$t/" >&2
    lines+=("$line  FAILED")
  else
    lines+=("$line  no crash")
  fi
done
echo "fuzz: ${#targets[@]} targets, ${secs} s each, ${jobs} at a time:"
printf '  %s\n' "${lines[@]}"
exit "$failed"
