#!/usr/bin/env bash
# Write-side benchmark: qcow2 vs qemu-img on the same inputs, in one run.
#
#   scripts/bench-write.sh                 # REPS=3, 1 GiB images, 512 MiB convert input
#   REPS=5 SIZE=2G scripts/bench-write.sh
#
# Measures (wall seconds, medians over REPS; ratio = ours / qemu-img, < 1 means faster):
#   seq-write   bench -w -c N -s 64k -S 64k   on a fresh image (every request allocates)
#   rand-write  bench -w -c 50000 -s 4k -S <large odd step>  (scattered allocating writes)
#   overwrite   bench -w -c 100000 -s 4k -S 4k on a fully allocated image (in place)
#   convert-c   convert -c -O qcow2 of a raw file of real binaries (zlib), and with zstd
#   convert     convert -O qcow2 (no compression)
# Every output image is checked with `qemu-img check` and compared with qemu-img's.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-3}
SIZE=${SIZE:-1G}
WORK=${WORK_DIR:-bench-work/write}
Q=${QCOW2:-.build/release/qcow2}
[ -n "${QCOW2:-}" ] || [ "${SKIP_BUILD:-0}" = 1 ] || swift build -c release --product qcow2 >/dev/null
mkdir -p "$WORK"

# Input for convert: real binaries (compressible like a typical system disk), 512 MiB.
SRC="$WORK/input.raw"
if [ ! -f "$SRC" ]; then
    find /usr/lib /usr/bin /opt/swift -type f -size +16k 2>/dev/null | sort | head -5000 | xargs cat 2>/dev/null | head -c $((512 << 20)) > "$SRC" || true
    truncate -s 512M "$SRC"
fi

median() { sort -n | awk '{a[NR]=$1} END {if (NR==0) {print "n/a"} else if (NR%2) {print a[(NR+1)/2]} else {printf "%.3f\n", (a[NR/2]+a[NR/2+1])/2}}'; }
timeit() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1 || { echo fail; return; }; e=$(date +%s.%N); echo "$e - $s" | bc; }

row() { # name, our-command-template, qemu-command-template, prepare-function
    local name=$1 ours=$2 theirs=$3 prep=$4 o=() q=()
    for _ in $(seq "$REPS"); do
        $prep "$WORK/o.qcow2"; o+=("$(eval timeit $ours)")
        $prep "$WORK/q.qcow2"; q+=("$(eval timeit $theirs)")
    done
    qemu-img check -q "$WORK/o.qcow2" || echo "  WARNING: qemu-img check failed on our $name output"
    qemu-img compare -q "$WORK/o.qcow2" "$WORK/q.qcow2" || echo "  WARNING: $name content differs from qemu-img's"
    local om qm
    om=$(printf '%s\n' "${o[@]}" | median); qm=$(printf '%s\n' "${q[@]}" | median)
    printf '| %-11s | %8s | %8s | %6s |\n' "$name" "$om" "$qm" "$(echo "scale=2; $om / $qm" | bc 2>/dev/null || echo n/a)"
}

fresh() { rm -f "$1"; qemu-img create -q -f qcow2 "$1" "$SIZE"; }
full() { fresh "$1"; qemu-io -c "write -P 1 0 $SIZE" "$1" >/dev/null; }
none() { rm -f "$1"; }

echo "qcow2: $Q   qemu-img: $(qemu-img --version | head -1)   reps: $REPS   size: $SIZE   $(date -u +%FT%TZ)"
echo "| benchmark   | qcow2 s  | qemu s   | ratio  |"
echo "|---|---:|---:|---:|"
N=$(( $(numfmt --from=iec "$SIZE") / 65536 ))
row seq-write  "$Q bench -w -c $N -s 64k -S 64k \$WORK/o.qcow2" "qemu-img bench -w -c $N -s 64k -S 64k \$WORK/q.qcow2" fresh
row rand-write "$Q bench -w -c 50000 -s 4k -S 663613440 \$WORK/o.qcow2" "qemu-img bench -w -c 50000 -s 4k -S 663613440 \$WORK/q.qcow2" fresh
row overwrite  "$Q bench -w -c 100000 -s 4k -S 4k \$WORK/o.qcow2" "qemu-img bench -w -c 100000 -s 4k -S 4k \$WORK/q.qcow2" full
row convert    "$Q convert -O qcow2 \$SRC \$WORK/o.qcow2" "qemu-img convert -O qcow2 \$SRC \$WORK/q.qcow2" none
row convert-c  "$Q convert -c -O qcow2 \$SRC \$WORK/o.qcow2" "qemu-img convert -c -O qcow2 \$SRC \$WORK/q.qcow2" none
row convert-cz "$Q convert -c -O qcow2 -o compression_type=zstd \$SRC \$WORK/o.qcow2" "qemu-img convert -c -O qcow2 -o compression_type=zstd \$SRC \$WORK/q.qcow2" none
