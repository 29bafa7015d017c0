//! `prog=vsock-echo [port=N] [bytes=N] [chunk=N] [cid=N] [local_port=N] [timeout_ms=T]
//! [vsock=I]`: connects from the guest to an echo service on the host (CID 2 by default),
//! sends `bytes` bytes of a seeded pattern in `chunk`-byte packets while reading the echo back,
//! verifies every byte in order, then closes cleanly (SHUTDOWN, then the peer's RST).
//!
//! `prog=vsock-echo serve=1 [port=N] [timeout_ms=T] [vsock=I]` is the other way round: the
//! guest listens on port N (default 1234) and echoes, on every connection the host opens (up
//! to 8 at a time; through the hybrid socket: `CONNECT N\n`), whatever arrives, until a byte
//! arrives on the serial port, so connections can outlive a swap of the device's backend.
//! Lines a host can match (N decimal):
//! - `vsock-echo: listening on port N; send a byte on the serial port to stop`
//! - `vsock-echo: connection N accepted from host port N`
//! - `vsock-echo: connection N closed by the host after echoing N bytes`
//! - `vsock-echo: served N connections, echoed N bytes, N still open` at the end
//!
//! Status 1 if the host broke the protocol (sent beyond the credit it was given, answered on a
//! connection that does not exist) or the device failed.
use super::virtio_util::{self, InputPoll, find_device, per_second};
use super::{Context, Failure, Outcome, Program, usage};
use crate::virtio::ID_VSOCK;
use crate::virtio::vsock::{
    Event, HOST_CID, Header, MAX_TX_PAYLOAD, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST,
    OP_RW, OP_SHUTDOWN, RX_PAYLOAD, Stream, TYPE_STREAM, Vsock,
};
use crate::{arch, dma, println, time};

pub const ECHO: Program =
    Program { name: "vsock-echo", about: "connect to a host vsock echo service and verify the echoed bytes", run };

/// Receive buffer space we advertise to the peer.
const BUF_ALLOC: u32 = 256 * 1024;
const TX_SLOTS: usize = 8;
/// How long the peer's credit may stay at zero before we ask for an update.
const CREDIT_REQUEST_AFTER_MS: u64 = 100;

/// Byte `offset` of the stream.
fn pattern(seed: u64, offset: u64) -> u8 {
    (virtio_util::mix(seed ^ (offset / 8)) >> (8 * (offset % 8))) as u8
}

fn run(ctx: &Context) -> Outcome {
    const P: &str = "vsock-echo";
    let port = ctx.args.u64_in("port", 1234, 0, u64::from(u32::MAX)).map_err(|e| usage(P, e))?;
    let bytes = ctx.args.u64_in("bytes", 65536, 1, 1 << 32).map_err(|e| usage(P, e))?;
    let chunk = ctx.args.u64_in("chunk", 4096, 1, MAX_TX_PAYLOAD as u64).map_err(|e| usage(P, e))? as usize;
    let peer_cid = ctx.args.u64_in("cid", HOST_CID, 0, u64::from(u32::MAX)).map_err(|e| usage(P, e))?;
    let ephemeral = 49152 + arch::rdtsc() % 16384;
    let local_port =
        ctx.args.u64_in("local_port", ephemeral, 1, u64::from(u32::MAX) - 1).map_err(|e| usage(P, e))? as u32;
    let timeout_ms = virtio_util::timeout_ms(ctx, P, 5000)?;
    let seed = virtio_util::seed(ctx, P)?;
    let serve = ctx.args.u64_in("serve", 0, 0, 1).map_err(|e| usage(P, e))? == 1;
    let transport = find_device(ctx, P, "vsock", ID_VSOCK)?;
    let base = transport.base();
    let mut dev = Vsock::open(transport, TX_SLOTS).map_err(|e| {
        println!("{P}: FAILED: virtio-vsock at {base:#x}: {e}");
        Failure::Check
    })?;
    if serve {
        println!("{P}: virtio-vsock at {base:#x}: guest cid {}, features {:#x}", dev.guest_cid, dev.features);
        let result = Server::new(&mut dev, port as u32, timeout_ms).and_then(Server::run);
        dev.shutdown();
        return result;
    }
    println!(
        "{P}: virtio-vsock at {base:#x}: guest cid {}, features {:#x}; connecting port \
         {local_port} to cid {peer_cid} port {port}",
        dev.guest_cid, dev.features
    );
    let result = echo(&mut dev, local_port, peer_cid, port as u32, bytes, chunk, seed, timeout_ms);
    dev.shutdown();
    result
}

/// Connections a server keeps at once.
const MAX_CONNS: usize = 8;
/// Echo buffer of each served connection: the receive space we advertise.
const SERVE_BUF: u32 = 64 * 1024;

/// One connection the host opened to our port.
#[derive(Clone, Copy, Default)]
struct Served {
    open: bool,
    /// Numbered from 1 in the order accepted.
    id: u64,
    peer_port: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes we have sent the host.
    tx_cnt: u32,
    /// Bytes received and echoed (consumed from our buffer): what we report as `fwd_cnt`.
    fwd_cnt: u32,
    /// Echo buffer ring: bytes waiting at `head..head + len` (wrapping).
    head: usize,
    len: usize,
    credit_requested: bool,
    echoed: u64,
}

impl Served {
    fn credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// `serve=1`: accepts host connections on one port and echoes each.
struct Server<'a> {
    dev: &'a mut Vsock,
    port: u32,
    timeout_ms: u64,
    conns: [Served; MAX_CONNS],
    /// MAX_CONNS echo buffers of SERVE_BUF bytes, one per connection slot.
    buffers: &'static mut [u8],
    rx: &'static mut [u8],
    accepted: u64,
    echoed: u64,
    violations: u64,
}

impl<'a> Server<'a> {
    fn new(dev: &'a mut Vsock, port: u32, timeout_ms: u64) -> Result<Server<'a>, Failure> {
        let oom = || {
            println!("vsock-echo: out of memory");
            Failure::Check
        };
        Ok(Server {
            dev,
            port,
            timeout_ms,
            conns: [Served::default(); MAX_CONNS],
            buffers: dma::alloc_slice::<u8>(MAX_CONNS * SERVE_BUF as usize).ok_or_else(oom)?,
            rx: dma::alloc_slice::<u8>(RX_PAYLOAD as usize).ok_or_else(oom)?,
            accepted: 0,
            echoed: 0,
            violations: 0,
        })
    }

    fn run(mut self) -> Outcome {
        const P: &str = "vsock-echo";
        let fail = |e: &dyn core::fmt::Display| {
            println!("{P}: FAILED: {e}");
            Failure::Check
        };
        println!("{P}: listening on port {}; send a byte on the serial port to stop", self.port);
        let mut input = InputPoll::new();
        while !input.arrived(arch::rdtsc()) {
            if let Some(id) = self.dev.poll_event().map_err(|e| fail(&e))? {
                println!("{P}: FAILED: the device reported event {id} (transport reset)");
                return Err(Failure::Check);
            }
            while let Some(hdr) = self.dev.recv(self.rx).map_err(|e| fail(&e))? {
                self.handle(&hdr)?;
            }
            for slot in 0..MAX_CONNS {
                self.echo(slot)?;
            }
            arch::pause();
        }
        let open = self.conns.iter().filter(|c| c.open).count();
        for slot in 0..MAX_CONNS {
            if self.conns[slot].open {
                self.control(slot, OP_RST)?;
            }
        }
        println!("{P}: served {} connections, echoed {} bytes, {open} still open", self.accepted, self.echoed);
        if self.violations != 0 {
            println!("{P}: FAILED: {} protocol violations by the host", self.violations);
            return Err(Failure::Check);
        }
        Ok(())
    }

    fn header(&self, slot: usize, op: u16, len: u32) -> Header {
        let c = &self.conns[slot];
        Header {
            src_cid: self.dev.guest_cid,
            dst_cid: HOST_CID,
            src_port: self.port,
            dst_port: c.peer_port,
            len,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: SERVE_BUF,
            fwd_cnt: c.fwd_cnt,
        }
    }

    /// Sends a packet without payload, waiting for a transmit slot if need be.
    fn send_bare(&mut self, hdr: &Header) -> Outcome {
        let deadline = time::Deadline::after_ms(self.timeout_ms);
        loop {
            match self.dev.send(hdr, &[]) {
                Ok(true) => return Ok(()),
                Ok(false) if !deadline.expired() => arch::pause(),
                Ok(false) => {
                    println!("vsock-echo: FAILED: no free transmit slot for {} ms", self.timeout_ms);
                    return Err(Failure::Check);
                }
                Err(e) => {
                    println!("vsock-echo: FAILED: {e}");
                    return Err(Failure::Check);
                }
            }
        }
    }

    fn control(&mut self, slot: usize, op: u16) -> Outcome {
        let hdr = self.header(slot, op, 0);
        self.send_bare(&hdr)
    }

    /// Answers a packet that belongs to no connection with RST (unless it is one).
    fn refuse(&mut self, hdr: &Header) -> Outcome {
        if hdr.op == OP_RST {
            return Ok(());
        }
        let rst = Header {
            src_cid: self.dev.guest_cid,
            dst_cid: hdr.src_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            len: 0,
            kind: hdr.kind,
            op: OP_RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        };
        self.send_bare(&rst)
    }

    fn handle(&mut self, hdr: &Header) -> Outcome {
        const P: &str = "vsock-echo";
        let ours = hdr.dst_cid == self.dev.guest_cid && hdr.dst_port == self.port && hdr.kind == TYPE_STREAM;
        let slot = self.conns.iter().position(|c| c.open && c.peer_port == hdr.src_port);
        let Some(slot) = slot.filter(|_| ours && hdr.src_cid == HOST_CID) else {
            if ours && hdr.op == OP_REQUEST && hdr.src_cid == HOST_CID {
                return self.accept(hdr);
            }
            if ours && hdr.op != OP_RST {
                println!("{P}: packet op {} for no connection (host port {})", hdr.op, hdr.src_port);
            }
            return self.refuse(hdr);
        };
        let c = &mut self.conns[slot];
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = hdr.fwd_cnt;
        c.credit_requested = false;
        match hdr.op {
            OP_RW => {
                let n = hdr.len as usize;
                if c.len + n > SERVE_BUF as usize {
                    println!("{P}: FAILED: connection {} sent {n} bytes with {} of {SERVE_BUF} buffered", c.id, c.len);
                    self.violations += 1;
                    return self.close(slot, OP_RST);
                }
                let base = slot * SERVE_BUF as usize;
                let mut at = (c.head + c.len) % SERVE_BUF as usize;
                for &b in &self.rx[..n] {
                    self.buffers[base + at] = b;
                    at = (at + 1) % SERVE_BUF as usize;
                }
                c.len += n;
                Ok(())
            }
            OP_CREDIT_REQUEST => self.control(slot, OP_CREDIT_UPDATE),
            OP_SHUTDOWN | OP_RST => {
                println!("{P}: connection {} closed by the host after echoing {} bytes", c.id, c.echoed);
                if hdr.op == OP_SHUTDOWN { self.close(slot, OP_RST) } else { self.close(slot, 0) }
            }
            OP_CREDIT_UPDATE => Ok(()),
            op => {
                println!("{P}: FAILED: unexpected op {op} on connection {}", c.id);
                self.violations += 1;
                self.close(slot, OP_RST)
            }
        }
    }

    fn accept(&mut self, hdr: &Header) -> Outcome {
        let Some(slot) = self.conns.iter().position(|c| !c.open) else {
            println!("vsock-echo: refusing host port {}: {MAX_CONNS} connections open", hdr.src_port);
            return self.refuse(hdr);
        };
        self.accepted += 1;
        self.conns[slot] = Served {
            open: true,
            id: self.accepted,
            peer_port: hdr.src_port,
            peer_buf_alloc: hdr.buf_alloc,
            peer_fwd_cnt: hdr.fwd_cnt,
            ..Served::default()
        };
        self.control(slot, OP_RESPONSE)?;
        println!("vsock-echo: connection {} accepted from host port {}", self.accepted, hdr.src_port);
        Ok(())
    }

    /// Forgets connection `slot`, telling the host with `op` (0: nothing to send).
    fn close(&mut self, slot: usize, op: u16) -> Outcome {
        if op != 0 {
            self.control(slot, op)?;
        }
        self.conns[slot].open = false;
        Ok(())
    }

    /// Sends back what connection `slot` has buffered, as far as the host's credit allows.
    fn echo(&mut self, slot: usize) -> Outcome {
        let c = self.conns[slot];
        if !c.open || c.len == 0 {
            return Ok(());
        }
        let contiguous = c.len.min(SERVE_BUF as usize - c.head);
        let n = contiguous.min(c.credit() as usize).min(RX_PAYLOAD as usize);
        if n == 0 {
            if !c.credit_requested {
                self.conns[slot].credit_requested = true;
                self.control(slot, OP_CREDIT_REQUEST)?;
            }
            return Ok(());
        }
        // What we echo is consumed: the same packet tells the host it has that much more room.
        let mut hdr = self.header(slot, OP_RW, n as u32);
        hdr.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
        let base = slot * SERVE_BUF as usize + c.head;
        let sent = self.dev.send(&hdr, &self.buffers[base..base + n]).map_err(|e| {
            println!("vsock-echo: FAILED: {e}");
            Failure::Check
        })?;
        if sent {
            let c = &mut self.conns[slot];
            c.head = (c.head + n) % SERVE_BUF as usize;
            c.len -= n;
            c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
            c.fwd_cnt = hdr.fwd_cnt;
            c.echoed += n as u64;
            self.echoed += n as u64;
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn echo(
    dev: &mut Vsock,
    local_port: u32,
    peer_cid: u64,
    port: u32,
    total: u64,
    chunk: usize,
    seed: u64,
    timeout_ms: u64,
) -> Outcome {
    const P: &str = "vsock-echo";
    let guest_cid = dev.guest_cid;
    let fail = |e: &dyn core::fmt::Display| {
        println!("{P}: FAILED: {e}");
        Failure::Check
    };
    let tx_buf = dma::alloc_slice::<u8>(chunk).ok_or(Failure::Check)?;
    let rx_buf = dma::alloc_slice::<u8>(RX_PAYLOAD as usize).ok_or(Failure::Check)?;
    let mut stream = Stream::connect(dev, local_port, peer_cid, port, BUF_ALLOC, timeout_ms).map_err(|e| fail(&e))?;
    println!("{P}: connected; peer offers {} bytes of credit", stream.credit());

    let (mut sent, mut received, mut corrupt) = (0u64, 0u64, 0u64);
    let mut packets = 0u64;
    let t0 = arch::rdtsc();
    let mut last_progress = arch::rdtsc();
    let mut credit_requested = false;
    let stall_ticks = time::ticks_for_ms(timeout_ms);
    let credit_ticks = time::ticks_for_ms(CREDIT_REQUEST_AFTER_MS);
    while received < total {
        let mut progress = false;
        if sent < total {
            let n = (chunk as u64).min(total - sent) as usize;
            for (i, b) in tx_buf[..n].iter_mut().enumerate() {
                *b = pattern(seed, sent + i as u64);
            }
            let done = stream.send(&tx_buf[..n]).map_err(|e| fail(&e))?;
            if done > 0 {
                sent += done as u64;
                packets += 1;
                progress = true;
            }
        }
        match stream.poll(rx_buf).map_err(|e| fail(&e))? {
            Event::Data(n) => {
                if received + n as u64 > sent {
                    println!("{P}: FAILED: received {} bytes but only {sent} were sent", received + n as u64);
                    stream.abort();
                    return Err(Failure::Check);
                }
                for (i, &b) in rx_buf[..n].iter().enumerate() {
                    let offset = received + i as u64;
                    if b != pattern(seed, offset) {
                        if corrupt == 0 {
                            println!("{P}: byte {offset} came back as {b:#04x}, sent {:#04x}", pattern(seed, offset));
                        }
                        corrupt += 1;
                    }
                }
                received += n as u64;
                progress = true;
            }
            Event::Shutdown(flags) => {
                println!(
                    "{P}: FAILED: peer shut down (flags {flags:#x}) after echoing {received} of \
                     {total} bytes"
                );
                stream.abort();
                return Err(Failure::Check);
            }
            Event::Reset => {
                println!(
                    "{P}: FAILED: peer reset the connection after echoing {received} of {total} \
                     bytes"
                );
                return Err(Failure::Check);
            }
            Event::Nothing => {}
        }
        let now = arch::rdtsc();
        if progress {
            last_progress = now;
            credit_requested = false;
            continue;
        }
        let idle = now.wrapping_sub(last_progress);
        if sent < total && stream.credit() == 0 && !credit_requested && idle > credit_ticks {
            stream.request_credit().map_err(|e| fail(&e))?;
            credit_requested = true;
        }
        if idle > stall_ticks {
            println!(
                "{P}: FAILED: no progress for {timeout_ms} ms: sent {sent}, echoed {received} of \
                 {total} bytes, peer credit {}",
                stream.credit()
            );
            stream.abort();
            return Err(Failure::Check);
        }
        arch::pause();
    }
    let t1 = arch::rdtsc();
    let mut discarded = 0u64;
    let clean = stream.close(&mut discarded).map_err(|e| fail(&e))?;
    let stats = stream.stats;
    println!(
        "{P}: {} packets sent, {} received, {} credit updates and {} credit requests sent, {} \
         stray packets",
        stats.packets_sent,
        stats.packets_received,
        stats.credit_updates_sent,
        stats.credit_requests_sent,
        stats.stray_packets
    );
    if corrupt != 0 {
        println!("{P}: FAILED: {corrupt} of {total} echoed bytes differ");
        return Err(Failure::Check);
    }
    if discarded != 0 {
        println!("{P}: FAILED: {discarded} extra bytes arrived after the echo was complete");
        return Err(Failure::Check);
    }
    if !clean {
        println!("{P}: FAILED: peer did not answer SHUTDOWN with RST within {timeout_ms} ms");
        return Err(Failure::Check);
    }
    let rate = match per_second(total, t0, t1) {
        Some(r) => Rate(Some(r / 1024)),
        None => Rate(None),
    };
    println!(
        "{P}: echoed and verified {total} bytes in {packets} packets over port {port} (guest cid \
         {guest_cid} -> cid {peer_cid}), closed cleanly{rate}"
    );
    Ok(())
}

struct Rate(Option<u64>);

impl core::fmt::Display for Rate {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match self.0 {
            Some(r) => write!(f, ", {r} KiB/s"),
            None => Ok(()),
        }
    }
}
