//! `prog=memdirty mib=N [pages_per_ms=R]`: keeps rewriting pages of N MiB of free RAM, in a
//! scattered order, each with a pattern that depends on how many times that page has been
//! written (a per-page generation kept in guest RAM too), and verifies the whole range after
//! every round (one write per page on average). A snapshot, restore or switchover that loses a
//! page, or brings back an old copy of one, shows up as a mismatch.
//!
//! `pages_per_ms` limits the dirtying rate (0: as fast as the CPU goes). Runs until a byte
//! arrives on the serial port (looked at between rounds), verifies once more and exits 0;
//! prints `memdirty: round N ok (W writes)` after each round.
use super::{Context, Failure, Outcome, Program, usage};
use crate::{arch, console, println, time};

pub const PROGRAM: Program =
    Program { name: "memdirty", about: "dirty mib=N MiB at pages_per_ms=R and verify it", run };

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

/// The value of word `word` of page `page` after its `generation`-th write.
fn pattern(page: u64, generation: u64, word: u64) -> u64 {
    let x = (page << 32 | word) ^ generation.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x ^ (x >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9).rotate_left(23)
}

struct Region {
    /// Per-page generations (u64 each), then the pages.
    generations: u64,
    pages_start: u64,
    pages: u64,
}

impl Region {
    fn generation(&self, page: u64) -> u64 {
        // SAFETY: inside the free range reserved in `run`, identity-mapped.
        unsafe { core::ptr::read_volatile((self.generations + page * 8) as *const u64) }
    }

    fn write(&self, page: u64) {
        let generation = self.generation(page) + 1;
        let base = self.pages_start + page * PAGE;
        for word in 0..PAGE / 8 {
            // SAFETY: as above.
            unsafe { core::ptr::write_volatile((base + word * 8) as *mut u64, pattern(page, generation, word)) };
        }
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile((self.generations + page * 8) as *mut u64, generation) };
    }

    /// The first wrong word: (page, word, found, expected).
    fn verify(&self) -> Option<(u64, u64, u64, u64)> {
        for page in 0..self.pages {
            let generation = self.generation(page);
            let base = self.pages_start + page * PAGE;
            for word in 0..PAGE / 8 {
                // SAFETY: as above.
                let found = unsafe { core::ptr::read_volatile((base + word * 8) as *const u64) };
                let expected = if generation == 0 { 0 } else { pattern(page, generation, word) };
                if found != expected {
                    return Some((page, word, found, expected));
                }
            }
        }
        None
    }
}

fn run(ctx: &Context) -> Outcome {
    let mib = ctx.args.u64_in("mib", 16, 1, 1 << 14).map_err(|e| usage("memdirty", e))?;
    let rate = ctx.args.u64_in("pages_per_ms", 0, 0, 1 << 30).map_err(|e| usage("memdirty", e))?;
    let pages = mib * MIB / PAGE;
    let floor = (arch::image_end() + 2 * MIB).next_multiple_of(2 * MIB);
    let Some(range) = ctx.boot.largest_free_range_above(floor) else {
        println!("memdirty: no usable RAM above {floor:#x}");
        return Err(Failure::Usage);
    };
    let table = (pages * 8).next_multiple_of(PAGE);
    let needed = table + pages * PAGE;
    let limit = range.end().min(16 << 30);
    if range.start + needed > limit {
        println!("memdirty: mib={mib} does not fit: {} MiB free at {:#x}", (limit - range.start) / MIB, range.start);
        return Err(Failure::Usage);
    }
    let region = Region { generations: range.start, pages_start: range.start + table, pages };
    // Fresh RAM reads as zeros: generation 0 everywhere, and pages of generation 0 are zeros.
    if let Some((page, word, found, _)) = region.verify() {
        println!("memdirty: RAM not zero at start: page {page} word {word}: {found:#x}");
        return Err(Failure::Check);
    }
    println!("memdirty: dirtying {mib} MiB at {:#x}, {} pages per ms; verifying every round", range.start, rate);
    let ticks_per_ms = time::ticks_for_ms(1).max(1);
    let (mut writes, mut round) = (0u64, 0u64);
    let started = arch::rdtsc();
    loop {
        round += 1;
        for _ in 0..pages {
            // A scattered order (a multiplicative hash of the write count) with repeats.
            let page = (writes.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 17) % pages;
            region.write(page);
            writes += 1;
            if rate > 0 {
                let due = started + writes * ticks_per_ms / rate;
                while arch::rdtsc() < due {
                    arch::pause();
                }
            }
        }
        if let Some((page, word, found, expected)) = region.verify() {
            println!(
                "memdirty: round {round} FAILED: page {page} (generation {}) word {word}: {found:#018x}, expected \
                 {expected:#018x}",
                region.generation(page)
            );
            return Err(Failure::Check);
        }
        println!("memdirty: round {round} ok ({writes} writes)");
        if console::try_read_byte().is_some() {
            break;
        }
    }
    println!("memdirty: {writes} writes in {round} rounds over {mib} MiB, all verified");
    Ok(())
}
