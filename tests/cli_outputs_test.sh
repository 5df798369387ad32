#!/usr/bin/env bash
# The kmv tool's outputs never destroy data: every output flag aimed at
# every input is refused before any work, as are two outputs aimed at one
# file; devices, FIFOs and symlinks keep their identity; a file keeps its
# mode; a missing directory fails before any input is read; a signal leaves
# no temporary file. Prints "N passed, M failed" last.
set -u

# Absolute, since the test works inside its own directory.
KMV=$(realpath "${KMV:-./kmv}")
GEN=$(realpath "${NPYGEN:-./tests/npygen}")
STORIES=$(realpath "${STORIES:-data/stories260K}")
T=$(mktemp -d "${TEST_TMPDIR:-/tmp}/kmv_out.XXXXXX")
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    rm -rf "$T"
}
trap cleanup EXIT
. "$(dirname "${BASH_SOURCE[0]}")/testlib.sh"

# no_tmp: no temporary file of an output anywhere under $T.
no_tmp() {
    local left
    left=$(find "$T" -name '*.tmp.*' | head -3)
    if [ -z "$left" ]; then ok; else bad "$1: temporary files left: $left"; fi
}

sum() { cksum <"$1"; }

cd "$T" || exit 1
$GEN write Q.npy 50 6 1 >/dev/null
$GEN write K.npy 80 6 2 >/dev/null
$GEN write x.npy 80 1 4 ndim=1 >/dev/null
$GEN write V.npy 80 3 6 >/dev/null
cp "$STORIES/stories260K.bin" model.bin
cp "$STORIES/tok512.bin" tok.bin
printf 'Once upon a time there was a cat.\n' >story.txt
ln -s K.npy Klink.npy
ln K.npy Khard.npy

# --- Every output flag aimed at every input: exit 2, both paths named, the
# input untouched (checksums before and after).
declare -A before
for f in Q.npy K.npy x.npy V.npy model.bin tok.bin story.txt; do before[$f]=$(sum "$f"); done
refuse() { # FLAG TARGET NAMED_INPUT -- command...
    local flag=$1 target=$2 input=$3
    shift 4
    expect 2 "--$flag $target is the same file as the input --[a-z-]+ .*$input" -- "$@"
}
MV=(matvec --sigma 1 --queries Q.npy --keys K.npy --x x.npy)
for flag in out stats; do
    other=$([ $flag = out ] && echo "--stats s.json" || echo "--out y.npy")
    for input in Q.npy K.npy x.npy ./K.npy Klink.npy Khard.npy "$T/K.npy"; do
        # shellcheck disable=SC2086
        refuse $flag "$input" npy -- $KMV "${MV[@]}" $other --$flag "$input"
    done
done
AT=(attention --q Q.npy --k K.npy --v V.npy)
for flag in out stats; do
    other=$([ $flag = out ] && echo "--stats s.json" || echo "--out o.npy")
    for input in Q.npy K.npy V.npy; do
        # shellcheck disable=SC2086
        refuse $flag $input $input -- $KMV "${AT[@]}" $other --$flag $input
    done
done
PF=(prefix --sigma 1 --start 10 --queries Q.npy --keys K.npy --x x.npy)
for input in Q.npy K.npy x.npy; do
    refuse out $input $input -- $KMV "${PF[@]}" --out $input
    refuse plot $input $input -- $KMV "${PF[@]}" --out p.csv --plot $input
done
DC=(decode --model model.bin --tokenizer tok.bin --steps 3 --exact)
for input in model.bin tok.bin; do
    refuse dump-qk $input $input -- $KMV "${DC[@]}" --prompt a --dump-qk $input
done
refuse dump-qk story.txt story.txt -- $KMV "${DC[@]}" --text-file story.txt --dump-qk story.txt
for input in model.bin tok.bin; do
    refuse report $input $input -- $KMV "${DC[@]}" --prompt a --report $input
done
refuse report story.txt story.txt -- $KMV "${DC[@]}" --text-file story.txt --report story.txt
$GEN write A.npy 40 4 31 >/dev/null
$GEN write b.npy 40 1 32 ndim=1 >/dev/null
before[A.npy]=$(sum A.npy)
before[b.npy]=$(sum b.npy)
RG=(regress --a A.npy --b b.npy --problem agram)
for flag in out stats; do
    other=$([ $flag = out ] && echo "--stats rs.json" || echo "--out rx.npy")
    for input in A.npy b.npy; do
        # shellcheck disable=SC2086
        refuse $flag $input $input -- $KMV "${RG[@]}" $other --$flag $input
    done
done
for f in Q.npy K.npy x.npy V.npy model.bin tok.bin story.txt A.npy b.npy; do
    if [ "$(sum "$f")" = "${before[$f]}" ]; then ok; else bad "$f changed"; fi
done
if [ -L Klink.npy ]; then ok; else bad "Klink.npy is no longer a link"; fi

# --- Two outputs aimed at one file (directly, through a link, or a file
# not there yet): refused, nothing written.
expect 2 "--out y.npy and --stats y.npy name the same file" -- $KMV "${MV[@]}" --out y.npy --stats y.npy
ln -s yy.npy ylink.npy
expect 2 "name the same file" -- $KMV "${MV[@]}" --out yy.npy --stats ylink.npy
expect 2 "name the same file" -- $KMV "${PF[@]}" --out p.png --plot ./p.png
expect 2 "name the same file" -- $KMV "${MV[@]}" --out - --stats /dev/stdout
expect 2 "name the same file" -- $KMV "${DC[@]}" --prompt a --dump-qk r.json --report ./r.json
for f in y.npy yy.npy p.png r.json; do
    if [ ! -e $f ]; then ok; else bad "$f was written by a refused run"; fi
done
no_tmp "refused runs"

# --- A reference output, then the same bytes through a FIFO, a pipe,
# /dev/null, a symlink, and over a 0600 file.
expect 0 "" -- $KMV "${MV[@]}" --out ref.npy
mkfifo fifo.npy
cat fifo.npy >fifo.copy &
catpid=$!
pids+=("$catpid")
expect 0 "" -- $KMV "${MV[@]}" --out fifo.npy
wait "$catpid"
if cmp -s fifo.copy ref.npy; then ok; else bad "bytes through the FIFO differ"; fi
if [ -p fifo.npy ]; then ok; else bad "fifo.npy is no longer a FIFO"; fi
if $KMV "${MV[@]}" --out - | cmp -s - ref.npy; then ok; else bad "--out - differs"; fi
if $KMV "${MV[@]}" --out /dev/stdout | cmp -s - ref.npy; then ok; else bad "--out /dev/stdout differs"; fi
expect 0 "" -- $KMV "${MV[@]}" --out /dev/null --stats -
if [ -c /dev/null ]; then ok; else bad "/dev/null is no longer a character device"; fi
# decode --report: whole through a FIFO, to /dev/null, and as a file
expect 0 "" -- $KMV "${DC[@]}" --prompt a --report rep.json
mkfifo rep.fifo
cat rep.fifo >rep.copy &
catpid=$!
pids+=("$catpid")
expect 0 "" -- $KMV "${DC[@]}" --prompt a --report rep.fifo
wait "$catpid"
if grep -q '"totals"' rep.copy && [ -p rep.fifo ]; then ok; else bad "--report through a FIFO: $(cat rep.copy)"; fi
expect 0 "" -- $KMV "${DC[@]}" --prompt a --report /dev/null
if [ -c /dev/null ]; then ok; else bad "/dev/null is no longer a character device"; fi
# regress: x whole through a FIFO and to /dev/null; a run that fails (b of
# the wrong length) publishes neither output
expect 0 "" -- $KMV "${RG[@]}" --out rx_ref.npy --stats rs_ref.json
mkfifo rx.fifo
cat rx.fifo >rx.copy &
catpid=$!
pids+=("$catpid")
expect 0 "" -- $KMV "${RG[@]}" --out rx.fifo
wait "$catpid"
if cmp -s rx.copy rx_ref.npy && [ -p rx.fifo ]; then ok; else bad "regress --out through a FIFO differs"; fi
expect 0 "" -- $KMV "${RG[@]}" --out /dev/null
if [ -c /dev/null ]; then ok; else bad "/dev/null is no longer a character device"; fi
expect 1 "b must be a vector of 40 entries" -- $KMV regress --a A.npy --b x.npy --problem exp --out rx_bad.npy --stats rs_bad.json
for f in rx_bad.npy rs_bad.json; do
    if [ ! -e $f ]; then ok; else bad "$f was published by a failed run"; fi
done
printf old >target.npy
ln -s target.npy out.link
expect 0 "" -- $KMV "${MV[@]}" --out out.link
if [ -L out.link ] && cmp -s target.npy ref.npy; then ok; else bad "symlinked output: link lost or target not written"; fi
printf old >private.npy
chmod 600 private.npy
expect 0 "" -- $KMV "${MV[@]}" --out private.npy
if [ "$(stat -c %a private.npy)" = 600 ] && cmp -s private.npy ref.npy; then ok; else bad "0600 file came back $(stat -c %a private.npy)"; fi
# Standard output that is a terminal gets no binary data.
if command -v script >/dev/null; then
    out=$(script -qec "$KMV ${MV[*]} --out -" /dev/null 2>&1)
    if grep -q "refusing to write binary data to a terminal" <<<"$out"; then ok; else bad "--out - to a terminal: $out"; fi
else
    bad "script(1) (util-linux) is missing: the terminal case cannot run"
fi
no_tmp "device outputs"

# --- A missing directory fails before any input is read. The queries are
# a FIFO whose writer blocks until someone opens it: if the command read
# its inputs (and so computed) before checking its outputs, the writer
# would finish; it must still be waiting when the command has failed.
mkfifo inq.fifo
blocked_writer() {
    (cat Q.npy >inq.fifo) &
    writer=$!
    pids+=("$writer")
}
check_unread() { # what
    if kill -0 "$writer" 2>/dev/null; then ok; else bad "$1: the input was read before the output was checked"; fi
    kill "$writer" 2>/dev/null
    wait "$writer" 2>/dev/null
}
blocked_writer
expect 1 "nodir/y.npy: cannot write: its directory does not exist" -- $KMV matvec --sigma 1 --queries inq.fifo --keys K.npy --x x.npy --out nodir/y.npy
check_unread "matvec --out nodir/y.npy"
blocked_writer
expect 1 "nodir/s.json: cannot write" -- $KMV matvec --sigma 1 --queries inq.fifo --keys K.npy --x x.npy --out y2.npy --stats nodir/s.json
check_unread "matvec --stats nodir/s.json"
blocked_writer
expect 1 "nodir/f.png: cannot write" -- $KMV prefix --sigma 1 --queries inq.fifo --keys K.npy --out p.csv --plot nodir/f.png
check_unread "prefix --plot nodir/f.png"
blocked_writer
expect 1 "nodir/x.npy: cannot write" -- $KMV regress --a inq.fifo --b b.npy --problem agram --out nodir/x.npy
check_unread "regress --out nodir/x.npy"
blocked_writer
expect 1 "nodir/s.json: cannot write" -- $KMV regress --a inq.fifo --b b.npy --problem agram --out x3.npy --stats nodir/s.json
check_unread "regress --stats nodir/s.json"
mkfifo model.fifo
(cat model.bin >model.fifo) &
writer=$!
pids+=("$writer")
expect 1 "nodir/qk.npz: cannot write" -- $KMV decode --model model.fifo --tokenizer tok.bin --prompt a --dump-qk nodir/qk.npz
check_unread "decode --dump-qk nodir/qk.npz"
(cat model.bin >model.fifo) &
writer=$!
pids+=("$writer")
expect 1 "nodir/r.json: cannot write" -- $KMV decode --model model.fifo --tokenizer tok.bin --prompt a --report nodir/r.json
check_unread "decode --report nodir/r.json"
# a run that fails after it started (the tokenizer is not one) leaves no report
expect 1 "" -- $KMV decode --model model.bin --tokenizer story.txt --prompt a --report late.json
if [ ! -e late.json ]; then ok; else bad "late.json written by a run that failed"; fi
for f in y2.npy p.csv; do
    if [ ! -e $f ]; then ok; else bad "$f written by a run that failed"; fi
done
no_tmp "missing directories"

# --- A signal mid-run: the outputs' temporary files exist from the start
# (the command is held opening its FIFO input, which has no writer);
# SIGTERM and SIGINT remove them and end the run with the signal's status.
# Job control on, so that the background run does not start with SIGINT
# ignored.
set -m
for sig in TERM INT; do
    $KMV matvec --sigma 1 --queries inq.fifo --keys K.npy --x x.npy --out sig.npy --stats sig.json &
    run=$!
    for _ in $(seq 100); do
        [ "$(find . -name 'sig.*.tmp.*' | wc -l)" -eq 2 ] && break
        sleep 0.1
    done
    if [ "$(find . -name 'sig.*.tmp.*' | wc -l)" -eq 2 ]; then ok; else bad "SIG$sig: temporary files not made up front"; fi
    kill -$sig $run
    wait $run
    status=$?
    want=$((128 + $(kill -l $sig)))
    if [ "$status" -eq "$want" ]; then ok; else bad "SIG$sig: exit status $status, want $want"; fi
    if [ ! -e sig.npy ] && [ ! -e sig.json ]; then ok; else bad "SIG$sig left an output"; fi
    no_tmp "SIG$sig"
done
set +m

finish
