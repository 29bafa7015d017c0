//! `prog=vsock-echo [port=N] [bytes=N] [chunk=N] [cid=N] [local_port=N] [timeout_ms=T]
//! [vsock=I]`: connects from the guest to an echo service on the host (CID 2 by default),
//! sends `bytes` bytes of a seeded pattern in `chunk`-byte packets while reading the echo back,
//! verifies every byte in order, then closes cleanly (SHUTDOWN, then the peer's RST).
use super::virtio_util::{self, find_device, per_second};
use super::{Context, Failure, Outcome, Program, usage};
use crate::virtio::ID_VSOCK;
use crate::virtio::vsock::{Event, HOST_CID, MAX_TX_PAYLOAD, RX_PAYLOAD, Stream, Vsock};
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
    let transport = find_device(ctx, P, "vsock", ID_VSOCK)?;
    let base = transport.base();
    let mut dev = Vsock::open(transport, TX_SLOTS).map_err(|e| {
        println!("{P}: FAILED: virtio-vsock at {base:#x}: {e}");
        Failure::Check
    })?;
    println!(
        "{P}: virtio-vsock at {base:#x}: guest cid {}, features {:#x}; connecting port \
         {local_port} to cid {peer_cid} port {port}",
        dev.guest_cid, dev.features
    );
    let result = echo(&mut dev, local_port, peer_cid, port as u32, bytes, chunk, seed, timeout_ms);
    dev.shutdown();
    result
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
