//! `prog=net-reflect [net=I]`: sends every frame it receives back out, unchanged, until a byte
//! arrives on the serial port: the far end of a VM-to-VM path through virtio-net (the swarm
//! benchmark's peer for the shared-memory rings). Sends one broadcast frame first, so a host
//! relay learns where this VM's backend is. Prints `net-reflect: ready` and, at the end,
//! `net-reflect: reflected N frames`.
use super::net::{ETHERTYPE, MIN_FRAME, open_net};
use super::virtio_util::InputPoll;
use super::{Context, Failure, Outcome, Program};
use crate::{arch, dma, println};

pub const REFLECT: Program =
    Program { name: "net-reflect", about: "send every received frame back (the far end of a VM-to-VM path)", run };

const P: &str = "net-reflect";

fn run(ctx: &Context) -> Outcome {
    let mut net = open_net(ctx, P, 64)?;
    let cap = net.max_frame() + 64;
    let frame = dma::alloc_slice::<u8>(cap).ok_or_else(|| {
        println!("{P}: out of memory");
        Failure::Check
    })?;
    let mut hello = [0u8; MIN_FRAME];
    hello[0..6].fill(0xff);
    hello[6..12].copy_from_slice(&net.mac);
    hello[12..14].copy_from_slice(&(ETHERTYPE + 1).to_be_bytes());
    let failed = |e| {
        println!("{P}: FAILED: {e}");
        Failure::Check
    };
    net.send(&hello).map_err(failed)?;
    println!("{P}: ready");
    let (mut reflected, mut input) = (0u64, InputPoll::new());
    while !input.arrived(arch::rdtsc()) {
        let Some(len) = net.recv(frame).map_err(failed)? else {
            arch::pause();
            continue;
        };
        while !net.send(&frame[..len]).map_err(failed)? {
            net.reclaim_tx().map_err(failed)?;
        }
        reflected += 1;
    }
    println!("{P}: reflected {reflected} frames");
    net.shutdown();
    Ok(())
}
