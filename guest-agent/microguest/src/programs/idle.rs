//! `prog=idle`: waits until a byte arrives on the serial port, then exits 0. Lets a harness
//! measure a guest that is up and quiet (e.g. the VMM's resident memory).
use super::{Context, Outcome, Program};
use crate::{console, println, time};

pub const PROGRAM: Program = Program { name: "idle", about: "wait for a byte on the serial port, then exit", run };

fn run(_ctx: &Context) -> Outcome {
    println!("idle: ready; send any byte on the serial port to finish");
    // Poll about once a millisecond: every poll is a VM exit.
    while console::try_read_byte().is_none() {
        time::spin_us(1000);
    }
    println!("idle: input received");
    Ok(())
}
