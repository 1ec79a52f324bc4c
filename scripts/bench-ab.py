#!/usr/bin/env python3
"""Side by side: minivmm binaries (or dirty trackers) on `make bench` scenarios, alternating
one repetition of each per round, so that every candidate sees the same host load.

    scripts/bench-ab.py --rounds 5 --only idle-4G,idle-16G \\
        main=/tmp/minivmm-main ours=target/release/minivmm ring=target/release/minivmm:ring

Each LABEL=BIN[:TRACKER][@BENCH] runs `target/release/bench --only S --reps 1 --no-qemu
--no-micro --json` (or BENCH: an older tree's bench, for an older tree's binary) with
MINIVMM_BIN=BIN (and `--dirty-tracker TRACKER`); the label `qemu` (no binary)
takes QEMU's figures from a run with QEMU instead. Prints, per scenario and metric, the median
and [min-max] of every label, and the load average before and after. Needs
`cargo build --release -p bench` first.
"""

import argparse
import json
import os
import subprocess
import sys

METRICS = [
    ("total migration ms", "total_ms"),
    ("downtime ms", "downtime_ms"),
    ("dirty-log switch-on ms", "dirty_log_on_ms"),
    ("bulk pass ms", "bulk_pass_ms"),
    ("final dirty-log fetch ms", "final_fetch_ms"),
    ("MiB transferred", "bytes"),
    ("passes", "passes"),
    ("source CPU ms", "src_cpu_ms"),
]


def load():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def one(bench, scenario, label, spec):
    """One repetition of `scenario` for `label`: its Measure (a dict), or None if it failed."""
    args = [bench, "--only", scenario, "--reps", "1", "--no-micro", "--json"]
    env = dict(os.environ)
    if label == "qemu":
        key = "qemu"
    else:
        key = "minivmm"
        args.append("--no-qemu")
        spec, _, own_bench = spec.partition("@")
        if own_bench:
            args[0] = own_bench
        binary, _, tracker = spec.partition(":")
        env["MINIVMM_BIN"] = binary
        if tracker:
            args += ["--dirty-tracker", tracker]
    r = subprocess.run(args, env=env, capture_output=True, text=True)
    try:
        runs = json.loads(r.stdout.strip().splitlines()[-1])["scenarios"][0][key]
    except (IndexError, KeyError, ValueError):
        runs = []
    if not runs:
        print(f"  {label}: failed:\n{r.stderr[-2000:]}", file=sys.stderr)
        return None
    return runs[0]


def cell(values):
    v = sorted(x for x in values if isinstance(x, (int, float)))
    if not v:
        return "-"
    d = 2 if v[-1] < 10 else 1
    return f"{v[len(v) // 2]:.{d}f} [{v[0]:.{d}f}-{v[-1]:.{d}f}]"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", required=True, help="scenario names, comma-separated")
    ap.add_argument("--bench", default="target/release/bench")
    ap.add_argument("candidates", nargs="+", help="LABEL=BIN[:TRACKER][@BENCH], or qemu")
    a = ap.parse_args()
    cands = []
    for c in a.candidates:
        label, _, spec = c.partition("=")
        cands.append((label, spec))
    print(f"load average before: {load()}")
    for scenario in a.only.split(","):
        runs = {label: [] for label, _ in cands}
        for r in range(a.rounds):
            for label, spec in cands:
                m = one(a.bench, scenario, label, spec)
                if m is not None:
                    runs[label].append(m)
            print(f"  {scenario}: round {r + 1}/{a.rounds} done, load {load()}", file=sys.stderr)
        print(f"\n== {scenario}, {a.rounds} rounds, candidates alternating")
        print(f"{'metric':<26}" + "".join(f"{label:>26}" for label, _ in cands))
        for name, key in METRICS:
            row = []
            for label, _ in cands:
                vals = [m.get(key) for m in runs[label]]
                if key == "bytes":
                    vals = [v / 1048576 for v in vals if isinstance(v, (int, float))]
                row.append(cell(vals))
            print(f"{name:<26}" + "".join(f"{c:>26}" for c in row))
        print("runs ok: " + ", ".join(f"{l} {len(runs[l])}/{a.rounds}" for l, _ in cands))
    print(f"\nload average after: {load()}")


if __name__ == "__main__":
    main()
