#!/usr/bin/env bash
# make-corpus.sh — regenerate the seed corpus in Fuzz/corpus/ from qemu-img-made images.
# Needs qemu-img, qemu-io and python3. Seeds are small (the whole corpus stays < 100 KiB).
#
#   header/        the first 512 bytes of images of several kinds (v2, v3, lazy refcounts,
#                  extended L2, zstd, refcount widths, backing file, data file, LUKS)
#   image-header/  the first 1 KiB of the same images (extensions, backing name)
#   l2-entry/      [cluster_bits-9][flags] + 16-byte (L2 entry, bitmap) records from real
#                  L2 tables (normal, zero, compressed, extended-L2 entries)
#   refcount/      [order][cluster_bits-9][0 ops] + the start of a real refcount block
#   snapshot/      [count u16][cluster_bits-9] + a real snapshot table (2–3 entries)
#   image/         whole tiny images (512 B / 1 KiB clusters) with data, zero,
#                  compressed clusters, snapshots, extended L2, lazy refcounts
#   luks-header/   LUKS areas of `qemu-img create -f luks` (passphrase "pw", iter-time 10 ms;
#                  xts-plain64/sha256, cbc-essiv:sha256 aes-128, cbc-plain64/sha1): the header,
#                  the area length at bytes 592..<596, slot 0's key material (rest dropped)
#   nbd-decoder/   [split][phase] + synthesized client streams (Fuzz/nbd-streams.py)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/Fuzz/corpus"
W="$(mktemp -d)"
trap 'rm -rf "$W"' EXIT
cd "$W"
rm -rf "$OUT"
mkdir -p "$OUT"/{header,image-header,l2-entry,refcount,snapshot,image,luks-header,nbd-decoder}

mk() { # name size options...
  local n="$1" s="$2"; shift 2
  qemu-img create -q -f qcow2 "$@" "$n.qcow2" "$s"
}
io() { local f="$1"; shift; local a=(); for c in "$@"; do a+=(-c "$c"); done; qemu-io -f qcow2 "${a[@]}" "$f" > /dev/null; }

mk v3 1M
mk v2 1M -o compat=0.10
mk lazy 1M -o lazy_refcounts=on
mk extl2 1M -o extended_l2=on,cluster_size=16k
mk zstd 1M -o compression_type=zstd,cluster_size=4k
mk rc1 1M -o refcount_bits=1,cluster_size=512
mk rc64 1M -o refcount_bits=64,cluster_size=2k
qemu-img create -q -f raw base.raw 1M
mk backing 1M -b base.raw -F raw -o cluster_size=4k
mk datafile 1M -o data_file=data.raw,data_file_raw=on
# (PBKDF2 calibration sometimes fails on a loaded machine: "Unable to get accurate CPU usage")
for _ in 1 2 3 4 5; do
  qemu-img create -q -f qcow2 --object secret,id=sec0,data=fuzzseed \
    -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=100 luks.qcow2 1M && break
done

for n in v3 v2 lazy extl2 zstd rc1 rc64 backing datafile luks; do
  head -c 512 "$n.qcow2" > "$OUT/header/$n"
  # cluster 0 up to the last non-zero byte (+16 zero bytes: the end-of-extensions marker)
  python3 -c 'import sys; b=open(sys.argv[1],"rb").read(4096); b=b[:1<<int.from_bytes(b[20:24],"big")]; n=len(b.rstrip(bytes(1))); sys.stdout.buffer.write(b[:(n+23)//8*8])' "$n.qcow2" > "$OUT/image-header/$n"
done

# Images with content: normal, zero (plain/allocated), compressed, subclusters, snapshots.
mk img512 256k -o cluster_size=512
io img512.qcow2 "write -P 0x11 0 3k" "write -z 4k 2k" "write -c -P 0x22 8k 1k" "write -P 0x33 100k 700" "discard 1k 1k"
qemu-img snapshot -c s1 img512.qcow2
io img512.qcow2 "write -P 0x44 0 1k"
mk img4k 512k -o cluster_size=1k,lazy_refcounts=on
io img4k.qcow2 "write -P 0x55 0 8k" "write -c -P 0x66 64k 8k" "write -z -u 16k 4k" "write -z 24k 4k"
qemu-img snapshot -c one img4k.qcow2
io img4k.qcow2 "write -P 0x5a 2k 1k"
qemu-img snapshot -c two img4k.qcow2
mk imgext 1M -o cluster_size=16k,extended_l2=on
io imgext.qcow2 "write -P 0x77 1k 3k" "write -z 20k 1k" "write -c -P 0x88 64k 16k" "write -P 0x99 200k 512"
mk imgzstd 256k -o cluster_size=1k,compression_type=zstd
io imgzstd.qcow2 "write -c -P 0xaa 0 2k" "write -P 0xbb 12k 100"
mk imgv2 256k -o compat=0.10,cluster_size=1k
io imgv2.qcow2 "write -P 0xcc 0 3k" "write -c -P 0xdd 8k 2k"
qemu-img snapshot -c s imgv2.qcow2
# (imgext is too big for the image corpus: 16 KiB clusters; its L2 table seeds l2-entry.)
for n in img512 img4k imgzstd imgv2; do cp "$n.qcow2" "$OUT/image/$n"; done

python3 - "$OUT" <<'EOF'
import struct, sys, os
out = sys.argv[1]
def hdr(f):
    f = os.path.basename(f) + '.qcow2'
    b = open(f, 'rb').read()
    magic, version, bfo, bfs, cb, size, crypt, l1s, l1o, rto, rtc, nbs, so = struct.unpack('>IIQIIQIIQQIIQ', b[:72])
    inc = struct.unpack('>Q', b[72:80])[0] if version >= 3 else 0
    order = struct.unpack('>I', b[96:100])[0] if version >= 3 else 4
    return b, cb, l1s, l1o, rto, rtc, nbs, so, inc, order
for name in ['img512', 'img4k', 'imgext', 'imgzstd', 'imgv2']:
    b, cb, l1s, l1o, rto, rtc, nbs, so, inc, order = hdr(os.path.join(out, 'image', name))
    cs = 1 << cb
    ext = bool(inc & 16)
    # L2 records from the first L2 table
    l1 = struct.unpack('>Q', b[l1o:l1o+8])[0] & 0x00fffffffffffe00
    recs = bytearray([cb - 9, (1 if ext else 0) | (2 if name == 'imgv2' else 0)])
    esz = 16 if ext else 8
    if l1:
        for i in range(0, min(cs, 32 * esz), esz):
            e = b[l1+i:l1+i+8]
            bm = b[l1+i+8:l1+i+16] if ext else bytes(8)
            recs += e + bm
    open(os.path.join(out, 'l2-entry', name), 'wb').write(recs)
    # refcount block start
    rb = struct.unpack('>Q', b[rto:rto+8])[0]
    blk = b[rb:rb + min(cs, 256)]
    open(os.path.join(out, 'refcount', name), 'wb').write(bytes([order, cb - 9, 0]) + blk)
    if nbs:
        # table length: parse entries
        p = so
        for _ in range(nbs):
            p = (p + 7) & ~7
            ids, ns = struct.unpack('>HH', b[p+12:p+16])
            extra = struct.unpack('>I', b[p+36:p+40])[0]
            p += 40 + extra + ids + ns
        open(os.path.join(out, 'snapshot', name), 'wb').write(struct.pack('>H', nbs) + bytes([cb - 9]) + b[so:p])
EOF
# Refcount blocks of other widths (synthetic patterns), and a refcount op sequence.
python3 - "$OUT" <<'EOF'
import sys, os, struct
out = sys.argv[1]
for order in range(7):
    ops = b''.join(struct.pack('>IQ', i * 37, (i * 0x0101010101010101) & 0xffffffffffffffff) for i in range(4))
    open(os.path.join(out, 'refcount', 'order%d' % order), 'wb').write(bytes([order, 0, 4]) + ops + bytes(range(256)) * 2)
EOF
# LUKS areas, truncated after slot 0's key material (the target reads the rest as zeros).
luks() { # name options
  for _ in 1 2 3 4 5 6; do
    qemu-img create -q -f luks --object secret,id=s,data=pw -o "key-secret=s,iter-time=10$2" "$1.luks" 1M 2>/dev/null && break
  done
  python3 - "$1.luks" "$OUT/luks-header/$1" <<'EOF'
import struct, sys
b = open(sys.argv[1], 'rb').read()
payload, key_bytes = struct.unpack('>II', b[104:112])
km, stripes = struct.unpack('>II', b[208 + 40:208 + 48])   # slot 0
end = km * 512 + (key_bytes * stripes + 511) // 512 * 512
out = bytearray(b[:end])
out[592:596] = struct.pack('>I', payload * 512)          # the area length
open(sys.argv[2], 'wb').write(out)
EOF
}
luks xts ""
luks essiv ",cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256"
luks cbc ",cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=plain64,hash-alg=sha1"
# qemu's iteration counts make an unlock too slow to fuzz; a copy with 1000 iterations
# (digest and slot 0) is cheap enough for the target to run the whole unlock path.
python3 - "$OUT/luks-header/essiv" "$OUT/luks-header/essiv-cheap" <<'EOF'
import struct, sys
b = bytearray(open(sys.argv[1], 'rb').read())
b[164:168] = struct.pack('>I', 1000)   # mk_digest_iter
b[212:216] = struct.pack('>I', 1000)   # slot 0 iterations
open(sys.argv[2], 'wb').write(b)
EOF

python3 "$ROOT/Fuzz/nbd-streams.py" "$OUT/nbd-decoder"

echo "corpus: $(du -sb "$OUT" | cut -f1) bytes in $(find "$OUT" -type f | wc -l) files"
