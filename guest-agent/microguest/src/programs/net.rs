//! `prog=net-echo [frames=N] [size=N] [window=N] [timeout_ms=T] [net=I]`: sends N Ethernet
//! frames to a host-side echo and checks that each comes back unchanged.
//!
//! Frames go to the broadcast address from the device's MAC with ethertype 0x88b5 (IEEE
//! "local experimental"); the payload carries a magic, a per-run id, a sequence number, the
//! frame length, seeded data and a checksum, so every returned frame can be checked byte
//! for byte. Up to `window` frames are in flight; a frame not echoed within `timeout_ms`
//! counts as lost, and a whole window lost in a row ends the run (the echo is gone).
use super::virtio_util::{self, Rng, find_device, per_second};
use super::{Context, Failure, Outcome, Program, usage};
use crate::virtio::net::{ETH_HLEN, Net};
use crate::virtio::{self, ID_NET};
use crate::{arch, dma, println, time};

pub const ECHO: Program = Program {
    name: "net-echo",
    about: "send frames through virtio-net to a host echo and verify what comes back",
    run,
};

pub const ETHERTYPE: u16 = 0x88b5;
const MAGIC: [u8; 4] = *b"MGNE";
/// Magic, run id, sequence number, length; then data; then a 4-byte checksum.
const PAYLOAD_HEADER: usize = 4 + 4 + 8 + 2;
pub(super) const MIN_FRAME: usize = 60;
/// After the last frame, keep listening this long for duplicates.
const LINGER_MS: u64 = 50;
const REPORT_LIMIT: u64 = 5;

pub(super) fn build_frame(out: &mut [u8], mac: &[u8; 6], run: u32, seq: u64) {
    let size = out.len();
    out[0..6].fill(0xff);
    out[6..12].copy_from_slice(mac);
    out[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
    let p = ETH_HLEN;
    out[p..p + 4].copy_from_slice(&MAGIC);
    out[p + 4..p + 8].copy_from_slice(&run.to_le_bytes());
    out[p + 8..p + 16].copy_from_slice(&seq.to_le_bytes());
    out[p + 16..p + 18].copy_from_slice(&(size as u16).to_le_bytes());
    let mut rng = Rng::new(u64::from(run) << 40 ^ seq);
    for chunk in out[p + PAYLOAD_HEADER..size - 4].chunks_mut(8) {
        let bytes = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    let sum = frame_checksum(&out[p..size - 4]);
    out[size - 4..].copy_from_slice(&sum.to_le_bytes());
}

fn frame_checksum(bytes: &[u8]) -> u32 {
    let h = bytes.iter().fold(0x811c_9dc5u32, |h, &b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    h ^ (h >> 16)
}

/// A received frame of ours (ethertype, magic and run id match): its sequence number.
pub(super) fn our_seq(frame: &[u8], run: u32) -> Option<u64> {
    let p = ETH_HLEN;
    if frame.len() < p + PAYLOAD_HEADER
        || frame[12..14] != ETHERTYPE.to_be_bytes()
        || frame[p..p + 4] != MAGIC
        || frame[p + 4..p + 8] != run.to_le_bytes()
    {
        return None;
    }
    Some(u64::from_le_bytes(frame[p + 8..p + 16].try_into().unwrap()))
}

fn mac_str(mac: &[u8; 6]) -> MacStr<'_> {
    MacStr(mac)
}

struct MacStr<'a>(&'a [u8; 6]);

impl core::fmt::Display for MacStr<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

fn device_failure(e: virtio::Error) -> Failure {
    println!("net-echo: FAILED: {e}");
    Failure::Check
}

fn run(ctx: &Context) -> Outcome {
    const P: &str = "net-echo";
    let frames = ctx.args.u64_in("frames", 1000, 1, 1 << 30).map_err(|e| usage(P, e))?;
    let size = ctx.args.u64_in("size", 1024, MIN_FRAME as u64, 65_549).map_err(|e| usage(P, e))? as usize;
    let window = ctx.args.u64_in("window", 8, 1, 256).map_err(|e| usage(P, e))? as usize;
    let timeout_ms = virtio_util::timeout_ms(ctx, P, 1000)?;
    let mut net = open_net(ctx, P, window)?;
    let result = echo(&mut net, frames, size, window, timeout_ms);
    net.shutdown();
    result
}

/// Finds device `net=` (default 0), initializes it with `tx_slots` transmit buffers and
/// prints what it offers.
pub(super) fn open_net(ctx: &Context, program: &str, tx_slots: usize) -> Result<Net, Failure> {
    let transport = find_device(ctx, program, "net", ID_NET)?;
    let base = transport.base();
    let net = Net::open(transport, tx_slots).map_err(|e| {
        println!("{program}: FAILED: virtio-net at {base:#x}: {e}");
        Failure::Check
    })?;
    println!(
        "{program}: virtio-net at {base:#x}: mac {} ({}), mtu {}{}, mergeable rx buffers {}, link {}, \
         features {:#x}",
        mac_str(&net.mac),
        if net.mac_from_device { "from device" } else { "generated" },
        net.mtu,
        if net.mtu_from_device { " (from device)" } else { "" },
        if net.mergeable { "yes" } else { "no" },
        match net.link_up {
            Some(true) => "up",
            Some(false) => "down",
            None => "unknown",
        },
        net.features
    );
    Ok(net)
}

fn echo(net: &mut Net, frames: u64, size: usize, window: usize, timeout_ms: u64) -> Outcome {
    const P: &str = "net-echo";
    if size > net.max_frame() {
        println!("{P}: size={size} exceeds the MTU: at most {} bytes", net.max_frame());
        return Err(Failure::Usage);
    }
    let run = virtio_util::mix(arch::rdtsc()) as u32;
    let mac = net.mac;
    let alloc_fail = || {
        println!("{P}: out of memory");
        Failure::Check
    };
    let seen = dma::alloc_slice::<u64>(frames.div_ceil(64) as usize).ok_or_else(alloc_fail)?;
    let sent_at = dma::alloc_slice::<u64>(window).ok_or_else(alloc_fail)?;
    let tx_frame = dma::alloc_slice::<u8>(size).ok_or_else(alloc_fail)?;
    let expected = dma::alloc_slice::<u8>(size).ok_or_else(alloc_fail)?;
    let rx_cap = net.max_frame() + 64;
    let rx_frame = dma::alloc_slice::<u8>(rx_cap).ok_or_else(alloc_fail)?;
    let timeout_ticks = time::ticks_for_ms(timeout_ms);

    let (mut next, mut oldest) = (0u64, 0u64);
    let (mut received, mut duplicated, mut corrupt, mut foreign) = (0u64, 0u64, 0u64, 0u64);
    let mut timed_out = 0u64;
    let mut lost_in_a_row = 0usize;
    let mut gave_up = false;
    let is_seen = |seen: &[u64], s: u64| seen[(s / 64) as usize] & (1 << (s % 64)) != 0;

    let mut handle =
        |len: usize, rx: &[u8], next: u64, seen: &mut [u64], expected: &mut [u8], lost_in_a_row: &mut usize| {
            let frame = &rx[..len.min(rx.len())];
            let Some(seq) = our_seq(frame, run) else {
                foreign += 1;
                return;
            };
            if seq >= next {
                if corrupt < REPORT_LIMIT {
                    println!("{P}: frame with sequence {seq}, which was never sent");
                }
                corrupt += 1;
                return;
            }
            build_frame(expected, &mac, run, seq);
            if len != size || frame != &expected[..] {
                if corrupt < REPORT_LIMIT {
                    let at = frame.iter().zip(expected.iter()).position(|(a, b)| a != b);
                    println!(
                        "{P}: frame {seq} came back corrupt: {len} bytes (sent {size}), first \
                     difference at byte {}",
                        at.unwrap_or(len.min(size))
                    );
                }
                corrupt += 1;
                return;
            }
            if is_seen(seen, seq) {
                duplicated += 1;
                return;
            }
            seen[(seq / 64) as usize] |= 1 << (seq % 64);
            received += 1;
            *lost_in_a_row = 0;
        };

    let t0 = arch::rdtsc();
    while oldest < frames && !gave_up {
        while next < frames && next - oldest < window as u64 {
            build_frame(tx_frame, &mac, run, next);
            if !net.send(tx_frame).map_err(device_failure)? {
                break;
            }
            sent_at[(next % window as u64) as usize] = arch::rdtsc();
            next += 1;
        }
        while let Some(len) = net.recv(rx_frame).map_err(device_failure)? {
            handle(len, rx_frame, next, seen, expected, &mut lost_in_a_row);
        }
        while oldest < next && is_seen(seen, oldest) {
            oldest += 1;
        }
        if oldest < next {
            let age = arch::rdtsc().wrapping_sub(sent_at[(oldest % window as u64) as usize]);
            if age > timeout_ticks {
                if timed_out < REPORT_LIMIT {
                    println!("{P}: frame {oldest} not echoed within {timeout_ms} ms");
                }
                timed_out += 1;
                oldest += 1;
                lost_in_a_row += 1;
                if lost_in_a_row >= window {
                    println!("{P}: {window} frames in a row lost: the echo is not answering");
                    gave_up = true;
                }
            }
        }
        arch::pause();
    }
    let t1 = arch::rdtsc();
    let linger = time::Deadline::after_ms(LINGER_MS);
    while !linger.expired() {
        while let Some(len) = net.recv(rx_frame).map_err(device_failure)? {
            handle(len, rx_frame, next, seen, expected, &mut lost_in_a_row);
        }
        net.reclaim_tx().map_err(device_failure)?;
    }
    let sent = next;
    let lost = sent - received;
    let rate = per_second(received, t0, t1).map(|r| RateSuffix(Some(r))).unwrap_or(RateSuffix(None));
    if foreign != 0 {
        println!("{P}: ignored {foreign} frames that were not ours");
    }
    println!(
        "{P}: sent {sent} frames, received {received}, lost {lost}, duplicated {duplicated}, \
         corrupt {corrupt}{rate} ({size}-byte frames, window {window})"
    );
    if sent < frames || lost != 0 || duplicated != 0 || corrupt != 0 {
        println!("{P}: FAILED");
        return Err(Failure::Check);
    }
    Ok(())
}

struct RateSuffix(Option<u64>);

impl core::fmt::Display for RateSuffix {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match self.0 {
            Some(r) => write!(f, ", {r} frames/s"),
            None => Ok(()),
        }
    }
}
