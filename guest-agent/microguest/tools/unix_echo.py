#!/usr/bin/env python3
"""Echo for our VMM's unix-socket network backend (`vmm run --net unix=PATH`): binds a Unix
datagram socket at PATH and sends every datagram (one Ethernet frame) back to its sender.

Usage: unix_echo.py PATH [--every N --fault drop|dup|corrupt] [--blackout-at S --blackout-for S]
The fault options damage every Nth frame; --blackout-* drops everything for a while, counted
from the first frame (what a NIC backend swap may look like to net-stream).
"""
import argparse
import os
import socket
import time

p = argparse.ArgumentParser()
p.add_argument("path")
p.add_argument("--every", type=int, default=0)
p.add_argument("--fault", choices=["drop", "dup", "corrupt"], default="drop")
p.add_argument("--blackout-at", type=float, default=0)
p.add_argument("--blackout-for", type=float, default=0)
a = p.parse_args()
try:
    os.unlink(a.path)
except FileNotFoundError:
    pass
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind(a.path)
n = 0
start = None
while True:
    frame, peer = s.recvfrom(70000)
    start = start or time.monotonic()
    n += 1
    if a.blackout_for and a.blackout_at <= time.monotonic() - start < a.blackout_at + a.blackout_for:
        continue
    if a.every and n % a.every == 0:
        if a.fault == "drop":
            continue
        if a.fault == "dup":
            s.sendto(frame, peer)
        if a.fault == "corrupt":
            frame = frame[:40] + bytes([frame[40] ^ 0xFF]) + frame[41:]
    try:
        s.sendto(frame, peer)
    except OSError:
        pass  # the VMM went away
