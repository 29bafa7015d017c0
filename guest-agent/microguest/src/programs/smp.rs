//! `prog=smp`: starts every CPU the firmware describes; each reports in and hammers a shared
//! counter with locked increments, which must add up exactly.
use core::sync::atomic::{AtomicU64, Ordering};

use super::{Context, Failure, Outcome, Program, usage};
use crate::{println, smp};

pub const PROGRAM: Program =
    Program { name: "smp", about: "start all CPUs; each reports in and increments a shared counter", run };

static SHARED: AtomicU64 = AtomicU64::new(0);
static INCREMENTS: AtomicU64 = AtomicU64::new(0);
static FINISHED: AtomicU64 = AtomicU64::new(0);

fn hammer() {
    for _ in 0..INCREMENTS.load(Ordering::Relaxed) {
        SHARED.fetch_add(1, Ordering::Relaxed);
    }
}

fn ap_task(cpu_index: usize) {
    println!("smp: cpu {cpu_index} (apic id {}) online", smp::apic_id());
    hammer();
    FINISHED.fetch_add(1, Ordering::AcqRel);
}

fn run(ctx: &Context) -> Outcome {
    let increments = ctx.args.u64_in("increments", 100_000, 0, 1 << 32).map_err(|e| usage("smp", e))?;
    let timeout_ms = ctx.args.u64_in("timeout_ms", 10_000, 1, 600_000).map_err(|e| usage("smp", e))?;
    INCREMENTS.store(increments, Ordering::Relaxed);
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
    hammer();
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
    let want = increments * n as u64;
    if total != want {
        println!("smp: FAILED: shared counter {total}, expected {want}");
        return Err(Failure::Check);
    }
    println!("smp: {n}/{n} cpus online, shared counter {total} as expected");
    Ok(())
}
