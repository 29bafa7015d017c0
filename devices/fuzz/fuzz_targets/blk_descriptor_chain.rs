//! Fuzzes virtio-blk descriptor-chain parsing with guest-controlled everything: the descriptor
//! table, the avail ring, the request headers and the data in guest memory.
//!
//! Input layout: byte 0 = queue size exponent, byte 1 = how many chains the driver claims,
//! the next `16 * size` bytes = the descriptor table, then the avail ring entries, then the
//! rest is copied into guest memory at the data area. Run with
//! `cargo +nightly fuzz run blk_descriptor_chain` from `devices/fuzz`.
#![no_main]

use devices::blk::request::{Limits, parse};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: usize = 0x4_0000;
const DESC_TABLE: u64 = 0x1000;
const AVAIL_RING: u64 = 0x3000;
const USED_RING: u64 = 0x4000;
const DATA: u64 = 0x8000;

fuzz_target!(|input: &[u8]| {
    if input.len() < 2 {
        return;
    }
    let size = 1u16 << (input[0] % 9); // 1..=256
    let claimed = input[1];
    let rest = &input[2..];
    let table_len = (16 * usize::from(size)).min(rest.len());
    let (table, rest) = rest.split_at(table_len);
    let ring_len = (2 * usize::from(claimed)).min(rest.len());
    let (ring, data) = rest.split_at(ring_len);

    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    mem.write_slice(table, GuestAddress(DESC_TABLE)).unwrap();
    mem.write_obj(0u16, GuestAddress(AVAIL_RING)).unwrap();
    mem.write_obj(u16::from(claimed), GuestAddress(AVAIL_RING + 2)).unwrap();
    mem.write_slice(ring, GuestAddress(AVAIL_RING + 4)).unwrap();
    let room = MEM_SIZE - DATA as usize;
    mem.write_slice(&data[..data.len().min(room)], GuestAddress(DATA)).unwrap();

    let mut queue = Queue::new(256).unwrap();
    queue.set_size(size);
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_ready(true);
    let limits = Limits {
        capacity_sectors: 4096,
        read_only: input[0] & 0x80 != 0,
        discard: true,
        write_zeroes: true,
        max_descriptors: 256,
    };
    let Ok(iter) = queue.iter(&mem) else { return };
    for chain in iter.take(usize::from(size)) {
        // Whatever the input, parsing returns a request or a rejection, never panics or hangs,
        // and a request's buffers lie within the limits it was checked against.
        if let Ok(req) = parse(chain, &mem, &limits) {
            assert!(req.data_len <= devices::blk::request::MAX_REQUEST_BYTES);
            let end = req.sector.saturating_add(req.data_len / 512).saturating_add(req.range_sectors.into());
            assert!(end <= limits.capacity_sectors, "sector {} beyond the capacity", req.sector);
        }
    }
});
