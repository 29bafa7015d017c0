//! Messages between two host threads through a `swarm-ring` lane in shared memory, next to
//! the same messages through a Unix datagram socket pair (what two processes would use
//! without shared memory). The VM-to-VM rows, next to virtio-vsock and virtio-net, come with
//! the shared-memory device.
//!
//! `cargo run --release -p bench --bin ring [MESSAGES]` (default 2,000,000 per row).

use std::os::unix::net::UnixDatagram;
use std::time::Instant;

use bench::{Samples, Table};
use swarm_ring::{CACHE_LINE, Consumer, Producer, Region, RegionLayout};

const RUNS: usize = 3;

fn main() {
    let messages: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2_000_000);
    let mut table =
        Table::new(&["message", "swarm-ring lane (polling, batches of 32)", "Unix datagram pair", "ring / socket"]);
    for size in [64usize, 1024] {
        let ring = Samples::new((0..RUNS).map(|_| ring_rate(size, messages)).collect());
        let socket = Samples::new((0..RUNS).map(|_| socket_rate(size, messages / 10)).collect());
        table.row(vec![
            format!("{size} B"),
            format!("{:.2} M msg/s", ring.median() / 1e6),
            format!("{:.2} M msg/s", socket.median() / 1e6),
            format!("{:.0}x", ring.median() / socket.median()),
        ]);
    }
    table.print();
    println!(
        "\nMedians of {RUNS} runs; two threads on this host's 2 cores, each message checked on arrival. Ring: 256 \
         slots of {} bytes, the consumer spinning; sockets: one datagram per message, blocking.",
        1024 + 64
    );
}

/// Messages per second through one lane.
fn ring_rate(size: usize, messages: u64) -> f64 {
    let layout = RegionLayout { lanes: 1, slots: 256, slot_size: 1024 + 64 };
    let mut memory = vec![0u64; (layout.bytes() + CACHE_LINE) / 8];
    let base = memory.as_mut_ptr() as *mut u8;
    let base = base.wrapping_add(base.align_offset(CACHE_LINE));
    // SAFETY: the vector outlives both threads (scoped) and holds the region, aligned.
    let region = unsafe { Region::format(base, layout.bytes(), layout) }.expect("region");
    let lane = region.lane(0).expect("lane");
    let (mut tx, mut rx) = (Producer::attach(lane).expect("producer"), Consumer::attach(lane).expect("consumer"));
    let started = Instant::now();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let mut message = vec![0u8; size];
            let mut n = 0u64;
            while n < messages {
                let mut batch = 0;
                while batch < 32 && n < messages {
                    message[..8].copy_from_slice(&n.to_le_bytes());
                    if tx.write(&message).is_err() {
                        break;
                    }
                    n += 1;
                    batch += 1;
                }
                tx.publish();
            }
        });
        let mut out = vec![0u8; 2048];
        let mut expected = 0u64;
        while expected < messages {
            match rx.read(&mut out).expect("a sane lane") {
                Some(len) => {
                    assert!(len == size && out[..8] == expected.to_le_bytes(), "message {expected}");
                    expected += 1;
                    if expected.is_multiple_of(32) {
                        rx.release();
                    }
                }
                None => {
                    rx.release();
                    std::hint::spin_loop();
                }
            }
        }
    });
    drop(memory);
    messages as f64 / started.elapsed().as_secs_f64()
}

/// Messages per second through a datagram socket pair.
fn socket_rate(size: usize, messages: u64) -> f64 {
    let (tx, rx) = UnixDatagram::pair().expect("socket pair");
    let started = Instant::now();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let mut message = vec![0u8; size];
            for n in 0..messages {
                message[..8].copy_from_slice(&n.to_le_bytes());
                tx.send(&message).expect("send");
            }
        });
        let mut out = vec![0u8; 2048];
        for expected in 0..messages {
            let len = rx.recv(&mut out).expect("recv");
            assert!(len == size && out[..8] == expected.to_le_bytes(), "message {expected}");
        }
    });
    messages as f64 / started.elapsed().as_secs_f64()
}
