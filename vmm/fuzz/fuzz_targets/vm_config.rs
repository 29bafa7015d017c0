//! Fuzzes the configuration file reader and its validation (see `vmm::fuzzing`). Run with
//! `cargo +nightly fuzz run vm_config fuzz/corpus/vm_config` from `vmm/`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| vmm::fuzzing::vm_config(input));
