//! `prog=memtouch mib=N [verify_until_input=1]`: writes an address-derived pattern over N MiB
//! of free RAM and reads it back, proving the guest really owns that memory.
//!
//! With `verify_until_input=1` it then keeps verifying the whole range, one line per pass
//! (`memtouch: pass N ok`), until a byte arrives on the serial port (looked at between
//! passes), so a host can replace the backing of guest RAM while the pattern must survive.
use super::{Context, Failure, Outcome, Program, usage};
use crate::{arch, console, println, time};

pub const PROGRAM: Program = Program { name: "memtouch", about: "write and verify a pattern over mib=N MiB", run };

const SEED: u64 = 0x9e37_79b9_7f4a_7c15;
const MIB: u64 = 1 << 20;

pub fn pattern(addr: u64) -> u64 {
    (addr ^ SEED).rotate_left(17)
}

/// Verifies `start..start + bytes`: the number of wrong words and the first one (address,
/// value found).
fn verify(start: u64, bytes: u64) -> (u64, Option<(u64, u64)>) {
    let mut bad = 0u64;
    let mut first = None;
    for addr in (start..start + bytes).step_by(8) {
        // SAFETY: usable RAM from the firmware map, above our image, inside the identity map.
        let value = unsafe { core::ptr::read_volatile(addr as *const u64) };
        if value != pattern(addr) {
            first.get_or_insert((addr, value));
            bad += 1;
        }
    }
    (bad, first)
}

fn run(ctx: &Context) -> Outcome {
    let mib = ctx.args.u64_in("mib", 16, 1, 1 << 20).map_err(|e| usage("memtouch", e))?;
    let until_input = ctx.args.u64_in("verify_until_input", 0, 0, 1).map_err(|e| usage("memtouch", e))? == 1;
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
    let (bad, first) = verify(start, bytes);
    let t2 = arch::rdtsc();
    if let Some((addr, _)) = first {
        println!("memtouch: mismatch at {addr:#x}");
        println!("memtouch: FAILED: {bad} of {} words wrong", bytes / 8);
        return Err(Failure::Check);
    }
    if until_input {
        let mut passes = 0u64;
        println!("memtouch: {mib} MiB at {start:#x} written; verifying until a byte arrives on the serial port");
        while console::try_read_byte().is_none() {
            passes += 1;
            let (bad, first) = verify(start, bytes);
            if let Some((addr, found)) = first {
                println!(
                    "memtouch: pass {passes} FAILED: {bad} of {} words wrong, first at {addr:#x}: \
                     {found:#018x}, expected {:#018x}",
                    bytes / 8,
                    pattern(addr)
                );
                return Err(Failure::Check);
            }
            println!("memtouch: pass {passes} ok");
        }
    }
    match (time::elapsed_us(t0, t1), time::elapsed_us(t1, t2)) {
        (Some(w), Some(r)) => {
            println!("memtouch: {mib} MiB at {start:#x} written and verified (write {w} us, verify {r} us)")
        }
        _ => println!("memtouch: {mib} MiB at {start:#x} written and verified"),
    }
    Ok(())
}
