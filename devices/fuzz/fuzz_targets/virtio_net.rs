//! A guest driver played from the input against virtio-net on a Unix datagram backend: MMIO register sequences,
//! descriptor chains and kicks (see `devices::fuzzing`). Run with
//! `cargo +nightly fuzz run virtio_net fuzz/corpus/virtio_net` from `devices/`.
#![no_main]

use devices::fuzzing::{Target, run};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| run(Target::Net, input));
