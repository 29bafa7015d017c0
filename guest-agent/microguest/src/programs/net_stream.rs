//! `prog=net-stream [frames=N | until_input=1] [size=N] [window=N] [timeout_ms=T]
//! [max_lost=N] [net=I] [progress_ms=N]`: streams numbered Ethernet frames to a host-side
//! echo, keeping up to `window` (default 32, at most 256) outstanding (sent, neither echoed
//! nor timed out), and checks each echo, so a host may swap the NIC's backend under it.
//!
//! Frames are net-echo's (broadcast from the device's MAC, ethertype 0x88b5, magic, per-run
//! id, 64-bit sequence number, length, seeded data, checksum), `size` bytes each (default
//! 256). Unlike net-echo, loss does not end the run: a frame not echoed within `timeout_ms`
//! (default 2000) counts as lost and sending goes on; a frame that is still out does not hold
//! back the ones after it (up to 4096 sequences from the oldest still out). An echo is corrupt when it differs from
//! what was sent (or carries a sequence never sent) and duplicated when its sequence came back
//! before; a lost frame that comes back after its timeout is counted once as late (it stays
//! counted as lost, so `sent = received + lost` at the end).
//!
//! The run sends `frames` frames (default 100000) or, with `until_input=1`, keeps sending
//! until a byte arrives on the serial port (looked at about every 10 ms); then it waits for
//! the frames still out (each until echoed or timed out) and listens 50 ms more for
//! duplicates.
//!
//! Lines a host can match (N decimal):
//! - `net-stream: running` (swaps may start from here)
//! - `net-stream: progress sent=N received=N lost=N duplicated=N corrupt=N frames_per_s=N`
//!   every `progress_ms` (default 1000; 0 = none; only when the TSC frequency is known; the
//!   rate is over the last period)
//! - `net-stream: sent=N received=N lost=N duplicated=N corrupt=N frames_per_s=N` at the end
//!   (`frames_per_s` is `unknown` without a TSC frequency)
//!
//! Status 1 for any duplicated or corrupt frame, or more than `max_lost` lost when given;
//! lost frames alone only get reported.
use super::net::{ETHERTYPE, MIN_FRAME, build_frame, open_net, our_seq};
use super::virtio_util::{self, Every, InputPoll, Limit, per_second};
use super::{Context, Failure, Outcome, Program, usage};
use crate::virtio::net::Net;
use crate::{arch, dma, println, time};

pub const STREAM: Program = Program {
    name: "net-stream",
    about: "stream numbered frames to a host echo until stopped; count lost, duplicated and corrupt echoes",
    run,
};

const P: &str = "net-stream";
const DEFAULT_FRAMES: u64 = 100_000;
/// Sequences whose fate (echoed or not) is remembered, as a ring of bits: 512 KiB, 40 s of
/// history at 100000 frames/s. An echo of an older frame is counted as late.
const HISTORY: u64 = 1 << 22;
/// Send times are kept for this many sequences from the oldest frame still out: how far
/// sending may run ahead of a frame that is neither echoed nor timed out yet.
const SPAN: u64 = 4096;
/// After the last frame is resolved, keep listening this long for duplicates.
const LINGER_MS: u64 = 50;
const REPORT_LIMIT: u64 = 5;

#[derive(Default, Clone, Copy)]
struct Counts {
    sent: u64,
    received: u64,
    lost: u64,
    late: u64,
    duplicated: u64,
    corrupt: u64,
    foreign: u64,
}

struct Stream {
    run: u32,
    mac: [u8; 6],
    size: usize,
    window: u64,
    timeout_ms: u64,
    timeout_ticks: u64,
    /// Next sequence to send; the oldest one neither echoed nor declared lost.
    next: u64,
    oldest: u64,
    /// Frames sent and neither echoed nor declared lost.
    out: u64,
    /// Send time of each sequence in `oldest..next`, at `seq % SPAN`.
    sent_at: &'static mut [u64],
    /// One bit per sequence (ring of HISTORY): its echo arrived.
    echoed: &'static mut [u64],
    tx_frame: &'static mut [u8],
    rx_frame: &'static mut [u8],
    expected: &'static mut [u8],
    c: Counts,
    reported_lost: u64,
    reported_bad: u64,
}

impl Stream {
    fn bit(seq: u64) -> (usize, u64) {
        let i = seq % HISTORY;
        ((i / 64) as usize, 1 << (i % 64))
    }

    fn is_echoed(&self, seq: u64) -> bool {
        let (word, bit) = Self::bit(seq);
        self.echoed[word] & bit != 0
    }

    fn set_echoed(&mut self, seq: u64, echoed: bool) {
        let (word, bit) = Self::bit(seq);
        if echoed {
            self.echoed[word] |= bit;
        } else {
            self.echoed[word] &= !bit;
        }
    }

    /// Sends frames while the window has room; `limit` is how many may be sent in all.
    fn send(&mut self, net: &mut Net, limit: u64) -> Outcome {
        while self.next < limit && self.out < self.window && self.next - self.oldest < SPAN {
            build_frame(self.tx_frame, &self.mac, self.run, self.next);
            if !net.send(self.tx_frame).map_err(device_failure)? {
                break;
            }
            let seq = self.next;
            self.set_echoed(seq, false);
            self.sent_at[(seq % SPAN) as usize] = arch::rdtsc();
            self.next += 1;
            self.out += 1;
            self.c.sent += 1;
        }
        Ok(())
    }

    fn report_bad(&mut self) -> bool {
        self.reported_bad += 1;
        self.reported_bad <= REPORT_LIMIT
    }

    /// Accounts for one received frame of `len` bytes (the first part is in `rx_frame`).
    fn handle(&mut self, len: usize) {
        let frame = &self.rx_frame[..len.min(self.rx_frame.len())];
        let Some(seq) = our_seq(frame, self.run) else {
            self.c.foreign += 1;
            return;
        };
        if seq >= self.next {
            self.c.corrupt += 1;
            if self.report_bad() {
                println!("{P}: echo with sequence {seq}, which was never sent");
            }
            return;
        }
        build_frame(self.expected, &self.mac, self.run, seq);
        if len != self.size || frame != &self.expected[..] {
            let at = frame.iter().zip(self.expected.iter()).position(|(a, b)| a != b).unwrap_or(len.min(self.size));
            self.c.corrupt += 1;
            if self.report_bad() {
                println!(
                    "{P}: frame {seq} came back corrupt: {len} bytes (sent {}), first difference at byte {at}",
                    self.size
                );
            }
            return;
        }
        if seq + HISTORY < self.next {
            // Too old to tell whether it came back before; it was certainly declared lost.
            self.c.late += 1;
            return;
        }
        if self.is_echoed(seq) {
            self.c.duplicated += 1;
            if self.report_bad() {
                println!("{P}: frame {seq} came back twice");
            }
            return;
        }
        self.set_echoed(seq, true);
        if seq >= self.oldest {
            self.c.received += 1;
            self.out -= 1;
        } else {
            self.c.late += 1;
        }
    }

    /// Moves `oldest` past frames that were echoed or have timed out (counted lost).
    fn retire(&mut self) {
        let now = arch::rdtsc();
        while self.oldest < self.next {
            let seq = self.oldest;
            if !self.is_echoed(seq) {
                let age = now.wrapping_sub(self.sent_at[(seq % SPAN) as usize]);
                if age <= self.timeout_ticks {
                    break;
                }
                self.c.lost += 1;
                self.out -= 1;
                self.reported_lost += 1;
                if self.reported_lost <= REPORT_LIMIT {
                    println!("{P}: frame {seq} not echoed within {} ms", self.timeout_ms);
                }
            }
            self.oldest += 1;
        }
    }

    fn receive_all(&mut self, net: &mut Net) -> Outcome {
        while let Some(len) = net.recv(self.rx_frame).map_err(device_failure)? {
            self.handle(len);
        }
        Ok(())
    }
}

fn device_failure(e: crate::virtio::Error) -> Failure {
    println!("{P}: FAILED: {e}");
    Failure::Check
}

struct Options {
    limit: Limit,
    size: usize,
    window: usize,
    timeout_ms: u64,
    max_lost: Option<u64>,
    progress_ms: Option<u64>,
}

fn run(ctx: &Context) -> Outcome {
    let arg = |key, default, min, max| ctx.args.u64_in(key, default, min, max).map_err(|e| usage(P, e));
    let options = Options {
        limit: virtio_util::limit(ctx, P, "frames", DEFAULT_FRAMES, 1 << 48)?,
        size: arg("size", 256, MIN_FRAME as u64, 65_549)? as usize,
        window: arg("window", 32, 1, 256)? as usize,
        timeout_ms: virtio_util::timeout_ms(ctx, P, 2000)?,
        max_lost: match ctx.args.get("max_lost") {
            Some(_) => Some(arg("max_lost", 0, 0, u64::MAX)?),
            None => None,
        },
        progress_ms: virtio_util::progress_ms(ctx, P)?,
    };
    let mut net = open_net(ctx, P, options.window)?;
    let result = stream(&mut net, options);
    net.shutdown();
    result
}

/// Frames per second as a number, or `unknown` without a TSC frequency.
struct Rate(Option<u64>);

impl core::fmt::Display for Rate {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match self.0 {
            Some(r) => write!(f, "{r}"),
            None => f.write_str("unknown"),
        }
    }
}

fn stream(net: &mut Net, o: Options) -> Outcome {
    if o.size > net.max_frame() {
        println!("{P}: size={} exceeds the MTU: at most {} bytes", o.size, net.max_frame());
        return Err(Failure::Usage);
    }
    let oom = || {
        println!("{P}: out of memory");
        Failure::Check
    };
    let mut s = Stream {
        run: virtio_util::mix(arch::rdtsc()) as u32,
        mac: net.mac,
        size: o.size,
        window: o.window as u64,
        timeout_ms: o.timeout_ms,
        timeout_ticks: time::ticks_for_ms(o.timeout_ms),
        next: 0,
        oldest: 0,
        out: 0,
        sent_at: dma::alloc_slice::<u64>(SPAN as usize).ok_or_else(oom)?,
        echoed: dma::alloc_slice::<u64>((HISTORY / 64) as usize).ok_or_else(oom)?,
        tx_frame: dma::alloc_slice::<u8>(o.size).ok_or_else(oom)?,
        rx_frame: dma::alloc_slice::<u8>(net.max_frame() + 64).ok_or_else(oom)?,
        expected: dma::alloc_slice::<u8>(o.size).ok_or_else(oom)?,
        c: Counts::default(),
        reported_lost: 0,
        reported_bad: 0,
    };
    let mut input = matches!(o.limit, Limit::UntilInput).then(InputPoll::new);
    let mut limit = match o.limit {
        Limit::Count(n) => n,
        Limit::UntilInput => u64::MAX,
    };
    println!(
        "{P}: {}-byte frames, ethertype {ETHERTYPE:#06x}, window {}, timeout {} ms, run id {:#010x}",
        o.size, o.window, o.timeout_ms, s.run
    );
    match o.limit {
        Limit::UntilInput => println!("{P}: running; send a byte on the serial port to stop"),
        Limit::Count(_) => println!("{P}: running"),
    }
    let mut progress = o.progress_ms.map(Every::ms);
    let mut received_at_last = 0u64;
    let t0 = arch::rdtsc();
    while s.next < limit || s.oldest < s.next {
        s.send(net, limit)?;
        s.receive_all(net)?;
        s.retire();
        let now = arch::rdtsc();
        if let Some(poll) = &mut input
            && poll.arrived(now)
        {
            limit = s.next;
            input = None;
            println!("{P}: input received; waiting for the frames still out");
        }
        if let Some(p) = &mut progress
            && let Some(elapsed) = p.due(now)
        {
            let c = s.c;
            let rate = per_second(c.received - received_at_last, 0, elapsed).unwrap_or(0);
            received_at_last = c.received;
            println!(
                "{P}: progress sent={} received={} lost={} duplicated={} corrupt={} frames_per_s={rate}",
                c.sent, c.received, c.lost, c.duplicated, c.corrupt
            );
        }
        arch::pause();
    }
    let t1 = arch::rdtsc();
    let linger = time::Deadline::after_ms(LINGER_MS);
    while !linger.expired() {
        s.receive_all(net)?;
        net.reclaim_tx().map_err(device_failure)?;
    }
    let c = s.c;
    if c.foreign != 0 {
        println!("{P}: ignored {} frames that were not ours", c.foreign);
    }
    if c.late != 0 {
        println!("{P}: {} lost frames came back after their timeout", c.late);
    }
    println!(
        "{P}: sent={} received={} lost={} duplicated={} corrupt={} frames_per_s={}",
        c.sent,
        c.received,
        c.lost,
        c.duplicated,
        c.corrupt,
        Rate(per_second(c.received, t0, t1))
    );
    let too_many_lost = o.max_lost.is_some_and(|max| c.lost > max);
    if too_many_lost {
        println!("{P}: more than max_lost={} frames lost", o.max_lost.unwrap_or(0));
    }
    if c.duplicated != 0 || c.corrupt != 0 || too_many_lost {
        println!("{P}: FAILED");
        return Err(Failure::Check);
    }
    Ok(())
}
