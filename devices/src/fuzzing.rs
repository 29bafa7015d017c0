//! Fuzz harnesses: a guest driver played from arbitrary bytes against a real device.
//!
//! Each harness builds a device as the VMM does (a real file, datagram socket or vsock
//! listener behind it), performs the driver handshake through the MMIO transport, then reads
//! the input as a program of driver actions: write guest memory, write a descriptor, publish a
//! chain, kick a queue, read or write any register, deliver backend readiness. Whatever the
//! program, the device must not panic, hang, or touch the host beyond its backend; the block
//! harness also checks that the image never grows past its capacity.
//!
//! The cargo-fuzz targets in `devices/fuzz` call these; `cargo test` replays the committed
//! corpora (`devices/fuzz/corpus/<target>`) through them.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::blk::request::{Limits, parse};

use crate::blk::{FileBackend, VirtioBlock};
use crate::bus::{BusDevice, lock_device};
use crate::interrupt::InterruptLine;
use crate::net::{NetSettings, UnixBackend, VirtioNet};
use crate::virtio::{MmioTransport, VirtioDevice, status};
use crate::vsock::{UnixVsockBackend, VirtioVsock};

/// The device a harness drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// virtio-blk on a 1 MiB image file.
    Block,
    /// virtio-net on a Unix datagram backend.
    Net,
    /// virtio-vsock on the hybrid Unix-socket backend.
    Vsock,
}

impl Target {
    /// The cargo-fuzz target's (and corpus directory's) name.
    pub fn name(self) -> &'static str {
        match self {
            Target::Block => "virtio_blk",
            Target::Net => "virtio_net",
            Target::Vsock => "virtio_vsock",
        }
    }
}

const MEM_SIZE: u64 = 0x40_0000;
const IMAGE_SIZE: u64 = 1 << 20;
/// Driver actions per input: enough to fill and drain a few rings, bounded so that one input
/// runs in milliseconds.
const MAX_ACTIONS: usize = 512;

// MMIO register offsets (virtio 1.x, section 4.2.2).
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DRIVER_LOW: u64 = 0x090;
const QUEUE_DEVICE_LOW: u64 = 0x0a0;

/// Where queue `q`'s rings live: 64 KiB apart, the descriptor table first.
fn ring_base(q: usize) -> u64 {
    0x1_0000 * (q as u64 + 1)
}
const AVAIL_OFFSET: u64 = 0x8000;
const USED_OFFSET: u64 = 0xc000;

struct NoIrq;

impl InterruptLine for NoIrq {
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Per-process scratch files: the block image and the net peer, made once.
fn scratch_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("vmm-fuzz-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        dir
    })
}

fn scratch(name: &str) -> PathBuf {
    scratch_dir().join(name)
}

fn image() -> PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let path = scratch("disk.img");
            let file = std::fs::File::create(&path).expect("create the fuzz image");
            file.set_len(IMAGE_SIZE).expect("size the fuzz image");
            path
        })
        .clone()
}

fn net_peer() -> &'static (UnixDatagram, PathBuf) {
    static PEER: OnceLock<(UnixDatagram, PathBuf)> = OnceLock::new();
    PEER.get_or_init(|| {
        let path = scratch("net.sock");
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path).expect("bind the net peer");
        socket.set_nonblocking(true).expect("non-blocking peer");
        (socket, path)
    })
}

fn device(target: Target, mem: crate::SharedGuestMem) -> Option<Arc<Mutex<dyn VirtioDevice>>> {
    let irq: Box<dyn InterruptLine> = Box::new(NoIrq);
    Some(match target {
        Target::Block => {
            let backend = FileBackend::open(&image(), false).ok()?;
            Arc::new(Mutex::new(VirtioBlock::new(Box::new(backend), "fuzz", irq, mem).ok()?))
        }
        Target::Net => {
            let (peer, path) = net_peer();
            // What earlier inputs sent: the peer's buffer must not stay full.
            let mut sink = [0u8; 65536];
            while peer.recv(&mut sink).is_ok() {}
            let backend = UnixBackend::connect(path).ok()?;
            let settings = NetSettings { mac: [0x52, 0x54, 0, 0, 0, 1], mtu: None };
            Arc::new(Mutex::new(VirtioNet::new(Box::new(backend), settings, irq, mem).ok()?))
        }
        Target::Vsock => {
            static N: AtomicUsize = AtomicUsize::new(0);
            let path = scratch(&format!("vsock-{}.sock", N.fetch_add(1, Ordering::Relaxed)));
            let backend = UnixVsockBackend::bind(&path).ok()?;
            let dev = VirtioVsock::new(3, Box::new(backend), irq, mem).ok()?;
            // The listener stays open in the device; its name is not needed any more.
            let _ = std::fs::remove_file(&path);
            Arc::new(Mutex::new(dev))
        }
    })
}

/// The input, read as driver actions; reads past its end give zeros.
struct Program<'a>(&'a [u8]);

impl Program<'_> {
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }

    fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | u16::from(self.u8()) << 8
    }

    fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | u32::from(self.u16()) << 16
    }
}

struct Driver {
    transport: MmioTransport,
    dev: Arc<Mutex<dyn VirtioDevice>>,
    mem: crate::SharedGuestMem,
    /// Per queue: its size and the next avail index the driver will publish.
    queues: Vec<(u16, u16)>,
}

impl Driver {
    fn write(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    fn read(&mut self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.transport.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    /// The handshake a Linux driver does, with the features and queue sizes the input picks.
    fn handshake(&mut self, program: &mut Program) {
        self.write(STATUS, 0);
        self.write(STATUS, status::ACKNOWLEDGE | status::DRIVER);
        for sel in 0..2 {
            self.write(DEVICE_FEATURES_SEL, sel);
            let offered = self.read(DEVICE_FEATURES);
            self.write(DRIVER_FEATURES_SEL, sel);
            let taken = offered & program.u32();
            // VERSION_1 (bit 32) always: without it the device refuses the driver.
            self.write(DRIVER_FEATURES, if sel == 1 { taken | 1 } else { taken });
        }
        self.write(STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        let count = lock_device(&self.dev).core().queues.len();
        for q in 0..count {
            self.write(QUEUE_SEL, q as u32);
            let max = self.read(QUEUE_NUM_MAX).max(1);
            let size = (1u32 << (program.u8() % 9)).min(max) as u16;
            self.write(QUEUE_NUM, u32::from(size));
            let base = ring_base(q);
            self.write(QUEUE_DESC_LOW, base as u32);
            self.write(QUEUE_DRIVER_LOW, (base + AVAIL_OFFSET) as u32);
            self.write(QUEUE_DEVICE_LOW, (base + USED_OFFSET) as u32);
            self.write(QUEUE_READY, 1);
            self.queues.push((size, 0));
        }
        self.write(STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
    }

    fn act(&mut self, program: &mut Program) {
        let op = program.u8();
        let q = usize::from(program.u8()) % self.queues.len().max(1);
        match op % 8 {
            0 => {
                let addr = u64::from(program.u32()) % MEM_SIZE;
                let len = usize::from(program.u8());
                let data = program.bytes(len).to_vec();
                let _ = self.mem.memory().write_slice(&data, GuestAddress(addr));
            }
            1 => {
                // A descriptor: mostly addresses inside guest memory, sometimes anything.
                let Some(&(size, _)) = self.queues.get(q) else { return };
                let index = program.u16() % size.max(1);
                let raw = program.u32();
                let addr = if raw & 0x8000_0000 != 0 { u64::from(raw) << 8 } else { u64::from(raw) % MEM_SIZE };
                let (len, flags, next) = (program.u32() % 0x2_0000, program.u16() & 0x7, program.u16());
                let at = GuestAddress(ring_base(q) + 16 * u64::from(index));
                let mut desc = [0u8; 16];
                desc[..8].copy_from_slice(&addr.to_le_bytes());
                desc[8..12].copy_from_slice(&len.to_le_bytes());
                desc[12..14].copy_from_slice(&flags.to_le_bytes());
                desc[14..16].copy_from_slice(&next.to_le_bytes());
                let _ = self.mem.memory().write_slice(&desc, at);
            }
            2 => {
                let Some((size, next)) = self.queues.get_mut(q) else { return };
                let head = program.u16();
                let avail = ring_base(q) + AVAIL_OFFSET;
                let mem = self.mem.memory();
                let _ = mem.write_obj(head, GuestAddress(avail + 4 + 2 * u64::from(*next % (*size).max(1))));
                *next = next.wrapping_add(1);
                let _ = mem.write_obj(*next, GuestAddress(avail + 2));
            }
            3 => {
                let mut dev = lock_device(&self.dev);
                if dev.core().activated {
                    dev.queue_notified(q);
                }
            }
            4 => {
                let (offset, value) = (u64::from(program.u16() % 0x200), program.u32());
                let width = [1usize, 2, 4][usize::from(program.u8()) % 3];
                self.transport.write(offset, &value.to_le_bytes()[..width]);
            }
            5 => {
                let offset = u64::from(program.u16() % 0x200);
                let mut data = [0u8; 4];
                self.transport.read(offset, &mut data);
            }
            6 => {
                let mut dev = lock_device(&self.dev);
                for source in dev.event_sources() {
                    dev.handle_event(source.token, source.events);
                }
            }
            _ => lock_device(&self.dev).poll_backend(),
        }
    }
}

/// Plays `input` as a guest driver against `target`'s device.
pub fn run(target: Target, input: &[u8]) {
    let mem: crate::SharedGuestMem =
        GuestMemoryAtomic::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap());
    let Some(dev) = device(target, mem.clone()) else { return };
    let transport = MmioTransport::new(dev.clone());
    let mut driver = Driver { transport, dev, mem, queues: Vec::new() };
    let mut program = Program(input);
    driver.handshake(&mut program);
    for _ in 0..MAX_ACTIONS {
        if program.0.is_empty() {
            break;
        }
        driver.act(&mut program);
    }
    if target == Target::Block {
        let len = std::fs::metadata(image()).map(|m| m.len()).unwrap_or(IMAGE_SIZE);
        assert_eq!(len, IMAGE_SIZE, "the guest grew the image past its capacity");
    }
}

const CHAIN_MEM_SIZE: usize = 0x4_0000;
const CHAIN_DESC_TABLE: u64 = 0x1000;
const CHAIN_AVAIL_RING: u64 = 0x3000;
const CHAIN_USED_RING: u64 = 0x4000;
const CHAIN_DATA: u64 = 0x8000;

/// Block request parsing alone, with guest-controlled everything: byte 0 = queue size
/// exponent (bit 7: a read-only disk), byte 1 = how many chains the driver claims, then the
/// descriptor table (`16 * size` bytes), the avail ring entries, and data for guest memory.
/// Whatever the input, parsing returns a request or a rejection, and a request's buffers lie
/// within the limits it was checked against.
pub fn blk_descriptor_chain(input: &[u8]) {
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

    let mem: crate::GuestMem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), CHAIN_MEM_SIZE)]).unwrap();
    mem.write_slice(table, GuestAddress(CHAIN_DESC_TABLE)).unwrap();
    mem.write_obj(0u16, GuestAddress(CHAIN_AVAIL_RING)).unwrap();
    mem.write_obj(u16::from(claimed), GuestAddress(CHAIN_AVAIL_RING + 2)).unwrap();
    mem.write_slice(ring, GuestAddress(CHAIN_AVAIL_RING + 4)).unwrap();
    let room = CHAIN_MEM_SIZE - CHAIN_DATA as usize;
    mem.write_slice(&data[..data.len().min(room)], GuestAddress(CHAIN_DATA)).unwrap();

    let mut queue = Queue::new(256).unwrap();
    queue.set_size(size);
    queue.set_desc_table_address(Some(CHAIN_DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(CHAIN_AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(CHAIN_USED_RING as u32), Some(0));
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
            assert!(req.data_len <= crate::blk::request::MAX_REQUEST_BYTES);
            let end = req.sector.saturating_add(req.data_len / 512).saturating_add(req.range_sectors.into());
            assert!(end <= limits.capacity_sectors, "sector {} beyond the capacity", req.sector);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replays every committed corpus input: what the fuzzer found interesting once stays a
    /// regression test, without libFuzzer or nightly.
    #[test]
    fn committed_corpora_replay_without_a_panic() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        for target in [Target::Block, Target::Net, Target::Vsock] {
            let dir = root.join(target.name());
            let mut inputs: Vec<_> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|e| e.unwrap().path())
                .collect();
            inputs.sort();
            assert!(inputs.len() >= 3, "{}: a corpus of {} inputs", dir.display(), inputs.len());
            for input in inputs {
                run(target, &std::fs::read(&input).unwrap());
            }
        }
        for input in std::fs::read_dir(root.join("blk_descriptor_chain")).unwrap() {
            blk_descriptor_chain(&std::fs::read(input.unwrap().path()).unwrap());
        }
        let _ = std::fs::remove_dir_all(scratch_dir());
    }
}
