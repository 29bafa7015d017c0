//! `prog=smp`: starts every CPU the firmware describes; each reports in and hammers a shared
//! counter with locked increments, which must add up exactly.
//!
//! `increments=N` (default 100000) sets each CPU's share. With `until_input=1` every CPU
//! instead increments until a byte arrives on the serial port, so a host can pause and resume
//! the guest under load for as long as it likes; the shared total must then equal the sum of
//! each CPU's own count.
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use microguest_protocol::MAX_CPUS;

use super::{Context, Failure, Outcome, Program, usage};
use crate::{console, println, smp};

pub const PROGRAM: Program =
    Program { name: "smp", about: "start all CPUs; each reports in and increments a shared counter", run };

static SHARED: AtomicU64 = AtomicU64::new(0);
static INCREMENTS: AtomicU64 = AtomicU64::new(0);
static UNTIL_STOP: AtomicBool = AtomicBool::new(false);
static STOP: AtomicBool = AtomicBool::new(false);
static FINISHED: AtomicU64 = AtomicU64::new(0);
/// Increments done by each CPU, by CPU index.
static PER_CPU: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

/// Runs this CPU's share; returns how many increments it did.
fn hammer(cpu_index: usize, poll_input: bool) -> u64 {
    let mut done = 0u64;
    if UNTIL_STOP.load(Ordering::Relaxed) {
        while !STOP.load(Ordering::Relaxed) {
            for _ in 0..10_000 {
                SHARED.fetch_add(1, Ordering::Relaxed);
            }
            done += 10_000;
            if poll_input && console::try_read_byte().is_some() {
                STOP.store(true, Ordering::Release);
            }
        }
    } else {
        for _ in 0..INCREMENTS.load(Ordering::Relaxed) {
            SHARED.fetch_add(1, Ordering::Relaxed);
        }
        done = INCREMENTS.load(Ordering::Relaxed);
    }
    PER_CPU[cpu_index].store(done, Ordering::Release);
    done
}

fn ap_task(cpu_index: usize) {
    println!("smp: cpu {cpu_index} (apic id {}) online", smp::apic_id());
    hammer(cpu_index, false);
    FINISHED.fetch_add(1, Ordering::AcqRel);
}

fn run(ctx: &Context) -> Outcome {
    let increments = ctx.args.u64_in("increments", 100_000, 0, 1 << 32).map_err(|e| usage("smp", e))?;
    let timeout_ms = ctx.args.u64_in("timeout_ms", 10_000, 1, 600_000).map_err(|e| usage("smp", e))?;
    let until_input = ctx.args.u64_in("until_input", 0, 0, 1).map_err(|e| usage("smp", e))? == 1;
    INCREMENTS.store(increments, Ordering::Relaxed);
    UNTIL_STOP.store(until_input, Ordering::Relaxed);
    let Some(cpus) = smp::discover_cpus() else {
        println!("smp: no MP table found; cannot enumerate CPUs");
        return Err(Failure::Check);
    };
    let n = cpus.count;
    println!("smp: cpu 0 (apic id {}) online; firmware describes {n} cpus", smp::apic_id());
    let others = n.saturating_sub(1);
    if others > 0 {
        let arrived = smp::start_aps(others, ap_task, timeout_ms * 1000);
        if arrived != others {
            println!("smp: FAILED: only {arrived} of {others} application processors started");
            return Err(Failure::Check);
        }
    }
    if until_input {
        println!("smp: all cpus incrementing; send a byte on the serial port to stop");
    }
    hammer(0, true);
    let mut spins = 0u64;
    while (FINISHED.load(Ordering::Acquire) as usize) < others {
        crate::time::spin_us(100);
        spins += 1;
        if spins > timeout_ms * 10 {
            println!("smp: FAILED: cpus did not finish their increments");
            return Err(Failure::Check);
        }
    }
    let total = SHARED.load(Ordering::Acquire);
    let want: u64 = PER_CPU[..n].iter().map(|c| c.load(Ordering::Acquire)).sum();
    if total != want {
        println!("smp: FAILED: shared counter {total}, expected {want}");
        return Err(Failure::Check);
    }
    println!("smp: {n}/{n} cpus online, shared counter {total} as expected");
    Ok(())
}
