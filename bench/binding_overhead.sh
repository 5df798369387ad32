#!/usr/bin/env bash
# Runs bench/binding_overhead.py with the package and the C baseline as this
# build made them (runfiles), under Debian's /usr/bin/python3.
set -euo pipefail
cd "${RUNFILES_DIR:-$0.runfiles}/kmv"
PYTHONPATH=$PWD/python PYTHONDONTWRITEBYTECODE=1 exec /usr/bin/python3 bench/binding_overhead.py "$@"
