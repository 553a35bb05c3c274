//! Fuzz target `proxy_header`: `wslb::proxy_protocol::parse` (the PROXY v1/v2 header a
//! `--proxy-protocol` listener peeks at): prefix-stable verdicts, bounded lengths, a v2
//! reference reading and `encode` round trips. The checks live in `fuzz/props`, shared with
//! `tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../props/mod.rs"]
mod props;

fuzz_target!(|data: &[u8]| props::proxy_header(data));
