#![allow(dead_code)]
pub fn http_request(_d: &[u8]) {}
pub fn http_response(_d: &[u8]) {}
pub fn chunked(_d: &[u8]) {}
pub fn ws_handshake(_d: &[u8]) {}
pub fn ws_frames(_d: &[u8]) {}
pub fn config_values(_d: &[u8]) {}
