//! Fuzz target `cidr`: `wslb::netpolicy::parse_cidr` (`--backend-allow`, `--trusted-proxy`)
//! against a reference reading, and `Cidr::contains` against a bit-by-bit membership test.
//! The checks live in `fuzz/props`, shared with `tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../props/mod.rs"]
mod props;

fuzz_target!(|data: &[u8]| props::cidr(data));
