//! Fuzz target `sticky_cookie`: `wslb::sticky` cookie lookup and verification never panic,
//! issued cookies round-trip, tampered ones never verify, and rendezvous picks are stable.
//! The checks live in `fuzz/props`, shared with `tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../props/mod.rs"]
mod props;

fuzz_target!(|data: &[u8]| props::sticky_cookie(data));
