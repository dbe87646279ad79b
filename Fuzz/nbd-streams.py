#!/usr/bin/env python3
"""Seeds of the nbd-decoder fuzz target: NBD client byte streams (docs/nbd-protocol.md),
each prefixed with [split][mode] (see Fuzz/Targets/FuzzNBDDecoder.swift).

Usage: nbd-streams.py OUTDIR"""
import os, struct, sys

OPT_MAGIC = 0x49484156454F5054
REQ_MAGIC = 0x25609513
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = 0, 1, 2, 3, 4, 5, 6, 7
FUA, NO_HOLE, DF, REQ_ONE = 1, 2, 4, 8


def option(code, data=b''):
    return struct.pack('>QII', OPT_MAGIC, code, len(data)) + data


def request(typ, cookie, offset, length, flags=0, payload=None):
    b = struct.pack('>IHHQQI', REQ_MAGIC, flags, typ, cookie, offset, length)
    return b + (payload if payload is not None else b'')


def go(name=b'disk', infos=()):
    return option(7, struct.pack('>I', len(name)) + name + struct.pack('>H', len(infos))
                  + b''.join(struct.pack('>H', i) for i in infos))


def meta(code, name=b'disk', queries=(b'base:allocation',)):
    body = struct.pack('>I', len(name)) + name + struct.pack('>I', len(queries))
    body += b''.join(struct.pack('>I', len(q)) + q for q in queries)
    return option(code, body)


def transmission():
    return (request(READ, 1, 0, 4096) + request(WRITE, 2, 4096, 512, FUA, bytes(range(256)) * 2)
            + request(FLUSH, 3, 0, 0) + request(BLOCK_STATUS, 4, 0, 1 << 20, REQ_ONE)
            + request(TRIM, 5, 8192, 4096) + request(WRITE_ZEROES, 6, 65536, 65536, NO_HOLE)
            + request(READ, 7, 1 << 20, 65536, DF) + request(CACHE, 8, 0, 4096) + request(DISC, 9, 0, 0))


handshake = (struct.pack('>I', 3) + option(8) + meta(10) + go(infos=(0, 3)) + transmission())
streams = {
    # [split][mode]: mode bit 0 = no client flags, bit 1 = tiny limits
    'handshake-go': bytes([128, 0]) + handshake,
    'handshake-split-early': bytes([3, 0]) + handshake,
    'list-info-abort': bytes([200, 0]) + struct.pack('>I', 1) + option(3) + meta(9, queries=(b'qemu:',))
        + option(6, struct.pack('>I', 4) + b'disk' + struct.pack('>H', 0)) + option(2),
    'export-name': bytes([50, 0]) + struct.pack('>I', 1) + option(1, b'disk') + transmission(),
    'transmission': bytes([77, 1]) + transmission(),
    # over the tiny limits: a 200-byte option (skipped), a 4 KiB WRITE (payload skipped)
    'oversized': bytes([100, 2]) + struct.pack('>I', 3) + option(99, bytes(200)) + go()
        + request(WRITE, 1, 0, 4096, 0, b'\x5a' * 4096) + request(READ, 2, 0, 512),
    'oversized-transmission': bytes([10, 3]) + request(WRITE, 1, 0, 2048, 0, b'\xa5' * 2048)
        + request(FLUSH, 2, 0, 0) + request(DISC, 3, 0, 0),
}
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
for name, data in streams.items():
    with open(os.path.join(out, name), 'wb') as f:
        f.write(data)
