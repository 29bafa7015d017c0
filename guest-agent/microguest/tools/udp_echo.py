#!/usr/bin/env python3
"""UDP echo for QEMU's socket netdev (`-netdev socket,udp=127.0.0.1:PORT,localaddr=127.0.0.1:PEER`):
every datagram (one Ethernet frame) received on PORT goes back to PEER unchanged.

Usage: udp_echo.py [--port 5555] [--peer 5556] [--every N --fault drop|dup|corrupt]
The fault options damage every Nth frame, to check that net-echo notices.
"""
import argparse
import socket

p = argparse.ArgumentParser()
p.add_argument("--port", type=int, default=5555)
p.add_argument("--peer", type=int, default=5556)
p.add_argument("--every", type=int, default=0)
p.add_argument("--fault", choices=["drop", "dup", "corrupt"], default="drop")
a = p.parse_args()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind(("127.0.0.1", a.port))
n = 0
while True:
    frame, _ = s.recvfrom(70000)
    n += 1
    if a.every and n % a.every == 0:
        if a.fault == "drop":
            continue
        if a.fault == "dup":
            s.sendto(frame, ("127.0.0.1", a.peer))
        if a.fault == "corrupt":
            frame = frame[:40] + bytes([frame[40] ^ 0xFF]) + frame[41:]
    s.sendto(frame, ("127.0.0.1", a.peer))
