//! `prog=blk-stress [qd=N] [blocks=N] [ops=N | until_input=1] [seed=S] [prefill=0|1]
//! [disk=I] [progress_ms=N] [timeout_ms=T]`: keeps `qd` (default 8, at most 64) random 4 KiB
//! requests in flight on a virtio-blk disk, about half writes and half reads, over `blocks`
//! 4 KiB blocks (default: the whole disk, at most 16384 blocks), and checks every read
//! against what was last written, so a host may swap the disk's backend under it.
//!
//! Block format (the full definition, and the same code for host tests, is
//! `microguest_protocol::blk_stress`): block `b` at byte offset `b * 4096` is 512
//! little-endian u64 words: magic `"MGBLKST1"` at byte 0, `b` at byte 8, its write sequence
//! number at byte 16 (1 for the first write in this run, +1 for each later one), the seed at
//! byte 24, payload words `mix(key + i)` at bytes 32..4088 (`key` from seed, block and
//! sequence) and a checksum of words 0..=510 at byte 4088.
//!
//! The guest keeps the last completed sequence of every block in RAM, never has two requests
//! on one block in flight, and checks every read holds exactly that sequence. With
//! `prefill=1` (the default) every block is first written once in order (sequence 1), so
//! every read is checked and the image holds nothing from earlier runs; with `prefill=0`
//! blocks start as "never written" (sequence 0) and reads of those are not checked. A write
//! that fails with an I/O error leaves its block uncertain: the next read accepts any
//! sequence up to the failed one and settles on what it finds.
//!
//! The run stops after `ops` requests (default 100000) or, with `until_input=1`, when a byte
//! arrives on the serial port (looked at about every 10 ms). It then drains the requests in
//! flight, issues a FLUSH (if the device offers it), reads every block once more (the final
//! verify) and prints a digest of the final state: 64-bit FNV-1a over `(block, sequence)`,
//! both little-endian u64, for every block in order (never written: sequence 0).
//!
//! Lines a host can match (N decimal, H hex):
//! - `blk-stress: seed=0xH blocks=N qd=N prefill=yes|no ops=N|until_input`
//! - `blk-stress: running` (after the prefill; swaps may start from here)
//! - `blk-stress: progress ops=N errors=N mismatches=N iops=N` every `progress_ms` (default
//!   1000; 0 = none; only when the TSC frequency is known)
//! - `blk-stress: ops=N writes=N reads=N errors=N mismatches=N final_verify=N/N digest=H`
//!   (16 hex digits) once at the end. `ops`, `writes`, `reads` and `mismatches` count the
//!   random phase; `errors` counts I/O errors in every phase, FLUSH included; `final_verify`
//!   is blocks that read back right (never written ones count) out of `blocks`.
//!
//! Status 1 if any error, mismatch or final-verify failure occurred (or the device stopped
//! answering for `timeout_ms`, default 30000), 2 for bad arguments.
use microguest_protocol::blk_stress::{self as format, BLOCK_SIZE, BLOCK_WORDS, Digest, Invalid};

use super::blk::{alloc_buffers, device_failure, open_disk, yes_no};
use super::virtio_util::{self, Every, InputPoll, Limit, Rng, Size, per_second};
use super::{Context, Failure, Outcome, Program, usage};
use crate::virtio::blk::{self, Blk, Kind, S_OK, SECTOR_SIZE};
use crate::{arch, dma, println, time};

pub const STRESS: Program = Program {
    name: "blk-stress",
    about: "random verified 4 KiB writes and reads at a queue depth until stopped; final verify and digest",
    run,
};

const P: &str = "blk-stress";
const BLOCK: u64 = BLOCK_SIZE as u64;
const SECTORS_PER_BLOCK: u64 = BLOCK / SECTOR_SIZE;
const DEFAULT_MAX_BLOCKS: u64 = 16384;
/// Keeps the sequence table (8 bytes a block) at 8 MiB.
const MAX_BLOCKS: u64 = 1 << 20;
const MAX_QD: usize = 64;
const DEFAULT_OPS: u64 = 100_000;
/// Set in a sequence-table entry when a write to the block failed: the block holds some
/// sequence up to the entry's, not necessarily the entry's.
const UNCERTAIN: u64 = 1 << 63;
/// Read buffers are filled with this first, so a read that transfers nothing cannot pass.
const POISON: u64 = 0xa5a5_a5a5_a5a5_a5a5;
/// How many errors and mismatches are described before only counting.
const REPORT_LIMIT: u64 = 5;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Every block written once, in order, with sequence 1.
    Prefill,
    /// Random reads and writes until the limit.
    Random,
    /// Every block read once, in order, and checked.
    Verify,
}

#[derive(Clone, Copy, Default)]
struct Pending {
    block: u64,
    /// The sequence being written (writes only).
    seq: u64,
    write: bool,
}

#[derive(Default)]
struct Counts {
    ops: u64,
    writes: u64,
    reads: u64,
    errors: u64,
    mismatches: u64,
    /// Final verify: blocks that read back as expected / that were never written.
    verified: u64,
    unwritten: u64,
    reported: u64,
}

/// Why a read did not hold what the sequence table says.
enum Mismatch {
    Invalid(Invalid),
    Block(u64),
    Seed(u64),
    Sequence { expected: u64, found: u64 },
}

struct Stress<'a> {
    disk: &'a mut Blk,
    seed: u64,
    blocks: u64,
    timeout_ms: u64,
    /// Last completed write sequence of every block (0: never written), maybe | UNCERTAIN.
    seqs: &'static mut [u64],
    /// One bit per block: a request on it is in flight.
    busy: &'static mut [u64],
    buffers: [u64; MAX_QD],
    pending: [Pending; MAX_QD],
    /// One bit per request slot: the slot is free.
    idle: u64,
    rng: Rng,
    /// Next block of a sequential phase.
    next_block: u64,
    limit: Limit,
    submitted: u64,
    stopping: bool,
    input: Option<InputPoll>,
    progress: Option<Every>,
    ops_at_last_progress: u64,
    c: Counts,
}

/// The words of one block buffer.
///
/// # Safety
/// `addr` must be one of our page-aligned block buffers that no device is accessing.
unsafe fn block_words(addr: u64) -> &'static mut [u64] {
    // SAFETY: guaranteed by the caller.
    unsafe { core::slice::from_raw_parts_mut(addr as *mut u64, BLOCK_WORDS) }
}

/// Checks a block read from the disk against its table entry; returns the sequence found
/// (`None`: never written, nothing to check).
fn check(words: &[u64], block: u64, seed: u64, entry: u64) -> Result<Option<u64>, Mismatch> {
    if entry == 0 {
        return Ok(None);
    }
    let header = format::parse_words(words, true).map_err(Mismatch::Invalid)?;
    if header.block != block {
        return Err(Mismatch::Block(header.block));
    }
    if header.seed != seed {
        return Err(Mismatch::Seed(header.seed));
    }
    let expected = entry & !UNCERTAIN;
    if header.seq == expected || (entry & UNCERTAIN != 0 && header.seq <= expected) {
        return Ok(Some(header.seq));
    }
    Err(Mismatch::Sequence { expected, found: header.seq })
}

fn describe(block: u64, entry: u64, mismatch: Mismatch, phase: Phase) {
    let when = if phase == Phase::Verify { "final verify: " } else { "" };
    let expected = entry & !UNCERTAIN;
    match mismatch {
        Mismatch::Invalid(Invalid::Magic) => {
            println!("{P}: {when}block {block}: no blk-stress data (bad magic), expected sequence {expected}")
        }
        Mismatch::Invalid(Invalid::Checksum) => {
            println!("{P}: {when}block {block}: checksum mismatch (torn or corrupt), expected sequence {expected}")
        }
        Mismatch::Invalid(Invalid::Payload) => {
            println!("{P}: {when}block {block}: payload does not match its header, expected sequence {expected}")
        }
        Mismatch::Block(found) => {
            println!("{P}: {when}block {block}: holds the data of block {found} (misdirected I/O)")
        }
        Mismatch::Seed(found) => println!("{P}: {when}block {block}: holds data of another run (seed {found:#x})"),
        Mismatch::Sequence { expected, found } => println!(
            "{P}: {when}block {block}: holds sequence {found}, expected {expected}{}",
            if found < expected { " (a completed write was lost)" } else { " (never completed)" }
        ),
    }
}

impl Stress<'_> {
    fn mark_busy(&mut self, block: u64, busy: bool) {
        let (word, bit) = ((block / 64) as usize, 1u64 << (block % 64));
        if busy {
            self.busy[word] |= bit;
        } else {
            self.busy[word] &= !bit;
        }
    }

    fn is_busy(&self, block: u64) -> bool {
        self.busy[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    /// The next request of `phase` (block, write?), or `None` once the phase has issued all.
    fn next_op(&mut self, phase: Phase) -> Option<(u64, bool)> {
        match phase {
            Phase::Prefill | Phase::Verify => {
                let block = self.next_block;
                (block < self.blocks).then(|| {
                    self.next_block += 1;
                    (block, phase == Phase::Prefill)
                })
            }
            Phase::Random => {
                let done = match self.limit {
                    Limit::Count(ops) => self.submitted >= ops,
                    Limit::UntilInput => self.stopping,
                };
                if done {
                    return None;
                }
                // At most qd - 1 <= blocks - 1 blocks are busy, so this ends (quickly: qd <= 64).
                let block = loop {
                    let b = self.rng.below(self.blocks);
                    if !self.is_busy(b) {
                        break b;
                    }
                };
                self.submitted += 1;
                Some((block, self.rng.next_u64() >> 63 == 1))
            }
        }
    }

    fn submit(&mut self, block: u64, write: bool) -> Outcome {
        let slot = self.idle.trailing_zeros() as usize;
        let buf = self.buffers[slot];
        // SAFETY: an idle slot's buffer: no request uses it.
        let words = unsafe { block_words(buf) };
        let seq = if write { (self.seqs[block as usize] & !UNCERTAIN) + 1 } else { 0 };
        if write {
            format::fill(words, block, seq, self.seed);
        } else {
            words.fill(POISON);
        }
        let kind = if write { Kind::Out } else { Kind::In };
        self.disk.submit(slot, kind, block * SECTORS_PER_BLOCK, buf, BLOCK as u32).map_err(|e| device_failure(P, e))?;
        self.idle &= !(1 << slot);
        self.mark_busy(block, true);
        self.pending[slot] = Pending { block, seq, write };
        Ok(())
    }

    fn complete(&mut self, slot: usize, status: u8, phase: Phase) {
        let Pending { block, seq, write } = self.pending[slot];
        self.idle |= 1 << slot;
        self.mark_busy(block, false);
        if phase == Phase::Random {
            self.c.ops += 1;
            if write {
                self.c.writes += 1;
            } else {
                self.c.reads += 1;
            }
        }
        let entry = &mut self.seqs[block as usize];
        if status != S_OK {
            self.c.errors += 1;
            if self.c.reported < REPORT_LIMIT {
                self.c.reported += 1;
                match write {
                    true => println!(
                        "{P}: write of block {block} (sequence {seq}) returned {} ({status})",
                        blk::status_name(status)
                    ),
                    false => println!("{P}: read of block {block} returned {} ({status})", blk::status_name(status)),
                }
            }
            if write {
                *entry = seq | UNCERTAIN;
            }
            return;
        }
        if write {
            *entry = seq;
            return;
        }
        // SAFETY: the request is complete; the device no longer writes the buffer.
        let words = unsafe { block_words(self.buffers[slot]) };
        match check(words, block, self.seed, *entry) {
            Ok(found) => {
                if let Some(found) = found {
                    *entry = found;
                }
                if phase == Phase::Verify {
                    self.c.verified += u64::from(found.is_some());
                    self.c.unwritten += u64::from(found.is_none());
                }
            }
            Err(m) => {
                let entry = *entry;
                if phase != Phase::Verify {
                    self.c.mismatches += 1;
                }
                if self.c.reported < REPORT_LIMIT {
                    self.c.reported += 1;
                    describe(block, entry, m, phase);
                }
            }
        }
    }

    /// Progress lines and the serial-port check, between batches of completions.
    fn periodic(&mut self) {
        let now = arch::rdtsc();
        if !self.stopping
            && let Some(input) = &mut self.input
            && input.arrived(now)
        {
            self.stopping = true;
            println!("{P}: input received; draining");
        }
        if let Some(progress) = &mut self.progress
            && let Some(elapsed) = progress.due(now)
        {
            let iops = per_second(self.c.ops - self.ops_at_last_progress, 0, elapsed).unwrap_or(0);
            self.ops_at_last_progress = self.c.ops;
            let c = &self.c;
            println!("{P}: progress ops={} errors={} mismatches={} iops={iops}", c.ops, c.errors, c.mismatches);
        }
    }

    /// Runs one phase: keeps every slot busy until the phase has issued all its requests,
    /// then waits for the last ones.
    fn pump(&mut self, phase: Phase) -> Outcome {
        let mut exhausted = false;
        loop {
            let mut queued = false;
            while self.idle != 0 && !exhausted {
                match self.next_op(phase) {
                    Some((block, write)) => {
                        self.submit(block, write)?;
                        queued = true;
                    }
                    None => exhausted = true,
                }
            }
            if queued {
                self.disk.kick();
            }
            if self.disk.in_flight() == 0 {
                return Ok(());
            }
            let (slot, status) = self.disk.wait(self.timeout_ms).map_err(|e| device_failure(P, e))?;
            self.complete(slot, status, phase);
            while let Some((slot, status)) = self.disk.poll().map_err(|e| device_failure(P, e))? {
                self.complete(slot, status, phase);
            }
            if phase == Phase::Random {
                self.periodic();
            }
        }
    }

    fn flush(&mut self) -> Outcome {
        if !self.disk.flush {
            println!("{P}: flush not offered by the device (write-through)");
            return Ok(());
        }
        let status = self.disk.run(Kind::Flush, 0, 0, 0, self.timeout_ms).map_err(|e| device_failure(P, e))?;
        if status != S_OK {
            println!("{P}: FLUSH returned {} ({status})", blk::status_name(status));
            self.c.errors += 1;
        }
        Ok(())
    }

    fn digest(&self) -> u64 {
        let mut digest = Digest::new();
        for (block, entry) in self.seqs.iter().enumerate() {
            digest.add(block as u64, entry & !UNCERTAIN);
        }
        digest.value()
    }
}

struct Options {
    qd: usize,
    blocks: Option<u64>,
    limit: Limit,
    seed: u64,
    prefill: bool,
    timeout_ms: u64,
    progress_ms: Option<u64>,
}

fn run(ctx: &Context) -> Outcome {
    let arg = |key, default, min, max| ctx.args.u64_in(key, default, min, max).map_err(|e| usage(P, e));
    let options = Options {
        qd: arg("qd", 8, 1, MAX_QD as u64)? as usize,
        blocks: match ctx.args.get("blocks") {
            Some(_) => Some(arg("blocks", 0, 1, MAX_BLOCKS)?),
            None => None,
        },
        limit: virtio_util::limit(ctx, P, "ops", DEFAULT_OPS, 1 << 48)?,
        seed: virtio_util::seed(ctx, P)?,
        prefill: arg("prefill", 1, 0, 1)? == 1,
        timeout_ms: virtio_util::timeout_ms(ctx, P, 30_000)?,
        progress_ms: virtio_util::progress_ms(ctx, P)?,
    };
    let mut disk = open_disk(ctx, P, options.qd)?;
    let result = stress_on(&mut disk, options);
    disk.shutdown();
    result
}

fn stress_on(disk: &mut Blk, o: Options) -> Outcome {
    if disk.read_only {
        println!("{P}: FAILED: the disk is read-only");
        return Err(Failure::Check);
    }
    if disk.slots() < o.qd {
        println!("{P}: the device's queue allows only qd={}", disk.slots());
        return Err(Failure::Usage);
    }
    if u64::from(disk.max_transfer()) < BLOCK {
        println!("{P}: the device's size_max {} is below one {BLOCK}-byte block", disk.max_transfer());
        return Err(Failure::Usage);
    }
    let disk_blocks = disk.capacity / SECTORS_PER_BLOCK;
    let blocks = match o.blocks {
        Some(b) if b > disk_blocks => {
            println!("{P}: blocks={b} does not fit on a disk of {disk_blocks} blocks");
            return Err(Failure::Usage);
        }
        Some(b) => b,
        None => disk_blocks.min(DEFAULT_MAX_BLOCKS),
    };
    if blocks < o.qd as u64 {
        println!("{P}: {blocks} blocks are too few for qd={} (each request needs a block of its own)", o.qd);
        return Err(Failure::Usage);
    }
    let oom = || {
        println!("{P}: out of memory for the sequence table");
        Failure::Check
    };
    let seqs = dma::alloc_slice::<u64>(blocks as usize).ok_or_else(oom)?;
    let busy = dma::alloc_slice::<u64>(blocks.div_ceil(64) as usize).ok_or_else(oom)?;
    let buffers = alloc_buffers(P, o.qd, BLOCK)?;
    let mut s = Stress {
        disk,
        seed: o.seed,
        blocks,
        timeout_ms: o.timeout_ms,
        seqs,
        busy,
        buffers,
        pending: [Pending::default(); MAX_QD],
        idle: u64::MAX >> (64 - o.qd),
        rng: Rng::new(o.seed ^ 0x5eed),
        next_block: 0,
        limit: o.limit,
        submitted: 0,
        stopping: false,
        input: matches!(o.limit, Limit::UntilInput).then(InputPoll::new),
        progress: None,
        ops_at_last_progress: 0,
        c: Counts::default(),
    };
    match o.limit {
        Limit::Count(ops) => {
            println!("{P}: seed={:#x} blocks={blocks} qd={} prefill={} ops={ops}", o.seed, o.qd, yes_no(o.prefill))
        }
        Limit::UntilInput => {
            println!("{P}: seed={:#x} blocks={blocks} qd={} prefill={} until_input", o.seed, o.qd, yes_no(o.prefill))
        }
    }
    if o.prefill {
        let t = arch::rdtsc();
        s.pump(Phase::Prefill)?;
        let took = time::elapsed_us(t, arch::rdtsc()).map(|us| us / 1000).unwrap_or(0);
        println!("{P}: prefilled {blocks} blocks ({}) with sequence 1 in {took} ms", Size(blocks * BLOCK));
    }
    match o.limit {
        Limit::UntilInput => println!("{P}: running; send a byte on the serial port to stop"),
        Limit::Count(_) => println!("{P}: running"),
    }
    // Progress periods count from here, not from argument parsing.
    s.progress = o.progress_ms.map(Every::ms);
    let t0 = arch::rdtsc();
    s.pump(Phase::Random)?;
    let t1 = arch::rdtsc();
    s.flush()?;
    s.next_block = 0;
    s.pump(Phase::Verify)?;
    let digest = s.digest();
    let c = &s.c;
    if let (Some(iops), Some(us)) = (per_second(c.ops, t0, t1), time::elapsed_us(t0, t1)) {
        println!("{P}: {} ops in {} ms: {iops} IOPS at queue depth {}", c.ops, us / 1000, o.qd);
    }
    if c.unwritten != 0 {
        println!("{P}: {} blocks were never written (not checked)", c.unwritten);
    }
    let good = c.verified + c.unwritten;
    println!(
        "{P}: ops={} writes={} reads={} errors={} mismatches={} final_verify={good}/{blocks} digest={digest:016x}",
        c.ops, c.writes, c.reads, c.errors, c.mismatches
    );
    if c.errors != 0 || c.mismatches != 0 || good != blocks {
        println!("{P}: FAILED");
        return Err(Failure::Check);
    }
    Ok(())
}
