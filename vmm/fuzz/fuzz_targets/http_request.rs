//! Fuzzes the API's HTTP/1.1 request parser (see `vmm::fuzzing`). Run with
//! `cargo +nightly fuzz run http_request fuzz/corpus/http_request` from `vmm/`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| vmm::fuzzing::http_request(input));
