//! `prog=ring-garbage [seconds=N]`: a hostile swarm VM. Scribbles random words over the whole
//! region in window 0 (indices, slot lengths, packet headers, the ring header) and rings every
//! doorbell number, about a thousand times a second, for N seconds (default 10), then exits 0.
//! What it attacks (the host side, the peers) must neither crash nor hang.
use super::{Context, Failure, Outcome, Program, usage};
use crate::shm;
use crate::{arch, println, time};

pub const GARBAGE: Program =
    Program { name: "ring-garbage", about: "scribble garbage over a shared region's rings (a hostile VM)", run };

const P: &str = "ring-garbage";

fn run(ctx: &Context) -> Outcome {
    let seconds = ctx.args.u64_in("seconds", 10, 1, 3600).map_err(|e| usage(P, e))?;
    let (windows, found) = shm::windows(ctx.args);
    let Some(window) = windows[0].filter(|w| found > 0 && w.present()) else {
        println!("{P}: FAILED: no shared-memory window");
        return Err(Failure::Check);
    };
    let (addr, size) = window.range().map_err(|why| {
        println!("{P}: FAILED: {why}");
        Failure::Check
    })?;
    println!("{P}: scribbling over {size} bytes for {seconds} s");
    let mut x = arch::rdtsc() | 1;
    let deadline = time::Deadline::after_ms(seconds * 1000);
    let mut rounds = 0u64;
    while !deadline.expired() {
        for _ in 0..64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Mostly the first lanes' index and length words, where it hurts most.
            let span = if x & 1 == 0 { size.min(4096) } else { size };
            let at = (x >> 8) % (span / 4) * 4;
            // SAFETY: inside the region the VMM mapped at `addr`, identity mapped, aligned.
            unsafe { arch::mmio_write32(addr + at, (x >> 32) as u32) };
        }
        window.ring((x % 4) as u16);
        rounds += 1;
        time::spin_us(1000);
    }
    println!("{P}: {rounds} rounds of garbage written");
    Ok(())
}
