# Shared by the shell tests: counters, checks and the closing summary.
# Source it; then call finish last.
pass=0
failn=0

ok() { pass=$((pass + 1)); }
bad() { failn=$((failn + 1)); echo "FAIL: $*"; }

# expect STATUS PATTERN -- command...: the exit status must be STATUS and
# stderr+stdout must match the extended regex PATTERN.
expect() {
    local want=$1 pat=$2
    shift 3
    local out status
    out=$("$@" 2>&1)
    status=$?
    if [ "$status" -ne "$want" ]; then
        bad "'$*' exited $status, want $want; output: $out"
    elif ! grep -Eq -- "$pat" <<<"$out"; then
        bad "'$*' output does not match /$pat/: $out"
    else
        ok
    fi
}

# absent FILE: a failed run must leave no output and no temporary file.
absent() {
    if [ -e "$1" ] || compgen -G "$1.tmp.*" >/dev/null; then bad "$1 or a temporary of it exists"; else ok; fi
}

# "N passed, M failed", and the exit status.
finish() {
    echo "$pass passed, $failn failed"
    [ "$failn" -eq 0 ]
}
