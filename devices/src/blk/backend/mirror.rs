//! Live storage migration as a backend.
//!
//! A [`MirrorBackend`] sits in the disk's backend slot with two backends inside. While
//! *copying*, the guest is served by the source and every chunk is copied to the target in the
//! background. Guest writes are mirrored actively: each goes to the source (which answers the
//! guest) and to the target, so the copy converges however fast the guest writes (the guest's
//! writes run at the slower half's pace meanwhile). A chunk with a guest write in flight is not
//! copied (the copy could read the data before the write lands), and a write that overlaps a
//! copy in flight re-dirties its chunks (the copy may carry older data to the target after the
//! write). A failed write on the target fails the migration, never the guest's request. Once
//! nothing is dirty, the migration quiesces the disk, finishes the copy
//! ([`MirrorControl::finish_copy`], usually nothing left) and flips to *write-through*: the
//! target serves the guest and every write also goes to the source, so rolling back after the
//! switch loses nothing. Commit or rollback takes the chosen backend out
//! ([`MirrorControl::take`]) and puts it in the slot.
//!
//! The copy advances from [`BlockBackend::poll_completions`], which the device's event loop
//! calls whenever the mirror's ready descriptor fires, so it needs no thread of its own.

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::ready::ReadySet;
use super::{BlockBackend, BlockInfo, BlockOp, Completion, IoBuf};

/// Copy granularity.
pub const CHUNK: u64 = 1 << 20;
/// Copies in flight at once.
const MAX_COPIES: usize = 4;
/// The mirror numbers its own requests to the halves from here up. A half goes back into the
/// disk's slot when the migration ends; should one of the mirror's requests still complete on
/// it after that (a stalled half abandoned on rollback), its token cannot be mistaken for one
/// of the disk's, which count up from zero.
const FIRST_TOKEN: u64 = 1 << 63;
/// Longest the event loop spends copying per call before it serves the guest again:
/// synchronous engines copy inline, and the device waits meanwhile.
const COPY_SLICE: Duration = Duration::from_millis(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Guest on the source; chunks copied to the target.
    Copying,
    /// Guest on the target; writes also go to the source.
    WriteThrough,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Side {
    Source,
    Target,
}

/// What an inner completion belongs to.
#[derive(Clone, Copy, Debug)]
enum Origin {
    /// A part of a guest request whose result the guest sees.
    Guest(u64),
    /// The copy of a guest write sent to the target while copying: its failure fails the
    /// migration, not the guest's request.
    GuestMirror(u64),
    CopyRead(u64),
    CopyWrite(u64),
    /// The mirror's own flush of the target before the source goes (see
    /// [`MirrorControl::flush_target`]).
    TargetFlush,
}

struct GuestOp {
    parts: u8,
    result: io::Result<u64>,
    /// Chunks this write touches (for the per-chunk in-flight count).
    chunks: Option<(u64, u64)>,
}

/// Progress of the background copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MirrorProgress {
    /// Chunks (the copy's 1 MiB unit; the last may be shorter) in the disk.
    pub total_chunks: u64,
    /// Chunks still to copy: never copied, or written by the guest while being copied.
    pub dirty_chunks: u64,
    /// Chunks being copied now.
    pub copies_in_flight: u64,
    /// Bytes copied to the target so far, counting a chunk again each time it is recopied.
    pub bytes_copied: u64,
    /// True once the copy failed; the migration must be abandoned.
    pub failed: bool,
}

struct State {
    mode: Mode,
    source: Option<Box<dyn BlockBackend>>,
    target: Option<Box<dyn BlockBackend>>,
    capacity: u64,
    dirty: Vec<bool>,
    dirty_count: u64,
    /// Guest writes in flight per chunk: such chunks are not copied yet.
    writing: HashMap<u64, u32>,
    copying: HashMap<u64, Vec<u8>>,
    /// Where the next search for a dirty chunk starts, so each call does not rescan the
    /// clean chunks at the front.
    cursor: u64,
    /// No new copies: the migration is ending (rollback), and the halves can only be taken
    /// out once no copy uses them.
    stopped: bool,
    guest: HashMap<u64, GuestOp>,
    origins: HashMap<(Side, u64), Origin>,
    next_token: u64,
    done: Vec<Completion>,
    bytes_copied: u64,
    failed: bool,
    scratch: Vec<Completion>,
    /// The outcome of the mirror's own target flush, once it finished.
    target_flushed: Option<io::Result<()>>,
}

impl State {
    fn backend(&mut self, side: Side) -> Option<&mut Box<dyn BlockBackend>> {
        match side {
            Side::Source => self.source.as_mut(),
            Side::Target => self.target.as_mut(),
        }
    }

    fn chunk_range(&self, offset: u64, len: u64) -> (u64, u64) {
        (offset / CHUNK, (offset + len.max(1) - 1) / CHUNK)
    }

    fn mark_dirty(&mut self, first: u64, last: u64) {
        for c in first..=last.min(self.dirty.len() as u64 - 1) {
            if !self.dirty[c as usize] {
                self.dirty[c as usize] = true;
                self.dirty_count += 1;
            }
        }
    }

    fn send(&mut self, side: Side, origin: Origin, op: BlockOp) -> io::Result<()> {
        let token = self.next_token;
        self.next_token += 1;
        let backend = self.backend(side).ok_or_else(|| io::Error::other("mirror half is gone"))?;
        backend.submit(token, op)?;
        self.origins.insert((side, token), origin);
        Ok(())
    }

    /// Starts the copy of one dirty chunk nobody is writing, within the in-flight limit.
    fn start_copies(&mut self) {
        if self.mode != Mode::Copying || self.failed || self.stopped {
            return;
        }
        let chunks = self.dirty.len() as u64;
        let limit = (self.copying.len() + 1).min(MAX_COPIES);
        // One lap at most, starting where the last search left off.
        for step in 0..chunks {
            if self.copying.len() >= limit || self.dirty_count == 0 {
                break;
            }
            let c = (self.cursor + step) % chunks;
            if !self.dirty[c as usize] || self.copying.contains_key(&c) || self.writing.contains_key(&c) {
                continue;
            }
            self.cursor = (c + 1) % chunks;
            if !self.source.as_ref().is_some_and(|s| s.can_submit()) {
                break;
            }
            // Clean from here on: a guest write that starts later re-dirties the chunk.
            self.dirty[c as usize] = false;
            self.dirty_count -= 1;
            let len = CHUNK.min(self.capacity - c * CHUNK) as usize;
            let mut buf = vec![0u8; len];
            let read = BlockOp::Read { offset: c * CHUNK, bufs: vec![IoBuf { addr: buf.as_mut_ptr(), len }] };
            // The buffer's heap allocation does not move when the Vec moves into the map.
            self.copying.insert(c, buf);
            if self.send(Side::Source, Origin::CopyRead(c), read).is_err() {
                self.copy_failed(c);
            }
        }
    }

    fn copy_failed(&mut self, chunk: u64) {
        self.copying.remove(&chunk);
        self.failed = true;
    }

    /// Requests of the mirror's own still in flight on `side`.
    fn in_flight_on(&self, side: Side) -> usize {
        self.origins.keys().filter(|(s, _)| *s == side).count()
    }

    /// Collects inner completions and advances guest ops and copies.
    fn pump(&mut self) {
        for side in [Side::Source, Side::Target] {
            let mut out = std::mem::take(&mut self.scratch);
            if let Some(b) = self.backend(side) {
                b.poll_completions(&mut out);
            }
            for (token, result) in out.drain(..) {
                let Some(origin) = self.origins.remove(&(side, token)) else { continue };
                self.complete(origin, result);
            }
            self.scratch = out;
        }
    }

    fn complete(&mut self, origin: Origin, result: io::Result<u64>) {
        match origin {
            Origin::Guest(outer) | Origin::GuestMirror(outer) => {
                let Some(op) = self.guest.get_mut(&outer) else { return };
                op.parts -= 1;
                match (result, origin) {
                    (Ok(_), _) => {}
                    (Err(_), Origin::GuestMirror(_)) => self.failed = true,
                    (Err(e), _) => op.result = Err(e),
                }
                if op.parts == 0
                    && let Some(op) = self.guest.remove(&outer)
                {
                    if let Some((first, last)) = op.chunks {
                        for c in first..=last {
                            if let Some(n) = self.writing.get_mut(&c) {
                                *n -= 1;
                                if *n == 0 {
                                    self.writing.remove(&c);
                                }
                            }
                        }
                    }
                    self.done.push((outer, op.result));
                }
            }
            Origin::TargetFlush => self.target_flushed = Some(result.map(|_| ())),
            Origin::CopyRead(c) => {
                if result.is_err() {
                    return self.copy_failed(c);
                }
                let Some(buf) = self.copying.get_mut(&c) else { return };
                let write =
                    BlockOp::Write { offset: c * CHUNK, bufs: vec![IoBuf { addr: buf.as_mut_ptr(), len: buf.len() }] };
                if self.send(Side::Target, Origin::CopyWrite(c), write).is_err() {
                    self.copy_failed(c);
                }
            }
            Origin::CopyWrite(c) => {
                if result.is_err() {
                    return self.copy_failed(c);
                }
                if let Some(buf) = self.copying.remove(&c) {
                    self.bytes_copied += buf.len() as u64;
                }
            }
        }
    }

    fn flush_inner(&mut self) {
        for side in [Side::Source, Side::Target] {
            if let Some(b) = self.backend(side) {
                let _ = b.flush();
            }
        }
    }

    fn progress(&self) -> MirrorProgress {
        MirrorProgress {
            total_chunks: self.dirty.len() as u64,
            dirty_chunks: self.dirty_count,
            copies_in_flight: self.copying.len() as u64,
            bytes_copied: self.bytes_copied,
            failed: self.failed,
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// The mirror as the disk sees it.
pub struct MirrorBackend {
    state: Arc<Mutex<State>>,
    ready: Arc<ReadySet>,
    info: BlockInfo,
}

/// The migration's handle on the mirror.
pub struct MirrorControl {
    state: Arc<Mutex<State>>,
    ready: Arc<ReadySet>,
}

/// Which backend to take out of a finished mirror.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Half {
    /// The backend being copied from (the disk's original).
    Source,
    /// The backend being copied to.
    Target,
}

impl MirrorBackend {
    /// A mirror copying `source` to `target`, which must have the same capacity.
    pub fn new(source: Box<dyn BlockBackend>, target: Box<dyn BlockBackend>) -> io::Result<(Self, MirrorControl)> {
        let (mirror, control) = Self::detached(source.info(), target)?;
        control.attach_source(source).map_err(|(e, _)| e)?;
        Ok((mirror, control))
    }

    /// A mirror for a source described by `si`, which is attached later with
    /// [`MirrorControl::attach_source`]: the disk hands over its backend only when the mirror
    /// takes its place. Nothing may be submitted before the source is attached.
    pub fn detached(si: &BlockInfo, target: Box<dyn BlockBackend>) -> io::Result<(Self, MirrorControl)> {
        let ti = target.info().clone();
        if si.capacity != ti.capacity {
            return Err(io::Error::other(format!("target is {} bytes, the disk is {}", ti.capacity, si.capacity)));
        }
        if ti.read_only {
            return Err(io::Error::other("the migration target is read-only"));
        }
        let ready = Arc::new(ReadySet::new()?);
        ready.watch(target.completion_fd())?;
        let chunks = si.capacity.div_ceil(CHUNK);
        let info = BlockInfo {
            capacity: si.capacity,
            read_only: si.read_only,
            discard: si.discard && ti.discard,
            write_zeroes: si.write_zeroes && ti.write_zeroes,
            description: format!("mirror {} -> {}", si.description, ti.description),
            image: None,
        };
        let state = State {
            mode: Mode::Copying,
            source: None,
            target: Some(target),
            capacity: si.capacity,
            dirty: vec![true; chunks as usize],
            dirty_count: chunks,
            writing: HashMap::new(),
            copying: HashMap::new(),
            guest: HashMap::new(),
            cursor: 0,
            stopped: false,
            origins: HashMap::new(),
            next_token: FIRST_TOKEN,
            done: Vec::new(),
            bytes_copied: 0,
            failed: false,
            scratch: Vec::new(),
            target_flushed: None,
        };
        let state = Arc::new(Mutex::new(state));
        Ok((Self { state: state.clone(), ready: ready.clone(), info }, MirrorControl { state, ready }))
    }
}

impl BlockBackend for MirrorBackend {
    fn info(&self) -> &BlockInfo {
        &self.info
    }

    fn submit(&mut self, outer: u64, op: BlockOp) -> io::Result<()> {
        let mut s = lock(&self.state);
        let copying = s.mode == Mode::Copying;
        // Copying: the source serves everything. Write-through: the target serves the guest and
        // writes (and flushes) go to the source as well.
        let (primary, secondary) = if copying { (Side::Source, Side::Target) } else { (Side::Target, Side::Source) };
        let expected = match &op {
            BlockOp::Read { bufs, .. } | BlockOp::Write { bufs, .. } => super::total_len(bufs),
            _ => 0,
        };
        let chunks = match &op {
            BlockOp::Write { offset, bufs } => Some(s.chunk_range(*offset, super::total_len(bufs))),
            BlockOp::Discard { offset, len } | BlockOp::WriteZeroes { offset, len } => {
                Some(s.chunk_range(*offset, *len))
            }
            BlockOp::Read { .. } | BlockOp::Flush => None,
        };
        // Writes go to both halves in either mode; flushes matter only for the half whose
        // data the guest relies on being durable, which in write-through is both.
        // In write-through without a source (dropped at commit), the target serves alone.
        let source_gone = !copying && s.source.is_none();
        let mirrored = (chunks.is_some() || (matches!(op, BlockOp::Flush) && !copying)) && !source_gone;
        let parts = if mirrored { 2 } else { 1 };
        let tracked = if copying { chunks } else { None };
        if let Some((first, last)) = tracked {
            for c in first..=last {
                if s.copying.contains_key(&c) {
                    s.mark_dirty(c, c);
                }
                *s.writing.entry(c).or_insert(0) += 1;
            }
        }
        s.guest.insert(outer, GuestOp { parts, result: Ok(expected), chunks: tracked });
        let second = (parts == 2).then(|| duplicate(&op));
        if let Err(e) = s.send(primary, Origin::Guest(outer), op) {
            s.complete(Origin::Guest(outer), Err(e));
        }
        let second_origin = if copying { Origin::GuestMirror(outer) } else { Origin::Guest(outer) };
        if let Some(op) = second
            && let Err(e) = s.send(secondary, second_origin, op)
        {
            s.complete(second_origin, Err(e));
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        lock(&self.state).flush_inner();
        Ok(())
    }

    fn can_submit(&self) -> bool {
        let s = lock(&self.state);
        s.source.as_ref().is_some_and(|b| b.can_submit()) && s.target.as_ref().is_some_and(|b| b.can_submit())
    }

    fn poll_completions(&mut self, out: &mut Vec<Completion>) {
        self.ready.clear();
        let mut s = lock(&self.state);
        let started = Instant::now();
        loop {
            let before = (s.bytes_copied, s.copying.len());
            s.pump();
            s.start_copies();
            s.flush_inner();
            let progressed = (s.bytes_copied, s.copying.len()) != before;
            if !progressed || s.mode != Mode::Copying || started.elapsed() >= COPY_SLICE {
                break;
            }
        }
        s.pump();
        out.append(&mut s.done);
        // With nothing in flight to wake us (synchronous engines complete inline), come back
        // for the rest of the copy after the device has had its turn.
        if s.mode == Mode::Copying
            && s.dirty_count > 0
            && !s.failed
            && !s.stopped
            && s.copying.is_empty()
            && s.writing.is_empty()
        {
            self.ready.signal();
        }
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.ready.fd())
    }

    fn in_flight(&self) -> usize {
        let s = lock(&self.state);
        s.guest.len() + s.copying.len()
    }
}

/// A second instance of a mirrored operation, for the other half.
fn duplicate(op: &BlockOp) -> BlockOp {
    match op {
        BlockOp::Read { offset, bufs } => BlockOp::Read { offset: *offset, bufs: bufs.clone() },
        BlockOp::Write { offset, bufs } => BlockOp::Write { offset: *offset, bufs: bufs.clone() },
        BlockOp::Flush => BlockOp::Flush,
        BlockOp::Discard { offset, len } => BlockOp::Discard { offset: *offset, len: *len },
        BlockOp::WriteZeroes { offset, len } => BlockOp::WriteZeroes { offset: *offset, len: *len },
    }
}

impl Drop for State {
    fn drop(&mut self) {
        // A copy still in flight when the mirror goes (a half stalled and was abandoned): the
        // engine may yet write into its buffer, which must therefore outlive us. Bounded by
        // MAX_COPIES chunks, and only on that failure path.
        if !self.copying.is_empty() {
            log::warn!("leaking {} copy buffer(s) still in use by a stalled migration half", self.copying.len());
            for (_, buf) in self.copying.drain() {
                std::mem::forget(buf);
            }
        }
    }
}

impl MirrorControl {
    /// Gives the mirror its source and starts copying without waiting for the guest. On
    /// failure the source comes back with the error, so the caller can reinstall it.
    pub fn attach_source(&self, source: Box<dyn BlockBackend>) -> Result<(), (io::Error, Box<dyn BlockBackend>)> {
        if let Err(e) = self.ready.watch(source.completion_fd()) {
            return Err((e, source));
        }
        lock(&self.state).source = Some(source);
        self.ready.signal();
        Ok(())
    }

    /// Starts no more copies and waits (up to `timeout`) for those in flight, so both halves
    /// can be taken out. Call before [`take`](Self::take) when abandoning a migration that is
    /// still copying. Returns the number of the mirror's requests still in flight on timeout.
    pub fn stop_copying(&self, timeout: Duration) -> Result<(), usize> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut s = lock(&self.state);
                s.stopped = true;
                s.pump();
                // A finished read has its write queued to the target: send it.
                s.flush_inner();
                if !s.done.is_empty() {
                    // Guest completions collected here: the device must come and take them.
                    self.ready.signal();
                }
                if s.copying.is_empty() {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    return Err(s.copying.len());
                }
            }
            self.ready.wait(1);
        }
    }

    /// The copy's progress now.
    pub fn progress(&self) -> MirrorProgress {
        lock(&self.state).progress()
    }

    /// Copies what is still dirty and flips to write-through. Call with the disk quiesced and
    /// drained, so no guest write can start; returns the bytes copied in this last step.
    pub fn finish_copy(&self, timeout: Duration) -> io::Result<u64> {
        let deadline = Instant::now() + timeout;
        let start = lock(&self.state).bytes_copied;
        loop {
            {
                let mut s = lock(&self.state);
                s.pump();
                s.start_copies();
                s.flush_inner();
                if s.failed {
                    return Err(io::Error::other("copying to the target failed"));
                }
                if s.dirty_count == 0 && s.copying.is_empty() {
                    // The target now holds every byte: it serves the guest from here on.
                    s.mode = Mode::WriteThrough;
                    return Ok(s.bytes_copied - start);
                }
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "final copy did not finish in time"));
            }
            self.ready.wait(1);
        }
    }

    /// Makes everything written to the target durable, waiting up to `timeout`; call in
    /// write-through, before the source goes. A guest flush during the copy reached only the
    /// source, so until this the source may be the only durable copy of what it covered.
    pub fn flush_target(&self, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        {
            let mut s = lock(&self.state);
            s.target_flushed = None;
            s.send(Side::Target, Origin::TargetFlush, BlockOp::Flush)?;
            s.flush_inner();
        }
        loop {
            {
                let mut s = lock(&self.state);
                s.pump();
                if !s.done.is_empty() {
                    // Guest completions collected here: the device must come and take them.
                    self.ready.signal();
                }
                if let Some(result) = s.target_flushed.take() {
                    return result;
                }
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "flushing the target did not finish in time"));
            }
            self.ready.wait(1);
        }
    }

    /// Gives up on the source in write-through: the guest's requests no longer wait for their
    /// part on it, and new ones are not sent there. For a commit that finds the source stalled:
    /// the target already holds every byte, the source was only kept for a rollback, which is
    /// no longer possible afterwards. Only when every unfinished guest request waits on the
    /// source alone (a target that is stuck too keeps the source, for the rollback). Returns
    /// how many of the source's requests were abandoned; the source is closed.
    pub fn drop_source(&self) -> usize {
        let mut s = lock(&self.state);
        let target_busy = s.origins.iter().any(|((side, _), o)| *side == Side::Target && matches!(o, Origin::Guest(_)));
        if s.mode != Mode::WriteThrough || target_busy {
            return 0;
        }
        let stalled: Vec<(Side, u64)> = s.origins.keys().filter(|(side, _)| *side == Side::Source).copied().collect();
        for key in &stalled {
            if let Some(origin) = s.origins.remove(key) {
                s.complete(origin, Ok(0));
            }
        }
        let source = s.source.take();
        if !s.done.is_empty() {
            self.ready.signal();
        }
        drop(s);
        // Out of the lock: closing a stalled engine may wait for it a while.
        self.ready.unwatch(source.as_ref().and_then(|b| b.completion_fd()));
        drop(source);
        stalled.len()
    }

    /// Takes one half out of a mirror that is no longer in use (after commit or rollback the
    /// disk holds the chosen half again): the disk quiesced and drained, copies stopped. A
    /// request of the mirror's still in flight on the half (it stalled) completes later with a
    /// token the disk does not know, and is ignored.
    pub fn take(&self, half: Half) -> Option<Box<dyn BlockBackend>> {
        let mut s = lock(&self.state);
        let side = match half {
            Half::Source => Side::Source,
            Half::Target => Side::Target,
        };
        let stray = s.in_flight_on(side);
        if stray > 0 {
            log::warn!("taking the migration's {half:?} half with {stray} of its request(s) unfinished");
        }
        let taken = match half {
            Half::Source => s.source.take(),
            Half::Target => s.target.take(),
        };
        self.ready.unwatch(taken.as_ref().and_then(|b| b.completion_fd()));
        taken
    }

    /// Chunks still to copy, for deciding when to switch.
    pub fn dirty_chunks(&self) -> u64 {
        lock(&self.state).dirty_count
    }

    /// Whether nothing is in flight: no guest request and no background copy (used in tests).
    pub fn idle(&self) -> bool {
        let s = lock(&self.state);
        s.guest.is_empty() && s.copying.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::blk::{FileBackend, UringBackend};

    fn file(tag: &str, fill: impl Fn(usize) -> u8, size: usize) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("mirror-{tag}-{}", std::process::id()));
        let data: Vec<u8> = (0..size).map(fill).collect();
        std::fs::File::create(&path).unwrap().write_all(&data).unwrap();
        path
    }

    /// Polls the mirror like the event loop would, until `pending` guest ops are back.
    fn pump_until(m: &mut MirrorBackend, pending: &mut usize, done: &mut Vec<Completion>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while *pending > 0 {
            assert!(Instant::now() < deadline, "mirror completions stalled");
            m.ready.wait(5);
            let before = done.len();
            m.poll_completions(done);
            *pending -= done.len() - before;
        }
    }

    fn migrate_under_writes(engine: &str, open: fn(&std::path::Path) -> Box<dyn BlockBackend>) {
        const SIZE: usize = 8 << 20;
        let src = file(&format!("{engine}-src"), |i| (i / 4096) as u8, SIZE);
        let dst = file(&format!("{engine}-dst"), |_| 0, SIZE);
        let (mut m, control) = MirrorBackend::new(open(&src), open(&dst)).unwrap();
        let mut done = Vec::new();
        let mut buffers = Vec::new();
        let mut pending = 0usize;
        // Guest writes land while the copy runs: each 4 KiB block gets a new value.
        for round in 0..64u64 {
            let offset = (round * 131 % 2048) * 4096;
            let mut buf = vec![0xa0 + (round % 16) as u8; 4096];
            let bufs = vec![IoBuf { addr: buf.as_mut_ptr(), len: 4096 }];
            m.submit(round, BlockOp::Write { offset, bufs }).unwrap();
            m.flush().unwrap();
            buffers.push(buf);
            pending += 1;
            m.poll_completions(&mut done);
            pending -= done.len().min(pending);
            done.clear();
        }
        pump_until(&mut m, &mut pending, &mut done);
        assert!(done.iter().all(|(_, r)| r.is_ok()));
        // Let the background copy get nearly everything (as the migration waits for).
        let deadline = Instant::now() + Duration::from_secs(20);
        while control.dirty_chunks() > 2 {
            assert!(Instant::now() < deadline, "copy made no progress: {:?}", control.progress());
            m.ready.wait(5);
            m.poll_completions(&mut done);
        }
        // Writes after the copy caught up are mirrored, so nothing is dirty again.
        for round in 0..32u64 {
            let mut buf = vec![0xc0 + round as u8; 4096];
            let bufs = vec![IoBuf { addr: buf.as_mut_ptr(), len: 4096 }];
            m.submit(100 + round, BlockOp::Write { offset: (round * 523 % 2048) * 4096, bufs }).unwrap();
            m.flush().unwrap();
            buffers.push(buf);
            pending += 1;
        }
        pump_until(&mut m, &mut pending, &mut done);
        while control.progress().copies_in_flight > 0 || control.dirty_chunks() > 0 {
            assert!(Instant::now() < deadline, "copy made no progress: {:?}", control.progress());
            m.ready.wait(5);
            m.poll_completions(&mut done);
        }
        assert_eq!(control.finish_copy(Duration::from_secs(10)).unwrap(), 0, "nothing left for the blackout");
        assert_eq!(control.progress().dirty_chunks, 0);
        assert!(control.progress().bytes_copied >= SIZE as u64);
        // Write-through: a write now lands in both files.
        let mut last = vec![0x5a; 4096];
        m.submit(1000, BlockOp::Write { offset: 0, bufs: vec![IoBuf { addr: last.as_mut_ptr(), len: 4096 }] }).unwrap();
        m.flush().unwrap();
        let mut pending = 1;
        pump_until(&mut m, &mut pending, &mut done);
        assert!(control.idle());
        control.flush_target(Duration::from_secs(10)).unwrap();
        let (a, b) = (std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        assert!(a == b, "source and target differ after the migration");
        assert_eq!(&b[..4096], &last[..]);
        assert!(control.take(Half::Target).is_some());
        assert!(control.take(Half::Target).is_none());
        std::fs::remove_file(src).unwrap();
        std::fs::remove_file(dst).unwrap();
    }

    #[test]
    fn migration_converges_under_writes_sync_engine() {
        migrate_under_writes("sync", |p| Box::new(FileBackend::open(p, false).unwrap()));
    }

    #[test]
    fn migration_converges_under_writes_io_uring_engine() {
        migrate_under_writes("uring", |p| Box::new(UringBackend::open(p, false).unwrap()));
    }

    #[test]
    fn a_failing_target_fails_the_migration_not_the_guest() {
        use crate::blk::{Fault, FaultyBackend};
        let src = file("fail-src", |_| 1, 4 << 20);
        let dst = file("fail-dst", |_| 0, 4 << 20);
        let target =
            Box::new(FaultyBackend::new(Box::new(FileBackend::open(&dst, false).unwrap()), Fault::Error).unwrap());
        let (mut m, control) = MirrorBackend::new(Box::new(FileBackend::open(&src, false).unwrap()), target).unwrap();
        let mut buf = vec![7u8; 4096];
        m.submit(1, BlockOp::Write { offset: 8192, bufs: vec![IoBuf { addr: buf.as_mut_ptr(), len: 4096 }] }).unwrap();
        m.flush().unwrap();
        let (mut pending, mut done) = (1, Vec::new());
        pump_until(&mut m, &mut pending, &mut done);
        assert!(done.iter().all(|(_, r)| r.is_ok()), "the guest's write succeeded: {done:?}");
        assert!(control.progress().failed);
        assert!(control.flush_target(Duration::from_secs(10)).is_err(), "nor can the target be flushed");
        assert_eq!(std::fs::read(&src).unwrap()[8192], 7);
        std::fs::remove_file(src).unwrap();
        std::fs::remove_file(dst).unwrap();
    }

    #[test]
    fn stopping_waits_for_copies_in_flight_and_starts_no_more() {
        const SIZE: usize = 16 << 20;
        let src = file("stop-src", |i| (i >> 20) as u8, SIZE);
        let dst = file("stop-dst", |_| 0, SIZE);
        let open = |p: &std::path::Path| -> Box<dyn BlockBackend> { Box::new(UringBackend::open(p, false).unwrap()) };
        let (mut m, control) = MirrorBackend::new(open(&src), open(&dst)).unwrap();
        let mut done = Vec::new();
        // io_uring copies complete asynchronously: after one look some are in flight.
        m.poll_completions(&mut done);
        assert!(control.progress().copies_in_flight > 0, "{:?}", control.progress());
        control.stop_copying(Duration::from_secs(10)).unwrap();
        let stopped = control.progress();
        assert_eq!(stopped.copies_in_flight, 0);
        assert!(stopped.dirty_chunks > 0, "the copy was stopped before the end: {stopped:?}");
        m.poll_completions(&mut done);
        assert_eq!(control.progress(), stopped, "nothing new started after the stop");
        // Both halves come out idle, and what was copied is the source's data.
        assert!(control.idle());
        let source = control.take(Half::Source).expect("source");
        assert_eq!(source.in_flight(), 0);
        drop(control.take(Half::Target));
        let (a, b) = (std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        for chunk in 0..SIZE / CHUNK as usize {
            let range = chunk * CHUNK as usize..(chunk + 1) * CHUNK as usize;
            assert!(b[range.clone()] == a[range.clone()] || b[range].iter().all(|&x| x == 0), "chunk {chunk} torn");
        }
        std::fs::remove_file(src).unwrap();
        std::fs::remove_file(dst).unwrap();
    }

    #[test]
    fn a_source_that_stalls_in_write_through_can_be_dropped() {
        use crate::blk::{Fault, FaultyBackend};
        const SIZE: usize = 4 << 20;
        let src = file("drop-src", |_| 1, SIZE);
        let dst = file("drop-dst", |_| 0, SIZE);
        // The source serves the copy's reads, then stalls.
        let reads = (SIZE as u64).div_ceil(CHUNK);
        let source = FaultyBackend::new(Box::new(FileBackend::open(&src, false).unwrap()), Fault::StallAfter(reads));
        let target = Box::new(FileBackend::open(&dst, false).unwrap());
        let (mut m, control) = MirrorBackend::new(Box::new(source.unwrap()), target).unwrap();
        let mut done = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while control.dirty_chunks() > 0 || control.progress().copies_in_flight > 0 {
            assert!(Instant::now() < deadline, "copy made no progress: {:?}", control.progress());
            m.ready.wait(5);
            m.poll_completions(&mut done);
        }
        control.finish_copy(Duration::from_secs(10)).unwrap();
        let mut buf = vec![9u8; 4096];
        m.submit(1, BlockOp::Write { offset: 0, bufs: vec![IoBuf { addr: buf.as_mut_ptr(), len: 4096 }] }).unwrap();
        m.flush().unwrap();
        m.poll_completions(&mut done);
        assert!(done.is_empty(), "the write waits for the stalled source");
        assert_eq!(control.drop_source(), 1);
        m.poll_completions(&mut done);
        assert!(matches!(done.as_slice(), [(1, Ok(_))]), "{done:?}");
        // From now on the target alone serves.
        m.submit(2, BlockOp::Flush).unwrap();
        m.flush().unwrap();
        let mut pending = 1;
        done.clear();
        pump_until(&mut m, &mut pending, &mut done);
        assert_eq!(std::fs::read(&dst).unwrap()[..4096], buf[..]);
        drop(m);
        drop(control);
        std::fs::remove_file(src).unwrap();
        std::fs::remove_file(dst).unwrap();
    }

    #[test]
    fn size_mismatch_is_refused() {
        let a = file("size-a", |_| 0, 4 << 20);
        let b = file("size-b", |_| 0, 8 << 20);
        let open = |p: &std::path::Path| -> Box<dyn BlockBackend> { Box::new(FileBackend::open(p, false).unwrap()) };
        assert!(MirrorBackend::new(open(&a), open(&b)).is_err());
        std::fs::remove_file(a).unwrap();
        std::fs::remove_file(b).unwrap();
    }
}
