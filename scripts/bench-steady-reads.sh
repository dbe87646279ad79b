#!/usr/bin/env bash
# Steady-state random 4 KiB read rate through backing chains, as a function of depth.
#
#   scripts/bench-steady-reads.sh                 # depths 1 500 (chains from bench-chain.sh)
#   DEPTHS="1 100 500 1000" COUNT=1000000 REPS=3 scripts/bench-steady-reads.sh
#
# Uses the chains cached by scripts/bench-chain.sh (bench-work/dN-...). Runs
# `qcow2 bench -c COUNT -s 4096 -S 663613440 -d 1` (the same scattered offsets as
# bench-chain.sh, but enough reads that the one-time chain resolution is amortized) and
# prints the median reads/s per depth and its ratio to depth 1 — the issue's criterion is
# "random 4 KiB reads at depth 500 at least 0.8x our depth-1 rate".
set -euo pipefail
cd "$(dirname "$0")/.."
DEPTHS=${DEPTHS:-"1 500"}
COUNT=${COUNT:-1000000}
REPS=${REPS:-3}
Q=${QCOW2:-.build/release/qcow2}
WORK=${WORK_DIR:-bench-work}
[ -n "${QCOW2:-}" ] || [ "${SKIP_BUILD:-0}" = 1 ] || swift build -c release --product qcow2 >/dev/null
base=""
printf '| depth | first read s (bench -c 1) | median s | reads/s | ratio to depth 1 |\n|---:|---:|---:|---:|---:|\n'
for d in $DEPTHS; do
    dir=$(ls -d "$WORK"/d$d-* 2>/dev/null | head -1) || true
    [ -n "$dir" ] || { echo "| $d | no chain (run scripts/bench-chain.sh $d first) | | |"; continue; }
    top=$(ls "$dir"/layer-*.qcow2 | sort -V | tail -1)
    # The first read of a region resolves it through every layer (one L2 read per layer).
    firsts=()
    for _ in $(seq "$REPS"); do
        firsts+=("$("$Q" bench -c 1 -s 4096 -d 1 "$top" | sed -n 's/Run completed in \([0-9.]*\) seconds./\1/p')")
    done
    first=$(printf '%s\n' "${firsts[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
    times=()
    for _ in $(seq "$REPS"); do
        times+=("$("$Q" bench -c "$COUNT" -s 4096 -S 663613440 -d 1 "$top" | sed -n 's/Run completed in \([0-9.]*\) seconds./\1/p')")
    done
    med=$(printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
    rate=$(echo "$COUNT / $med" | bc)
    [ -n "$base" ] || base=$rate
    printf '| %s | %s | %s | %s | %s |\n' "$d" "$first" "$med" "$rate" "$(echo "scale=2; $rate / $base" | bc)"
done
