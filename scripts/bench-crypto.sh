#!/usr/bin/env bash
# Encryption benchmark: LUKS (aes-256-xts-plain64, QEMU's default) read/write throughput,
# qcow2 vs qemu-img bench on the same images, and each against an unencrypted image.
#
#   scripts/bench-crypto.sh                  # REPS=3, 1 GiB images
#   REPS=5 SIZE=2G scripts/bench-crypto.sh
#
# qemu-img bench cannot open encrypted images (it has no --object), so there are two parts:
#
# 1. `bench` rows (wall seconds, medians over REPS): ours on a plain and on a LUKS image
#    (aes-256-xts-plain64, QEMU's default), qemu-img bench on the plain one; the last column
#    is ours / qemu-img for plain rows and LUKS / plain (our encryption overhead) for -luks rows.
#      seq-read   bench -c N -s 64k  on a fully written image (N = SIZE / 64k)
#      rand-read  bench -c 100000 -s 4k -S <large odd step>
#      seq-write  bench -w -c N -s 64k on a fresh image (every request allocates)
#      overwrite  bench -w -c 100000 -s 4k on a fully written image (in place)
# 2. `convert` rows, both tools on the same encrypted images (secrets through
#    --object/--image-opts for qemu-img, --password-file for ours); ratio = ours / qemu-img:
#      dec-read   convert -O raw  of a fully written LUKS image (read + decrypt)
#      enc-write  convert -n      of a raw file into an empty LUKS image (encrypt + allocate)
# and the same two on plain images, for the cost of encryption in each tool.
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

ours_bench() { # image kind args...
    local img=$1 kind=$2; shift 2
    if [ "$kind" = luks ]; then timeit "$Q" bench -t 1 "$@" --password-file "$WORK/pw" "$img"; else timeit "$Q" bench -t 1 "$@" "$img"; fi
}

brow() { # name kind fill bench-args...
    local name=$1 kind=$2 fill=$3; shift 3
    local o=() q=()
    for _ in $(seq "$REPS"); do
        make "$WORK/o.qcow2" "$kind" "$fill"; o+=("$(ours_bench "$WORK/o.qcow2" "$kind" "$@")")
        if [ "$kind" = plain ]; then make "$WORK/q.qcow2" plain "$fill"; q+=("$(timeit qemu-img bench "$@" "$WORK/q.qcow2")"); fi
    done
    local om qm ratio
    om=$(printf '%s\n' "${o[@]}" | median)
    if [ "$kind" = plain ]; then
        qm=$(printf '%s\n' "${q[@]}" | median); ratio=$(echo "scale=2; $om / $qm" | bc 2>/dev/null || echo n/a)
        PLAIN[$name]=$om
    else
        qm="n/a"; ratio=$(echo "scale=2; $om / ${PLAIN[${name%-luks}]}" | bc 2>/dev/null || echo n/a)
    fi
    printf '| %-15s | %8s | %8s | %6s |\n' "$name" "$om" "$qm" "$ratio"
}

crow() { # name kind read|write
    local name=$1 kind=$2 dir=$3 o=() q=() spec
    for _ in $(seq "$REPS"); do
        for who in o q; do
            if [ "$dir" = read ]; then make "$WORK/$who.qcow2" "$kind" full; else make "$WORK/$who.qcow2" "$kind" fresh; fi
        done
        rm -f "$WORK/out.raw"
        spec="driver=qcow2,file.filename=$WORK/q.qcow2,encrypt.key-secret=s0"
        if [ "$dir" = read ]; then
            if [ "$kind" = luks ]; then
                o+=("$(timeit "$Q" convert --password-file "$WORK/pw" -O raw "$WORK/o.qcow2" "$WORK/out.raw")"); rm -f "$WORK/out.raw"
                q+=("$(timeit qemu-img convert $OBJ --image-opts "$spec" -O raw "$WORK/out.raw")")
            else
                o+=("$(timeit "$Q" convert -O raw "$WORK/o.qcow2" "$WORK/out.raw")"); rm -f "$WORK/out.raw"
                q+=("$(timeit qemu-img convert -O raw "$WORK/q.qcow2" "$WORK/out.raw")")
            fi
        else
            if [ "$kind" = luks ]; then
                o+=("$(timeit "$Q" convert -n --password-file "$WORK/pw" -f raw -O qcow2 "$WORK/input.raw" "$WORK/o.qcow2")")
                q+=("$(timeit qemu-img convert -n $OBJ -f raw --target-image-opts "$WORK/input.raw" "$spec")")
            else
                o+=("$(timeit "$Q" convert -n -f raw -O qcow2 "$WORK/input.raw" "$WORK/o.qcow2")")
                q+=("$(timeit qemu-img convert -n -f raw -O qcow2 "$WORK/input.raw" "$WORK/q.qcow2")")
            fi
        fi
    done
    if [ "$dir" = write ] && [ "$kind" = luks ]; then
        qemu-img check -q $OBJ --image-opts "driver=qcow2,file.filename=$WORK/o.qcow2,encrypt.key-secret=s0" \
            || echo "  WARNING: qemu-img check failed on our $name image"
    fi
    local om qm
    om=$(printf '%s\n' "${o[@]}" | median); qm=$(printf '%s\n' "${q[@]}" | median)
    printf '| %-15s | %8s | %8s | %6s |\n' "$name" "$om" "$qm" "$(echo "scale=2; $om / $qm" | bc 2>/dev/null || echo n/a)"
}

declare -A PLAIN
echo "qcow2: $Q   qemu-img: $(qemu-img --version | head -1)   reps: $REPS   size: $SIZE   $(date -u +%FT%TZ)"
N=$(( $(numfmt --from=iec "$SIZE") / 65536 ))
[ -f "$WORK/input.raw" ] && [ "$(stat -c %s "$WORK/input.raw")" = "$(numfmt --from=iec "$SIZE")" ] \
    || head -c "$(numfmt --from=iec "$SIZE")" /dev/urandom > "$WORK/input.raw"
echo
echo "| bench           | qcow2 s  | qemu s   | ratio  |"
echo "|---|---:|---:|---:|"
for kind in plain luks; do
    suffix=$([ "$kind" = luks ] && echo "-luks" || echo "")
    brow "seq-read$suffix"  "$kind" full -c "$N" -s 64k -S 64k
    brow "rand-read$suffix" "$kind" full -c 100000 -s 4k -S 663613440
    brow "seq-write$suffix" "$kind" fresh -w -c "$N" -s 64k -S 64k
    brow "overwrite$suffix" "$kind" full -w -c 100000 -s 4k -S 4k
done
echo
echo "| convert         | qcow2 s  | qemu s   | ratio  |"
echo "|---|---:|---:|---:|"
crow dec-read-plain plain read
crow dec-read-luks luks read
crow enc-write-plain plain write
crow enc-write-luks luks write
