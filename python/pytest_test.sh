#!/usr/bin/env bash
# The Python package's tests (python/tests) under pytest, run by Debian's
# /usr/bin/python3 over the package as this build made it: __init__.py and
# _kmv.so side by side in the runfiles tree. Under AddressSanitizer the
# extension is instrumented and its runtime must be loaded before the
# interpreter; leaks are CPython's own business there (it keeps interned
# objects to exit), so only overflows and use-after-free are checked.
set -euo pipefail
ext=python/kmv/_kmv.so
[ -f "$ext" ] || { echo "pytest_test: $ext missing" >&2; exit 1; }
asan=$(ldd "$ext" | awk '/libasan/ {print $3}')
if [ -n "$asan" ]; then
    export LD_PRELOAD=$asan ASAN_OPTIONS=detect_leaks=0:halt_on_error=1
fi
export PYTHONPATH=$PWD/python PYTHONDONTWRITEBYTECODE=1
exec /usr/bin/python3 -m pytest -q -p no:cacheprovider -o console_output_style=classic python/tests
