//! `prog=memtouch mib=N`: writes an address-derived pattern over N MiB of free RAM and reads it
//! back, proving the guest really owns that memory.
use super::{Context, Failure, Outcome, Program, usage};
use crate::{arch, println, time};

pub const PROGRAM: Program = Program { name: "memtouch", about: "write and verify a pattern over mib=N MiB", run };

const SEED: u64 = 0x9e37_79b9_7f4a_7c15;
const MIB: u64 = 1 << 20;

pub fn pattern(addr: u64) -> u64 {
    (addr ^ SEED).rotate_left(17)
}

fn run(ctx: &Context) -> Outcome {
    let mib = ctx.args.u64_in("mib", 16, 1, 1 << 20).map_err(|e| usage("memtouch", e))?;
    let bytes = mib * MIB;
    // Leave the first 2 MiB after the image alone and stay inside the 16 GiB identity map.
    let floor = (arch::image_end() + 2 * MIB).next_multiple_of(2 * MIB);
    let Some(range) = ctx.boot.largest_free_range_above(floor) else {
        println!("memtouch: no usable RAM above {floor:#x}");
        return Err(Failure::Usage);
    };
    let limit = range.end().min(16 << 30);
    if range.start + bytes > limit {
        println!(
            "memtouch: mib={mib} does not fit: {} MiB free at {:#x}",
            limit.saturating_sub(range.start) / MIB,
            range.start
        );
        return Err(Failure::Usage);
    }
    let start = range.start;
    let t0 = arch::rdtsc();
    for addr in (start..start + bytes).step_by(8) {
        // SAFETY: usable RAM from the firmware map, above our image, inside the identity map.
        unsafe { core::ptr::write_volatile(addr as *mut u64, pattern(addr)) };
    }
    let t1 = arch::rdtsc();
    let mut bad = 0u64;
    for addr in (start..start + bytes).step_by(8) {
        // SAFETY: as above.
        if unsafe { core::ptr::read_volatile(addr as *const u64) } != pattern(addr) {
            if bad == 0 {
                println!("memtouch: mismatch at {addr:#x}");
            }
            bad += 1;
        }
    }
    let t2 = arch::rdtsc();
    if bad != 0 {
        println!("memtouch: FAILED: {bad} of {} words wrong", bytes / 8);
        return Err(Failure::Check);
    }
    match (time::elapsed_us(t0, t1), time::elapsed_us(t1, t2)) {
        (Some(w), Some(r)) => {
            println!("memtouch: {mib} MiB at {start:#x} written and verified (write {} us, verify {} us)", w, r)
        }
        _ => println!("memtouch: {mib} MiB at {start:#x} written and verified"),
    }
    Ok(())
}
