//! Fuzzes virtio-blk descriptor-chain parsing alone (see
//! `devices::fuzzing::blk_descriptor_chain` for the input layout). Run with
//! `cargo +nightly fuzz run blk_descriptor_chain fuzz/corpus/blk_descriptor_chain` from
//! `devices/`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| devices::fuzzing::blk_descriptor_chain(input));
