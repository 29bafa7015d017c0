//! `prog=memdirty mib=N [pages_per_ms=R] [words=W]`: keeps rewriting pages of N MiB of free RAM in a
//! scattered order and verifies the whole range after every round, so a snapshot, restore or
//! switchover that loses a page, or brings back an old copy of one (or of all of them), shows
//! up as a mismatch.
//!
//! Each round writes every page once, in an order that changes from round to round (a
//! bijection `i -> (i * STEP + offset(round)) mod pages`). A page's content is a pattern of
//! its number and of how many times it has been written, and that count follows from the
//! total number of writes alone, which the guest keeps in a register: pages that went back in
//! time, even consistently with each other, no longer match it.
//!
//! `pages_per_ms` limits the dirtying rate (0: as fast as the CPU goes). `words` (1 to 512,
//! all by default) is how many of a page's first 64-bit words each write rewrites, the rest
//! staying zero: small writes into pages, for a delta encoder to show what it saves. Runs until a byte
//! arrives on the serial port (looked at between rounds), verifies once more and exits 0;
//! prints `memdirty: round N ok (W writes)` after each round and
//! `memdirty: W writes in N rounds over M MiB, all verified` at the end.
use super::{Context, Failure, Outcome, Program, usage};
use crate::{arch, console, println, time};

pub const PROGRAM: Program =
    Program { name: "memdirty", about: "dirty mib=N MiB at pages_per_ms=R and verify it", run };

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// A prime above any page count, so the write order is a bijection on the pages.
const STEP: u64 = 1_000_003;

/// The value of word `word` of page `page` after its `generation`-th write (zero before).
fn pattern(page: u64, generation: u64, word: u64) -> u64 {
    if generation == 0 {
        return 0;
    }
    let x = (page << 32 | word) ^ generation.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x ^ (x >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9).rotate_left(23)
}

struct Region {
    start: u64,
    pages: u64,
    /// Words of a page each write rewrites (the rest stay zero).
    words: u64,
    /// STEP's inverse modulo `pages`.
    step_inverse: u64,
}

impl Region {
    fn new(start: u64, pages: u64, words: u64) -> Self {
        Self { start, pages, words, step_inverse: inverse(STEP % pages, pages) }
    }

    fn offset(&self, round: u64) -> u64 {
        (round % self.pages) * 7919 % self.pages
    }

    /// The page the `write`-th write (counting from 0) goes to.
    fn page_of(&self, write: u64) -> u64 {
        let (round, i) = (write / self.pages, write % self.pages);
        (i * (STEP % self.pages) + self.offset(round)) % self.pages
    }

    /// How many times `page` has been written after `writes` writes.
    fn generation(&self, page: u64, writes: u64) -> u64 {
        let (round, done) = (writes / self.pages, writes % self.pages);
        let i = (page + self.pages - self.offset(round)) % self.pages * self.step_inverse % self.pages;
        round + u64::from(i < done)
    }

    fn write(&self, page: u64, generation: u64) {
        let base = self.start + page * PAGE;
        for word in 0..self.words {
            // SAFETY: inside the free range reserved in `run`, identity-mapped.
            unsafe { core::ptr::write_volatile((base + word * 8) as *mut u64, pattern(page, generation, word)) };
        }
    }

    /// The first wrong word after `writes` writes: (page, word, found, expected).
    fn verify(&self, writes: u64) -> Option<(u64, u64, u64, u64)> {
        for page in 0..self.pages {
            let generation = self.generation(page, writes);
            let base = self.start + page * PAGE;
            for word in 0..PAGE / 8 {
                // SAFETY: as above.
                let found = unsafe { core::ptr::read_volatile((base + word * 8) as *const u64) };
                let expected = if word < self.words { pattern(page, generation, word) } else { 0 };
                if found != expected {
                    return Some((page, word, found, expected));
                }
            }
        }
        None
    }
}

/// `a`'s inverse modulo `m` (they are coprime; m < 2^32, so i64 holds every step; i128
/// would need a runtime helper this bare-metal build lacks).
fn inverse(a: u64, m: u64) -> u64 {
    let (mut r0, mut r1, mut t0, mut t1) = (m as i64, a as i64, 0i64, 1i64);
    while r1 != 0 {
        let q = r0 / r1;
        (r0, r1) = (r1, r0 - q * r1);
        (t0, t1) = (t1, t0 - q * t1);
    }
    t0.rem_euclid(m as i64) as u64
}

fn check(region: &Region, writes: u64, round: u64) -> Outcome {
    match region.verify(writes) {
        None => Ok(()),
        Some((page, word, found, expected)) => {
            println!(
                "memdirty: round {round} FAILED: page {page} word {word} after {writes} writes: {found:#018x}, \
                 expected {expected:#018x} (generation {})",
                region.generation(page, writes)
            );
            Err(Failure::Check)
        }
    }
}

fn run(ctx: &Context) -> Outcome {
    let mib = ctx.args.u64_in("mib", 16, 1, 1 << 14).map_err(|e| usage("memdirty", e))?;
    let rate = ctx.args.u64_in("pages_per_ms", 0, 0, 1 << 30).map_err(|e| usage("memdirty", e))?;
    let words = ctx.args.u64_in("words", PAGE / 8, 1, PAGE / 8).map_err(|e| usage("memdirty", e))?;
    let pages = mib * MIB / PAGE;
    let floor = (arch::image_end() + 2 * MIB).next_multiple_of(2 * MIB);
    let Some(range) = ctx.boot.largest_free_range_above(floor) else {
        println!("memdirty: no usable RAM above {floor:#x}");
        return Err(Failure::Usage);
    };
    let limit = range.end().min(16 << 30);
    if range.start + pages * PAGE > limit {
        println!("memdirty: mib={mib} does not fit: {} MiB free at {:#x}", (limit - range.start) / MIB, range.start);
        return Err(Failure::Usage);
    }
    let region = Region::new(range.start, pages, words);
    // Fresh RAM reads as zeros, which is generation 0 everywhere.
    check(&region, 0, 0)?;
    println!(
        "memdirty: dirtying {mib} MiB at {:#x}, {rate} pages per ms (0: no limit); verifying every round",
        range.start
    );
    let ticks_per_ms = time::ticks_for_ms(1).max(1);
    let (mut writes, mut round) = (0u64, 0u64);
    let started = arch::rdtsc();
    loop {
        round += 1;
        for _ in 0..pages {
            let page = region.page_of(writes);
            region.write(page, region.generation(page, writes) + 1);
            writes += 1;
            if let Some(ticks) = (writes * ticks_per_ms).checked_div(rate) {
                let due = started + ticks;
                while arch::rdtsc() < due {
                    arch::pause();
                }
            }
        }
        check(&region, writes, round)?;
        println!("memdirty: round {round} ok ({writes} writes)");
        if console::try_read_byte().is_some() {
            break;
        }
    }
    // Once more: the byte may come right after a restore, which must be checked too.
    check(&region, writes, round)?;
    println!("memdirty: {writes} writes in {round} rounds over {mib} MiB, all verified");
    Ok(())
}
