#!/usr/bin/env python3
"""A minimal vhost-user virtio-vsock backend with a built-in stream echo service, for testing
the microguest's vsock driver under QEMU (vhost-user-vsock-device) where /dev/vhost-vsock is
missing. It plays the host (CID 2): it accepts connections on --port, echoes every byte back
within the guest's credit, answers CREDIT_REQUEST, and answers SHUTDOWN with RST. It checks
the guest strictly (header fields, credit, lengths) and prints VIOLATION lines on stderr.

Usage: vhost_user_vsock_echo.py SOCKET_PATH [--cid 3] [--port 1234] [--buf-alloc 65536]
       [--chunk 3000] [--delay-credit] [--hold BYTES] [--no-rst]
Only the rx and tx queues are the backend's: QEMU keeps the event queue itself.
QEMU:  -object memory-backend-memfd,id=mem,size=256M,share=on -M microvm,memory-backend=mem
       -chardev socket,id=c0,path=SOCKET_PATH -device vhost-user-vsock-device,chardev=c0
"""
import argparse, mmap, os, socket, struct, sys, threading, time

HDR = struct.Struct("<QQIIIHHIII")  # 44 bytes
assert HDR.size == 44
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = range(1, 8)
OPS = {1: "REQUEST", 2: "RESPONSE", 3: "RST", 4: "SHUTDOWN", 5: "RW", 6: "CREDIT_UPDATE", 7: "CREDIT_REQUEST"}
HOST_CID = 2
violations = 0


def log(*a):
    print("vsock-backend:", *a, file=sys.stderr, flush=True)


def violation(*a):
    global violations
    violations += 1
    log("VIOLATION:", *a)


class Mem:
    def __init__(self):
        self.regions = []  # (gpa, size, uva, mm, off)

    def set(self, regions):
        self.regions = regions

    def _find(self, addr, n, key):
        for r in self.regions:
            base = r[0] if key == "gpa" else r[2]
            if base <= addr and addr + n <= base + r[1]:
                return r[3], r[4] + addr - base
        raise ValueError(f"{key} {addr:#x}+{n} not mapped")

    def read(self, gpa, n):
        mm, off = self._find(gpa, n, "gpa")
        return bytes(mm[off:off + n])

    def write(self, gpa, data):
        mm, off = self._find(gpa, len(data), "gpa")
        mm[off:off + len(data)] = data

    def uva_to_gpa(self, uva):
        for r in self.regions:
            if r[2] <= uva < r[2] + r[1]:
                return r[0] + uva - r[2]
        raise ValueError(f"uva {uva:#x} not mapped")


mem = Mem()


class Vring:
    def __init__(self, index):
        self.index = index
        self.num = 0
        self.desc = self.avail = self.used = None
        self.last_avail = 0
        self.enabled = False
        self.call_fd = None

    def ready(self):
        return self.enabled and self.desc is not None and self.num

    def u16(self, gpa):
        return struct.unpack("<H", mem.read(gpa, 2))[0]

    def pop(self):
        if self.u16(self.avail + 2) == self.last_avail % 65536:
            return None
        head = self.u16(self.avail + 4 + 2 * (self.last_avail % self.num))
        self.last_avail = (self.last_avail + 1) % 65536
        chain, i, seen = [], head, 0
        while True:
            addr, ln, flags, nxt = struct.unpack("<QIHH", mem.read(self.desc + 16 * i, 16))
            if flags & 4:
                violation("indirect descriptor used without negotiation")
            chain.append((addr, ln, bool(flags & 2)))
            seen += 1
            if not flags & 1:
                break
            if seen > self.num:
                violation("descriptor loop")
                break
            i = nxt
        # Spec: device-readable descriptors must come before device-writable ones.
        w = [c[2] for c in chain]
        if w != sorted(w):
            violation(f"queue {self.index}: writable descriptor before a readable one")
        return head, chain

    def push_used(self, head, length):
        idx = self.u16(self.used + 2)
        mem.write(self.used + 4 + 8 * (idx % self.num), struct.pack("<II", head, length))
        mem.write(self.used + 2, struct.pack("<H", (idx + 1) % 65536))
        if self.call_fd is not None:
            try:
                os.write(self.call_fd, struct.pack("<Q", 1))
            except OSError:
                pass


class Conn:
    def __init__(self, gport, port, guest_buf_alloc, guest_fwd_cnt, buf_alloc):
        self.gport, self.port = gport, port
        self.guest_buf_alloc, self.guest_fwd_cnt = guest_buf_alloc, guest_fwd_cnt
        self.buf_alloc = buf_alloc
        self.rx_cnt = 0      # bytes received from the guest
        self.fwd_cnt = 0     # bytes the echo app consumed
        self.reported_fwd = 0
        self.tx_cnt = 0      # bytes sent to the guest
        self.pending = bytearray()
        self.shutdown = 0
        self.credit_blocked_since = None


class Device:
    def __init__(self, args):
        self.args = args
        self.rx, self.tx = Vring(0), Vring(1)
        self.lock = threading.Lock()
        self.out = []  # packets (hdr_bytes, payload) waiting for rx buffers
        self.conns = {}
        self.stats = dict(conns=0, rx_bytes=0, tx_bytes=0, rsts=0, credit_updates=0)

    def hdr(self, conn_or_ports, op, length=0, flags=0, conn=None):
        gport, port = conn_or_ports
        buf_alloc = conn.buf_alloc if conn else 0
        fwd = conn.fwd_cnt if conn else 0
        if conn:
            conn.reported_fwd = conn.fwd_cnt
        return HDR.pack(HOST_CID, self.args.cid, port, gport, length, 1, op, flags, buf_alloc, fwd)

    def send(self, ports, op, payload=b"", flags=0, conn=None):
        self.out.append((self.hdr(ports, op, len(payload), flags, conn), bytes(payload)))

    def handle_tx_packet(self, data):
        if len(data) < 44:
            violation(f"tx packet of {len(data)} bytes, shorter than the header")
            return
        src_cid, dst_cid, sport, dport, ln, typ, op, flags, buf_alloc, fwd_cnt = HDR.unpack_from(data)
        payload = data[44:]
        if src_cid != self.args.cid:
            violation(f"src_cid {src_cid} != guest cid {self.args.cid}")
        if dst_cid != HOST_CID:
            log(f"packet for cid {dst_cid}: answering RST")
            if op != OP_RST:
                self.send((sport, dport), OP_RST)
            return
        if typ != 1:
            violation(f"type {typ} != STREAM")
        if ln != len(payload):
            violation(f"hdr.len {ln} != payload bytes {len(payload)} (op {OPS.get(op, op)})")
        if op != OP_RW and ln != 0:
            violation(f"{OPS.get(op, op)} with len {ln}")
        key = (sport, dport)
        conn = self.conns.get(key)
        if conn:
            conn.guest_buf_alloc, conn.guest_fwd_cnt = buf_alloc, fwd_cnt
        if op == OP_REQUEST:
            if conn:
                violation("REQUEST on an existing connection")
            if dport != self.args.port:
                log(f"REQUEST to port {dport}: nobody listens, RST")
                self.send(key, OP_RST)
                self.stats["rsts"] += 1
                return
            conn = Conn(sport, dport, buf_alloc, fwd_cnt, self.args.buf_alloc)
            self.conns[key] = conn
            self.stats["conns"] += 1
            log(f"connection from guest port {sport} to {dport} (guest buf_alloc {buf_alloc})")
            self.send(key, OP_RESPONSE, conn=conn)
            return
        if not conn:
            if op != OP_RST:
                log(f"{OPS.get(op, op)} for unknown connection {key}: RST")
                self.send(key, OP_RST)
            return
        if op == OP_RW:
            in_flight = conn.rx_cnt + len(payload) - conn.fwd_cnt
            if in_flight > conn.buf_alloc:
                violation(f"guest exceeded credit: {in_flight} bytes in flight > buf_alloc {conn.buf_alloc}")
            if conn.shutdown & 2:
                violation("RW after SHUTDOWN(SEND)")
            conn.rx_cnt += len(payload)
            conn.pending += payload
            if self.args.hold:
                conn.fwd_cnt += len(payload)  # consumed into the app at once
            self.stats["rx_bytes"] += len(payload)
        elif op == OP_CREDIT_REQUEST:
            self.stats["credit_updates"] += 1
            self.send(key, OP_CREDIT_UPDATE, conn=conn)
        elif op == OP_CREDIT_UPDATE:
            pass
        elif op == OP_SHUTDOWN:
            if flags & ~3 or not flags:
                violation(f"SHUTDOWN flags {flags:#x}")
            conn.shutdown |= flags & 3
            log(f"SHUTDOWN flags {flags} from guest port {sport}; pending echo {len(conn.pending)}")
        elif op == OP_RST:
            log(f"RST from guest port {sport}")
            del self.conns[key]
            return
        elif op == OP_RESPONSE:
            violation("RESPONSE from the client side")

    def pump_echo(self):
        for key, conn in list(self.conns.items()):
            if self.args.hold and conn.rx_cnt < self.args.hold and not conn.shutdown:
                continue
            # Echo within the guest's credit, in chunks of --chunk bytes.
            while conn.pending:
                credit = conn.guest_buf_alloc - (conn.tx_cnt - conn.guest_fwd_cnt)
                if credit < 0:
                    violation(f"guest fwd_cnt {conn.guest_fwd_cnt} ahead of what we sent {conn.tx_cnt}")
                n = min(len(conn.pending), self.args.chunk, 4096, max(credit, 0))
                if n <= 0:
                    break
                if len(self.out) > 256:
                    break
                chunk = bytes(conn.pending[:n])
                del conn.pending[:n]
                if not self.args.hold:
                    conn.fwd_cnt += n
                conn.tx_cnt += n
                self.stats["tx_bytes"] += n
                self.send(key, OP_RW, chunk, conn=conn)
            # Tell the guest about freed buffer space now and then (every packet carries it).
            if not self.args.delay_credit and conn.fwd_cnt - conn.reported_fwd >= conn.buf_alloc // 4:
                self.stats["credit_updates"] += 1
                self.send(key, OP_CREDIT_UPDATE, conn=conn)
            if conn.shutdown == 3 and not conn.pending and not self.args.no_rst:
                log(f"closing guest port {conn.gport}: RST")
                self.send(key, OP_RST, conn=conn)
                self.stats["rsts"] += 1
                del self.conns[key]

    def deliver(self):
        while self.out:
            got = self.rx.pop()
            if got is None:
                return
            head, chain = got
            hdr, payload = self.out.pop(0)
            data = hdr + payload
            if any(not w for _, _, w in chain):
                violation("rx buffer with a device-readable descriptor")
            cap = sum(l for _, l, w in chain if w)
            if cap < len(data):
                violation(f"rx buffer of {cap} bytes cannot hold a {len(data)}-byte packet")
                data = data[:cap]
            off = 0
            for addr, ln, w in chain:
                if off >= len(data):
                    break
                part = data[off:off + ln]
                mem.write(addr, part)
                off += len(part)
            self.rx.push_used(head, len(data))

    def poll(self):
        with self.lock:
            if not (self.rx.ready() and self.tx.ready()):
                return False
            busy = False
            while True:
                got = self.tx.pop()
                if got is None:
                    break
                busy = True
                head, chain = got
                if any(w for _, _, w in chain):
                    violation("tx chain with a device-writable descriptor")
                data = b"".join(mem.read(a, l) for a, l, w in chain if not w)
                self.handle_tx_packet(data)
                self.tx.push_used(head, 0)
            self.pump_echo()
            n = len(self.out)
            self.deliver()
            return busy or len(self.out) != n


# vhost-user protocol -------------------------------------------------------------------
GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER, SET_MEM_TABLE = 1, 2, 3, 4, 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
GET_CONFIG = 24
F_VERSION_1 = 1 << 32
F_PROTOCOL_FEATURES = 1 << 30
PF_CONFIG = 1 << 9


def serve(args):
    dev = Device(args)
    if os.path.exists(args.socket):
        os.unlink(args.socket)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(args.socket)
    srv.listen(1)
    log(f"listening on {args.socket}, guest cid {args.cid}, echo port {args.port}")
    stop = threading.Event()

    def poller():
        while not stop.is_set():
            if not dev.poll():
                time.sleep(0.0002)
    threading.Thread(target=poller, daemon=True).start()

    c, _ = srv.accept()
    protocol_features = False
    while True:
        msg, anc, _, _ = c.recvmsg(12, socket.CMSG_SPACE(8 * 4))
        if len(msg) < 12:
            break
        req, flags, size = struct.unpack("<III", msg)
        payload = b""
        while len(payload) < size:
            chunk = c.recv(size - len(payload))
            if not chunk:
                break
            payload += chunk
        fds = []
        for level, typ, data in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds += list(struct.unpack(f"<{len(data) // 4}i", data[: len(data) // 4 * 4]))

        def reply(data):
            c.sendall(struct.pack("<III", req, 0x1 | 0x4, len(data)) + data)

        with dev.lock:
            if req == GET_FEATURES:
                reply(struct.pack("<Q", F_VERSION_1 | F_PROTOCOL_FEATURES))
            elif req == SET_FEATURES:
                (features,) = struct.unpack("<Q", payload[:8])
                protocol_features = bool(features & F_PROTOCOL_FEATURES)
                log(f"features {features:#x}")
            elif req == GET_PROTOCOL_FEATURES:
                reply(struct.pack("<Q", PF_CONFIG))
            elif req == SET_PROTOCOL_FEATURES:
                protocol_features = True
            elif req in (SET_OWNER, RESET_OWNER, SET_VRING_ERR):
                pass
            elif req == SET_MEM_TABLE:
                n, _ = struct.unpack_from("<II", payload)
                regions = []
                for i in range(n):
                    gpa, sz, uva, off = struct.unpack_from("<QQQQ", payload, 8 + 32 * i)
                    mm = mmap.mmap(fds[i], sz + off, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                    os.close(fds[i])
                    regions.append((gpa, sz, uva, mm, off))
                    log(f"region gpa {gpa:#x} size {sz:#x}")
                mem.set(regions)
            elif req == SET_VRING_NUM:
                i, num = struct.unpack_from("<II", payload)
                if i < 2:
                    (dev.rx, dev.tx)[i].num = num
            elif req == SET_VRING_ADDR:
                i, _, d, u, a, _ = struct.unpack_from("<IIQQQQ", payload)
                if i < 2:
                    q = (dev.rx, dev.tx)[i]
                    q.desc, q.used, q.avail = mem.uva_to_gpa(d), mem.uva_to_gpa(u), mem.uva_to_gpa(a)
                    log(f"vring {i}: num {q.num} desc {q.desc:#x} avail {q.avail:#x} used {q.used:#x}")
            elif req == SET_VRING_BASE:
                i, base = struct.unpack_from("<II", payload)
                if i < 2:
                    (dev.rx, dev.tx)[i].last_avail = base
            elif req == GET_VRING_BASE:
                i, _ = struct.unpack_from("<II", payload)
                q = (dev.rx, dev.tx)[i] if i < 2 else None
                base = q.last_avail if q else 0
                if q:
                    q.enabled = False
                    q.desc = None
                reply(struct.pack("<II", i, base))
                log(f"vring {i} stopped at {base}")
            elif req in (SET_VRING_KICK, SET_VRING_CALL):
                (v,) = struct.unpack("<Q", payload[:8])
                i = v & 0xff
                fd = fds[0] if fds else None
                if req == SET_VRING_CALL and i < 2:
                    (dev.rx, dev.tx)[i].call_fd = fd
                elif req == SET_VRING_KICK and i < 2 and not protocol_features:
                    (dev.rx, dev.tx)[i].enabled = True
            elif req == SET_VRING_ENABLE:
                i, en = struct.unpack_from("<II", payload)
                if i < 2:
                    (dev.rx, dev.tx)[i].enabled = bool(en)
                    log(f"vring {i} enable {en}")
            elif req == GET_CONFIG:
                off, sz, fl = struct.unpack_from("<III", payload)
                cfg = struct.pack("<Q", args.cid).ljust(sz, b"\0")[:sz]
                reply(struct.pack("<III", off, sz, fl) + cfg)
            elif req == GET_QUEUE_NUM:
                reply(struct.pack("<Q", 2))
            else:
                log(f"unhandled request {req} (flags {flags:#x})")
                if flags & 0x8:
                    reply(struct.pack("<Q", 0))
    stop.set()
    log(f"done: {dev.stats}, violations {violations}")
    sys.exit(1 if violations else 0)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("socket")
    p.add_argument("--cid", type=int, default=3)
    p.add_argument("--port", type=int, default=1234)
    p.add_argument("--buf-alloc", type=int, default=65536)
    p.add_argument("--chunk", type=int, default=3000)
    p.add_argument("--delay-credit", action="store_true",
                   help="never send unsolicited CREDIT_UPDATEs (the guest must ask)")
    p.add_argument("--hold", type=int, default=0,
                   help="consume data at once but echo nothing until this many bytes arrived")
    p.add_argument("--no-rst", action="store_true", help="never answer SHUTDOWN")
    serve(p.parse_args())
