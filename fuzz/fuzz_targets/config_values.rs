//! Fuzz target `config_values`: the property checks live in `fuzz/props`, shared with
//! `tests/fuzz_corpus.rs`, which replays the committed corpus on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../props/mod.rs"]
mod props;

fuzz_target!(|data: &[u8]| props::config_values(data));
