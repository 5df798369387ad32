#!/usr/bin/env python3
"""Check a `kmv --stats` file against the table in docs/stats.md: every field
the table says is present for this run is there with its type, and nothing
else is. Usage: stats_schema.py docs/stats.md FILE.json; exits 1 naming the
first difference."""
import json
import re
import sys


def schema(md):
    rows = {}
    for line in open(md, encoding="utf-8"):
        m = re.match(r"\|\s*(`[^|]+`)\s*\|\s*([^|]+?)\s*\|\s*([^|]+?)\s*\|", line)
        if not m:
            continue
        names = re.findall(r"`([^`]+)`", m.group(1))
        for name in names:
            rows[name] = (m.group(2), m.group(3))
    return rows


def applies(when, doc):
    attn = doc.get("kernel") == "attention"
    exact = doc.get("mode") == "exact"
    conds = [c.strip() for c in when.split(",")]
    for c in conds:
        if c == "always":
            continue
        if c == "attention" and not attn:
            return False
        if c == "mode is not `exact`" and exact:
            return False
    return True


def type_ok(kind, v):
    if v is None:
        return "null" in kind
    if isinstance(v, bool):
        return kind.startswith("boolean")
    if isinstance(v, int):
        return kind.startswith(("integer", "number"))
    if isinstance(v, float):
        return kind.startswith("number")
    if isinstance(v, str):
        return kind.startswith("string")
    if isinstance(v, dict):
        return kind.startswith("object")
    return False


def flatten(doc, prefix=""):
    out = {}
    for k, v in doc.items():
        name = prefix + k
        out[name] = v
        if isinstance(v, dict):
            out.update(flatten(v, name + "."))
    return out


def main():
    rows = schema(sys.argv[1])
    doc = json.load(open(sys.argv[2], encoding="utf-8"))
    got = flatten(doc)
    want = {n for n, (kind, when) in rows.items() if applies(when, doc)}
    for n in sorted(want - set(got)):
        sys.exit(f"{sys.argv[2]}: documented field {n} is missing")
    for n in sorted(set(got) - want):
        sys.exit(f"{sys.argv[2]}: field {n} is not documented for this run (docs/stats.md)")
    for n in sorted(want):
        if not type_ok(rows[n][0], got[n]):
            sys.exit(f"{sys.argv[2]}: {n} = {got[n]!r} is not of the documented type {rows[n][0]}")


if __name__ == "__main__":
    main()
