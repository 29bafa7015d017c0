//! `prog=idle [until=WORD]`: waits for input on the serial port, then exits 0. Without
//! `until`, any byte ends it; with it, only WORD typed in full does (the bytes before it are
//! ignored), so a harness that types at random (an API fuzzer) cannot end it by chance. Lets a
//! harness measure a guest that is up and quiet (e.g. the VMM's resident memory).
use super::{Context, Outcome, Program};
use crate::{console, println, time};

pub const PROGRAM: Program =
    Program { name: "idle", about: "wait for a byte (or until=WORD) on the serial port, then exit", run };

/// The longest `until` word kept.
const MAX_WORD: usize = 64;

fn run(ctx: &Context) -> Outcome {
    let word = ctx.args.get("until").unwrap_or("").as_bytes();
    let word = &word[..word.len().min(MAX_WORD)];
    match word.is_empty() {
        true => println!("idle: ready; send any byte on the serial port to finish"),
        false => println!("idle: ready; type the word given as until= on the serial port to finish"),
    }
    // The last bytes received, to compare with the word's tail.
    let mut recent = [0u8; MAX_WORD];
    loop {
        match console::try_read_byte() {
            Some(byte) => {
                recent.copy_within(1.., 0);
                recent[MAX_WORD - 1] = byte;
                if recent.ends_with(word) {
                    break;
                }
            }
            // Poll about once a millisecond: every poll is a VM exit.
            None => time::spin_us(1000),
        }
    }
    println!("idle: input received");
    Ok(())
}
