#!/usr/bin/env bash
# End-to-end checks of the kmv tool: exit statuses, messages, outputs that
# appear whole or not at all. Prints "N passed, M failed" last.
set -u

KMV=${KMV:-./kmv}
GEN=${NPYGEN:-./tests/npygen}
SCHEMA=${SCHEMA:-./tests/stats_schema.py}
STATS_DOC=${STATS_DOC:-docs/stats.md}
T=$(mktemp -d "${TEST_TMPDIR:-/tmp}/kmv_cli.XXXXXX")
trap 'rm -rf "$T"' EXIT
. "$(dirname "${BASH_SOURCE[0]}")/testlib.sh"

$GEN write "$T/q.npy" 50 6 1
$GEN write "$T/k.npy" 80 6 2
$GEN write "$T/k5.npy" 80 5 3
$GEN write "$T/x.npy" 80 1 4 ndim=1
$GEN write "$T/x79.npy" 79 1 5 ndim=1
$GEN write "$T/v.npy" 80 3 6
$GEN write "$T/ones.npy" 80 3 0 fill=1
$GEN write "$T/qnan.npy" 50 6 7 bad=nan 7 2
$GEN write "$T/xinf.npy" 80 1 8 ndim=1 bad=inf 13 0
printf 'not a numpy file' >"$T/junk.npy"

# Help and version.
expect 0 "^kmv [0-9]+\.[0-9]+\.[0-9]+$" -- $KMV --version
expect 0 "commands:" -- $KMV --help
expect 0 "usage: kmv matvec.*--sigma" -- $KMV matvec --help
expect 0 "usage: kmv attention.*--causal" -- $KMV attention --help
expect 0 "usage: kmv demo" -- $KMV demo --help

# Usage errors exit 2.
expect 2 "usage: kmv COMMAND" -- $KMV
expect 2 "unknown command 'frobnicate'" -- $KMV frobnicate
expect 2 "unknown option '--sigam'" -- $KMV matvec --sigam 1
expect 2 "missing --sigma" -- $KMV matvec --queries "$T/q.npy" --keys "$T/k.npy" --x "$T/x.npy" --out "$T/y.npy"
expect 2 "missing --out" -- $KMV matvec --queries "$T/q.npy" --keys "$T/k.npy" --x "$T/x.npy" --sigma 1
expect 2 "invalid value 'abc' for --sigma" -- $KMV matvec --queries "$T/q.npy" --keys "$T/k.npy" --x "$T/x.npy" --sigma abc --out "$T/y.npy"
expect 2 "invalid value '1e' for --eps" -- $KMV matvec --queries "$T/q.npy" --keys "$T/k.npy" --x "$T/x.npy" --sigma 1 --eps 1e --out "$T/y.npy"
expect 2 "sigma must be in" -- $KMV matvec --queries "$T/q.npy" --keys "$T/k.npy" --x "$T/x.npy" --sigma -1 --out "$T/y.npy"
expect 2 "eps must be in \(0, 1\)" -- $KMV matvec --queries "$T/q.npy" --keys "$T/k.npy" --x "$T/x.npy" --sigma 1 --eps 1.5 --out "$T/y.npy"
expect 2 "delta must be in \(0, 1\)" -- $KMV matvec --queries "$T/q.npy" --keys "$T/k.npy" --x "$T/x.npy" --sigma 1 --delta 0 --out "$T/y.npy"
expect 2 "threads must be" -- $KMV matvec --queries "$T/q.npy" --keys "$T/k.npy" --x "$T/x.npy" --sigma 1 --threads -2 --out "$T/y.npy"
expect 2 "needs a value" -- $KMV matvec --queries "$T/q.npy" --keys "$T/k.npy" --x "$T/x.npy" --sigma
expect 2 "given twice" -- $KMV matvec --sigma 1 --sigma 2
expect 2 "scale must be > 0" -- $KMV attention --q "$T/q.npy" --k "$T/k.npy" --v "$T/v.npy" --scale 0 --out "$T/o.npy"
absent "$T/y.npy"
absent "$T/o.npy"

# Bad input files exit 1, name the file, write nothing.
MV=(matvec --exact --sigma 1 --out "$T/y.npy")
expect 1 "$T/nope.npy" -- $KMV "${MV[@]}" --queries "$T/nope.npy" --keys "$T/k.npy" --x "$T/x.npy"
expect 1 "junk.npy.*(magic|not a .npy)" -- $KMV "${MV[@]}" --queries "$T/junk.npy" --keys "$T/k.npy" --x "$T/x.npy"
expect 1 "dimension mismatch.*dim 6.*dim 5" -- $KMV "${MV[@]}" --queries "$T/q.npy" --keys "$T/k5.npy" --x "$T/x.npy"
expect 1 "x79.npy has 79 rows but there are 80 keys" -- $KMV "${MV[@]}" --queries "$T/q.npy" --keys "$T/k.npy" --x "$T/x79.npy"
expect 1 "qnan.npy: queries contain NaN at row 7, column 2" -- $KMV "${MV[@]}" --queries "$T/qnan.npy" --keys "$T/k.npy" --x "$T/x.npy"
expect 1 "xinf.npy: x contain infinity at row 13, column 0" -- $KMV "${MV[@]}" --queries "$T/q.npy" --keys "$T/k.npy" --x "$T/xinf.npy"
expect 1 "must be a 2-D array" -- $KMV "${MV[@]}" --queries "$T/x.npy" --keys "$T/k.npy" --x "$T/x.npy"
# Without --exact attention runs the approximate path's rules: this input is
# too small to gain, so it runs exact and the stats say so.
expect 0 "" -- $KMV attention --q "$T/q.npy" --k "$T/k.npy" --v "$T/v.npy" --out "$T/ya.npy" --stats "$T/sa.json"
if grep -q '"mode": "fallback"' "$T/sa.json"; then ok; else bad "small approximate attention not reported as a fallback: $(cat "$T/sa.json")"; fi
# Spread attention over 4096 keys (16-d random keys, logits near 0), eps
# 0.3: the certified budget cannot rule out a dominant key and runs every
# row exact; --empirical samples the rows and reports no bound (null).
$GEN write "$T/qs.npy" 4096 16 31 >/dev/null
$GEN write "$T/vs.npy" 4096 1 32 >/dev/null
expect 0 "" -- $KMV attention --eps 0.3 --q "$T/qs.npy" --k "$T/qs.npy" --v "$T/vs.npy" --out "$T/os.npy" --stats "$T/ss.json"
if grep -q '"attn_budget": "certified"' "$T/ss.json" && grep -q '"rows_exact": 4096' "$T/ss.json"; then ok; else bad "certified spread attention: $(cat "$T/ss.json")"; fi
expect 0 "" -- $KMV attention --empirical --eps 0.3 --q "$T/qs.npy" --k "$T/qs.npy" --v "$T/vs.npy" --out "$T/oe.npy" --stats "$T/se.json"
if grep -q '"attn_budget": "empirical"' "$T/se.json" && grep -q '"mode": "approx"' "$T/se.json" &&
    grep -q '"error_bound": null' "$T/se.json"; then ok; else bad "empirical spread attention: $(cat "$T/se.json")"; fi
# Causal products run without --exact too, and say so in the stats.
expect 0 "" -- $KMV matvec --causal --sigma 1 --out "$T/yc.npy" --stats "$T/sc.json" --queries "$T/q.npy" --keys "$T/k.npy" --x "$T/x.npy"
if grep -q '"causal": true' "$T/sc.json"; then ok; else bad "causal matvec stats lack causal"; fi

# Without --exact the approximate engine runs; on this small input it runs
# exact instead and the stats say why; --measure-error reports the error.
expect 0 "" -- $KMV matvec --sigma 1 --out "$T/ya.npy" --stats "$T/sa.json" --measure-error --queries "$T/q.npy" --keys "$T/k.npy" --x "$T/x.npy"
if grep -q '"mode": "fallback"' "$T/sa.json" && grep -q '"fallback_reason": "small"' "$T/sa.json" &&
    grep -Eq '"error_measured": [0-9.e-]+,?$' "$T/sa.json"; then ok; else bad "approx stats: $(cat "$T/sa.json")"; fi

# A failed run leaves an existing output as it was.
printf 'old' >"$T/keep.npy"
expect 1 "dimension mismatch" -- $KMV matvec --exact --sigma 1 --out "$T/keep.npy" --queries "$T/q.npy" --keys "$T/k5.npy" --x "$T/x.npy"
if [ "$(cat "$T/keep.npy")" = old ]; then ok; else bad "keep.npy was changed by a failed run"; fi
expect 1 "nodir/y.npy: cannot write: its directory does not exist" -- $KMV matvec --exact --sigma 1 --out "$T/nodir/y.npy" --queries "$T/q.npy" --keys "$T/k.npy" --x "$T/x.npy"

# A stats file that cannot be written fails the run and publishes nothing.
expect 1 "nodir/s.json: cannot write" -- $KMV matvec --exact --sigma 1 --out "$T/y.npy" --stats "$T/nodir/s.json" --queries "$T/q.npy" --keys "$T/k.npy" --x "$T/x.npy"
absent "$T/y.npy"
# Logits beyond float's range are refused, not answered with NaN.
expect 1 "logits could exceed float32" -- $KMV attention --exact --scale 1e39 --q "$T/q.npy" --k "$T/k.npy" --v "$T/v.npy" --out "$T/o.npy"
absent "$T/o.npy"
expect 2 "sigma must be in" -- $KMV matvec --exact --sigma 1e-200 --out "$T/y.npy" --queries "$T/q.npy" --keys "$T/k.npy" --x "$T/x.npy"
# A memory cap the product cannot fit in: a clear error and no output.
expect 1 "needs more memory than --max-mb 0.001" -- $KMV matvec --exact --max-mb 0.001 --sigma 1 --out "$T/y.npy" --queries "$T/q.npy" --keys "$T/k.npy" --x "$T/x.npy"
absent "$T/y.npy"
expect 1 "needs more memory than --max-mb" -- $KMV attention --exact --max-mb 0.001 --q "$T/q.npy" --k "$T/k.npy" --v "$T/v.npy" --out "$T/o.npy"
absent "$T/o.npy"
expect 2 "max-mb must be in" -- $KMV matvec --exact --max-mb 0 --sigma 1 --out "$T/y.npy" --queries "$T/q.npy" --keys "$T/k.npy" --x "$T/x.npy"
expect 0 "" -- $KMV matvec --exact --max-mb 64 --sigma 1 --out "$T/y.npy" --queries "$T/q.npy" --keys "$T/k.npy" --x "$T/x.npy"
rm -f "$T/y.npy"

# Successful runs: shapes, stats, and softmax of constant values.
expect 0 "" -- $KMV matvec --exact --sigma 1.5 --queries "$T/q.npy" --keys "$T/k.npy" --x "$T/x.npy" --out "$T/y.npy" --stats "$T/s.json"
expect 0 "^1 50 1 " -- $GEN stat "$T/y.npy"
for key in '"mode": "exact"' '"n_keys": 80' '"n_queries": 50' '"dim": 6' '"seconds": ' '"kernel": '; do
    if grep -q -- "$key" "$T/s.json"; then ok; else bad "stats lack $key"; fi
done
expect 0 "" -- $KMV matvec --exact --sigma 1.5 --queries "$T/q.npy" --keys "$T/k.npy" --x "$T/v.npy" --out "$T/y3.npy" --threads 1
expect 0 "^2 50 3 " -- $GEN stat "$T/y3.npy"
expect 0 "" -- $KMV attention --exact --causal --q "$T/q.npy" --k "$T/k.npy" --v "$T/ones.npy" --out "$T/o.npy" --stats "$T/so.json"
# Every output row is a convex combination of rows of ones: all exactly ~1.
expect 0 "^2 50 3 " -- $GEN stat "$T/o.npy"
out=$($GEN stat "$T/o.npy" | awk '{d = $5 - 1; if (d < 0) d = -d; print ($4 < 1e-6 && d < 1e-6) ? "ones" : "spread " $4 " first " $5}')
if [ "$out" = ones ]; then ok; else bad "attention of ones is not ones: $out"; fi
if grep -q '"causal": true' "$T/so.json"; then ok; else bad "attention stats lack causal"; fi
expect 0 "" -- $KMV attention --exact --q "$T/q.npy" --k "$T/k.npy" --v "$T/x.npy" --scale 0.5 --out "$T/o1.npy"
expect 0 "^1 50 1 " -- $GEN stat "$T/o1.npy"

# Every stats file holds exactly the fields docs/stats.md documents for its
# run, with their types: exact, fallback, measured, attention (exact,
# fallback, empirical), forced approximate.
schema() { if python3 "$SCHEMA" "$STATS_DOC" "$1"; then ok; else bad "stats schema: $(cat "$1")"; fi; }
for f in s.json sa.json sc.json so.json ss.json se.json; do schema "$T/$f"; done
expect 0 "" -- $KMV attention --q "$T/q.npy" --k "$T/k.npy" --v "$T/v.npy" --delta 0.05 --measure-error --out "$T/om.npy" --stats "$T/sm.json"
schema "$T/sm.json"
if grep -Eq '"error_measured": [0-9.e-]+,' "$T/sm.json" && grep -q '"delta": 0.05' "$T/sm.json"; then ok; else bad "attention --delta/--measure-error: $(cat "$T/sm.json")"; fi
# The effective scale and the lifted sigma, not zeros: d = 6.
if grep -q '"scale": 0.408248' "$T/sm.json" && grep -q '"sigma": 1.565084' "$T/sm.json"; then ok; else bad "attention scale/sigma: $(cat "$T/sm.json")"; fi
# An exact run has no approx block, no budget, and claims error 0.
if ! grep -q '"approx"' "$T/s.json" && grep -q '"error_bound": 0,' "$T/s.json" &&
    grep -q '"error_measured": null' "$T/s.json"; then ok; else bad "exact stats: $(cat "$T/s.json")"; fi
if ! grep -q attn_budget "$T/sa.json"; then ok; else bad "a Gaussian run names an attention budget"; fi
# Fallbacks claim the same bound, whatever their reason: eps.
if grep -q '"error_bound": 0.1,' "$T/sa.json"; then ok; else bad "fallback bound: $(cat "$T/sa.json")"; fi
# --force-approx runs the approximate path on an input too small to gain;
# --measure-error's exact product is then a phase of its own.
expect 0 "" -- $KMV matvec --force-approx --measure-error --sigma 1 --queries "$T/q.npy" --keys "$T/k.npy" --x "$T/x.npy" --out "$T/yf.npy" --stats "$T/sf.json"
if grep -q '"mode": "approx"' "$T/sf.json"; then ok; else bad "--force-approx: $(cat "$T/sf.json")"; fi
if awk -F': ' '/"measure"/ {gsub(/,/, "", $2); exit !($2 > 0)}' "$T/sf.json"; then ok; else bad "no measure phase: $(cat "$T/sf.json")"; fi
schema "$T/sf.json"
# --backend tree: the bounds tree answers with a deterministic certificate;
# --verify-every 4 computes rows 0, 4, ... exactly too and reports their errors.
expect 0 "" -- $KMV matvec --backend tree --verify-every 4 --measure-error --sigma 0.5 --queries "$T/q.npy" --keys "$T/k.npy" --x "$T/x.npy" --out "$T/yt.npy" --stats "$T/st.json"
for f in '"backend": "tree"' '"deterministic": true' '"verified": 13,'; do
    if grep -q "$f" "$T/st.json"; then ok; else bad "--backend tree: no $f in $(cat "$T/st.json")"; fi
done
if awk -F': ' '/"error_measured"/ {gsub(/,/, "", $2); exit !($2 + 0 <= 0.1)}' "$T/st.json"; then ok; else bad "tree error: $(cat "$T/st.json")"; fi
if awk -F': ' '/"verify_max"/ {gsub(/,/, "", $2); exit !($2 + 0 <= 0.1)}' "$T/st.json"; then ok; else bad "verify_max: $(cat "$T/st.json")"; fi
schema "$T/st.json"
expect 0 "" -- $KMV matvec --backend lsh --force-approx --sigma 0.5 --queries "$T/q.npy" --keys "$T/k.npy" --x "$T/x.npy" --out "$T/yl.npy" --stats "$T/sl.json"
if grep -q '"backend": "lsh"' "$T/sl.json" && grep -q '"verify_max": null' "$T/sl.json"; then ok; else bad "--backend lsh: $(cat "$T/sl.json")"; fi
schema "$T/sl.json"
expect 2 "backend must be auto, tree or lsh" -- $KMV matvec --backend fast --sigma 1 --queries "$T/q.npy" --keys "$T/k.npy" --x "$T/x.npy" --out "$T/yb.npy"
expect 2 "verify-every must be in" -- $KMV matvec --verify-every 0 --sigma 1 --queries "$T/q.npy" --keys "$T/k.npy" --x "$T/x.npy" --out "$T/yb.npy"
absent "$T/yb.npy"
# Attention over no keys names the file.
$GEN write "$T/k0.npy" 0 6 1 >/dev/null
$GEN write "$T/v0.npy" 0 3 1 >/dev/null
expect 1 "k0.npy holds no keys" -- $KMV attention --q "$T/q.npy" --k "$T/k0.npy" --v "$T/v0.npy" --out "$T/o0.npy"
absent "$T/o0.npy"

# kmv prefix: usage errors, then a table checked against a brute force.
PF=(prefix --queries "$T/q.npy" --keys "$T/k.npy")
expect 0 "usage: kmv prefix.*--attention" -- $KMV prefix --help
expect 2 "exactly one of --sigma and --attention" -- $KMV "${PF[@]}" --out "$T/p.csv"
expect 2 "exactly one of --sigma and --attention" -- $KMV "${PF[@]}" --sigma 1 --attention --out "$T/p.csv"
expect 2 "start must be >= 2" -- $KMV "${PF[@]}" --sigma 1 --start 1 --out "$T/p.csv"
expect 2 "step must be >= 1" -- $KMV "${PF[@]}" --sigma 1 --step 0 --out "$T/p.csv"
expect 2 "scale goes with --attention" -- $KMV "${PF[@]}" --sigma 1 --scale 2 --out "$T/p.csv"
expect 2 "start 51 is past the 50 rows" -- $KMV "${PF[@]}" --sigma 1 --start 51 --out "$T/p.csv"
expect 1 "x79.npy has 79 rows but there are 80 keys" -- $KMV "${PF[@]}" --sigma 1 --x "$T/x79.npy" --out "$T/p.csv"
absent "$T/p.csv"
# A plot that cannot be written leaves no table either.
expect 1 "nodir/f.png" -- $KMV "${PF[@]}" --sigma 1 --start 10 --out "$T/p.csv" --plot "$T/nodir/f.png"
absent "$T/p.csv"
expect 0 "" -- $KMV "${PF[@]}" --sigma 0.7 --start 10 --step 15 --x "$T/v.npy" --out "$T/p.csv" --plot "$T/p.png"
# Prefixes 10, 25, 40 and the last, 50 (min of 50 queries and 80 keys).
out=$(awk -F, 'NR == 1 {print; next} {printf " %s", $1}' "$T/p.csv")
if [ "$out" = "i,c,ratio_next,ratio_double,approx_seconds,exact_seconds,speedup,error,eps,mode
 10 25 40 50" ]; then ok; else bad "prefix table rows: $out"; fi
if awk -F, 'NR > 1 && !($8 >= 0 && $8 <= $9) {exit 1}' "$T/p.csv"; then ok; else bad "prefix error above eps"; fi
if [ "$(head -c 4 "$T/p.png" | od -An -c | tr -d ' ')" = "211PNG" ]; then ok; else bad "prefix plot is not a PNG"; fi
# The image format follows the name: SVG for .svg; a name that says none is refused.
expect 0 "" -- $KMV "${PF[@]}" --sigma 0.7 --start 40 --out "$T/p2.csv" --plot "$T/p.svg"
if grep -q "<svg" "$T/p.svg"; then ok; else bad "prefix --plot p.svg is not an SVG"; fi
expect 2 "name the image .png, .svg or .pdf" -- $KMV "${PF[@]}" --sigma 0.7 --out "$T/p3.csv" --plot "$T/p.jpg"
absent "$T/p3.csv"
# c and the ratios of K[:50, :50] by brute force: every entry, sorted.
want=$( { $GEN dump "$T/q.npy"; echo; $GEN dump "$T/k.npy"; } | awk -v s=0.7 '
    NF == 0 {part = 1; next}
    part == 0 {nq++; for (t = 1; t <= NF; t++) q[nq, t] = $t; d = NF; next}
    {nk++; for (t = 1; t <= NF; t++) k[nk, t] = $t}
    END {for (i = 1; i <= 50; i++) for (j = 1; j <= 50; j++) {
        d2 = 0; for (t = 1; t <= d; t++) d2 += (q[i, t] - k[j, t]) ^ 2
        printf "%.17g\n", exp(-d2 / (2 * s * s)) }}' | sort -gr | awk '
    {v[NR] = $1; all += $1; if (NR <= 50) a += $1}
    END {printf "%.6g %.6g %.6g\n", (all - a) / a, v[50] / v[51], v[50] / v[100]}')
got=$(awk -F, '$1 == 50 {printf "%.6g %.6g %.6g\n", $2, $3, $4}' "$T/p.csv")
if [ "$got" = "$want" ]; then ok; else bad "prefix statistics at 50: got '$got', brute force '$want'"; fi
expect 0 "" -- $KMV "${PF[@]}" --attention --start 20 --out "$T/pa.csv"
if awk -F, 'NR > 1 && !($8 >= 0 && $8 <= $9) {exit 1} END {exit NR < 2}' "$T/pa.csv"; then ok; else bad "attention prefix error above eps"; fi

# The demo runs on the shipped sample and reports its checks.
expect 0 "error vs float64.*bound 1e-5" -- $KMV demo
expect 0 "ms, mode (approx|fallback)" -- $KMV demo
expect 0 "per kernel entry, 1 thread\)" -- $KMV demo --threads 1
# Part 4: a row per doubling up to 65536 keys, the error within eps.
out=$($KMV demo --threads 2 2>&1)
if grep -Eq "^ +65536 +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+x " <<<"$out"; then ok; else bad "demo lacks the stream's 65536 row: $out"; fi
if awk '/worst \|y - exact\|/ {found = 1; v = $(NF - 2); if (!(v <= 0.1)) exit 1} END {exit !found}' <<<"$out"; then ok; else bad "demo stream error above eps: $out"; fi

# kmv decode on the shipped stories260K. The exact path reproduces the
# model's own greedy output: these are the first words llama2.c's run.c
# prints for this checkpoint and prompt at temperature 0 (its README).
M=(--model "${STORIES:-data/stories260K}/stories260K.bin" --tokenizer "${STORIES:-data/stories260K}/tok512.bin")
out=$($KMV decode "${M[@]}" --prompt "Once upon a time" --steps 60 --exact 2>/dev/null)
if [[ "$out" == "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball."* ]]; then ok; else bad "decode greedy output differs: $out"; fi
# Both modes in one run: the comparison is reported (contexts this short
# run exact, so the two agree everywhere).
expect 0 "top-1 agreement with exact 1.0000, mean KL.* 0 nats" -- $KMV decode "${M[@]}" --prompt "Once upon a time" --steps 40
printf 'The cat sat on the mat. It was a sunny day and the cat was happy.\n' > "$T/story.txt"
expect 0 "[0-9]+ positions; exact attention: [0-9.]+% of forward time, mean log-loss [0-9.]+" -- $KMV decode "${M[@]}" --text-file "$T/story.txt" --exact
expect 0 "steps approximate" -- $KMV decode "${M[@]}" --text-file "$T/story.txt" --force-approx --eps 0.3
# Positions and attention steps agree: one step per layer and query head
# (5 x 8 for stories260K) at each position run.
out=$($KMV decode "${M[@]}" --text-file "$T/story.txt" --force-approx 2>&1)
np=$(sed -n 's/.*: \([0-9]*\) positions;.*/\1/p' <<<"$out")
ns=$(sed -n 's/.* of \([0-9]*\) steps approximate.*/\1/p' <<<"$out")
if [ -n "$np" ] && [ "$ns" = $((np * 40)) ]; then ok; else bad "decode: $np positions but $ns steps: $out"; fi
printf 'text\0with a NUL' >"$T/bin.txt"
expect 1 "bin.txt: not UTF-8 text" -- $KMV decode "${M[@]}" --text-file "$T/bin.txt" --exact
printf '\xff\xfe bad bytes' >"$T/bin2.txt"
expect 1 "bin2.txt: not UTF-8 text" -- $KMV decode "${M[@]}" --text-file "$T/bin2.txt" --exact
expect 1 "nope.txt: cannot open: No such file" -- $KMV decode "${M[@]}" --text-file "$T/nope.txt" --exact
# A text longer than the old 1 MiB limit is read whole and scored up to the
# model's context.
awk 'BEGIN {for (i = 0; i < 40000; i++) print "The cat sat on the mat and looked at the sun."}' >"$T/long.txt"
expect 0 "scoring the first 513 of [0-9]+ tokens" -- $KMV decode "${M[@]}" --text-file "$T/long.txt" --exact
# --context past the trained range, and --report's fields per context
# bucket (pinned: a renamed or missing field fails here).
expect 0 "past the model's trained context \(512\): from position 512 on" -- \
    $KMV decode "${M[@]}" --text-file "$T/long.txt" --exact --context 1100 --report "$T/report.json"
expect 0 "" -- $KMV decode "${M[@]}" --text-file "$T/story.txt" --force-approx --report "$T/report2.json"
expect 2 "context must be in" -- $KMV decode "${M[@]}" --prompt a --context 0
if python3 - "$T/report.json" "$T/report2.json" <<'PY'; then ok; else bad "decode --report: $(cat "$T/report.json" "$T/report2.json")"; fi
import json, math, sys
FIELDS = ["context", "steps", "attention_steps", "approx_steps", "exact_us_per_step",
          "kmv_us_per_step", "worst_bound", "top1_agreement", "mean_kl", "log_loss", "log_loss_kmv"]
ex, ap = (json.load(open(p)) for p in sys.argv[1:3])
for r in (ex, ap):
    assert r["trained_context"] == 512 and r["attention_steps_per_position"] == 40
    for b in r["buckets"] + [r["totals"]]:
        assert list(b) == FIELDS, list(b)
        assert b["attention_steps"] == 40 * b["steps"]
        assert b["exact_us_per_step"] > 0 and b["log_loss"] > 0
# exact only: three buckets (up to 512, 1024, 2048), no kmv figures
assert ex["context"] == 1100
assert [b["context"] for b in ex["buckets"]] == [512, 1024, 2048]
assert [b["steps"] for b in ex["buckets"]] == [512, 512, 76] and ex["totals"]["steps"] == 1100
for b in ex["buckets"] + [ex["totals"]]:
    assert b["approx_steps"] == 0
    assert all(b[f] is None for f in ("kmv_us_per_step", "worst_bound", "top1_agreement",
                                      "mean_kl", "log_loss_kmv"))
# the totals are the buckets' sums and means
tl = ex["totals"]
mean = sum(b["log_loss"] * b["steps"] for b in ex["buckets"]) / tl["steps"]
assert math.isclose(tl["log_loss"], mean, rel_tol=1e-6)
# beside an approximate session: its figures; a bound only where a step approximated
for b in ap["buckets"] + [ap["totals"]]:
    assert b["kmv_us_per_step"] > 0 and 0 <= b["top1_agreement"] <= 1 and b["mean_kl"] >= 0
    assert (b["worst_bound"] is None) == (b["approx_steps"] == 0)
PY
# --dump-qk: a ZIP of .npy files, q/k/v per layer, positions x heads x head size.
expect 0 "" -- $KMV decode "${M[@]}" --prompt "Once upon a time" --steps 30 --exact --dump-qk "$T/qk.npz"
if [ "$(head -c 4 "$T/qk.npz" | od -An -tx1 | tr -d ' ')" = 504b0304 ] &&
    grep -aq "q_4.npy" "$T/qk.npz" && grep -aq "'shape': (30, 8, 8)" "$T/qk.npz" &&
    grep -aq "'shape': (30, 4, 8)" "$T/qk.npz"; then ok; else bad "qk.npz is not the expected archive"; fi
if command -v python3 >/dev/null; then
    if python3 -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); sys.exit(z.testzip() is not None or len(z.namelist()) != 15)" "$T/qk.npz"; then ok; else bad "qk.npz fails zipfile's CRC check"; fi
fi
expect 1 "no tokens to dump|cannot" -- $KMV decode "${M[@]}" --prompt "a" --steps 1 --exact --dump-qk "$T/nodir/qk.npz"
absent "$T/nodir/qk.npz"
# An empty prompt starts from BOS alone (the model's own story); an empty
# file name is still refused.
out=$($KMV decode "${M[@]}" --prompt "" --steps 20 --exact 2>/dev/null)
if [[ $out == "Once upon a time"* ]]; then ok; else bad "decode from BOS alone: '$out'"; fi
expect 2 "invalid value '' for --text-file" -- $KMV decode "${M[@]}" --text-file ""
expect 2 "exactly one of --prompt and --text-file" -- $KMV decode "${M[@]}" --prompt a --text-file "$T/story.txt"
expect 2 "steps must be >= 1" -- $KMV decode "${M[@]}" --prompt a --steps 0
expect 1 "nope.bin: cannot open" -- $KMV decode --model "$T/nope.bin" --tokenizer "${STORIES:-data/stories260K}/tok512.bin" --prompt a
head -c 100000 "${STORIES:-data/stories260K}/stories260K.bin" > "$T/short.bin"
expect 1 "short.bin: 100000 bytes, but its header describes 1056540" -- $KMV decode --model "$T/short.bin" --tokenizer "${STORIES:-data/stories260K}/tok512.bin" --prompt a
head -c 3000 "${STORIES:-data/stories260K}/tok512.bin" > "$T/tok.bin"
expect 1 "tok.bin: token [0-9]+: truncated" -- $KMV decode "${M[0]}" "${M[1]}" --tokenizer "$T/tok.bin" --prompt a
expect 1 "story.txt: not a llama2.c checkpoint|story.txt: [0-9]+ bytes, but" -- $KMV decode --model "$T/story.txt" --tokenizer "${STORIES:-data/stories260K}/tok512.bin" --prompt a


# kmv regress: each problem solves a small system to its tolerance (the
# stats' residual, recomputed in float64, under --tol), x as float64 of the
# right length; bad input is a clear error with no output.
$GEN write "$T/A.npy" 300 8 21
$GEN write "$T/b300.npy" 300 1 22 ndim=1
$GEN write "$T/b8.npy" 8 1 23 ndim=1
$GEN write "$T/b7.npy" 7 1 24 ndim=1
$GEN write "$T/Anan.npy" 300 8 25 bad=nan 17 3
$GEN write "$T/Abig.npy" 300 8 26 fill=300
R=(regress --a "$T/A.npy")
for case in "gram b8 1" "gram b8 3" "agram b300 2" "exp b300 1"; do
    set -- $case
    rm -f "$T/rx.npy" "$T/rs.json"
    expect 0 "" -- $KMV "${R[@]}" --b "$T/$2.npy" --problem "$1" --power "$3" --tol 1e-5 --out "$T/rx.npy" --stats "$T/rs.json"
    want=$([ "$1" = exp ] && echo 300 || echo 8)
    if [[ $($GEN stat "$T/rx.npy") == "1 $want 1 "* ]]; then ok; else bad "regress $case: x is $($GEN stat "$T/rx.npy")"; fi
    if head -c 64 "$T/rx.npy" | grep -q "'descr': '<f8'"; then ok; else bad "regress $case: x is not float64"; fi
    res=$(sed -n 's/.*"residual": \([^,]*\),.*/\1/p' "$T/rs.json")
    if [ "$1" = agram ]; then
        # the optimum of an overdetermined system is not 0: within 1e-3 of it
        opt=$(sed -n 's/.*"residual_optimal": \([^,]*\),.*/\1/p' "$T/rs.json")
        if awk -v r="$res" -v o="$opt" 'BEGIN { exit !(r <= o * (1 + 1e-3) + 1e-5) }'; then ok; else bad "regress $case: residual $res, optimum $opt"; fi
    elif awk -v r="$res" 'BEGIN { exit !(r <= 1e-4) }'; then ok; else bad "regress $case: residual $res"; fi
    if grep -q '"residual_per_iteration": \[[0-9]' "$T/rs.json"; then ok; else bad "regress $case: no residual history"; fi
done
expect 0 "usage: kmv regress.*--problem" -- $KMV regress --help
expect 2 "problem must be exp, gram or agram" -- $KMV "${R[@]}" --b "$T/b8.npy" --problem svd --out "$T/rx2.npy"
expect 2 "power must be in" -- $KMV "${R[@]}" --b "$T/b8.npy" --problem gram --power 0 --out "$T/rx2.npy"
expect 2 "tol must be in" -- $KMV "${R[@]}" --b "$T/b8.npy" --problem gram --tol 0 --out "$T/rx2.npy"
expect 2 "ridge must be >= 0" -- $KMV "${R[@]}" --b "$T/b300.npy" --problem exp --ridge -1 --out "$T/rx2.npy"
expect 1 "b must be a vector of 8 entries" -- $KMV "${R[@]}" --b "$T/b7.npy" --problem gram --out "$T/rx2.npy"
expect 1 "b must be a vector of 300 entries" -- $KMV "${R[@]}" --b "$T/b8.npy" --problem agram --out "$T/rx2.npy"
expect 1 "b must be a vector" -- $KMV "${R[@]}" --b "$T/A.npy" --problem exp --out "$T/rx2.npy"
expect 1 "Anan.npy.*(NaN|nan).*row 17" -- $KMV regress --a "$T/Anan.npy" --b "$T/b300.npy" --problem exp --out "$T/rx2.npy"
expect 1 "largest s \|\|a_i\|\|\^2 / 2 is" -- $KMV regress --a "$T/Abig.npy" --b "$T/b300.npy" --problem exp --scale 1 --out "$T/rx2.npy"
absent "$T/rx2.npy"

finish
