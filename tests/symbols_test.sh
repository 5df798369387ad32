#!/usr/bin/env bash
# The shared library exports exactly the public headers' functions: every
# KMV_API declaration of kmv/kmv.h and kmv/kmv_experimental.h is defined in
# libkmv.so, and nothing else is exported (the library builds with
# -fvisibility=hidden). Prints "N passed, M failed" last.
set -u
SO=${SO:-./libkmv.so}
pass=0
failn=0
ok() { pass=$((pass + 1)); }
bad() { failn=$((failn + 1)); echo "FAIL: $*"; }

exported=$(nm -D --defined-only "$SO" | awk '$2 ~ /^[TDBR]$/ {print $3}' |
    grep -Ev '^(_init|_fini|_edata|_end|__bss_start)$' | sort)
declared=$(cat kmv/kmv.h kmv/kmv_experimental.h | tr '\n' ' ' |
    grep -oE 'KMV_API [^;(]*[ *](kmv_[a-z0-9_]+)\(' | grep -oE 'kmv_[a-z0-9_]+\($' | tr -d '(' | sort -u)
[ -n "$declared" ] || bad "no KMV_API declarations found"
for f in $declared; do
    if grep -qx "$f" <<<"$exported"; then ok; else bad "$f is declared but not exported"; fi
done
extra=$(comm -23 <(echo "$exported") <(echo "$declared"))
if [ -z "$extra" ]; then ok; else bad "exported beyond the headers: $(echo $extra | head -c 400)"; fi
echo "$pass passed, $failn failed"
[ "$failn" -eq 0 ]
