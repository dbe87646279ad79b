#!/usr/bin/env bash
# Encryption benchmark: LUKS (aes-256-xts-plain64, QEMU's default) read/write throughput,
# qcow2 vs qemu-img bench on the same images, and each against an unencrypted image.
#
#   scripts/bench-crypto.sh                  # REPS=3, 1 GiB images
#   REPS=5 SIZE=2G scripts/bench-crypto.sh
#
# Measures (wall seconds, medians over REPS; ratio = ours / qemu-img, < 1 means faster):
#   seq-read    bench -c N -s 64k        on a fully written image (N = SIZE / 64k)
#   rand-read   bench -c 100000 -s 4k -S <large odd step>
#   seq-write   bench -w -c N -s 64k     on a fresh image (every request allocates)
#   overwrite   bench -w -c 100000 -s 4k on a fully written image (in place)
# for a plain image and a LUKS image (the same rows, "-luks"). qemu-img bench gets the
# secret through --object/--image-opts, ours through --password-file. Both sides use one
# I/O thread (qemu-img bench's default; our -t 1).
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-3}
SIZE=${SIZE:-1G}
WORK=${WORK_DIR:-bench-work/crypto}
Q=${QCOW2:-.build/release/qcow2}
[ -n "${QCOW2:-}" ] || [ "${SKIP_BUILD:-0}" = 1 ] || swift build -c release --product qcow2 >/dev/null
mkdir -p "$WORK"
PASS=bench-passphrase
printf '%s' "$PASS" > "$WORK/pw"
OBJ="--object secret,id=s0,data=$PASS"

median() { sort -n | awk '{a[NR]=$1} END {if (NR==0) {print "n/a"} else if (NR%2) {print a[(NR+1)/2]} else {printf "%.3f\n", (a[NR/2]+a[NR/2+1])/2}}'; }
timeit() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1 || { echo fail; return; }; e=$(date +%s.%N); echo "$e - $s" | bc; }

# make IMAGE plain|luks fresh|full
make() {
    local img=$1 kind=$2 fill=$3
    rm -f "$img"
    if [ "$kind" = luks ]; then
        until qemu-img create -q -f qcow2 $OBJ -o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 "$img" "$SIZE" 2>/dev/null; do :; done
    else
        qemu-img create -q -f qcow2 "$img" "$SIZE"
    fi
    if [ "$fill" = full ]; then
        if [ "$kind" = luks ]; then
            qemu-io $OBJ --image-opts -c "write -P 1 0 $SIZE" "driver=qcow2,file.filename=$img,encrypt.key-secret=s0" >/dev/null
        else
            qemu-io -c "write -P 1 0 $SIZE" "$img" >/dev/null
        fi
    fi
}

row() { # name kind fill our-bench-args
    local name=$1 kind=$2 fill=$3; shift 3
    local args=("$@") o=() q=() oi qi
    for _ in $(seq "$REPS"); do
        make "$WORK/o.qcow2" "$kind" "$fill"
        make "$WORK/q.qcow2" "$kind" "$fill"
        if [ "$kind" = luks ]; then
            oi=(--password-file "$WORK/pw" "$WORK/o.qcow2")
            qi=($OBJ --image-opts "driver=qcow2,file.filename=$WORK/q.qcow2,encrypt.key-secret=s0")
        else
            oi=("$WORK/o.qcow2"); qi=("$WORK/q.qcow2")
        fi
        o+=("$(timeit "$Q" bench -t 1 "${args[@]}" "${oi[@]}")")
        q+=("$(timeit qemu-img bench "${args[@]}" "${qi[@]}")")
    done
    if [ "$kind" = luks ]; then
        qemu-img check -q $OBJ --image-opts "driver=qcow2,file.filename=$WORK/o.qcow2,encrypt.key-secret=s0" \
            || echo "  WARNING: qemu-img check failed on our $name image"
    fi
    local om qm
    om=$(printf '%s\n' "${o[@]}" | median); qm=$(printf '%s\n' "${q[@]}" | median)
    printf '| %-15s | %8s | %8s | %6s |\n' "$name" "$om" "$qm" "$(echo "scale=2; $om / $qm" | bc 2>/dev/null || echo n/a)"
}

echo "qcow2: $Q   qemu-img: $(qemu-img --version | head -1)   reps: $REPS   size: $SIZE   $(date -u +%FT%TZ)"
echo "| benchmark       | qcow2 s  | qemu s   | ratio  |"
echo "|---|---:|---:|---:|"
N=$(( $(numfmt --from=iec "$SIZE") / 65536 ))
for kind in plain luks; do
    suffix=$([ "$kind" = luks ] && echo "-luks" || echo "")
    row "seq-read$suffix"  "$kind" full -c "$N" -s 64k -S 64k
    row "rand-read$suffix" "$kind" full -c 100000 -s 4k -S 663613440
    row "seq-write$suffix" "$kind" fresh -w -c "$N" -s 64k -S 64k
    row "overwrite$suffix" "$kind" full -w -c 100000 -s 4k -S 4k
done
