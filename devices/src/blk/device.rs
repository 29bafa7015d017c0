//! The virtio-blk device: takes requests from its queue, hands them to its backend, and returns
//! completions to the guest in whatever order the backend finishes them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use event_manager::EventSet;
use virtio_queue::QueueT;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryLoadGuard};

use super::backend::{BlockBackend, BlockOp, Completion, IoBuf};
use super::request::{self, Limits, Rejected, Request, RequestKind, SECTOR_SIZE, Segment};
use super::undo::UndoLog;
use crate::interrupt::InterruptLine;
use crate::lifecycle::{BackendSlot, Incompatible};
use crate::metrics::RequestMetrics;
use crate::virtio::{
    ActivateError, DEVICE_TOKEN_BASE, DeviceType, EventSource, QueueProcessor, VirtioCore, VirtioDevice, features,
};
use crate::{GuestMem, SharedGuestMem};

/// Descriptors per queue; also bounds a chain's length.
pub const BLOCK_QUEUE_SIZE: u16 = 256;
const REQUEST_QUEUE: usize = 0;
const COMPLETION_TOKEN: u32 = DEVICE_TOKEN_BASE;

mod feature {
    pub const SEG_MAX: u64 = 1 << 2;
    pub const RO: u64 = 1 << 5;
    pub const BLK_SIZE: u64 = 1 << 6;
    pub const FLUSH: u64 = 1 << 9;
    pub const DISCARD: u64 = 1 << 13;
    pub const WRITE_ZEROES: u64 = 1 << 14;
}

/// A request the backend is working on.
struct InFlight {
    /// Kept so the request can be retried on another backend (see probation).
    req: Request,
    head: u16,
    status: GuestAddress,
    /// Bytes the device writes into the chain on success (data for reads, plus the status).
    used_len: u32,
    started: Instant,
    bytes_read: u64,
    bytes_written: u64,
    /// The driver reset the device since: complete silently.
    orphaned: bool,
    /// Keeps the guest mapping the backend writes into alive until completion.
    _mem: GuestMemoryLoadGuard<GuestMem>,
}

/// A virtio-blk device with one request queue, serving a swappable [`BlockBackend`].
pub struct VirtioBlock {
    core: VirtioCore,
    backend: Box<dyn BlockBackend>,
    id: [u8; request::ID_BYTES],
    inflight: HashMap<u64, InFlight>,
    next_token: u64,
    /// The backend was full: retry the queue when completions free room.
    blocked: bool,
    completions: Vec<Completion>,
    metrics: Arc<RequestMetrics>,
    /// Under probation (a backend swap being verified), failed requests are held here instead
    /// of failing to the guest; they are retried first on the next backend.
    probation: bool,
    held: VecDeque<Request>,
    probation_failures: u64,
    /// Requests still in flight on the backend a swap replaced: the swap does not wait for
    /// them with the disk stopped, they finish there (see `drain_previous`).
    on_previous: HashSet<u64>,
    /// Outcomes of those requests, counted in the metrics only once probation ends: a swap's
    /// health check reads the metrics, and must judge the new backend by its own results.
    deferred: Vec<(std::time::Duration, bool, u64, u64)>,
    /// Saves what writes overwrite, so that they can be undone (see [`UndoLog`]).
    undo: Option<UndoLog>,
}

/// How a new backend takes over a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Takeover {
    /// The same data through another engine or path: same size, same image where known.
    SameData,
    /// A copy of the data, made by a live migration: same size, any image.
    CopiedData,
    /// A different disk (the guest is told): any size.
    NewImage,
}

impl VirtioBlock {
    /// A block device serving `backend`; `id` is what GET_ID returns (truncated to 20 bytes).
    pub fn new(
        backend: Box<dyn BlockBackend>,
        id: &str,
        interrupt: Box<dyn InterruptLine>,
        memory: SharedGuestMem,
    ) -> std::io::Result<Self> {
        let info = backend.info();
        let mut avail =
            features::VERSION_1 | features::RING_EVENT_IDX | feature::SEG_MAX | feature::BLK_SIZE | feature::FLUSH;
        if info.read_only {
            avail |= feature::RO;
        }
        if info.discard {
            avail |= feature::DISCARD;
        }
        if info.write_zeroes {
            avail |= feature::WRITE_ZEROES;
        }
        let core = VirtioCore::new(DeviceType::Block, avail, &[BLOCK_QUEUE_SIZE], interrupt, memory)?;
        let mut id_bytes = [0u8; request::ID_BYTES];
        let n = id.len().min(request::ID_BYTES);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(Self {
            core,
            backend,
            id: id_bytes,
            inflight: HashMap::new(),
            next_token: 0,
            blocked: false,
            completions: Vec::new(),
            metrics: Arc::new(RequestMetrics::default()),
            probation: false,
            held: VecDeque::new(),
            probation_failures: 0,
            on_previous: HashSet::new(),
            deferred: Vec::new(),
            undo: None,
        })
    }

    /// From now on, saves what each write overwrites into `undo` before the write starts,
    /// whichever backend serves it; a write whose old contents cannot be saved fails.
    pub fn log_overwrites(&mut self, undo: UndoLog) {
        self.undo = Some(undo);
    }

    /// The backend now serving the disk.
    pub fn backend(&self) -> &dyn BlockBackend {
        &*self.backend
    }

    /// Whether `new` can take over the disk in the way `takeover` says, keeping the promises
    /// made to the guest: the features it was offered, read-only, and unless the image is
    /// replaced, the size and (as far as the backends can tell) the data.
    pub fn check_takeover(&self, new: &dyn BlockBackend, takeover: Takeover) -> Result<(), Incompatible> {
        let (old, new) = (self.backend.info(), new.info());
        if takeover != Takeover::NewImage && old.capacity != new.capacity {
            return Err(Incompatible(format!(
                "capacity differs: {} bytes now, {} bytes offered (a different disk needs a new-image swap)",
                old.capacity, new.capacity
            )));
        }
        let same_image = match (old.image, new.image) {
            (Some(a), Some(b)) => Some(a == b),
            _ => None,
        };
        if takeover == Takeover::CopiedData && same_image == Some(true) {
            // The copy would read and write the very file the guest writes: a chunk copied
            // around a guest write could put the older data back over it.
            return Err(Incompatible(format!("{} is the disk's own image: nothing to migrate", new.description)));
        }
        if takeover == Takeover::SameData && same_image == Some(false) {
            return Err(Incompatible(format!(
                "{} is another file than the disk's ({}): a switch keeps the guest's data, so copy it \
                 with a migration, or replace it with a new-image swap",
                new.description, old.description
            )));
        }
        // The guest was offered these when the device was created; it may use them any time.
        let offered = self.core.avail_features;
        for (bit, name, supported) in
            [(feature::DISCARD, "discard", new.discard), (feature::WRITE_ZEROES, "write-zeroes", new.write_zeroes)]
        {
            if offered & bit != 0 && !supported {
                return Err(Incompatible(format!("the guest was offered {name}, which the new backend lacks")));
            }
        }
        if old.read_only != new.read_only {
            return Err(Incompatible(format!(
                "read-only differs: {} now, {} offered",
                if old.read_only { "read-only" } else { "read-write" },
                if new.read_only { "read-only" } else { "read-write" }
            )));
        }
        Ok(())
    }

    /// The device's request counters, shared: they stay the same across backend swaps.
    pub fn metrics(&self) -> Arc<RequestMetrics> {
        self.metrics.clone()
    }

    fn limits(&self) -> Limits {
        let info = self.backend.info();
        Limits {
            capacity_sectors: info.capacity / SECTOR_SIZE,
            read_only: info.read_only,
            discard: info.discard,
            write_zeroes: info.write_zeroes,
            // seg_max (what the config space announces) plus the header and the status.
            max_descriptors: usize::from(BLOCK_QUEUE_SIZE),
        }
    }

    fn process_queue(&mut self) {
        let limits = self.limits();
        let Self { core, backend, inflight, next_token, blocked, metrics, id, held, undo, .. } = self;
        // Requests held from a failed or abandoned backend go first: the guest has waited
        // longest for them (virtio promises no order among requests in flight).
        *blocked = false;
        while !core.quiesced() && backend.can_submit() {
            let Some(req) = held.pop_front() else { break };
            start(core, &mut **backend, inflight, next_token, metrics, id, req);
        }
        if !held.is_empty() {
            *blocked = true;
        }
        QueueProcessor::drain(core, REQUEST_QUEUE, |core, chain| {
            if *blocked {
                QueueProcessor::unpop(core, REQUEST_QUEUE);
                return false;
            }
            if !backend.can_submit() {
                QueueProcessor::unpop(core, REQUEST_QUEUE);
                *blocked = true;
                return false;
            }
            let mem = core.mem();
            match request::parse(chain, &mem, &limits).and_then(|req| save_overwritten(undo.as_ref(), req)) {
                Ok(req) => start(core, &mut **backend, inflight, next_token, metrics, id, req),
                Err(rejected) => reject(core, metrics, rejected),
            }
            true
        });
        if let Err(e) = self.backend.flush() {
            self.core.guest_error("backend could not start requests", format_args!("{e}"));
        }
        self.reap();
    }

    /// Returns finished requests to the guest.
    fn reap(&mut self) {
        self.backend.poll_completions(&mut self.completions);
        self.finish_completions();
    }

    /// Returns the requests in `completions` to the guest, from whichever backend they came.
    fn finish_completions(&mut self) {
        if self.completions.is_empty() {
            return;
        }
        let mut returned = false;
        for (token, result) in self.completions.drain(..) {
            let Some(done) = self.inflight.remove(&token) else {
                continue;
            };
            // The swapped-out backend's results are its own: not held against the new one.
            let previous = self.on_previous.remove(&token);
            if done.orphaned {
                continue;
            }
            if result.is_err() && self.probation && !previous {
                self.probation_failures += 1;
                self.held.push_back(done.req);
                continue;
            }
            let ok = result.is_ok();
            if let Err(e) = &result {
                self.core.guest_error("backend I/O error", format_args!("{e}"));
            }
            if done.req.kind == RequestKind::Read {
                // Even a failed read may have written part of its buffers.
                mark_written(&done._mem, &done.req.data);
            }
            let code = if ok { request::status::OK } else { request::status::IOERR };
            let used_len = if ok { done.used_len } else { 1 };
            let _ = done._mem.write_obj(code, done.status);
            let mem = self.core.mem();
            if self.core.queues[REQUEST_QUEUE].add_used(&*mem, done.head, used_len).is_err() {
                self.core.guest_error("bad used ring", format_args!("head {}", done.head));
            }
            let outcome = (done.started.elapsed(), ok, done.bytes_read, done.bytes_written);
            match previous && self.probation {
                true => self.deferred.push(outcome),
                false => self.metrics.record(outcome.0, outcome.1, outcome.2, outcome.3),
            }
            returned = true;
        }
        if returned {
            self.core.notify_if_needed(REQUEST_QUEUE);
        }
        if self.blocked && self.backend.can_submit() && !self.core.quiesced() {
            self.blocked = false;
            self.process_queue();
        }
    }
}

/// Converts guest segments into host buffers; `None` if any lies outside guest memory.
fn host_buffers(mem: &GuestMem, segs: &[Segment]) -> Option<Vec<IoBuf>> {
    segs.iter()
        .map(|s| {
            let slice = mem.get_slice(s.addr, s.len as usize).ok()?;
            Some(IoBuf { addr: slice.ptr_guard_mut().as_ptr(), len: s.len as usize })
        })
        .collect()
}

/// Records that `segs` were written into guest memory: backends fill read buffers through raw
/// pointers (`preadv`, io_uring, a socket), which vm-memory's dirty bitmap cannot see, and
/// dirty tracking (diff snapshots, replication) must. Called on completion, so the page is
/// marked after its last write.
fn mark_written(mem: &GuestMem, segs: &[Segment]) {
    for seg in segs {
        if let Ok(slice) = mem.get_slice(seg.addr, seg.len as usize) {
            slice.bitmap().mark_dirty(0, seg.len as usize);
        }
    }
}

/// Completes a request that never reached the backend.
fn finish_now(core: &mut VirtioCore, head: u16, status: Option<GuestAddress>, code: u8, written: u32) {
    let mem = core.mem();
    let used_len = match status {
        Some(addr) if mem.write_obj(code, addr).is_ok() => written + 1,
        _ => 0,
    };
    drop(mem);
    core.complete(REQUEST_QUEUE, head, used_len);
}

/// Saves what `req` will overwrite into the undo log, if the disk keeps one; a request whose
/// old contents cannot be saved fails (it could not be undone).
fn save_overwritten(undo: Option<&UndoLog>, req: Request) -> Result<Request, Rejected> {
    let len = match req.kind {
        RequestKind::Write => req.data_len,
        RequestKind::Discard | RequestKind::WriteZeroes => u64::from(req.range_sectors) * SECTOR_SIZE,
        _ => return Ok(req),
    };
    let Some(undo) = undo else { return Ok(req) };
    match undo.before_write(req.sector * SECTOR_SIZE, len) {
        Ok(()) => Ok(req),
        Err(e) => {
            log::error!("virtio-blk: cannot save the blocks a write overwrites: {e}");
            let reason = "the undo log could not save what the write overwrites";
            Err(Rejected { head: req.head, status: Some(req.status), code: request::status::IOERR, reason })
        }
    }
}

fn reject(core: &mut VirtioCore, metrics: &RequestMetrics, rejected: Rejected) {
    core.guest_error(rejected.reason, format_args!("descriptor head {}", rejected.head));
    metrics.record_rejected();
    finish_now(core, rejected.head, rejected.status, rejected.code, 0);
}

fn start(
    core: &mut VirtioCore,
    backend: &mut dyn BlockBackend,
    inflight: &mut HashMap<u64, InFlight>,
    next_token: &mut u64,
    metrics: &RequestMetrics,
    id: &[u8; request::ID_BYTES],
    req: Request,
) {
    let mem = core.mem();
    let fail = |core: &mut VirtioCore, reason| {
        reject(
            core,
            metrics,
            Rejected { head: req.head, status: Some(req.status), code: request::status::IOERR, reason },
        )
    };
    let offset = req.sector * SECTOR_SIZE;
    let (op, bytes_read, bytes_written) = match req.kind {
        RequestKind::GetId => {
            let mut copied = 0usize;
            for seg in &req.data {
                let n = seg.len as usize;
                if mem.write_slice(&id[copied..copied + n], seg.addr).is_err() {
                    drop(mem);
                    return fail(core, "GET_ID buffer outside guest memory");
                }
                copied += n;
            }
            drop(mem);
            metrics.record(std::time::Duration::ZERO, true, 0, 0);
            return finish_now(core, req.head, Some(req.status), request::status::OK, req.data_len as u32);
        }
        RequestKind::Read | RequestKind::Write => {
            let Some(bufs) = host_buffers(&mem, &req.data) else {
                drop(mem);
                return fail(core, "data buffer outside guest memory");
            };
            if req.kind == RequestKind::Read {
                (BlockOp::Read { offset, bufs }, req.data_len, 0)
            } else {
                (BlockOp::Write { offset, bufs }, 0, req.data_len)
            }
        }
        RequestKind::Flush => (BlockOp::Flush, 0, 0),
        RequestKind::Discard => (BlockOp::Discard { offset, len: u64::from(req.range_sectors) * SECTOR_SIZE }, 0, 0),
        RequestKind::WriteZeroes => {
            (BlockOp::WriteZeroes { offset, len: u64::from(req.range_sectors) * SECTOR_SIZE }, 0, 0)
        }
    };
    let token = *next_token;
    *next_token = next_token.wrapping_add(1);
    let used_len = if req.kind == RequestKind::Read { req.data_len as u32 + 1 } else { 1 };
    match backend.submit(token, op) {
        Ok(()) => {
            inflight.insert(
                token,
                InFlight {
                    req: req.clone(),
                    head: req.head,
                    status: req.status,
                    used_len,
                    started: Instant::now(),
                    bytes_read,
                    bytes_written,
                    orphaned: false,
                    _mem: mem,
                },
            );
        }
        Err(e) => {
            drop(mem);
            core.guest_error("backend refused a request", format_args!("{e}"));
            fail(core, "backend refused the request");
        }
    }
}

impl VirtioDevice for VirtioBlock {
    fn core(&self) -> &VirtioCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut VirtioCore {
        &mut self.core
    }

    /// `struct virtio_blk_config` (virtio 1.x 5.2.4), 60 bytes.
    fn config_space(&self) -> Vec<u8> {
        let info = self.backend.info();
        let mut c = vec![0u8; 60];
        c[0..8].copy_from_slice(&(info.capacity / SECTOR_SIZE).to_le_bytes());
        c[12..16].copy_from_slice(&(u32::from(BLOCK_QUEUE_SIZE) - 2).to_le_bytes()); // seg_max
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        c[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
        c[36..40].copy_from_slice(&request::MAX_RANGE_SECTORS.to_le_bytes()); // max_discard_sectors
        c[40..44].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
        c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        c[48..52].copy_from_slice(&request::MAX_RANGE_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        c[52..56].copy_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        self.core.guest_error("write to read-only config space", format_args!("offset {offset:#x}"));
    }

    fn activate(&mut self) -> Result<(), ActivateError> {
        Ok(())
    }

    fn reset(&mut self) {
        for request in self.inflight.values_mut() {
            request.orphaned = true;
        }
        // Held requests belong to the driver instance that just went away.
        self.held.clear();
        self.blocked = false;
    }

    fn queue_notified(&mut self, index: usize) {
        if index == REQUEST_QUEUE && self.core.accept_notification(index) {
            self.process_queue();
        }
    }

    fn event_sources(&self) -> Vec<EventSource> {
        // Watched even while quiesced: draining needs completions.
        self.backend
            .completion_fd()
            .map(|fd| EventSource { fd, token: COMPLETION_TOKEN, events: EventSet::IN })
            .into_iter()
            .collect()
    }

    fn handle_event(&mut self, token: u32, _events: EventSet) {
        if token == COMPLETION_TOKEN {
            self.reap();
        }
    }

    fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    fn poll_backend(&mut self) {
        self.reap();
    }
}

impl BackendSlot for VirtioBlock {
    type Backend = dyn BlockBackend;

    fn backend_description(&self) -> String {
        self.backend.info().description.clone()
    }

    fn check_compatible(&self, new: &dyn BlockBackend) -> Result<(), Incompatible> {
        self.check_takeover(new, Takeover::SameData)
    }

    fn replace_backend(&mut self, new: Box<dyn BlockBackend>) -> Box<dyn BlockBackend> {
        let capacity_changed = new.info().capacity != self.backend.info().capacity;
        let old = std::mem::replace(&mut self.backend, new);
        // Nothing starts while quiesced, so what is in flight now and not already on `new`
        // (which may be the backend a rollback reinstates) went to `old`.
        let on_new = std::mem::take(&mut self.on_previous);
        self.on_previous = self.inflight.keys().filter(|t| !on_new.contains(t)).copied().collect();
        self.blocked = false;
        if capacity_changed {
            // A new image of another size: tell the driver to re-read the config space.
            self.core.config_changed();
        }
        old
    }

    fn set_probation(&mut self, on: bool) {
        self.probation = on;
        for (latency, ok, read, written) in self.deferred.drain(..) {
            self.metrics.record(latency, ok, read, written);
        }
        if on {
            self.probation_failures = 0;
        } else if !self.held.is_empty() && self.core.activated {
            // Failures the health check tolerated are retried on the backend that stays; the
            // guest waits for them and may not kick again, so wake the event loop ourselves.
            let _ = self.core.queue_events[REQUEST_QUEUE].write(1);
        }
    }

    fn probation_failures(&self) -> u64 {
        self.probation_failures
    }

    /// Abandons the requests on the current backend; those on the previous one stay (they are
    /// healthy, and finish there or on reinstatement).
    fn abandon_in_flight(&mut self) {
        let current: Vec<u64> = self.inflight.keys().filter(|t| !self.on_previous.contains(t)).copied().collect();
        for token in current {
            if let Some(request) = self.inflight.remove(&token)
                && !request.orphaned
            {
                self.held.push_back(request.req);
            }
        }
    }

    /// A disk's requests are independent: they may finish on the backend they started on.
    fn hands_over_in_flight(&self) -> bool {
        true
    }

    fn in_flight_on_previous(&self) -> usize {
        self.on_previous.len()
    }

    fn drain_previous(&mut self, previous: &mut (dyn BlockBackend + 'static), _last: bool) -> bool {
        if !self.on_previous.is_empty() {
            previous.poll_completions(&mut self.completions);
            self.finish_completions();
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use std::io::{self, Write};

    use super::*;
    use crate::blk::request::{request_type, status};
    use crate::blk::{BlockInfo, FileBackend};
    use crate::lifecycle::Lifecycle;
    use crate::virtio::testing::{F_WRITE, add_chain, install, irq, memory, used};
    use vm_memory::GuestMemoryRegion;

    const QS: u16 = BLOCK_QUEUE_SIZE;

    fn image(tag: &str, fill: u8) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("blkdev-{tag}-{}", std::process::id()));
        std::fs::File::create(&path).unwrap().write_all(&vec![fill; 1 << 20]).unwrap();
        path
    }

    fn device(path: &std::path::Path, read_only: bool) -> (VirtioBlock, Arc<crate::virtio::testing::CountingIrq>) {
        let (count, line) = irq();
        let backend = Box::new(FileBackend::open(path, read_only).unwrap());
        let mut dev = VirtioBlock::new(backend, "test-disk-serial", line, memory()).unwrap();
        install(&mut dev.core, &[QS]);
        (dev, count)
    }

    fn header(mem: &GuestMem, at: u64, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(at)).unwrap();
        mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    #[test]
    fn write_then_read_through_the_queue() {
        let path = image("rw", 0);
        let (mut dev, irqs) = device(&path, false);
        let mem = dev.core.mem();
        header(&mem, 0x8_0000, request_type::OUT, 2);
        mem.write_slice(&[0xa5; 1024], GuestAddress(0x8_1000)).unwrap();
        add_chain(&dev.core, 0, &[(0x8_0000, 16, 0), (0x8_1000, 1024, 0), (0x8_2000, 1, F_WRITE)], 0);
        header(&mem, 0x9_0000, request_type::IN, 2);
        add_chain(&dev.core, 0, &[(0x9_0000, 16, 0), (0x9_1000, 1024, F_WRITE), (0x9_2000, 1, F_WRITE)], 3);
        dev.queue_notified(0);
        let (n, elems) = used(&dev.core, 0);
        assert_eq!(n, 2);
        assert_eq!(elems, vec![(0, 1), (3, 1025)], "write returns the status byte, read the data too");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x8_2000)).unwrap(), status::OK);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x9_2000)).unwrap(), status::OK);
        let mut back = [0u8; 1024];
        mem.read_slice(&mut back, GuestAddress(0x9_1000)).unwrap();
        assert_eq!(back, [0xa5; 1024]);
        assert!(irqs.0.load(std::sync::atomic::Ordering::SeqCst) > 0);
        let disk = std::fs::read(&path).unwrap();
        assert!(disk[1024..2048].iter().all(|&b| b == 0xa5), "data landed at sector 2");
        let m = dev.metrics.snapshot();
        assert_eq!((m.requests, m.errors, m.bytes_written, m.bytes_read), (2, 0, 1024, 1024));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn hostile_requests_get_error_statuses_and_never_stall_the_queue() {
        let path = image("hostile", 0);
        let (mut dev, _) = device(&path, true);
        let mem = dev.core.mem();
        let mut next = 0u16;
        let mut add = |descs: &[(u64, u32, u16)]| {
            add_chain(&dev.core, 0, descs, next);
            next += descs.len() as u16;
        };
        header(&mem, 0x8_0000, request_type::IN, 2040); // 8 sectors from 2040: beyond 2048
        add(&[(0x8_0000, 16, 0), (0x8_1000, 8192, F_WRITE), (0x8_3000, 1, F_WRITE)]);
        header(&mem, 0x8_0100, request_type::OUT, 0); // read-only disk
        add(&[(0x8_0100, 16, 0), (0x8_1000, 512, 0), (0x8_3001, 1, F_WRITE)]);
        header(&mem, 0x8_0200, 77, 0); // unknown type
        add(&[(0x8_0200, 16, 0), (0x8_3002, 1, F_WRITE)]);
        header(&mem, 0x8_0300, request_type::IN, 0); // data buffer outside guest memory
        add(&[(0x8_0300, 16, 0), (0x7000_0000, 512, F_WRITE), (0x8_3003, 1, F_WRITE)]);
        header(&mem, 0x8_0400, request_type::IN, 0); // no status byte at all
        add(&[(0x8_0400, 16, 0), (0x8_1000, 512, 0)]);
        header(&mem, 0x8_0500, request_type::GET_ID, 0); // and a good one last
        add(&[(0x8_0500, 16, 0), (0x8_4000, 20, F_WRITE), (0x8_3004, 1, F_WRITE)]);
        dev.queue_notified(0);
        let (n, elems) = used(&dev.core, 0);
        assert_eq!(n, 6, "every chain is returned");
        let statuses: Vec<u8> = (0..5).map(|i| mem.read_obj::<u8>(GuestAddress(0x8_3000 + i)).unwrap()).collect();
        assert_eq!(statuses, vec![status::IOERR, status::IOERR, status::UNSUPP, status::IOERR, status::OK]);
        assert_eq!(elems[4].1, 0, "no status byte: returned unused");
        assert_eq!(elems[5].1, 21);
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(0x8_4000)).unwrap();
        assert_eq!(&id[..16], b"test-disk-serial");
        assert_eq!(dev.metrics.snapshot().errors, 5);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn twenty_thousand_random_register_accesses_and_kicks_never_panic() {
        use crate::bus::BusDevice;
        let path = image("mmio-fuzz", 0);
        let backend = Box::new(FileBackend::open(&path, false).unwrap());
        let (_count, line) = irq();
        let dev: Arc<std::sync::Mutex<dyn crate::virtio::VirtioDevice>> =
            Arc::new(std::sync::Mutex::new(VirtioBlock::new(backend, "fuzz", line, memory()).unwrap()));
        let mut transport = crate::virtio::MmioTransport::new(dev.clone());
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Mostly the registers that exist, a window's worth of offsets beyond.
            let offset = ((x >> 8) % 0x200) & !(if x & 1 == 0 { 3 } else { 0 });
            let width = [1usize, 2, 4, 8][(x >> 40) as usize % 4];
            let value = (x >> 16).to_le_bytes();
            if x & 0x10 == 0 {
                let mut data = [0u8; 8];
                transport.read(offset, &mut data[..width]);
            } else {
                transport.write(offset, &value[..width]);
            }
            if x & 0x300 == 0 {
                let mut dev = dev.lock().unwrap_or_else(|p| p.into_inner());
                dev.queue_notified(0);
            }
        }
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_full_ring_is_served_a_budget_at_a_time() {
        let path = image("budget", 0);
        let (mut dev, _) = device(&path, false);
        let mem = dev.core.mem();
        let chains = crate::virtio::PASS_BUDGET as u16 + 36;
        for i in 0..chains {
            let at = 0x8_0000 + u64::from(i) * 0x100;
            header(&mem, at, request_type::GET_ID, 0);
            // The ID and the status byte in one writable descriptor: two per chain, all distinct.
            add_chain(&dev.core, 0, &[(at, 16, 0), (at + 0x20, 21, F_WRITE)], i * 2);
        }
        dev.queue_notified(0);
        assert_eq!(used(&dev.core, 0).0, crate::virtio::PASS_BUDGET as u16, "one pass, one budget");
        assert_eq!(dev.core.queue_events[0].read().unwrap(), 1, "the queue re-armed itself for the event loop");
        dev.queue_notified(0);
        assert_eq!(used(&dev.core, 0).0, chains, "the rest on the next pass");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn an_indirect_table_never_offered_is_not_followed() {
        const F_INDIRECT: u16 = 4;
        let path = image("indirect", 0);
        let (mut dev, _) = device(&path, false);
        let mem = dev.core.mem();
        // A well-formed read behind an indirect table: followed (as virtio-queue's iterator
        // would), it would be served; never offered, it is returned unused.
        let table = 0x10_0000u64;
        header(&mem, 0x8_0000, request_type::IN, 0);
        let descs = [(0x8_0000u64, 16u32, 1u16, 1u16), (0x8_1000, 512, 1 | F_WRITE, 2), (0x8_3000, 1, F_WRITE, 0)];
        for (i, (addr, len, flags, next)) in descs.into_iter().enumerate() {
            let raw = [addr, u64::from(len) | u64::from(flags) << 32 | u64::from(next) << 48];
            mem.write_obj(raw, GuestAddress(table + i as u64 * 16)).unwrap();
        }
        add_chain(&dev.core, 0, &[(table, 3 * 16, F_INDIRECT)], 0);
        header(&mem, 0x8_0500, request_type::GET_ID, 0); // a good one after it
        add_chain(&dev.core, 0, &[(0x8_0500, 16, 0), (0x8_4000, 20, F_WRITE), (0x8_3004, 1, F_WRITE)], 1);
        dev.queue_notified(0);
        let (n, elems) = used(&dev.core, 0);
        assert_eq!(n, 2, "both chains are returned");
        assert_eq!(elems[0].1, 0, "the indirect chain is returned unused");
        assert_eq!(elems[1].1, 21, "the queue goes on");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn quiesced_device_takes_nothing_until_resumed() {
        let path = image("quiesce", 7);
        let (mut dev, _) = device(&path, false);
        let mem = dev.core.mem();
        // Two holders (a device swap inside a memory swap): the first resume keeps it stopped.
        dev.quiesce();
        dev.quiesce();
        header(&mem, 0x8_0000, request_type::IN, 0);
        add_chain(&dev.core, 0, &[(0x8_0000, 16, 0), (0x8_1000, 512, F_WRITE), (0x8_2000, 1, F_WRITE)], 0);
        dev.queue_notified(0);
        assert_eq!(used(&dev.core, 0).0, 0, "nothing taken while quiesced");
        assert_eq!(dev.pending_requests(), 0);
        dev.resume();
        assert!(dev.is_quiesced(), "still held by the other party");
        dev.queue_notified(0);
        assert_eq!(used(&dev.core, 0).0, 0, "nothing taken while one hold remains");
        dev.resume();
        assert_eq!(dev.core.queue_events[0].read().unwrap(), 1, "resume replays a kick for the event loop");
        dev.queue_notified(0);
        assert_eq!(used(&dev.core, 0).0, 1, "taken after resume without a new kick from the guest");
        std::fs::remove_file(path).unwrap();
    }

    /// A file backend whose completions wait until the test lets them through.
    struct Gated(FileBackend, Vec<Completion>, Arc<std::sync::atomic::AtomicBool>);

    impl BlockBackend for Gated {
        fn info(&self) -> &BlockInfo {
            self.0.info()
        }
        fn submit(&mut self, token: u64, op: BlockOp) -> io::Result<()> {
            self.0.submit(token, op)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.0.flush()
        }
        fn can_submit(&self) -> bool {
            true
        }
        fn poll_completions(&mut self, out: &mut Vec<Completion>) {
            self.0.poll_completions(&mut self.1);
            if self.2.load(std::sync::atomic::Ordering::SeqCst) {
                out.append(&mut self.1);
            }
        }
        fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
            None
        }
        fn in_flight(&self) -> usize {
            self.1.len()
        }
    }

    #[test]
    fn requests_in_flight_at_a_switch_finish_on_the_old_backend() {
        let old_path = image("handover-old", 1);
        let new_path = image("handover-new", 2);
        let (count, line) = irq();
        let open = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let gated = Gated(FileBackend::open(&old_path, false).unwrap(), Vec::new(), open.clone());
        let mut dev = VirtioBlock::new(Box::new(gated), "x", line, memory()).unwrap();
        install(&mut dev.core, &[QS]);
        let mem = dev.core.mem();
        header(&mem, 0x8_0000, request_type::IN, 0);
        add_chain(&dev.core, 0, &[(0x8_0000, 16, 0), (0x8_1000, 512, F_WRITE), (0x8_2000, 1, F_WRITE)], 0);
        dev.queue_notified(0);
        assert_eq!(dev.pending_requests(), 1, "held by the gate");

        // The switch does not wait for it.
        assert!(dev.hands_over_in_flight());
        dev.quiesce();
        let mut old = dev.replace_backend(Box::new(FileBackend::open(&new_path, false).unwrap()));
        dev.set_probation(true);
        dev.resume();
        assert_eq!(dev.in_flight_on_previous(), 1);
        header(&mem, 0x8_0100, request_type::IN, 0);
        add_chain(&dev.core, 0, &[(0x8_0100, 16, 0), (0x9_1000, 512, F_WRITE), (0x9_2000, 1, F_WRITE)], 1);
        dev.queue_notified(0);
        let (n, _) = used(&dev.core, 0);
        assert_eq!(n, 1, "the new backend serves at once");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x9_1000)).unwrap(), 2);

        // The old backend's request completes through drain_previous, once, with its data.
        dev.drain_previous(&mut *old, false);
        assert_eq!(dev.in_flight_on_previous(), 1, "still gated");
        open.store(true, std::sync::atomic::Ordering::SeqCst);
        dev.drain_previous(&mut *old, false);
        assert_eq!((dev.in_flight_on_previous(), dev.pending_requests()), (0, 0));
        // The health check judges the new backend alone: the old one's request is counted
        // only once probation ends.
        assert_eq!(dev.metrics.snapshot().requests, 1);
        dev.set_probation(false);
        assert_eq!(dev.metrics.snapshot().requests, 2);
        let (n, elems) = used(&dev.core, 0);
        assert_eq!((n, elems[1].0), (2, 0), "head 0 returned after head 1");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x8_1000)).unwrap(), 1, "read from the old image");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x8_2000)).unwrap(), status::OK);
        assert!(count.0.load(std::sync::atomic::Ordering::SeqCst) > 0);
        std::fs::remove_file(old_path).unwrap();
        std::fs::remove_file(new_path).unwrap();
    }

    #[test]
    fn reads_mark_the_guest_pages_they_fill_dirty() {
        let path = image("dirty", 7);
        let (mut dev, _) = device(&path, false);
        let mem = dev.core.mem();
        let dirty_at = |addr: u64| {
            let region = mem.find_region(GuestAddress(addr)).unwrap();
            region.bitmap().dirty_at((addr - region.start_addr().0) as usize)
        };
        // Marks from setting the queue up are not what this test is about.
        for region in mem.iter() {
            let mmap: &vm_memory::mmap::MmapRegion<crate::DirtyBitmap> = region;
            mmap.bitmap().reset();
        }
        header(&mem, 0x8_0000, request_type::IN, 0);
        add_chain(&dev.core, 0, &[(0x8_0000, 16, 0), (0xa_1000, 512, F_WRITE), (0x8_2000, 1, F_WRITE)], 0);
        assert!(!dirty_at(0xa_1000));
        dev.queue_notified(0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0xa_1000)).unwrap(), 7, "the read landed");
        assert!(dirty_at(0xa_1000), "a page the backend filled is marked");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn whole_state_moves_to_a_new_instance() {
        let path = image("whole-state", 1);
        let (mut old, _) = device(&path, false);
        let (mut new, _) = device(&path, false);
        crate::virtio::testing::assert_state_moves(&mut old, &mut new);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn queue_state_moves_to_a_new_backend_instance() {
        let old_path = image("old", 1);
        let new_path = image("new", 2);
        let (mut old, _) = device(&old_path, false);
        let mem = old.core.mem();
        header(&mem, 0x8_0000, request_type::IN, 0);
        add_chain(&old.core, 0, &[(0x8_0000, 16, 0), (0x8_1000, 512, F_WRITE), (0x8_2000, 1, F_WRITE)], 0);
        old.queue_notified(0);
        old.quiesce();
        let state = old.export_state();
        assert_eq!((state.queues[0].next_avail, state.queues[0].next_used), (1, 1));

        // A second device instance on another backend continues where the first stopped.
        let (count, line) = irq();
        let backend = Box::new(FileBackend::open(&new_path, false).unwrap());
        let mut new = VirtioBlock::new(backend, "x", line, old.core.memory.clone()).unwrap();
        new.quiesce();
        new.import_state(&state).unwrap();
        new.resume();
        header(&mem, 0x8_0000, request_type::IN, 0);
        add_chain(&new.core, 0, &[(0x8_0000, 16, 0), (0x9_1000, 512, F_WRITE), (0x9_2000, 1, F_WRITE)], 3);
        new.queue_notified(0);
        let (n, elems) = used(&new.core, 0);
        assert_eq!((n, elems[1]), (2, (3, 513)));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x9_1000)).unwrap(), 2, "served by the new backend");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x8_1000)).unwrap(), 1, "the first read came from the old one");
        assert!(count.0.load(std::sync::atomic::Ordering::SeqCst) > 0);
        // Importing into a busy (unquiesced) device is refused.
        assert!(new.import_state(&state).is_err());
        std::fs::remove_file(old_path).unwrap();
        std::fs::remove_file(new_path).unwrap();
    }

    /// A file backend that claims fewer features than it has.
    struct Limited(FileBackend, BlockInfo);

    impl BlockBackend for Limited {
        fn info(&self) -> &BlockInfo {
            &self.1
        }
        fn submit(&mut self, token: u64, op: BlockOp) -> io::Result<()> {
            self.0.submit(token, op)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.0.flush()
        }
        fn can_submit(&self) -> bool {
            self.0.can_submit()
        }
        fn poll_completions(&mut self, out: &mut Vec<Completion>) {
            self.0.poll_completions(out)
        }
        fn completion_fd(&self) -> Option<std::os::fd::RawFd> {
            self.0.completion_fd()
        }
        fn in_flight(&self) -> usize {
            self.0.in_flight()
        }
    }

    #[test]
    fn only_a_backend_that_keeps_every_promise_made_to_the_guest_can_take_over() {
        let path = image("compat", 0);
        let (dev, _) = device(&path, false);
        let with = |f: &dyn Fn(&mut BlockInfo)| {
            let file = FileBackend::open(&path, false).unwrap();
            let mut info = file.info().clone();
            f(&mut info);
            Limited(file, info)
        };
        assert!(dev.check_compatible(&with(&|_| {})).is_ok());
        type Change = fn(&mut BlockInfo);
        let cases: [(Change, &str); 4] = [
            (|i| i.capacity *= 2, "capacity differs"),
            (|i| i.read_only = true, "read-only differs"),
            (|i| i.discard = false, "offered discard"),
            (|i| i.write_zeroes = false, "offered write-zeroes"),
        ];
        for (change, expected) in cases {
            let err = dev.check_compatible(&with(&change)).unwrap_err();
            assert!(err.to_string().contains(expected), "{err}");
        }
        // Another file of the same size: not the same data, but fine as a migration's target.
        let other = image("compat-other", 0);
        let copy = FileBackend::open(&other, false).unwrap();
        let err = dev.check_compatible(&copy).unwrap_err();
        assert!(err.to_string().contains("another file"), "{err}");
        assert!(dev.check_takeover(&copy, Takeover::CopiedData).is_ok());
        let itself = FileBackend::open(&path, false).unwrap();
        assert!(dev.check_takeover(&itself, Takeover::CopiedData).unwrap_err().to_string().contains("own image"));
        // A new image may have any size, but must keep the features the guest was offered.
        assert!(dev.check_takeover(&with(&|i| i.capacity *= 2), Takeover::NewImage).is_ok());
        assert!(dev.check_takeover(&with(&|i| i.discard = false), Takeover::NewImage).is_err());
        // The same file under another path is the same data.
        let alias = std::env::temp_dir().join(format!("blkdev-compat-alias-{}", std::process::id()));
        let _ = std::fs::remove_file(&alias);
        std::os::unix::fs::symlink(&path, &alias).unwrap();
        assert!(dev.check_compatible(&crate::blk::UringBackend::open(&alias, false).unwrap()).is_ok());
        std::fs::remove_file(alias).unwrap();
        std::fs::remove_file(other).unwrap();
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn config_space_reports_capacity_and_limits() {
        let path = image("config", 0);
        let (dev, _) = device(&path, true);
        let c = dev.config_space();
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 254);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_ne!(dev.core.avail_features & feature::RO, 0);
        assert_ne!(dev.core.avail_features & features::VERSION_1, 0);
        std::fs::remove_file(path).unwrap();
    }
}
