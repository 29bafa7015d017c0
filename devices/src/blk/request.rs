//! Turning a guest descriptor chain into a block request, trusting nothing in it.
//!
//! Layout rules (virtio 1.x 5.2.6): the chain is device-readable descriptors followed by
//! device-writable ones; the first 16 readable bytes are the request header; the last writable
//! byte is the status. Framing is arbitrary (the header or data may be split across
//! descriptors, or share one), so everything here works on byte ranges over the chain.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryBackend};

use crate::GuestMem;

/// Bytes per sector: the unit of the request header's sector field, whatever the image's block size.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the GET_ID string.
pub const ID_BYTES: usize = 20;
/// Largest data transfer accepted in one request.
pub const MAX_REQUEST_BYTES: u64 = 64 << 20;
/// Largest discard / write-zeroes range, in sectors.
pub const MAX_RANGE_SECTORS: u32 = 1 << 22;

/// Request types: the header's `type` field (`VIRTIO_BLK_T_*`).
pub mod request_type {
    /// Read from the disk into the guest's buffers.
    pub const IN: u32 = 0;
    /// Write the guest's buffers to the disk.
    pub const OUT: u32 = 1;
    /// Make completed writes durable.
    pub const FLUSH: u32 = 4;
    /// Return the device's ID string.
    pub const GET_ID: u32 = 8;
    /// Deallocate a range of sectors.
    pub const DISCARD: u32 = 11;
    /// Make a range of sectors read as zeros.
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status byte values the device writes at the end of a request (`VIRTIO_BLK_S_*`).
pub mod status {
    /// The request succeeded.
    pub const OK: u8 = 0;
    /// The request failed (an I/O error, or a malformed or out-of-range request).
    pub const IOERR: u8 = 1;
    /// The request type or its flags are not supported.
    pub const UNSUPP: u8 = 2;
}

const HEADER_LEN: u64 = 16;
const RANGE_LEN: u64 = 16;
/// Write-zeroes flag: the range may be deallocated.
const FLAG_UNMAP: u32 = 1;

/// A contiguous piece of guest memory named by a descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address of the first byte.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u64,
}

/// `len` bytes starting `start` bytes into `segs`, as segments.
pub fn slice_segments(segs: &[Segment], mut start: u64, mut len: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    for s in segs {
        if len == 0 {
            break;
        }
        if start >= s.len {
            start -= s.len;
            continue;
        }
        let take = (s.len - start).min(len);
        out.push(Segment { addr: GuestAddress(s.addr.0.wrapping_add(start)), len: take });
        len -= take;
        start = 0;
    }
    out
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| s.len).sum()
}

/// Reads `buf.len()` bytes starting `start` bytes into `segs`.
fn gather(mem: &GuestMem, segs: &[Segment], start: u64, buf: &mut [u8]) -> bool {
    let mut filled = 0;
    for s in slice_segments(segs, start, buf.len() as u64) {
        let end = filled + s.len as usize;
        if mem.read_slice(&mut buf[filled..end], s.addr).is_err() {
            return false;
        }
        filled = end;
    }
    filled == buf.len()
}

/// What a validated request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// `VIRTIO_BLK_T_IN`: read sectors into the guest's buffers.
    Read,
    /// `VIRTIO_BLK_T_OUT`: write the guest's buffers to sectors.
    Write,
    /// `VIRTIO_BLK_T_FLUSH`: make completed writes durable.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`: return the device's ID string.
    GetId,
    /// `VIRTIO_BLK_T_DISCARD`: deallocate a range of sectors.
    Discard,
    /// `VIRTIO_BLK_T_WRITE_ZEROES`: make a range of sectors read as zeros.
    WriteZeroes,
}

/// A validated request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Index of the chain's head descriptor, which the used ring returns.
    pub head: u16,
    /// What the request asks for.
    pub kind: RequestKind,
    /// First sector (Read, Write, Discard, WriteZeroes).
    pub sector: u64,
    /// Sectors affected by Discard / WriteZeroes.
    pub range_sectors: u32,
    /// WriteZeroes may deallocate.
    pub unmap: bool,
    /// Guest buffers: the data read into (Read, GetId) or written from (Write).
    pub data: Vec<Segment>,
    /// Total bytes in `data`: a multiple of 512 for Read and Write, at most 20 for GetId.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// A chain that is not a valid request. With `status`, the error can be reported to the
/// driver; without it the chain can only be returned unused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// Index of the chain's head descriptor.
    pub head: u16,
    /// Guest physical address of the status byte, if the chain has a usable one.
    pub status: Option<GuestAddress>,
    /// The status to report (a [`status`](mod@status) value).
    pub code: u8,
    /// What was wrong, for the log.
    pub reason: &'static str,
}

/// What the device offers, for range checks.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Disk size in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Writes, discards and write-zeroes are refused.
    pub read_only: bool,
    /// Discard requests are accepted.
    pub discard: bool,
    /// Write-zeroes requests are accepted.
    pub write_zeroes: bool,
    /// The most descriptors a request may have: the `seg_max` data segments the device
    /// announces, plus the header and the status.
    pub max_descriptors: usize,
}

/// Parses and validates one chain.
pub fn parse<M>(chain: DescriptorChain<M>, mem: &GuestMem, limits: &Limits) -> Result<Request, Rejected>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let head = chain.head_index();
    let reject = |status, code, reason| Rejected { head, status, code, reason };

    let (mut readable, mut writable) = (Vec::new(), Vec::new());
    let (mut out_of_order, mut descriptors) = (false, 0);
    // The iterator stops after as many descriptors as the queue has, so loops end; an
    // indirect table may hold 65,535, so the walk also stops one past what seg_max allows.
    for desc in chain.take(limits.max_descriptors + 1) {
        descriptors += 1;
        let seg = Segment { addr: desc.addr(), len: u64::from(desc.len()) };
        if desc.is_write_only() {
            writable.push(seg);
        } else if writable.is_empty() {
            readable.push(seg);
        } else {
            out_of_order = true;
        }
    }

    // The walk stopped early: the status byte was never seen, so the chain is returned unused.
    if descriptors > limits.max_descriptors {
        return Err(reject(None, status::IOERR, "more descriptors than the announced seg_max allows"));
    }
    // The status byte: the last writable byte, if it is in guest memory.
    let wtotal = total(&writable);
    let status = (wtotal > 0)
        .then(|| slice_segments(&writable, wtotal - 1, 1))
        .and_then(|s| s.first().map(|s| s.addr))
        .filter(|a| GuestMemoryBackend::check_range(mem, *a, 1));
    let Some(status_addr) = status else {
        return Err(reject(None, status::IOERR, "no writable status byte in guest memory"));
    };
    let status = Some(status_addr);
    if out_of_order {
        return Err(reject(status, status::IOERR, "readable descriptor after a writable one"));
    }

    let mut header = [0u8; HEADER_LEN as usize];
    if total(&readable) < HEADER_LEN || !gather(mem, &readable, 0, &mut header) {
        return Err(reject(status, status::IOERR, "request header missing or outside guest memory"));
    }
    let req_type = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
    let payload_len = total(&readable) - HEADER_LEN;
    let in_len = wtotal - 1;

    let mut req = Request {
        head,
        kind: RequestKind::Flush,
        sector,
        range_sectors: 0,
        unmap: false,
        data: Vec::new(),
        data_len: 0,
        status: status_addr,
    };
    let in_capacity =
        |first: u64, sectors: u64| first.checked_add(sectors).is_some_and(|end| end <= limits.capacity_sectors);
    match req_type {
        request_type::IN | request_type::OUT => {
            let (kind, len, data) = if req_type == request_type::IN {
                (RequestKind::Read, in_len, slice_segments(&writable, 0, in_len))
            } else {
                (RequestKind::Write, payload_len, slice_segments(&readable, HEADER_LEN, payload_len))
            };
            if kind == RequestKind::Write && limits.read_only {
                return Err(reject(status, status::IOERR, "write to a read-only disk"));
            }
            if len % SECTOR_SIZE != 0 || len > MAX_REQUEST_BYTES {
                return Err(reject(status, status::IOERR, "data length not a multiple of 512 or too large"));
            }
            if !in_capacity(sector, len / SECTOR_SIZE) {
                return Err(reject(status, status::IOERR, "request beyond the disk's capacity"));
            }
            req.kind = kind;
            req.data = data;
            req.data_len = len;
        }
        // The sector field means nothing to these (the guest may leave anything there); zero
        // keeps every request's sector within the capacity.
        request_type::FLUSH => (req.kind, req.sector) = (RequestKind::Flush, 0),
        request_type::GET_ID => {
            (req.kind, req.sector) = (RequestKind::GetId, 0);
            req.data_len = in_len.min(ID_BYTES as u64);
            req.data = slice_segments(&writable, 0, req.data_len);
        }
        request_type::DISCARD | request_type::WRITE_ZEROES => {
            let discard = req_type == request_type::DISCARD;
            if (discard && !limits.discard) || (!discard && !limits.write_zeroes) {
                return Err(reject(status, status::UNSUPP, "discard / write-zeroes not offered"));
            }
            if limits.read_only {
                return Err(reject(status, status::IOERR, "discard / write-zeroes on a read-only disk"));
            }
            if payload_len != RANGE_LEN {
                // We offer max_discard_seg = max_write_zeroes_seg = 1.
                return Err(reject(status, status::UNSUPP, "discard / write-zeroes needs exactly one range"));
            }
            let mut range = [0u8; RANGE_LEN as usize];
            if !gather(mem, &readable, HEADER_LEN, &mut range) {
                return Err(reject(status, status::IOERR, "range outside guest memory"));
            }
            let first = u64::from_le_bytes(range[0..8].try_into().unwrap_or_default());
            let sectors = u32::from_le_bytes(range[8..12].try_into().unwrap_or_default());
            let flags = u32::from_le_bytes(range[12..16].try_into().unwrap_or_default());
            let allowed_flags = if discard { 0 } else { FLAG_UNMAP };
            if flags & !allowed_flags != 0 {
                return Err(reject(status, status::UNSUPP, "unknown discard / write-zeroes flags"));
            }
            if sectors > MAX_RANGE_SECTORS || !in_capacity(first, u64::from(sectors)) {
                return Err(reject(status, status::IOERR, "discard / write-zeroes range out of bounds"));
            }
            req.kind = if discard { RequestKind::Discard } else { RequestKind::WriteZeroes };
            req.sector = first;
            req.range_sectors = sectors;
            req.unmap = flags & FLAG_UNMAP != 0;
        }
        _ => return Err(reject(status, status::UNSUPP, "unsupported request type")),
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::GuestMemoryMmap;

    use super::*;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    pub const LIMITS: Limits =
        Limits { capacity_sectors: 2048, read_only: false, discard: true, write_zeroes: true, max_descriptors: 8 };

    fn mem() -> GuestMem {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn header(mem: &GuestMem, at: u64, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(at)).unwrap();
        mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    /// Builds a chain of (addr, len, flags) descriptors and parses it.
    fn parse_descs(mem: &GuestMem, descs: &[(u64, u32, u16)], limits: &Limits) -> Result<Request, Rejected> {
        parse_descs_in(mem, descs, limits, 16)
    }

    /// The same, on a queue of `size` descriptors.
    fn parse_descs_in(
        mem: &GuestMem,
        descs: &[(u64, u32, u16)],
        limits: &Limits,
        size: u16,
    ) -> Result<Request, Rejected> {
        let q = MockSplitQueue::new(mem, size);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let next = if i + 1 < descs.len() { flags | F_NEXT } else { flags };
                RawDescriptor::from(Descriptor::new(addr, len, next, i as u16 + 1))
            })
            .collect();
        q.add_desc_chains(&raw, 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let chain = queue.iter(mem).unwrap().next().unwrap();
        parse(chain, mem, limits)
    }

    #[test]
    fn well_formed_read_write_flush_getid() {
        let m = mem();
        header(&m, 0x8000, request_type::IN, 8);
        let r = parse_descs(&m, &[(0x8000, 16, 0), (0x9000, 4096, F_WRITE), (0xa000, 1, F_WRITE)], &LIMITS).unwrap();
        assert_eq!((r.kind, r.sector, r.data_len, r.status), (RequestKind::Read, 8, 4096, GuestAddress(0xa000)));
        header(&m, 0x8000, request_type::OUT, 0);
        let r = parse_descs(&m, &[(0x8000, 16, 0), (0x9000, 1024, 0), (0xa000, 1, F_WRITE)], &LIMITS).unwrap();
        assert_eq!((r.kind, r.data_len, r.data.len()), (RequestKind::Write, 1024, 1));
        // Whatever sector a flush or GET_ID carries is ignored (it once overflowed an offset).
        header(&m, 0x8000, request_type::FLUSH, u64::MAX);
        let r = parse_descs(&m, &[(0x8000, 16, 0), (0xa000, 1, F_WRITE)], &LIMITS).unwrap();
        assert_eq!((r.kind, r.sector), (RequestKind::Flush, 0));
        header(&m, 0x8000, request_type::GET_ID, u64::MAX);
        let r = parse_descs(&m, &[(0x8000, 16, 0), (0x9000, 64, F_WRITE), (0xa000, 1, F_WRITE)], &LIMITS).unwrap();
        assert_eq!((r.kind, r.data_len, r.sector), (RequestKind::GetId, 20, 0));
    }

    #[test]
    fn arbitrary_framing_header_data_and_status_in_one_buffer() {
        let m = mem();
        // A write whose header and data share one readable descriptor; a read whose data and
        // status share one writable descriptor.
        header(&m, 0x8000, request_type::OUT, 4);
        let r = parse_descs(&m, &[(0x8000, 16 + 512, 0), (0xa000, 1, F_WRITE)], &LIMITS).unwrap();
        assert_eq!((r.kind, r.data_len, r.data[0].addr), (RequestKind::Write, 512, GuestAddress(0x8010)));
        header(&m, 0x8000, request_type::IN, 4);
        let r = parse_descs(&m, &[(0x8000, 8, 0), (0x8008, 8, 0), (0x9000, 513, F_WRITE)], &LIMITS).unwrap();
        assert_eq!((r.kind, r.data_len, r.status), (RequestKind::Read, 512, GuestAddress(0x9200)));
    }

    #[test]
    fn hostile_chains_are_rejected_with_a_status_when_possible() {
        let m = mem();
        type Case<'a> = (&'a [(u64, u32, u16)], u32, u64, u8, bool);
        let cases: &[Case] = &[
            // (descs, type, sector, expected code, status reportable)
            (
                &[(0x8000, 16, 0), (0x9000, 4096, F_WRITE), (0xa000, 1, F_WRITE)],
                request_type::IN,
                2047,
                status::IOERR,
                true,
            ),
            (
                &[(0x8000, 16, 0), (0x9000, 4096, F_WRITE), (0xa000, 1, F_WRITE)],
                request_type::IN,
                u64::MAX,
                status::IOERR,
                true,
            ),
            (
                &[(0x8000, 16, 0), (0x9000, 100, F_WRITE), (0xa000, 1, F_WRITE)],
                request_type::IN,
                0,
                status::IOERR,
                true,
            ),
            (&[(0x8000, 16, 0), (0x9000, 512, 0)], request_type::OUT, 0, status::IOERR, false),
            (&[(0x8000, 16, 0), (0x9000, 512, 0), (0xa000, 0, F_WRITE)], request_type::OUT, 0, status::IOERR, false),
            (
                &[(0x8000, 16, 0), (0x9000, 512, F_WRITE), (0xb000, 16, 0), (0xa000, 1, F_WRITE)],
                request_type::OUT,
                0,
                status::IOERR,
                true,
            ),
            (&[(0x8000, 8, 0), (0xa000, 1, F_WRITE)], request_type::IN, 0, status::IOERR, true),
            (&[(0x8000, 16, 0), (0xa000, 1, F_WRITE)], 99, 0, status::UNSUPP, true),
            // Status byte outside guest memory.
            (
                &[(0x8000, 16, 0), (0x9000, 512, F_WRITE), (0x4000_0000, 1, F_WRITE)],
                request_type::IN,
                0,
                status::IOERR,
                false,
            ),
            // Header outside guest memory.
            (&[(0xffff_fff0, 16, 0), (0xa000, 1, F_WRITE)], request_type::IN, 0, status::IOERR, true),
            // Discard with two ranges, with reserved flags, beyond capacity.
            (&[(0x8000, 48, 0), (0xa000, 1, F_WRITE)], request_type::DISCARD, 0, status::UNSUPP, true),
        ];
        for (i, (descs, kind, sector, code, reportable)) in cases.iter().enumerate() {
            header(&m, 0x8000, *kind, *sector);
            let err = parse_descs(&m, descs, &LIMITS).expect_err(&format!("case {i} must be rejected"));
            assert_eq!(err.code, *code, "case {i}: {}", err.reason);
            assert_eq!(err.status.is_some(), *reportable, "case {i}: {}", err.reason);
        }
    }

    #[test]
    fn discard_and_write_zeroes_ranges() {
        let m = mem();
        header(&m, 0x8000, request_type::WRITE_ZEROES, 0);
        m.write_obj(100u64, GuestAddress(0x8010)).unwrap();
        m.write_obj(8u32, GuestAddress(0x8018)).unwrap();
        m.write_obj(1u32, GuestAddress(0x801c)).unwrap();
        let r = parse_descs(&m, &[(0x8000, 32, 0), (0xa000, 1, F_WRITE)], &LIMITS).unwrap();
        assert_eq!((r.kind, r.sector, r.range_sectors, r.unmap), (RequestKind::WriteZeroes, 100, 8, true));
        header(&m, 0x8000, request_type::DISCARD, 0);
        let err = parse_descs(&m, &[(0x8000, 32, 0), (0xa000, 1, F_WRITE)], &LIMITS).unwrap_err();
        assert_eq!(err.code, status::UNSUPP, "discard takes no unmap flag");
        m.write_obj(0u32, GuestAddress(0x801c)).unwrap();
        m.write_obj(2045u64, GuestAddress(0x8010)).unwrap();
        let err = parse_descs(&m, &[(0x8000, 32, 0), (0xa000, 1, F_WRITE)], &LIMITS).unwrap_err();
        assert_eq!(err.code, status::IOERR, "range beyond capacity");
        let ro = Limits { read_only: true, ..LIMITS };
        header(&m, 0x8000, request_type::OUT, 0);
        let err = parse_descs(&m, &[(0x8000, 16, 0), (0x9000, 512, 0), (0xa000, 1, F_WRITE)], &ro).unwrap_err();
        assert_eq!((err.code, err.reason), (status::IOERR, "write to a read-only disk"));
    }

    #[test]
    fn a_chain_longer_than_seg_max_is_refused_after_reading_one_descriptor_too_many() {
        let m = mem();
        header(&m, 0x8000, request_type::IN, 0);
        // Header, 8 data segments, status: 10 descriptors for a limit of 8.
        let mut descs = vec![(0x8000, 16, 0)];
        descs.extend((0..8).map(|i| (0x9000 + i * 0x200, 512, F_WRITE)));
        descs.push((0xb000, 1, F_WRITE));
        let err = parse_descs_in(&m, &descs, &LIMITS, 32).unwrap_err();
        assert_eq!(err.reason, "more descriptors than the announced seg_max allows");
        assert!(err.status.is_none(), "the walk stopped before the status byte: returned unused");
        // At the limit it is fine.
        let fits = [(0x8000, 16, 0), (0x9000, 512, F_WRITE), (0xb000, 1, F_WRITE)];
        assert!(parse_descs_in(&m, &fits, &LIMITS, 32).is_ok());
    }

    #[test]
    fn looping_chain_terminates() {
        let m = mem();
        header(&m, 0x8000, request_type::IN, 0);
        let q = MockSplitQueue::new(&m, 4);
        // Descriptor 0 -> 1 -> 0 -> ... never ends on its own.
        let raw = [
            RawDescriptor::from(Descriptor::new(0x8000, 16, F_NEXT, 1)),
            RawDescriptor::from(Descriptor::new(0x9000, 512, F_NEXT | F_WRITE, 0)),
        ];
        q.add_desc_chains(&raw, 0).unwrap();
        let mut queue: Queue = q.create_queue().unwrap();
        let chain = queue.iter(&m).unwrap().next().unwrap();
        // Bounded by the queue size; the chain is readable/writable/readable... so rejected.
        assert!(parse(chain, &m, &LIMITS).is_err());
    }

    #[test]
    fn slicing_segments() {
        let segs = [Segment { addr: GuestAddress(0x1000), len: 10 }, Segment { addr: GuestAddress(0x2000), len: 10 }];
        assert_eq!(
            slice_segments(&segs, 5, 10),
            vec![Segment { addr: GuestAddress(0x1005), len: 5 }, Segment { addr: GuestAddress(0x2000), len: 5 }]
        );
        assert_eq!(slice_segments(&segs, 20, 5), vec![]);
        assert_eq!(slice_segments(&segs, 19, 5), vec![Segment { addr: GuestAddress(0x2009), len: 1 }]);
    }
}
