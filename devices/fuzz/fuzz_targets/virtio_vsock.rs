//! A guest driver played from the input against virtio-vsock on its Unix-socket backend: MMIO register sequences,
//! descriptor chains and kicks (see `devices::fuzzing`). Run with
//! `cargo +nightly fuzz run virtio_vsock fuzz/corpus/virtio_vsock` from `devices/`.
#![no_main]

use devices::fuzzing::{Target, run};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| run(Target::Vsock, input));
