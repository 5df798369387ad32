#!/usr/bin/env bash
# tools/install-tree into a scratch prefix, then kmv used as an installed
# library: the files and links, the soname (MAJOR.MINOR of kmv.h), the
# pkg-config file, no runpath into the build tree, libkmv.a complete and
# clean, examples/stream_example.c built outside Bazel with pkg-config
# against the shared and the static library and run, bin/kmv run from the
# prefix, an upgrade in place, and refusals (a prefix that is a file, an
# input as destination) that exit 1 and leave no temporary. Sanitizer
# builds: the example is compiled with the library's sanitizer. Prints
# "N passed, M failed" last.
set -u
. "$(dirname "${BASH_SOURCE[0]}")/testlib.sh"

INSTALL=$(realpath tools/install-tree)
KMV=tests/kmv_tool # the tool, renamed (tests/BUILD says why)
T=$(mktemp -d "${TEST_TMPDIR:-/tmp}/kmv_install.XXXXXX")
trap 'rm -rf "$T"' EXIT
P=$T/prefix

part() { sed -n "s/^#define KMV_VERSION_$1 \([0-9][0-9]*\)\$/\1/p" kmv/kmv.h; }
version=$(part MAJOR).$(part MINOR).$(part PATCH)
soname=libkmv.so.$(part MAJOR).$(part MINOR)

# The Python package (//python:package).
python=()
for f in python/kmv/__init__.py python/kmv/_kmv.so; do
    if [ -f "$f" ]; then python+=(--python "$f"); else bad "$f missing from the runfiles"; fi
done
pydir=lib/python3.$(/usr/bin/python3 -c 'import sys; print(sys.version_info[1])')/dist-packages/kmv

install_into() {
    "$INSTALL" --prefix "$1" --headers kmv --shared libkmv.so --static libkmv.a --cli "$KMV" \
        ${python[@]+"${python[@]}"}
}
files() { (cd "$1" && find . \( -type f -o -type l \) | sed 's|^\./||' | sort); }
no_tmp() {
    local left
    left=$(find "$T" -name '.*.tmp.*' | head -3)
    if [ -z "$left" ]; then ok; else bad "$1: temporaries left: $left"; fi
}

# --- The install and its files.
if out=$(install_into "$P" 2>&1); then ok; else bad "install-tree failed: $out"; finish; exit; fi
want="bin/kmv
include/kmv/kmv.h
include/kmv/kmv_experimental.h
lib/libkmv.a
lib/libkmv.so
lib/$soname
lib/libkmv.so.$version
lib/pkgconfig/kmv.pc"
if [ ${#python[@]} -gt 0 ]; then
    want="$want
$pydir/__init__.py
$pydir/_kmv.so"
    if grep -q "$P/${pydir%/kmv}" <<<"$out"; then ok; else
        bad "the Python directory is not printed: $out"
    fi
fi
want=$(sort <<<"$want")
got=$(files "$P")
if [ "$got" = "$want" ]; then ok; else bad "installed files: $got; want $want"; fi
# What it prints is the list to delete to uninstall.
listed=$(grep "^$P/" <<<"$out" | sed "s|^$P/||" | sort)
if [ "$listed" = "$want" ]; then ok; else bad "printed list: $listed"; fi

# The real library and its two links, and the soname the links rely on.
if [ -f "$P/lib/libkmv.so.$version" ] && [ ! -L "$P/lib/libkmv.so.$version" ]; then ok; else
    bad "lib/libkmv.so.$version is not a file"
fi
if [ "$(readlink "$P/lib/$soname")" = "libkmv.so.$version" ]; then ok; else
    bad "$soname -> $(readlink "$P/lib/$soname")"
fi
if [ "$(readlink "$P/lib/libkmv.so")" = "$soname" ]; then ok; else
    bad "libkmv.so -> $(readlink "$P/lib/libkmv.so")"
fi
got=$(readelf -d "$P/lib/libkmv.so.$version" | sed -n 's/.*(SONAME).*\[\(.*\)\]$/\1/p')
if [ "$got" = "$soname" ]; then ok; else bad "soname '$got', want $soname (kmv.h's MAJOR.MINOR)"; fi
if cmp -s libkmv.a "$P/lib/libkmv.a"; then ok; else
    bad "lib/libkmv.a differs from the built one"
fi
if cmp -s kmv/kmv.h "$P/include/kmv/kmv.h"; then ok; else bad "include/kmv/kmv.h differs"; fi

# No runpath into the build tree (Bazel's _solib directories): what is
# installed runs from the prefix alone, OpenBLAS's OpenMP build included.
for f in "lib/libkmv.so.$version" bin/kmv; do
    rp=$(readelf -d "$P/$f" | grep -E '\((RUN)?PATH\)')
    if grep -qE 'ORIGIN|_solib|bazel' <<<"$rp"; then bad "$f: $rp"; else ok; fi
    deps=$(ldd "$P/$f")
    if grep -q 'not found' <<<"$deps"; then bad "$f: $deps"; else ok; fi
done
if grep -qE 'libopenblas\.so\.0 => [^ ]*/openblas-openmp/' <<<"$(ldd "$P/lib/libkmv.so")"; then ok; else
    bad "libkmv.so does not find OpenBLAS's OpenMP build: $(ldd "$P/lib/libkmv.so")"
fi
expect 0 "^kmv $version\$" -- "$P/bin/kmv" --version

# --- The pkg-config file.
export PKG_CONFIG_PATH=$P/lib/pkgconfig
expect 0 "^$version\$" -- pkg-config --modversion kmv
expect 0 "^-I$P/include *\$" -- pkg-config --cflags kmv
expect 0 "^-L$P/lib -lkmv *\$" -- pkg-config --libs kmv

# --- libkmv.a: every public function, nothing internal left undefined,
# and no global name outside kmv_ (a static link shares the caller's
# namespace). The sanitizers' own symbols are not the library's; "i" is an
# indirect function (the kernels' target_clones).
declared=$(cat kmv/kmv.h kmv/kmv_experimental.h | tr '\n' ' ' |
    grep -oE 'KMV_API [^;(]*[ *](kmv_[a-z0-9_]+)\(' | grep -oE 'kmv_[a-z0-9_]+\($' | tr -d '(' | sort -u)
defined=$(nm --defined-only "$P/lib/libkmv.a" 2>/dev/null | awk 'NF == 3 && $2 ~ /^[A-Zi]$/ {print $3}' |
    grep -Ev '^_*(asan|ubsan|odr_asan|sanitizer)' | sort -u)
if [ -n "$declared" ]; then ok; else bad "no KMV_API declarations found"; fi
missing=$(comm -23 <(echo "$declared") <(echo "$defined"))
if [ -z "$missing" ]; then ok; else bad "libkmv.a lacks $(echo "$missing" | tr "\n" " ")"; fi
undefined=$(nm -u "$P/lib/libkmv.a" 2>/dev/null | awk '{print $2}' | grep '^kmv_' | sort -u)
unresolved=$(comm -23 <(echo "$undefined") <(echo "$defined"))
if [ -z "$unresolved" ]; then ok; else
    bad "libkmv.a leaves undefined: $(echo "$unresolved" | tr "\n" " ")"
fi
foreign=$(grep -v '^kmv_' <<<"$defined")
if [ -z "$foreign" ]; then ok; else
    bad "libkmv.a defines names outside kmv_: $(echo "$foreign" | head -c 300 | tr "\n" " ")"
fi

# --- The example, built outside Bazel as a user would. A sanitizer build of
# the library needs its runtime in the program too.
san=()
if nm -u "$P/lib/libkmv.a" 2>/dev/null | grep -q ' __asan_'; then san+=(-fsanitize=address); fi
if nm -u "$P/lib/libkmv.a" 2>/dev/null | grep -q ' __ubsan_'; then san+=(-fsanitize=undefined); fi
EX=examples/stream_example.c
CFLAGS=(-std=c11 -Wall -Wextra -Werror ${san[@]+"${san[@]}"})
# shellcheck disable=SC2046
if cc "${CFLAGS[@]}" "$EX" $(pkg-config --cflags --libs kmv) -Wl,-rpath,"$P/lib" \
    -o "$T/example_shared" 2>"$T/cc.log"; then ok; else bad "shared build: $(cat "$T/cc.log")"; fi
if readelf -d "$T/example_shared" | grep -q "(NEEDED).*\[$soname\]"; then ok; else
    bad "the example does not need $soname"
fi
expect 0 "the same row, bit for bit" -- "$T/example_shared" "$T/shared.kmvs"
# -lkmv would take the shared library beside the archive.
# shellcheck disable=SC2046
if cc "${CFLAGS[@]}" "$EX" $(pkg-config --static --cflags --libs kmv | sed 's/-lkmv/-l:libkmv.a/') \
    -o "$T/example_static" 2>"$T/cc.log"; then ok; else bad "static build: $(cat "$T/cc.log")"; fi
if readelf -d "$T/example_static" | grep -q 'libkmv'; then bad "the static build needs libkmv.so"; else ok; fi
expect 0 "the same row, bit for bit" -- "$T/example_static" "$T/static.kmvs"
if cmp -s "$T/shared.kmvs" "$T/static.kmvs"; then ok; else
    bad "the two builds saved different snapshots"
fi
expect 1 "kmv_stream_save: .*does not exist" -- "$T/example_static" "$T/missing/x.kmvs"

# --- An upgrade in place: the same files, no temporaries, and a program
# linked to the first install still runs.
before=$(files "$P")
if out=$(install_into "$P" 2>&1); then ok; else bad "second install failed: $out"; fi
if [ "$(files "$P")" = "$before" ]; then ok; else
    bad "a second install changed the file list: $(files "$P")"
fi
no_tmp "upgrade"
expect 0 "the same row, bit for bit" -- "$T/example_shared" "$T/shared2.kmvs"

# --- The Python package from the prefix's site-packages, by Debian's
# python3 with nothing of this environment but PYTHONPATH (an instrumented
# extension needs its sanitizer's runtime first).
asan=$(ldd "$P/$pydir/_kmv.so" | awk '/libasan/ {print $3}')
pyenv=(PATH=/usr/bin:/bin PYTHONPATH="$P/${pydir%/kmv}" PYTHONDONTWRITEBYTECODE=1)
[ -n "$asan" ] && pyenv+=(LD_PRELOAD="$asan" ASAN_OPTIONS=detect_leaks=0)
pyout=$(cd "$T" && env -i "${pyenv[@]}" /usr/bin/python3 -c '
import kmv, numpy as np
print(kmv.__file__, kmv.__version__)
s = kmv.Stream(3, attention=True, cols=2, exact=True)
s.append(np.eye(3), np.arange(6.0).reshape(3, 2))
row, st = s.decode([0.0, 0.0, 0.0])
print(row.tolist(), st["mode"])' 2>&1)
if grep -qx "$P/$pydir/__init__.py $version" <<<"$(head -1 <<<"$pyout")"; then ok; else
    bad "import kmv from the prefix: $pyout"
fi
if grep -qx '\[2.0, 3.0\] exact' <<<"$(tail -1 <<<"$pyout")"; then ok; else
    bad "the installed package's step: $pyout"
fi

# --- Refusals: exit 1, a message, nothing written.
printf 'a file\n' >"$T/plain"
expect 1 "$T/plain exists and is not a directory" -- install_into "$T/plain"
if [ "$(cat "$T/plain")" = "a file" ]; then ok; else bad "the file given as prefix changed"; fi
expect 1 "cannot create the prefix directory $T/plain/sub" -- install_into "$T/plain/sub"
# Installing from an installed tree into itself: its headers are inputs.
sum=$(cksum <"$P/include/kmv/kmv.h")
expect 1 "kmv.h is the input" -- "$INSTALL" --prefix "$P" --headers "$P/include/kmv" \
    --shared libkmv.so --static libkmv.a --cli "$KMV"
if [ "$(cksum <"$P/include/kmv/kmv.h")" = "$sum" ]; then ok; else
    bad "an input was written over"
fi
# A failure midway (bin/ is a file) leaves what landed whole and no temporary.
mkdir -p "$T/half" && printf 'x\n' >"$T/half/bin"
expect 1 "cannot create the directory $T/half/bin" -- install_into "$T/half"
no_tmp "a failed install"
if cmp -s libkmv.a "$T/half/lib/libkmv.a"; then ok; else
    bad "what landed before the failure is not whole"
fi

finish
