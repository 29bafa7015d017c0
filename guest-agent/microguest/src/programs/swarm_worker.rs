//! `prog=swarm-worker work=LAYER[+LAYER...] vm=N layer=L affinity=BITS key=KEY [spin_us=N]`:
//! one layer VM of a swarm. Window 0 holds the region the swarm manager shares with it (the
//! manager is party 0, this VM party 1): requests come in on lane 0, results go out on lane 1,
//! and this VM's `VmStatus` (layer, load, capacity, requests served, hardware affinity) goes out
//! on lane 2, the control channel: once when ready, then every 256 requests and before sleeping. Each request is a
//! `swarm_ring::packet` whose payload goes through the named layers' work
//! (`swarm_ring::work`: http, auth, digest, respond; several, joined by `+`, for one VM doing
//! them all) and comes back with the same id: `Pending` for the next layer, `Error` with a
//! status line when a layer refuses it. Spins `spin_us` (default 50) when idle, then sleeps on
//! its doorbell. Runs until the VM is stopped.
use swarm_ring::packet::{HEADER_BYTES, PacketHeader, PacketStatus};
use swarm_ring::status::VmStatus;
use swarm_ring::work::Work;
use swarm_ring::{Consumer, Producer, RingError};

use super::{Context, Failure, Outcome, Program, usage};
use crate::shm;
use crate::{arch, println};

pub const WORKER: Program =
    Program { name: "swarm-worker", about: "serve one swarm layer (work=http|auth|digest|respond)", run };

const P: &str = "swarm-worker";
const MAX_MESSAGE: usize = 4096;
const MANAGER: u16 = 0;
/// A sleep's upper bound: the manager's doorbell normally ends it much sooner.
const SLEEP_US: u32 = 100_000;

fn run(ctx: &Context) -> Outcome {
    let mut works = [Work::Http; 4];
    let mut count = 0;
    for name in ctx.args.get("work").unwrap_or("").split('+') {
        match (Work::from_name(name), count < works.len()) {
            (Some(work), true) => {
                works[count] = work;
                count += 1;
            }
            _ => {
                println!("{P}: work={name:?}: expected http, auth, digest or respond, joined by +");
                return Err(Failure::Usage);
            }
        }
    }
    let works = &works[..count];
    let vm = ctx.args.u64_in("vm", 0, 0, u64::from(u16::MAX)).map_err(|e| usage(P, e))? as u16;
    let layer = ctx.args.u64_in("layer", 0, 0, 31).map_err(|e| usage(P, e))? as u32;
    let affinity = ctx.args.u64_in("affinity", 0, 0, u64::from(u32::MAX)).map_err(|e| usage(P, e))? as u32;
    let key = ctx.args.get("key").unwrap_or("").as_bytes();
    let spin_us = ctx.args.u64_in("spin_us", 50, 0, 1_000_000).map_err(|e| usage(P, e))?;
    let spin_ticks = crate::time::ticks_for_ms(1) * spin_us / 1000;
    let (windows, found) = shm::windows(ctx.args);
    let Some(window) = windows[0].filter(|w| found > 0 && w.present()) else {
        println!("{P}: FAILED: no shared-memory window (run with --shm)");
        return Err(Failure::Check);
    };
    shm::enable_interrupts(&windows[..found]);
    let lanes = window.region().and_then(|r| {
        let rx = Consumer::attach(r.lane(0).map_err(|_| "no lane 0")?).map_err(|_| "lane 0 is corrupt")?;
        let tx = Producer::attach(r.lane(1).map_err(|_| "no lane 1")?).map_err(|_| "lane 1 is corrupt")?;
        let control = Producer::attach(r.lane(2).map_err(|_| "no lane 2")?).map_err(|_| "lane 2 is corrupt")?;
        Ok((rx, tx, control))
    });
    let (mut rx, mut tx, mut control) = lanes.map_err(|why| {
        println!("{P}: FAILED: {why}");
        Failure::Check
    })?;
    let mut input = [0u8; MAX_MESSAGE];
    let mut scratch = [[0u8; MAX_MESSAGE]; 2];
    let mut out = [0u8; MAX_MESSAGE];
    let mut status = VmStatus { vm, layers: 1 << layer, load: 0, capacity: rx.slots(), served: 0, affinity };
    // The first status says this VM is ready.
    if control.push(&status.encode()).is_err() {
        println!("{P}: FAILED: cannot announce myself");
        return Err(Failure::Check);
    }
    window.ring(MANAGER);
    println!("{P}: vm {vm} serving {count} layer(s), ready");
    let (mut served, mut reported) = (0u64, 0u64);
    loop {
        let result = serve_batch(&mut rx, &mut tx, works, key, vm, &mut input, &mut scratch, &mut out);
        match result {
            Ok(0) => {
                if served != reported {
                    report(&mut control, &mut status, &mut rx, served);
                    reported = served;
                }
                // Spin a moment before sleeping: under load the next request is near, and a
                // sleep and its wake-up cost two VM exits.
                let spin = arch::rdtsc();
                while arch::rdtsc().wrapping_sub(spin) < spin_ticks && rx.waiting().unwrap_or(1) == 0 {
                    arch::pause();
                }
                if rx.waiting().unwrap_or(1) == 0 && rx.prepare_sleep().unwrap_or(false) {
                    shm::sleep_us(SLEEP_US);
                }
                rx.woke();
            }
            Ok(n) => {
                served += n;
                tx.publish();
                if tx.consumer_sleeping() {
                    window.ring(MANAGER);
                }
                if served - reported >= REPORT_EVERY {
                    report(&mut control, &mut status, &mut rx, served);
                    reported = served;
                }
            }
            Err(e) => {
                // The manager's side is corrupt: nothing sane can be read from it any more.
                println!("{P}: FAILED after {served} requests: {e}");
                return Err(Failure::Check);
            }
        }
    }
}

/// Requests between two status records while busy.
const REPORT_EVERY: u64 = 256;

/// Publishes the status on the control lane (dropped when the manager has not read the last
/// ones: a newer one follows).
fn report(control: &mut Producer, status: &mut VmStatus, rx: &mut Consumer, served: u64) {
    status.served = served;
    status.load = rx.waiting().unwrap_or(0);
    let _ = control.push(&status.encode());
}

/// Serves what is waiting (up to a lane's worth); returns how many requests.
#[allow(clippy::too_many_arguments)]
fn serve_batch(
    rx: &mut Consumer,
    tx: &mut Producer,
    works: &[Work],
    key: &[u8],
    vm: u16,
    input: &mut [u8; MAX_MESSAGE],
    scratch: &mut [[u8; MAX_MESSAGE]; 2],
    out: &mut [u8; MAX_MESSAGE],
) -> Result<u64, RingError> {
    let mut done = 0;
    while tx.free()? > 0 {
        let Some(len) = rx.read(input)? else { break };
        let (header, payload) = match PacketHeader::decode(&input[..len]) {
            Ok(packet) => packet,
            // A packet no manager writes: answered as an error under id 0, not acted on.
            Err(_) => (
                PacketHeader { request_id: 0, next_vm: vm, layer: 0, status: PacketStatus::Error, payload_len: 0 },
                &[][..],
            ),
        };
        // The work chain: each layer's output is the next one's input.
        let mut status = PacketStatus::Pending;
        let (a, b) = scratch.split_at_mut(1);
        let (mut cur, mut next) = (&mut a[0], &mut b[0]);
        cur[..payload.len()].copy_from_slice(payload);
        let mut cur_len = payload.len();
        for work in works {
            match work.run(key, vm, &cur[..cur_len], &mut next[..]) {
                Ok(n) => cur_len = n,
                Err(n) => {
                    cur_len = n;
                    status = PacketStatus::Error;
                }
            }
            core::mem::swap(&mut cur, &mut next);
            if status == PacketStatus::Error {
                break;
            }
        }
        let reply = PacketHeader { status, payload_len: cur_len as u32, next_vm: vm, ..header };
        let cap = MAX_MESSAGE.min(tx.max_message());
        let n = match reply.encode(&cur[..cur_len], &mut out[..cap]) {
            Some(n) => n,
            None => {
                let refusal = b"413 result too large for a slot";
                let small = PacketHeader { status: PacketStatus::Error, payload_len: refusal.len() as u32, ..reply };
                small.encode(refusal, &mut out[..]).unwrap_or(HEADER_BYTES)
            }
        };
        tx.write(&out[..n])?;
        done += 1;
    }
    rx.release();
    Ok(done)
}
