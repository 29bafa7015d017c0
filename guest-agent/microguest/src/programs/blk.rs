//! virtio-blk programs.
//!
//! `prog=blk-rw [mib=N] [disk=I] [seed=S] [expect_pattern=1] [timeout_ms=T]` writes a
//! verifiable pattern over the first N MiB of the disk (default: all of it, up to 64 MiB),
//! flushes, reads it back and verifies it. Each 512-byte sector carries a magic, its own
//! sector number, the run's seed, seed-derived data and a checksum, so misplaced, stale or
//! torn sectors are all caught. It also asks for the disk's ID. On a read-only disk
//! (VIRTIO_BLK_F_RO) it checks that a write is refused with IOERR and changes nothing, then
//! reads the range and counts sectors carrying a valid pattern from an earlier run
//! (`expect_pattern=1`: all of them must).
//!
//! `prog=blk-bench mode=randread|randwrite [ops=N] [qd=N] [bs=4096] [disk=I]` runs random
//! I/O at queue depth `qd` and prints IOPS and mean latency on one line.
use super::virtio_util::{self, Rng, Size, find_device, mean_tenth_us, per_second};
use super::{Context, Failure, Outcome, Program, usage};
use crate::virtio::blk::{self, Blk, Kind, S_IOERR, S_OK, S_UNSUPP, SECTOR_SIZE};
use crate::virtio::{self, ID_BLOCK};
use crate::{arch, dma, println};

pub const RW: Program =
    Program { name: "blk-rw", about: "write, flush, read back and verify a pattern on a virtio-blk disk", run: blk_rw };

pub const BENCH: Program =
    Program { name: "blk-bench", about: "random read or write IOPS and latency on a virtio-blk disk", run: blk_bench };

const MIB: u64 = 1 << 20;
const SECTORS_PER_MIB: u64 = MIB / SECTOR_SIZE;
const DEFAULT_LIMIT_MIB: u64 = 64;
/// blk-rw moves 64 KiB per request, 8 requests in flight.
const RW_REQUEST_SECTORS: u64 = 128;
const RW_QUEUE_DEPTH: usize = 8;
const WORDS: usize = (SECTOR_SIZE / 8) as usize;
/// "MGBLKRW1"
const SECTOR_MAGIC: u64 = u64::from_le_bytes(*b"MGBLKRW1");
/// How many mismatching sectors are described before only counting.
const REPORT_LIMIT: u64 = 5;

pub(super) fn open_disk(ctx: &Context, program: &str, slots: usize) -> Result<Blk, Failure> {
    let transport = find_device(ctx, program, "disk", ID_BLOCK)?;
    let base = transport.base();
    let disk = Blk::open(transport, slots).map_err(|e| {
        println!("{program}: FAILED: virtio-blk at {base:#x}: {e}");
        Failure::Check
    })?;
    println!(
        "{program}: virtio-blk at {base:#x}: {} sectors ({}), read-only {}, flush {}, \
         size_max {}, blk_size {}, features {:#x}, queue depth {}",
        disk.capacity,
        Size(disk.capacity * SECTOR_SIZE),
        yes_no(disk.read_only),
        yes_no(disk.flush),
        disk.size_max.unwrap_or(0),
        disk.blk_size.unwrap_or(0),
        disk.features,
        disk.slots()
    );
    Ok(disk)
}

pub(super) fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

pub(super) fn device_failure(program: &str, e: virtio::Error) -> Failure {
    println!("{program}: FAILED: {e}");
    Failure::Check
}

fn checksum(words: &[u64]) -> u64 {
    words.iter().fold(0xcbf2_9ce4_8422_2325, |h, &w| (h ^ w).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(29))
}

fn fill_sector(words: &mut [u64], sector: u64, seed: u64) {
    words[0] = SECTOR_MAGIC;
    words[1] = sector;
    words[2] = seed;
    let mut rng = Rng::new(seed ^ sector.wrapping_mul(0xd6e8_feb8_6659_fd93));
    for w in &mut words[3..WORDS - 1] {
        *w = rng.next_u64();
    }
    words[WORDS - 1] = checksum(&words[..WORDS - 1]);
}

/// Why a sector does not hold the pattern we expect.
enum Mismatch {
    Magic,
    Sector(u64),
    Seed(u64),
    Checksum,
    Data,
}

/// Checks one sector against the pattern for `sector`, and `seed` when given (any seed
/// otherwise, as stored in the sector).
fn check_sector(words: &[u64], sector: u64, seed: Option<u64>) -> Result<(), Mismatch> {
    if words[0] != SECTOR_MAGIC {
        return Err(Mismatch::Magic);
    }
    if words[1] != sector {
        return Err(Mismatch::Sector(words[1]));
    }
    if seed.is_some_and(|s| s != words[2]) {
        return Err(Mismatch::Seed(words[2]));
    }
    if checksum(&words[..WORDS - 1]) != words[WORDS - 1] {
        return Err(Mismatch::Checksum);
    }
    let mut expected = [0u64; WORDS];
    fill_sector(&mut expected, sector, words[2]);
    if expected[..] != words[..] {
        return Err(Mismatch::Data);
    }
    Ok(())
}

fn describe(program: &str, sector: u64, mismatch: Mismatch) {
    match mismatch {
        Mismatch::Magic => println!("{program}: sector {sector}: no pattern (bad magic)"),
        Mismatch::Sector(found) => {
            println!("{program}: sector {sector}: holds the data of sector {found}")
        }
        Mismatch::Seed(found) => {
            println!("{program}: sector {sector}: stale data from run with seed {found:#x}")
        }
        Mismatch::Checksum => println!("{program}: sector {sector}: checksum mismatch"),
        Mismatch::Data => println!("{program}: sector {sector}: pattern data differs"),
    }
}

/// The u64 words of `sectors` sectors at `addr`.
///
/// # Safety
/// `addr` must be a buffer we own that no device is writing.
unsafe fn sector_words<'a>(addr: u64, sectors: u64) -> &'a mut [u64] {
    // SAFETY: guaranteed by the caller; DMA buffers are page aligned.
    unsafe { core::slice::from_raw_parts_mut(addr as *mut u64, (sectors * SECTOR_SIZE / 8) as usize) }
}

/// Moves sectors `0..total` in requests of `per_request` sectors, keeping up to
/// `disk.slots()` in flight. `prepare` fills a buffer before a write; `finish` sees each
/// buffer after its request completed. Returns the number of requests.
/// One pass over sectors `0..total`.
#[derive(Clone, Copy)]
struct Pass {
    kind: Kind,
    total: u64,
    per_request: u64,
    timeout_ms: u64,
}

fn stream(
    disk: &mut Blk,
    program: &str,
    pass: Pass,
    buffers: &[u64],
    mut prepare: impl FnMut(u64, u64, u64),
    mut finish: impl FnMut(u64, u64, u64),
) -> Result<u64, Failure> {
    let Pass { kind, total, per_request, timeout_ms } = pass;
    let mut next = 0u64;
    let mut requests = 0u64;
    let mut pending = [(0u64, 0u64); 64];
    let slots = disk.slots().min(buffers.len()).min(pending.len());
    let mut idle: u64 = u64::MAX >> (64 - slots);
    while next < total || disk.in_flight() > 0 {
        let mut queued = false;
        while next < total && idle != 0 {
            let slot = idle.trailing_zeros() as usize;
            idle &= !(1 << slot);
            let count = per_request.min(total - next);
            prepare(buffers[slot], next, count);
            disk.submit(slot, kind, next, buffers[slot], (count * SECTOR_SIZE) as u32)
                .map_err(|e| device_failure(program, e))?;
            pending[slot] = (next, count);
            next += count;
            queued = true;
        }
        if queued {
            disk.kick();
        }
        let (slot, status) = disk.wait(timeout_ms).map_err(|e| device_failure(program, e))?;
        let (first, count) = pending[slot];
        if status != S_OK {
            println!(
                "{program}: FAILED: {} of sectors {first}..{} returned {} ({status})",
                if kind == Kind::Out { "write" } else { "read" },
                first + count,
                blk::status_name(status)
            );
            return Err(Failure::Check);
        }
        finish(buffers[slot], first, count);
        idle |= 1 << slot;
        requests += 1;
    }
    Ok(requests)
}

pub(super) fn alloc_buffers(program: &str, count: usize, bytes: u64) -> Result<[u64; 64], Failure> {
    let mut buffers = [0u64; 64];
    for b in buffers.iter_mut().take(count) {
        *b = dma::alloc(bytes).ok_or_else(|| {
            println!("{program}: out of memory for I/O buffers");
            Failure::Check
        })?;
    }
    Ok(buffers)
}

/// Asks the disk for its ID string; prints it. UNSUPP is allowed by the spec.
fn get_id(disk: &mut Blk, program: &str, timeout_ms: u64) -> Result<(), Failure> {
    let buf = dma::alloc(dma::PAGE).ok_or(Failure::Check)?;
    let status = disk.run(Kind::GetId, 0, buf, blk::ID_BYTES, timeout_ms).map_err(|e| device_failure(program, e))?;
    match status {
        S_OK => {
            // SAFETY: our buffer; the request is complete.
            let raw = unsafe { core::slice::from_raw_parts(buf as *const u8, 20) };
            let len = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            let id = core::str::from_utf8(&raw[..len]).unwrap_or("<not utf-8>");
            println!("{program}: disk id \"{id}\"");
            Ok(())
        }
        S_UNSUPP => {
            println!("{program}: disk id: GET_ID unsupported by the device");
            Ok(())
        }
        _ => {
            println!("{program}: FAILED: GET_ID returned {} ({status})", blk::status_name(status));
            Err(Failure::Check)
        }
    }
}

fn blk_rw(ctx: &Context) -> Outcome {
    const P: &str = "blk-rw";
    let timeout_ms = virtio_util::timeout_ms(ctx, P, 10_000)?;
    let seed = virtio_util::seed(ctx, P)?;
    let expect_pattern = ctx.args.u64_in("expect_pattern", 0, 0, 1).map_err(|e| usage(P, e))? == 1;
    let mib = match ctx.args.get("mib") {
        Some(_) => Some(ctx.args.u64_in("mib", 0, 1, 1 << 24).map_err(|e| usage(P, e))?),
        None => None,
    };
    let mut disk = open_disk(ctx, P, RW_QUEUE_DEPTH)?;
    let result = blk_rw_on(&mut disk, mib, seed, expect_pattern, timeout_ms);
    disk.shutdown();
    result
}

fn blk_rw_on(disk: &mut Blk, mib: Option<u64>, seed: u64, expect_pattern: bool, timeout_ms: u64) -> Outcome {
    const P: &str = "blk-rw";
    let total = match mib {
        Some(mib) if mib * SECTORS_PER_MIB > disk.capacity => {
            println!("{P}: mib={mib} does not fit on a disk of {}", Size(disk.capacity * SECTOR_SIZE));
            return Err(Failure::Usage);
        }
        Some(mib) => mib * SECTORS_PER_MIB,
        None => disk.capacity.min(DEFAULT_LIMIT_MIB * SECTORS_PER_MIB),
    };
    if total == 0 {
        println!("{P}: FAILED: the disk has no sectors");
        return Err(Failure::Check);
    }
    let per_request = RW_REQUEST_SECTORS.min(u64::from(disk.max_transfer()) / SECTOR_SIZE);
    let slots = disk.slots().min(64);
    let buffers = alloc_buffers(P, slots, per_request * SECTOR_SIZE)?;
    let buffers = &buffers[..slots];
    get_id(disk, P, timeout_ms)?;

    if disk.read_only {
        return read_only_checks(disk, total, per_request, buffers, expect_pattern, timeout_ms);
    }

    println!("{P}: writing {} ({total} sectors), seed {seed:#x}", Size(total * SECTOR_SIZE));
    let t0 = arch::rdtsc();
    let writes = stream(
        disk,
        P,
        Pass { kind: Kind::Out, total, per_request, timeout_ms },
        buffers,
        |buf, first, count| {
            // SAFETY: an idle slot's buffer, `count` sectors long.
            let words = unsafe { sector_words(buf, count) };
            for (i, chunk) in words.chunks_exact_mut(WORDS).enumerate() {
                fill_sector(chunk, first + i as u64, seed);
            }
        },
        |_, _, _| {},
    )?;
    let t1 = arch::rdtsc();
    if disk.flush {
        let status = disk.run(Kind::Flush, 0, 0, 0, timeout_ms).map_err(|e| device_failure(P, e))?;
        if status != S_OK {
            println!("{P}: FAILED: FLUSH returned {} ({status})", blk::status_name(status));
            return Err(Failure::Check);
        }
        println!("{P}: flush OK");
    } else {
        println!("{P}: flush not offered by the device (write-through)");
    }

    let mut bad = 0u64;
    let t2 = arch::rdtsc();
    let reads = stream(
        disk,
        P,
        Pass { kind: Kind::In, total, per_request, timeout_ms },
        buffers,
        |buf, _, count| {
            // Poison the buffer so a read that returns nothing cannot pass.
            // SAFETY: an idle slot's buffer.
            unsafe { core::ptr::write_bytes(buf as *mut u8, 0xa5, (count * SECTOR_SIZE) as usize) };
        },
        |buf, first, count| {
            // SAFETY: the request is complete; the device no longer writes the buffer.
            let words = unsafe { sector_words(buf, count) };
            for (i, chunk) in words.chunks_exact(WORDS).enumerate() {
                let sector = first + i as u64;
                if let Err(m) = check_sector(chunk, sector, Some(seed)) {
                    if bad < REPORT_LIMIT {
                        describe(P, sector, m);
                    }
                    bad += 1;
                }
            }
        },
    )?;
    let t3 = arch::rdtsc();
    if bad != 0 {
        println!("{P}: FAILED: {bad} of {total} sectors read back wrong");
        return Err(Failure::Check);
    }
    let size = Size(total * SECTOR_SIZE);
    let disk_size = Size(disk.capacity * SECTOR_SIZE);
    let request = Size(per_request * SECTOR_SIZE);
    match (per_second(writes, t0, t1), per_second(reads, t2, t3)) {
        (Some(w), Some(r)) => println!(
            "{P}: wrote and verified {size} ({total} sectors) on a {disk_size} disk, \
             {w} write IOPS, {r} read IOPS ({request} requests, queue depth {})",
            buffers.len()
        ),
        _ => println!("{P}: wrote and verified {size} ({total} sectors) on a {disk_size} disk"),
    }
    Ok(())
}

fn read_only_checks(
    disk: &mut Blk,
    total: u64,
    per_request: u64,
    buffers: &[u64],
    expect_pattern: bool,
    timeout_ms: u64,
) -> Outcome {
    const P: &str = "blk-rw";
    let fail = |e| device_failure(P, e);
    // Read sector 0, try to write the very same bytes back (so even a device that wrongly
    // accepts it changes nothing), then make sure the sector is unchanged.
    let (a, b) = (buffers[0], dma::alloc(SECTOR_SIZE).ok_or(Failure::Check)?);
    let status = disk.run(Kind::In, 0, a, SECTOR_SIZE as u32, timeout_ms).map_err(fail)?;
    if status != S_OK {
        println!("{P}: FAILED: read of sector 0 returned {}", blk::status_name(status));
        return Err(Failure::Check);
    }
    let status = disk.run(Kind::Out, 0, a, SECTOR_SIZE as u32, timeout_ms).map_err(fail)?;
    if status != S_IOERR {
        println!(
            "{P}: FAILED: write to the read-only disk returned {} ({status}), expected IOERR",
            blk::status_name(status)
        );
        return Err(Failure::Check);
    }
    let status = disk.run(Kind::In, 0, b, SECTOR_SIZE as u32, timeout_ms).map_err(fail)?;
    // SAFETY: both requests are complete; the buffers are ours.
    let same = unsafe {
        core::slice::from_raw_parts(a as *const u8, SECTOR_SIZE as usize)
            == core::slice::from_raw_parts(b as *const u8, SECTOR_SIZE as usize)
    };
    if status != S_OK || !same {
        println!("{P}: FAILED: sector 0 changed after the refused write");
        return Err(Failure::Check);
    }
    println!("{P}: read-only disk refused a write with IOERR and kept its data");

    let mut valid = 0u64;
    let mut reported = 0u64;
    let t0 = arch::rdtsc();
    let reads = stream(
        disk,
        P,
        Pass { kind: Kind::In, total, per_request, timeout_ms },
        buffers,
        |_, _, _| {},
        |buf, first, count| {
            // SAFETY: the request is complete; the device no longer writes the buffer.
            let words = unsafe { sector_words(buf, count) };
            for (i, chunk) in words.chunks_exact(WORDS).enumerate() {
                let sector = first + i as u64;
                match check_sector(chunk, sector, None) {
                    Ok(()) => valid += 1,
                    Err(m) if expect_pattern && reported < REPORT_LIMIT => {
                        describe(P, sector, m);
                        reported += 1;
                    }
                    Err(_) => {}
                }
            }
        },
    )?;
    let t1 = arch::rdtsc();
    let iops = per_second(reads, t0, t1).map(|r| IopsSuffix(Some(r))).unwrap_or(IopsSuffix(None));
    println!(
        "{P}: read-only disk refused writes (IOERR) and read back {} ({total} sectors) on a {} \
         disk, {valid} sectors carry a valid pattern{iops}",
        Size(total * SECTOR_SIZE),
        Size(disk.capacity * SECTOR_SIZE)
    );
    if expect_pattern && valid != total {
        println!("{P}: FAILED: {} sectors lack the pattern", total - valid);
        return Err(Failure::Check);
    }
    Ok(())
}

struct IopsSuffix(Option<u64>);

impl core::fmt::Display for IopsSuffix {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        match self.0 {
            Some(r) => write!(f, ", {r} read IOPS"),
            None => Ok(()),
        }
    }
}

fn blk_bench(ctx: &Context) -> Outcome {
    const P: &str = "blk-bench";
    let write = match ctx.args.get("mode") {
        Some("randread") | None => false,
        Some("randwrite") => true,
        Some(other) => {
            println!("{P}: invalid mode={other:?}: expected randread or randwrite");
            return Err(Failure::Usage);
        }
    };
    let ops = ctx.args.u64_in("ops", 10_000, 1, 1 << 32).map_err(|e| usage(P, e))?;
    let qd = ctx.args.u64_in("qd", 1, 1, 64).map_err(|e| usage(P, e))? as usize;
    let bs = ctx.args.u64_in("bs", 4096, SECTOR_SIZE, 1 << 20).map_err(|e| usage(P, e))?;
    if !bs.is_multiple_of(SECTOR_SIZE) {
        println!("{P}: invalid bs={bs}: expected a multiple of {SECTOR_SIZE}");
        return Err(Failure::Usage);
    }
    let timeout_ms = virtio_util::timeout_ms(ctx, P, 10_000)?;
    let seed = virtio_util::seed(ctx, P)?;
    let mut disk = open_disk(ctx, P, qd)?;
    let result = bench_on(&mut disk, write, ops, qd, bs, seed, timeout_ms);
    disk.shutdown();
    result
}

fn bench_on(disk: &mut Blk, write: bool, ops: u64, qd: usize, bs: u64, seed: u64, timeout_ms: u64) -> Outcome {
    const P: &str = "blk-bench";
    let mode = if write { "randwrite" } else { "randread" };
    if bs > u64::from(disk.max_transfer()) {
        println!("{P}: bs={bs} exceeds the device's size_max {}", disk.max_transfer());
        return Err(Failure::Usage);
    }
    let blocks = disk.capacity * SECTOR_SIZE / bs;
    if blocks == 0 {
        println!("{P}: the disk is smaller than bs={bs}");
        return Err(Failure::Usage);
    }
    if disk.slots() < qd {
        println!("{P}: the device's queue allows only qd={}", disk.slots());
        return Err(Failure::Usage);
    }
    if write && disk.read_only {
        println!("{P}: FAILED: mode=randwrite on a read-only disk");
        return Err(Failure::Check);
    }
    let buffers = alloc_buffers(P, qd, bs)?;
    if write {
        for &b in &buffers[..qd] {
            // SAFETY: our buffers, idle.
            let words = unsafe { sector_words(b, bs / SECTOR_SIZE) };
            let mut rng = Rng::new(seed ^ b);
            words.iter_mut().for_each(|w| *w = rng.next_u64());
        }
    }
    let kind = if write { Kind::Out } else { Kind::In };
    let mut rng = Rng::new(seed);
    let mut started = [0u64; 64];
    let mut submitted = 0u64;
    let mut completed = 0u64;
    let mut latency_ticks = 0u64;
    let mut idle: u64 = u64::MAX >> (64 - qd);
    let t0 = arch::rdtsc();
    while completed < ops {
        let mut queued = false;
        while submitted < ops && idle != 0 {
            let slot = idle.trailing_zeros() as usize;
            idle &= !(1 << slot);
            let sector = rng.below(blocks) * (bs / SECTOR_SIZE);
            started[slot] = arch::rdtsc();
            disk.submit(slot, kind, sector, buffers[slot], bs as u32).map_err(|e| device_failure(P, e))?;
            submitted += 1;
            queued = true;
        }
        if queued {
            disk.kick();
        }
        let mut done = Some(disk.wait(timeout_ms).map_err(|e| device_failure(P, e))?);
        while let Some((slot, status)) = done {
            latency_ticks += arch::rdtsc().wrapping_sub(started[slot]);
            if status != S_OK {
                println!("{P}: FAILED: {mode} request returned {} ({status})", blk::status_name(status));
                return Err(Failure::Check);
            }
            idle |= 1 << slot;
            completed += 1;
            done = disk.poll().map_err(|e| device_failure(P, e))?;
        }
    }
    let t1 = arch::rdtsc();
    match (per_second(ops, t0, t1), mean_tenth_us(latency_ticks, ops)) {
        (Some(iops), Some(lat)) => {
            println!("{P}: mode={mode} ops={ops} qd={qd} bs={bs} iops={iops} lat_us={}.{}", lat / 10, lat % 10)
        }
        _ => println!(
            "{P}: mode={mode} ops={ops} qd={qd} bs={bs} iops=unknown lat_us=unknown \
             (TSC frequency unknown)"
        ),
    }
    Ok(())
}
