//! Lanes in ordinary memory: what crosses, in what order, and what a corrupt peer gets.

use swarm_ring::packet::{HEADER_BYTES, PacketError, PacketHeader, PacketStatus};
use swarm_ring::status::VmStatus;
use swarm_ring::{CACHE_LINE, Consumer, Producer, Region, RegionLayout, RingError};

/// Cache-line aligned memory standing in for a shared region.
struct Shared {
    words: Vec<u64>,
    offset: usize,
    len: usize,
}

impl Shared {
    fn new(len: usize) -> Self {
        let words = vec![0u64; (len + CACHE_LINE) / 8 + 1];
        let offset = (words.as_ptr() as usize).next_multiple_of(CACHE_LINE) - words.as_ptr() as usize;
        Self { words, offset, len }
    }

    fn base(&mut self) -> *mut u8 {
        // SAFETY: `offset` < CACHE_LINE, inside the allocation.
        unsafe { (self.words.as_mut_ptr() as *mut u8).add(self.offset) }
    }

    fn bytes(&mut self) -> &mut [u8] {
        let len = self.len;
        // SAFETY: `len` bytes from `base` are inside the allocation.
        unsafe { std::slice::from_raw_parts_mut(self.base(), len) }
    }
}

fn region(shared: &mut Shared, layout: RegionLayout) -> Region {
    let len = shared.len;
    // SAFETY: the memory outlives the region in every test; aligned by `Shared`.
    unsafe { Region::format(shared.base(), len, layout) }.unwrap()
}

const LAYOUT: RegionLayout = RegionLayout { lanes: 2, slots: 8, slot_size: 64 };

#[test]
fn messages_cross_in_order_and_back_pressure_holds() {
    let mut shared = Shared::new(LAYOUT.bytes());
    let region = region(&mut shared, LAYOUT);
    let lane = region.lane(0).unwrap();
    let (mut tx, mut rx) = (Producer::attach(lane).unwrap(), Consumer::attach(lane).unwrap());
    let mut out = [0u8; 56];
    assert_eq!(rx.pop(&mut out), Ok(None));
    for i in 0..8u8 {
        tx.write(&[i; 5]).unwrap();
    }
    // Written, not yet published: the consumer sees nothing.
    assert_eq!(rx.pop(&mut out), Ok(None));
    tx.publish();
    assert_eq!(tx.push(b"ninth"), Err(RingError::Full));
    assert_eq!(tx.push(&[0; 57]), Err(RingError::TooLong { len: 57, max: 56 }));
    for i in 0..8u8 {
        assert_eq!(rx.pop(&mut out), Ok(Some(5)));
        assert_eq!(&out[..5], &[i; 5]);
    }
    assert_eq!(rx.pop(&mut out), Ok(None));
    // Room again once the consumer released; a message as long as a slot fits.
    tx.push(&[7; 56]).unwrap();
    let mut short = [0u8; 10];
    assert_eq!(rx.pop(&mut short), Err(RingError::TooLong { len: 56, max: 10 }));
    assert_eq!(rx.pop(&mut out), Ok(Some(56)), "a message too long for the buffer stays");
}

#[test]
fn a_million_messages_between_two_threads_none_lost_none_reordered() {
    const MESSAGES: u64 = 1_000_000;
    let layout = RegionLayout { lanes: 1, slots: 256, slot_size: 64 };
    let mut shared = Shared::new(layout.bytes());
    let region = region(&mut shared, layout);
    let lane = region.lane(0).unwrap();
    let (mut tx, mut rx) = (Producer::attach(lane).unwrap(), Consumer::attach(lane).unwrap());
    let message = |n: u64| {
        let mut m = [0u8; 24];
        m[..8].copy_from_slice(&n.to_le_bytes());
        m[8..16].copy_from_slice(&(n.wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_le_bytes());
        m[16..24].copy_from_slice(&(!n).to_le_bytes());
        m
    };
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let mut n = 0;
            while n < MESSAGES {
                // Batches of up to 32, one publication each.
                let mut batch = 0;
                while batch < 32 && n < MESSAGES && tx.write(&message(n)).is_ok() {
                    n += 1;
                    batch += 1;
                }
                tx.publish();
                if batch == 0 {
                    std::hint::spin_loop();
                }
            }
        });
        let mut out = [0u8; 56];
        let mut expected = 0;
        while expected < MESSAGES {
            match rx.read(&mut out).unwrap() {
                Some(len) => {
                    assert_eq!(&out[..len], &message(expected), "message {expected}");
                    expected += 1;
                    if expected.is_multiple_of(16) {
                        rx.release();
                    }
                }
                None => {
                    rx.release();
                    std::hint::spin_loop();
                }
            }
        }
        rx.release();
    });
}

#[test]
fn a_corrupt_peer_gets_errors_never_a_panic() {
    let mut shared = Shared::new(LAYOUT.bytes());
    let region = region(&mut shared, LAYOUT);
    let lane = region.lane(1).unwrap();
    let mut rx = Consumer::attach(lane).unwrap();
    let mut tx = Producer::attach(lane).unwrap();
    tx.push(b"ok").unwrap();
    let lane_at = RegionLayout::bytes(&RegionLayout { lanes: 1, ..LAYOUT });
    // The producer's index jumps far ahead: more in flight than there are slots.
    shared.bytes()[lane_at..lane_at + 4].copy_from_slice(&1000u32.to_le_bytes());
    let mut out = [0u8; 64];
    assert_eq!(rx.pop(&mut out), Err(RingError::BadIndex { head: 1000, tail: 0 }));
    assert!(matches!(Producer::attach(lane), Err(RingError::BadIndex { .. })));
    // A sane index, a slot length beyond the slot.
    shared.bytes()[lane_at..lane_at + 4].copy_from_slice(&1u32.to_le_bytes());
    let slot = lane_at + 2 * CACHE_LINE;
    shared.bytes()[slot..slot + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(rx.pop(&mut out), Err(RingError::BadLength { len: u32::MAX }));
    // The consumer's index corrupt: the producer refuses to write rather than overwrite
    // slots still in flight, whether it attaches now or already had.
    let tail = lane_at + CACHE_LINE;
    shared.bytes()[tail..tail + 4].copy_from_slice(&7777u32.to_le_bytes());
    assert!(matches!(Producer::attach(lane), Err(RingError::BadIndex { .. })));
    for _ in 0..8 {
        let _ = tx.write(b"x");
    }
    assert!(matches!(tx.push(b"x"), Err(RingError::BadIndex { .. })));
    // The other lane is untouched.
    let other = region.lane(0).unwrap();
    Producer::attach(other).unwrap().push(b"fine").unwrap();
    assert_eq!(Consumer::attach(other).unwrap().pop(&mut out), Ok(Some(4)));
}

#[test]
fn garbage_anywhere_in_a_region_is_survived() {
    let mut shared = Shared::new(LAYOUT.bytes());
    let region = region(&mut shared, LAYOUT);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut out = [0u8; 64];
    for round in 0..2000u32 {
        // Scribble a few random bytes, then use both ends of both lanes.
        for _ in 0..4 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = shared.len;
            shared.bytes()[(x as usize) % len] = (x >> 32) as u8;
        }
        for lane in 0..2 {
            let lane = region.lane(lane).unwrap();
            if let Ok(mut tx) = Producer::attach(lane) {
                let _ = tx.push(&round.to_le_bytes());
            }
            if let Ok(mut rx) = Consumer::attach(lane) {
                for _ in 0..10 {
                    if !matches!(rx.pop(&mut out), Ok(Some(_))) {
                        break;
                    }
                }
            }
        }
        // SAFETY: the memory is alive and aligned.
        let _ = unsafe { Region::open(shared.base(), shared.len) };
    }
}

#[test]
fn a_region_opens_only_with_a_header_that_fits() {
    let mut shared = Shared::new(LAYOUT.bytes());
    let len = shared.len;
    // SAFETY (every call here): the memory is alive and aligned.
    assert_eq!(unsafe { Region::open(shared.base(), len) }.err(), Some(RingError::BadRegion("no ring header")));
    region(&mut shared, LAYOUT);
    let opened = unsafe { Region::open(shared.base(), len) }.unwrap();
    assert_eq!(opened.layout(), LAYOUT);
    assert!(unsafe { Region::open(shared.base(), len - 1) }.is_err(), "lanes beyond the region");
    assert!(opened.lane(2).is_err());
    // Lanes, slots or sizes out of bounds in the header.
    shared.bytes()[16..20].copy_from_slice(&3u32.to_le_bytes());
    assert!(unsafe { Region::open(shared.base(), len) }.is_err());
    let too_big = RegionLayout { lanes: 5000, ..LAYOUT };
    assert!(unsafe { Region::format(shared.base(), len, too_big) }.is_err());
}

#[test]
fn packets_and_status_records_round_trip_and_garbage_is_refused() {
    let header = PacketHeader {
        request_id: 0x0123_4567_89ab_cdef,
        next_vm: 3,
        layer: 2,
        status: PacketStatus::InProgress,
        payload_len: 5,
    };
    let mut buf = [0u8; 64];
    assert_eq!(header.encode(b"hello", &mut buf), Some(HEADER_BYTES + 5));
    let (decoded, payload) = PacketHeader::decode(&buf[..HEADER_BYTES + 5]).unwrap();
    assert_eq!((decoded, payload), (header, &b"hello"[..]));
    assert_eq!(header.encode(&[0; 64], &mut buf), None, "too big for the buffer");
    assert_eq!(PacketHeader::decode(&buf[..10]), Err(PacketError::Short));
    assert_eq!(PacketHeader::decode(&buf[..HEADER_BYTES + 4]), Err(PacketError::Short), "payload cut");
    buf[12] = 9;
    assert_eq!(PacketHeader::decode(&buf), Err(PacketError::BadStatus(9)));
    buf[12] = 0;
    buf[21] = 1;
    assert_eq!(PacketHeader::decode(&buf), Err(PacketError::Reserved));

    let status = VmStatus { vm: 4, layers: 0b110, load: 17, capacity: 239, served: 1 << 40, affinity: 1 };
    assert_eq!(VmStatus::decode(&status.encode()), Some(status));
    let mut bad = status.encode();
    bad[30] = 1;
    assert_eq!(VmStatus::decode(&bad), None);
    assert_eq!(VmStatus::decode(&bad[..31]), None);
}

#[test]
fn a_consumer_about_to_sleep_is_seen_or_sees_the_message() {
    let mut shared = Shared::new(swarm_ring::lane_bytes(4, 64));
    // SAFETY: `shared` is cache-line aligned, large enough, and outlives the lane.
    let lane = unsafe { swarm_ring::LaneMemory::new(shared.base(), 4, 64) }.unwrap();
    lane.reset();
    let mut producer = Producer::attach(lane).unwrap();
    let mut consumer = Consumer::attach(lane).unwrap();
    assert!(!producer.consumer_sleeping());
    assert!(consumer.prepare_sleep().unwrap(), "an empty lane may be slept on");
    producer.push(b"wake up").unwrap();
    assert!(producer.consumer_sleeping(), "the producer sees the consumer asleep and rings");
    consumer.woke();
    assert!(!producer.consumer_sleeping());
    assert!(!consumer.prepare_sleep().unwrap(), "a message is waiting: no sleep");
    assert!(!producer.consumer_sleeping(), "the flag is taken back");
    let mut out = [0u8; 56];
    assert_eq!(consumer.pop(&mut out).unwrap(), Some(7));
}
