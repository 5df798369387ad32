#!/usr/bin/env bash
# The README's synopsis is what the binary says: for every command, the
# options of `kmv COMMAND --help`'s usage line, in order, with their
# arguments and brackets, are the README's (whitespace aside); and the
# top-level help names every command. Prints "N passed, M failed" last.
set -u
KMV=${KMV:-./kmv}
README=${README:-README.md}
. "$(dirname "${BASH_SOURCE[0]}")/testlib.sh"

block=$(sed -n '/<!-- synopsis:begin -->/,/<!-- synopsis:end -->/p' "$README" | grep -v '^<!--' | grep -v '^```')
[ -n "$block" ] || bad "no synopsis block in $README"
for cmd in matvec attention prefix decode regress demo; do
    help=$($KMV $cmd --help | head -1 | sed 's/^usage: //' | tr -s ' ')
    # The command's lines: from "kmv CMD" to the next line starting "kmv".
    doc=$(awk -v c="$cmd" '$1 == "kmv" {on = ($2 == c)} on' <<<"$block" | tr '\n' ' ' | tr -s ' ' | sed 's/ $//')
    if [ "$help" = "$doc" ]; then ok; else bad "$cmd: --help says '$help'; README says '$doc'"; fi
    if $KMV --help | grep -Eq "^  $cmd "; then ok; else bad "kmv --help does not list $cmd"; fi
done
finish
