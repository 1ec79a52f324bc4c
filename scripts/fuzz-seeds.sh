#!/usr/bin/env bash
# Refreshes the committed seeds of each fuzz target from what `make fuzz` found: the inputs of
# migration/fuzz/work/<target>/ and the old seeds are reduced to a set with the same coverage
# (`cargo fuzz cmin`), of which N (default 48), spread evenly over that set sorted by size
# (small inputs and the deep ones that get through a whole migration), become
# migration/fuzz/corpus/<target>/. Files with names of their own (not a 40-digit hash: the
# inputs of fixed bugs, `regression-*`, and hand-made seeds) are kept as they are.
#
#   scripts/fuzz-seeds.sh [N] TARGET...
set -euo pipefail
n=48
if [[ ${1:-} =~ ^[0-9]+$ ]]; then
  n=$1
  shift
fi
cargo=${CARGO:-cargo}
cd "$(dirname "$0")/../migration"
for t in "$@"; do
  tmp=$(mktemp -d)
  cp -r "fuzz/work/$t/." "$tmp/" 2>/dev/null || true
  hashed=(-regextype posix-extended -type f -regex '.*/[0-9a-f]{40}')
  find "fuzz/corpus/$t" "${hashed[@]}" -exec cp {} "$tmp/" \;
  "$cargo" +nightly fuzz cmin -s "${FUZZ_SANITIZER:-none}" "$t" "$tmp" >/dev/null 2>&1
  find "fuzz/corpus/$t" "${hashed[@]}" -delete
  find "$tmp" -type f -printf '%s %p\n' | sort -n >"$tmp.list"
  awk -v n="$n" 'NR == FNR { m++; next } { if (int((FNR - 1) * n / m) != int(FNR * n / m) || m <= n) print }' \
    "$tmp.list" "$tmp.list" | cut -d' ' -f2- | while read -r f; do cp "$f" "fuzz/corpus/$t/"; done
  rm -rf "$tmp" "$tmp.list"
  echo "fuzz-seeds: $t: $(find "fuzz/corpus/$t" -type f | wc -l) seeds," \
    "$(du -sb "fuzz/corpus/$t" | cut -f1) bytes"
done
