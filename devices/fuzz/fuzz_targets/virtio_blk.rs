//! A guest driver played from the input against virtio-blk on an image file: MMIO register sequences,
//! descriptor chains and kicks (see `devices::fuzzing`). Run with
//! `cargo +nightly fuzz run virtio_blk fuzz/corpus/virtio_blk` from `devices/`.
#![no_main]

use devices::fuzzing::{Target, run};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| run(Target::Block, input));
