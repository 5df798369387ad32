#!/usr/bin/env bash
# The shared library exports exactly the public headers' functions: every
# KMV_API declaration of kmv/kmv.h and kmv/kmv_experimental.h is defined in
# libkmv.so, and nothing else is exported (the library builds with
# -fvisibility=hidden). What a sanitizer's instrumentation adds is not the
# library's and is left out. Prints "N passed, M failed" last.
set -u
SO=${SO:-./libkmv.so}
. "$(dirname "${BASH_SOURCE[0]}")/testlib.sh"

exported=$(nm -D --defined-only "$SO" | awk '$2 ~ /^[TDBR]$/ {print $3}' |
    grep -Ev '^(_init|_fini|_edata|_end|__bss_start)$' |
    grep -Ev '^_*(asan|ubsan|odr_asan|sanitizer|tsan)' | sort)
declared=$(cat kmv/kmv.h kmv/kmv_experimental.h | tr '\n' ' ' |
    grep -oE 'KMV_API [^;(]*[ *](kmv_[a-z0-9_]+)\(' | grep -oE 'kmv_[a-z0-9_]+\($' | tr -d '(' | sort -u)
[ -n "$declared" ] || bad "no KMV_API declarations found"
for f in $declared; do
    if grep -qx "$f" <<<"$exported"; then ok; else bad "$f is declared but not exported"; fi
done
extra=$(comm -23 <(echo "$exported") <(echo "$declared"))
if [ -z "$extra" ]; then ok; else bad "exported beyond the headers: $(echo $extra | head -c 400)"; fi
finish
