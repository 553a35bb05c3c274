//! Fuzz target `ws_inject`: the frame injector. Frames of the balancer's own (Broadcast,
//! WriteData) spliced into a backend-to-client stream at the points
//! `FrameTracker::read_limit_for_injection` allows reach the client whole, between messages,
//! with the backend's bytes unchanged, as tungstenite's frame parser reads the result.
//! The checks live in `fuzz/props`, shared with `tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../props/mod.rs"]
mod props;

fuzz_target!(|data: &[u8]| props::ws_inject(data));
