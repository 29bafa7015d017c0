#!/usr/bin/env python3
"""Recomputes blk-stress's digest from a disk image, independently of the guest's code (the
format is documented in guest-agent/protocol/src/blk_stress.rs).

Usage: blk_stress_image.py IMAGE SEED BLOCKS [--payload]
Prints `valid=N digest=H`; H must equal the digest on the guest's summary line. --payload
also checks every payload word (slow: about 10 s per 16384 blocks).
"""
import struct
import sys

M = (1 << 64) - 1
MAGIC = int.from_bytes(b"MGBLKST1", "little")


def mix(x):
    x = (x + 0x9E3779B97F4A7C15) & M
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M
    return x ^ (x >> 31)


def checksum(words):
    h = 0xCBF29CE484222325
    for w in words[:511]:
        h = ((h ^ w) * 0x100000001B3) & M
        h = ((h << 29) | (h >> 35)) & M
    return h


def main():
    path, seed, blocks = sys.argv[1], int(sys.argv[2], 0), int(sys.argv[3], 0)
    payload = "--payload" in sys.argv[4:]
    with open(path, "rb") as f:
        data = f.read(blocks * 4096)
    digest, valid = 0xCBF29CE484222325, 0
    for b in range(blocks):
        w = struct.unpack_from("<512Q", data, b * 4096)
        seq = 0
        if w[0] == MAGIC and w[1] == b and w[3] == seed and checksum(w) == w[511]:
            key = mix(seed ^ ((b * 0x9E3779B97F4A7C15) & M) ^ ((w[2] * 0xC2B2AE3D27D4EB4F) & M))
            if not payload or all(w[i] == mix((key + i) & M) for i in range(4, 511)):
                seq = w[2]
                valid += 1
        for byte in struct.pack("<QQ", b, seq):
            digest = ((digest ^ byte) * 0x100000001B3) & M
    print(f"valid={valid} digest={digest:016x}")


main()
