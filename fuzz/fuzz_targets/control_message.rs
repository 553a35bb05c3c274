//! Fuzz target `control_message`: `wslb::control::protocol::decode` (every text frame a
//! backend sends on the control WebSocket) agrees with serde_json's reading of the same text
//! on its verdict, accepted registrations hold every documented limit and round-trip through
//! the agent's encoder, and the balancer's answers stay valid JSON for any text they carry.
//! Backend messaging requests (issue 17) go through the session's own decoders
//! (`wslb::control::messaging::decode_text`/`decode_binary`) and round-trip through the
//! agent's encoders. The checks live in `fuzz/props`, shared with `tests/fuzz_corpus.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../props/mod.rs"]
mod props;

fuzz_target!(|data: &[u8]| props::control_message(data));
