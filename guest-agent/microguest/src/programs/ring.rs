//! `prog=ring-pair role=ping|pong [count=N] [size=BYTES] [mode=poll|doorbell] [spin_us=N] [rtt=0|1]`: two
//! VMs sharing a region (window 0) exchange messages through its lanes. Each VM produces on
//! lane `party` and consumes lane `1 - party`.
//!
//! - ping streams `count` messages of `size` bytes (a sequence number, its check word and a
//!   pattern of both), then an end marker, and waits for pong's report; with `rtt=1` it sends
//!   one message at a time and waits for its echo, timing each round trip.
//! - pong verifies every message (in order, none lost, none corrupt), sends a credit back
//!   every half lane so a sleeping ping wakes, echoes with `rtt=1`, and reports at the end.
//!
//! `mode=doorbell` spins for `spin_us` (default 50) when there is nothing to do, then sleeps on
//! the doorbell (the producer rings only when the consumer said it sleeps); `mode=poll` spins. Both VMs also watch their other
//! windows: a region attached there gets a greeting on its lane `party`, a region being
//! detached is let go of at once. Prints
//! `ring-pair: sent N messages of S bytes in T us: R msg/s` (ping),
//! `ring-pair: received N messages, 0 out of order, 0 corrupt, W wake-ups` (pong) and, for
//! rtt, `ring-pair: rtt p50 A ns p99 B ns`.
use swarm_ring::window::WindowState;
use swarm_ring::{Consumer, Producer, RingError};

use super::{Context, Failure, Outcome, Program, usage};
use crate::shm::{self, Window};
use crate::{arch, println, time};

pub const PAIR: Program =
    Program { name: "ring-pair", about: "exchange verified messages with a sibling VM through a shared ring", run };

const P: &str = "ring-pair";
const END: u64 = u64::MAX;
const CREDIT: u64 = u64::MAX - 1;
const REPORT: u64 = u64::MAX - 2;
const MAX_SIZE: usize = 4096;
const RTT_SAMPLES: usize = 4096;
/// pong hands slots back this many at a time.
const RELEASE_EVERY: u32 = 32;
/// ping publishes this many at a time: pong starts on a batch while ping writes the next.
const BATCH: u32 = 32;
/// The longest a doorbell sleep lasts before looking around anyway.
const SLEEP_US: u32 = 50_000;
/// How long either side waits for the other before giving up.
const PEER_TIMEOUT_MS: u64 = 60_000;

struct Link {
    window: Window,
    peer: u16,
    tx: Producer,
    rx: Consumer,
    doorbell: bool,
    /// How long a doorbell-mode side spins before it sleeps.
    spin_ticks: u64,
    wakeups: u64,
    /// Other windows and the generation last seen.
    others: [(Option<Window>, u32); 4],
    last_look: u64,
}

impl Link {
    /// Publishes what was written and rings the peer if it sleeps.
    fn publish(&mut self) {
        self.tx.publish();
        if self.doorbell && self.tx.consumer_sleeping() {
            self.window.ring(self.peer);
        }
    }

    /// Waits a moment for something to happen: a doorbell sleep or a spin. `sending`: this
    /// side waits for room in its lane too, which the peer signals with a credit message when
    /// it sees this side asleep.
    fn idle(&mut self, sending: bool) -> Result<(), RingError> {
        if self.doorbell {
            // Busy: spin a moment first, a sleep and a wake-up cost two VM exits.
            let spin = arch::rdtsc();
            while arch::rdtsc().wrapping_sub(spin) < self.spin_ticks {
                if self.rx.waiting()? > 0 || (sending && self.tx.free()? > 0) {
                    return Ok(());
                }
                arch::pause();
            }
            // The sleep flag is up before the free slots are counted: a peer that frees one
            // afterwards sees the flag and sends a credit.
            if self.rx.prepare_sleep()? && !(sending && self.tx.free()? > 0) {
                shm::sleep_us(SLEEP_US);
                self.wakeups += 1;
            }
            self.rx.woke();
        } else {
            arch::pause();
        }
        self.watch_others();
        Ok(())
    }

    /// Every few milliseconds (each look is an MMIO exit), greets newly attached regions and
    /// lets go of those being detached.
    fn watch_others(&mut self) {
        let now = arch::rdtsc();
        if now.wrapping_sub(self.last_look) < time::ticks_for_ms(5) {
            return;
        }
        self.last_look = now;
        for (index, (window, seen)) in self.others.iter_mut().enumerate() {
            let Some(window) = window else { continue };
            let generation = window.generation();
            if generation == *seen {
                continue;
            }
            *seen = generation;
            match window.state() {
                Some(WindowState::Attached) => greet(window, index + 1),
                Some(WindowState::Detaching) => {
                    window.ack_detach();
                    println!("{P}: window {} detached", index + 1);
                }
                _ => {}
            }
        }
    }
}

fn greet(window: &Window, index: usize) {
    let party = window.party();
    let sent = window.region().and_then(|region| {
        let lane = region.lane(u32::from(party)).map_err(|_| "no lane for this party")?;
        let mut tx = Producer::attach(lane).map_err(|_| "corrupt lane")?;
        let mut text = [0u8; 64];
        let len = format_greeting(&mut text, party);
        tx.push(&text[..len]).map_err(|_| "the lane is full")?;
        Ok(())
    });
    match sent {
        Ok(()) => {
            println!("{P}: window {index} attached, greeted as party {party}");
            window.ring(if party == 0 { 1 } else { 0 });
        }
        Err(why) => println!("{P}: window {index} attached but not greeted: {why}"),
    }
}

fn format_greeting(out: &mut [u8; 64], party: u16) -> usize {
    let head = b"hello from party ";
    out[..head.len()].copy_from_slice(head);
    out[head.len()] = b'0' + (party % 10) as u8;
    head.len() + 1
}

/// Word `i` of message `seq`: a multiple of the sequence number (so a stale or misdirected
/// message differs in every word) mixed with the word's place (so a shifted one does too).
fn word(seq: u64, i: usize) -> u64 {
    seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i as u64).wrapping_mul(0x0100_0000_01b3)
}

fn fill(buf: &mut [u8], seq: u64) {
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let w = if i == 0 { seq } else { word(seq, i) };
        chunk.copy_from_slice(&w.to_le_bytes()[..chunk.len()]);
    }
}

fn intact(buf: &[u8], seq: u64) -> bool {
    buf.chunks(8).enumerate().skip(1).all(|(i, chunk)| chunk == &word(seq, i).to_le_bytes()[..chunk.len()])
}

fn seq_of(buf: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(buf.get(..8)?.try_into().ok()?))
}

fn run(ctx: &Context) -> Outcome {
    let arg = |key, default, min, max| ctx.args.u64_in(key, default, min, max).map_err(|e| usage(P, e));
    let count = arg("count", 100_000, 1, 1 << 40)?;
    let size = arg("size", 64, 16, MAX_SIZE as u64)? as usize;
    let rtt = arg("rtt", 0, 0, 1)? == 1;
    let spin_us = arg("spin_us", 50, 0, 1_000_000)?;
    let doorbell = match ctx.args.get("mode").unwrap_or("doorbell") {
        "doorbell" => true,
        "poll" => false,
        other => {
            println!("{P}: mode={other:?}: expected poll or doorbell");
            return Err(Failure::Usage);
        }
    };
    let ping = match ctx.args.get("role") {
        Some("ping") => true,
        Some("pong") => false,
        _ => {
            println!("{P}: role= must be ping or pong");
            return Err(Failure::Usage);
        }
    };
    let (windows, found) = shm::windows(ctx.args);
    let Some(window) = windows[0].filter(|w| found > 0 && w.present()) else {
        println!("{P}: FAILED: no shared-memory window (run with --shm)");
        return Err(Failure::Check);
    };
    shm::enable_interrupts(&windows[..found]);
    let region = window.region().map_err(|why| {
        println!("{P}: FAILED: window 0: {why}");
        Failure::Check
    })?;
    let party = window.party();
    if party > 1 || region.layout().lanes < 2 {
        println!("{P}: FAILED: needs parties 0 and 1 and two lanes (party {party})");
        return Err(Failure::Check);
    }
    let lanes = region.lane(u32::from(party)).and_then(|tx| Ok((tx, region.lane(u32::from(1 - party))?)));
    let (tx, rx) = lanes.map_err(|_| Failure::Check)?;
    let (tx, rx) = match (Producer::attach(tx), Consumer::attach(rx)) {
        (Ok(tx), Ok(rx)) => (tx, rx),
        _ => {
            println!("{P}: FAILED: the region's lanes are corrupt");
            return Err(Failure::Check);
        }
    };
    if size > tx.max_message() {
        println!("{P}: size={size} does not fit a slot of {}", tx.max_message());
        return Err(Failure::Usage);
    }
    let mut others = [(None, 0); 4];
    for (slot, window) in others.iter_mut().zip(windows[1..found].iter()) {
        *slot = (*window, window.map_or(0, |w| w.generation()));
    }
    let spin_ticks = time::ticks_for_ms(1) * spin_us / 1000;
    let mut link = Link { window, peer: 1 - party, tx, rx, doorbell, spin_ticks, wakeups: 0, others, last_look: 0 };
    println!("{P}: party {party}, {} mode, ready", if doorbell { "doorbell" } else { "poll" });
    let result = match (ping, rtt) {
        (true, false) => stream(&mut link, count, size),
        (true, true) => round_trips(&mut link, count, size),
        (false, _) => answer(&mut link, rtt),
    };
    result.map_err(|e| {
        println!("{P}: FAILED: {e}");
        Failure::Check
    })
}

/// ping, streaming.
fn stream(link: &mut Link, count: u64, size: usize) -> Result<(), RingError> {
    let mut buf = [0u8; MAX_SIZE];
    let mut reply = [0u8; MAX_SIZE];
    let start = arch::rdtsc();
    let mut seq = 0;
    let mut report = None;
    while report.is_none() {
        // Write as many as fit, publish once.
        let mut wrote = false;
        let mut batch = 0;
        while seq <= count && batch < BATCH && link.tx.free()? > 0 {
            batch += 1;
            let message = if seq == count { END } else { seq };
            fill(&mut buf[..size], message);
            link.tx.write(&buf[..size])?;
            seq += 1;
            wrote = true;
        }
        if wrote {
            link.publish();
        }
        // Credits and, at the end, the report.
        let mut got = false;
        while let Some(len) = link.rx.read(&mut reply)? {
            got = true;
            if seq_of(&reply[..len]) == Some(REPORT) && len >= 24 {
                let n = |at: usize| u64::from_le_bytes(reply[at..at + 8].try_into().unwrap_or_default());
                report = Some((n(8), n(16)));
            }
        }
        link.rx.release();
        if !wrote && !got {
            link.idle(seq <= count)?;
            if time::elapsed_us(start, arch::rdtsc()).is_some_and(|us| us > PEER_TIMEOUT_MS * 1000) {
                println!("{P}: FAILED: the peer went silent");
                return Err(RingError::Full);
            }
        }
    }
    let us = time::elapsed_us(start, arch::rdtsc()).unwrap_or(0).max(1);
    let (received, bad) = report.unwrap_or_default();
    println!("{P}: sent {count} messages of {size} bytes in {us} us: {} msg/s", count * 1_000_000 / us);
    println!("{P}: peer received {received}, {bad} bad, {} wake-ups here", link.wakeups);
    match received == count && bad == 0 {
        true => Ok(()),
        false => Err(RingError::BadRegion("the peer did not receive every message intact")),
    }
}

/// ping, one at a time.
fn round_trips(link: &mut Link, count: u64, size: usize) -> Result<(), RingError> {
    let mut buf = [0u8; MAX_SIZE];
    let mut samples = [0u32; RTT_SAMPLES];
    let khz = time::tsc_khz().unwrap_or(1_000_000);
    for seq in 0..=count {
        let message = if seq == count { END } else { seq };
        fill(&mut buf[..size], message);
        let sent = arch::rdtsc();
        link.tx.write(&buf[..size])?;
        link.publish();
        loop {
            if let Some(len) = link.rx.pop(&mut buf)? {
                if seq_of(&buf[..len]) == Some(REPORT) || seq == count {
                    break;
                }
                if seq_of(&buf[..len]) != Some(message) {
                    return Err(RingError::BadRegion("an echo out of order"));
                }
                let ns = arch::rdtsc().wrapping_sub(sent) * 1_000_000 / khz;
                samples[(seq as usize) % RTT_SAMPLES] = ns.min(u64::from(u32::MAX)) as u32;
                break;
            }
            link.idle(false)?;
        }
    }
    let n = (count as usize).min(RTT_SAMPLES);
    let samples = &mut samples[..n];
    samples.sort_unstable();
    let pick = |q: usize| samples.get((n * q / 100).min(n.saturating_sub(1))).copied().unwrap_or(0);
    println!("{P}: {count} round trips of {size} bytes: rtt p50 {} ns p99 {} ns", pick(50), pick(99));
    Ok(())
}

/// pong.
fn answer(link: &mut Link, echo: bool) -> Result<(), RingError> {
    let mut buf = [0u8; MAX_SIZE];
    let (mut expected, mut bad, mut since_credit) = (0u64, 0u64, 0u32);
    let mut last_heard = arch::rdtsc();
    loop {
        let Some(len) = link.rx.read(&mut buf)? else {
            link.rx.release();
            // Everything read is handed back: a ping asleep for want of room learns of it.
            if since_credit > 0 && !echo && link.doorbell && link.tx.consumer_sleeping() {
                send_control(link, CREDIT, 0, 0)?;
            }
            since_credit = 0;
            link.idle(false)?;
            if time::elapsed_us(last_heard, arch::rdtsc()).is_some_and(|us| us > PEER_TIMEOUT_MS * 1000) {
                println!("{P}: FAILED: the peer went silent after {expected} messages");
                return Err(RingError::Full);
            }
            continue;
        };
        last_heard = arch::rdtsc();
        let seq = seq_of(&buf[..len]).unwrap_or(0);
        if echo {
            link.rx.release();
            while link.tx.free()? == 0 {
                link.idle(true)?;
            }
            link.tx.write(&buf[..len])?;
            link.publish();
        }
        if seq == END {
            link.rx.release();
            send_control(link, REPORT, expected, bad)?;
            println!("{P}: received {expected} messages, {bad} out of order or corrupt, {} wake-ups", link.wakeups);
            return match bad {
                0 => Ok(()),
                _ => Err(RingError::BadRegion("messages arrived out of order or corrupt")),
            };
        }
        if seq != expected || !intact(&buf[..len], seq) {
            bad += 1;
        }
        expected = seq.wrapping_add(1);
        since_credit += 1;
        if since_credit >= RELEASE_EVERY {
            // Slots go back in batches; a ping asleep for want of them gets a credit.
            link.rx.release();
            since_credit = 0;
            if !echo && link.doorbell && link.tx.consumer_sleeping() {
                send_control(link, CREDIT, 0, 0)?;
            }
        }
    }
}

fn send_control(link: &mut Link, kind: u64, a: u64, b: u64) -> Result<(), RingError> {
    let mut msg = [0u8; 24];
    msg[..8].copy_from_slice(&kind.to_le_bytes());
    msg[8..16].copy_from_slice(&a.to_le_bytes());
    msg[16..24].copy_from_slice(&b.to_le_bytes());
    loop {
        match link.tx.write(&msg) {
            Ok(()) => break,
            // Credits may be dropped when the lane back is full: the ping is awake then.
            Err(RingError::Full) if kind == CREDIT => return Ok(()),
            Err(RingError::Full) => link.idle(true)?,
            Err(e) => return Err(e),
        }
    }
    link.publish();
    Ok(())
}
