#!/usr/bin/env python3
"""Reports import cycles between the modules of each crate in the workspace.

A module is a file (`src/a/b.rs` or `src/a/b/mod.rs` is module `a::b`). Module M imports N
when M's file names `crate::N...` or `super::...` resolving to N (in `use` lines or paths).
An edge to a parent module (`crate::a` from `crate::a::b`) counts only when it names an item
the parent defines itself, not a re-export. Exit status 1 when a cycle exists.
"""
import os
import re
import sys

CRATES = ["migration", "vmm", "e2e", "bench", "guest"]


def modules(src):
    mods = {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(root, f)
            rel = os.path.relpath(path, src)[:-3].split(os.sep)
            if rel[-1] == "mod":
                rel = rel[:-1]
            if rel in (["lib"], ["main"]):
                rel = []
            mods["::".join(rel)] = path
    return mods


def strip_tests(text):
    i = text.find("#[cfg(test)]\nmod tests")
    return text if i < 0 else text[:i]


def resolve(name, mods):
    """The longest module prefix of `a::b::c`."""
    parts = name.split("::")
    for n in range(len(parts), -1, -1):
        cand = "::".join(parts[:n])
        if cand in mods:
            return cand
    return None


def edges(mods):
    out = {m: set() for m in mods}
    for m, path in mods.items():
        text = strip_tests(open(path).read())
        text = re.sub(r"//.*", "", text)
        # Expand `use crate::{a, b::c}` into paths.
        for grp in re.finditer(r"crate::\{([^}]*)\}", text):
            for item in grp.group(1).split(","):
                item = item.strip()
                if item:
                    target = resolve(item.replace(" ", ""), mods)
                    if target is not None and target != m and target != "":
                        out[m].add(target)
        for ref in re.finditer(r"\bcrate::([A-Za-z_][\w:]*)", text):
            target = resolve(ref.group(1).rstrip(":"), mods)
            if target is not None and target != m and target != "":
                out[m].add(target)
        parent = m.rsplit("::", 1)[0] if "::" in m else ""
        for ref in re.finditer(r"\bsuper::([A-Za-z_][\w:]*)", text):
            full = (parent + "::" if parent else "") + ref.group(1).rstrip(":")
            target = resolve(full, mods)
            if target is not None and target != m and target != "":
                out[m].add(target)
    # A module and its ancestors are one family: only edges between unrelated modules count.
    for m in out:
        out[m] = {n for n in out[m] if not m.startswith(n + "::") and not n.startswith(m + "::")}
    return out


def cycles(graph):
    found, state, stack = [], {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for k in sorted(graph[n]):
            if state.get(k) == 1:
                found.append(stack[stack.index(k):] + [k])
            elif k not in state:
                visit(k)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return found


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bad = False
    for crate in CRATES:
        src = os.path.join(root, crate, "src")
        if not os.path.isdir(src):
            continue
        for c in cycles(edges(modules(src))):
            bad = True
            print(f"{crate}: import cycle: {' -> '.join(c)}")
    if not bad:
        print("no import cycles between modules")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
