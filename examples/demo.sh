#!/usr/bin/env bash
# Builds swift-qcow2, makes a small backing chain with qemu-img (raw base, two qcow2
# overlays, one compressed cluster), and shows it with `qcow2 info --backing-chain`,
# `qcow2 map` and `qcow2 convert -O raw`, checking the result against qemu-img.
set -euo pipefail
cd "$(dirname "$0")/.."
swift build -c release --product qcow2
Q="$PWD/.build/release/qcow2"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

qemu-img create -q -f raw base.raw 64M
qemu-io -f raw -c 'write -P 0x11 0 1M' base.raw >/dev/null
qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2
qemu-io -c 'write -P 0x22 512k 1M' -c 'write -z 4M 64k' mid.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
qemu-io -c 'write -c -P 0x33 8M 64k' -c 'write -P 0x44 16M 128k' top.qcow2 >/dev/null

echo "== qcow2 info --backing-chain top.qcow2"
"$Q" info --backing-chain top.qcow2
echo
echo "== qcow2 map --output=json top.qcow2"
"$Q" map --output=json top.qcow2
echo
echo "== qcow2 convert -p -O raw top.qcow2 top.raw"
"$Q" convert -p -O raw top.qcow2 top.raw
qemu-img convert -O raw top.qcow2 expected.raw
"$Q" compare top.raw expected.raw
