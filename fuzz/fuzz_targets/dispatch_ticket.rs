//! Fuzz target `dispatch_ticket`: `wslb::ticket` verification of untrusted tickets never
//! panics, accepts only what the signer issued, and issued tickets round-trip.
//! The checks live in `fuzz/props`, shared with `tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../props/mod.rs"]
mod props;

fuzz_target!(|data: &[u8]| props::dispatch_ticket(data));
