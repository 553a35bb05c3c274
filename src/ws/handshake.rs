//! RFC 6455 §4 opening handshake checks, on heads parsed by `http::head`. Pure.

use std::fmt;

use crate::http::head::{has_token, header, Request, Response};

/// Why an upgrade request or a backend's 101 was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeError {
    /// Upgrade must be a GET.
    WrongMethod,
    /// Upgrade needs HTTP/1.1.
    WrongVersion,
    /// `Connection` lacks the `upgrade` token.
    MissingConnectionUpgrade,
    /// `Sec-WebSocket-Version` is not 13 (answered 426 with the supported version).
    UnsupportedVersion,
    /// `Sec-WebSocket-Key` missing or not 16 base64-encoded bytes.
    BadKey,
    /// A request body on an upgrade.
    UnexpectedBody,
    /// The backend's `Sec-WebSocket-Accept` does not match the key.
    BadAccept,
    /// The backend's 101 does not upgrade to websocket.
    BadUpgradeResponse,
}

impl HandshakeError {
    /// The status answered to the client for a refused request.
    pub fn status(self) -> u16 {
        match self {
            HandshakeError::UnsupportedVersion => 426,
            HandshakeError::BadAccept | HandshakeError::BadUpgradeResponse => 502,
            _ => 400,
        }
    }
}

impl HandshakeError {
    /// What was wrong, in a few words.
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeError::WrongMethod => "websocket upgrade must be GET",
            HandshakeError::WrongVersion => "websocket upgrade needs HTTP/1.1",
            HandshakeError::MissingConnectionUpgrade => "Connection lacks upgrade",
            HandshakeError::UnsupportedVersion => "Sec-WebSocket-Version must be 13",
            HandshakeError::BadKey => "missing or malformed Sec-WebSocket-Key",
            HandshakeError::UnexpectedBody => "body on a websocket upgrade",
            HandshakeError::BadAccept => "backend sent a wrong Sec-WebSocket-Accept",
            HandshakeError::BadUpgradeResponse => "backend 101 does not upgrade to websocket",
        }
    }
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for HandshakeError {}

/// The key of a valid upgrade request: 24 base64 characters encoding 16 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WsKey(pub [u8; 24]);

fn is_b64(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'+' || b == b'/'
}

/// Checks an upgrade request (whose `wants_websocket` is set) and returns its key.
pub fn validate_request(req: &Request<'_, '_>) -> Result<WsKey, HandshakeError> {
    if req.method != "GET" {
        return Err(HandshakeError::WrongMethod);
    }
    if req.version != 1 {
        return Err(HandshakeError::WrongVersion);
    }
    let conn_upgrade = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .any(|h| has_token(h.value, "upgrade"));
    if !conn_upgrade {
        return Err(HandshakeError::MissingConnectionUpgrade);
    }
    match header(req.headers, "sec-websocket-version") {
        Some(v) if v.trim_ascii() == b"13" => {}
        _ => return Err(HandshakeError::UnsupportedVersion),
    }
    let key = header(req.headers, "sec-websocket-key")
        .map(<[u8]>::trim_ascii)
        .ok_or(HandshakeError::BadKey)?;
    // 16 bytes encode to 22 symbols + "==" (RFC 6455 §4.1 item 7).
    let key: [u8; 24] = key.try_into().map_err(|_| HandshakeError::BadKey)?;
    let (sym, pad) = key.split_at(22);
    // The last symbol holds 2 data bits and 4 zero bits (RFC 4648 §3.5): any other is not
    // 16 bytes to a strict decoder such as a tungstenite backend's, which would refuse it.
    let canonical_end = sym.last().is_some_and(|b| b"AQgw".contains(b));
    if !sym.iter().all(|&b| is_b64(b)) || !canonical_end || pad != b"==" {
        return Err(HandshakeError::BadKey);
    }
    if req.body != crate::http::body::BodyKind::Empty {
        return Err(HandshakeError::UnexpectedBody);
    }
    Ok(WsKey(key))
}

/// Checks a backend's 101 against the client's key (a backend that answers a handshake it
/// did not understand must not open a tunnel).
pub fn validate_response(resp: &Response<'_, '_>, key: &WsKey) -> Result<(), HandshakeError> {
    let upgrade_ok = header(resp.headers, "upgrade").is_some_and(|v| has_token(v, "websocket"));
    if !upgrade_ok {
        return Err(HandshakeError::BadUpgradeResponse);
    }
    let expected = tungstenite::handshake::derive_accept_key(&key.0);
    match header(resp.headers, "sec-websocket-accept") {
        Some(v) if v.trim_ascii() == expected.as_bytes() => Ok(()),
        _ => Err(HandshakeError::BadAccept),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::head::{header_storage, parse_request, parse_response};

    const GOOD: &str = "GET /chat HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    fn check(raw: &str) -> Result<WsKey, HandshakeError> {
        let mut st = header_storage();
        let req = parse_request(raw.as_bytes(), &mut st).unwrap().unwrap();
        validate_request(&req)
    }

    #[test]
    fn valid_request_and_rfc_example_accept() {
        let key = check(GOOD).unwrap();
        // RFC 6455 §1.3 sample.
        let resp = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        let mut st = header_storage();
        let r = parse_response(resp, &mut st, false).unwrap().unwrap();
        assert_eq!(validate_response(&r, &key), Ok(()));
        let wrong = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: AAAALMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        let mut st = header_storage();
        let r = parse_response(wrong, &mut st, false).unwrap().unwrap();
        assert_eq!(validate_response(&r, &key), Err(HandshakeError::BadAccept));
    }

    #[test]
    fn invalid_requests() {
        let cases = [
            (GOOD.replace("GET", "POST"), HandshakeError::WrongMethod),
            (
                GOOD.replace("HTTP/1.1", "HTTP/1.0"),
                HandshakeError::WrongVersion,
            ),
            (
                GOOD.replace("Connection: Upgrade", "Connection: keep-alive"),
                HandshakeError::MissingConnectionUpgrade,
            ),
            (
                GOOD.replace("Version: 13", "Version: 8"),
                HandshakeError::UnsupportedVersion,
            ),
            (
                GOOD.replace("dGhlIHNhbXBsZSBub25jZQ==", "short=="),
                HandshakeError::BadKey,
            ),
            (
                GOOD.replace("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZQ=x"),
                HandshakeError::BadKey,
            ),
            (
                GOOD.replace("\r\n\r\n", "\r\nContent-Length: 2\r\n\r\n"),
                HandshakeError::UnexpectedBody,
            ),
        ];
        for (raw, err) in cases {
            assert_eq!(check(&raw), Err(err), "{raw}");
        }
        assert_eq!(HandshakeError::UnsupportedVersion.status(), 426);
    }

    #[test]
    fn non_canonical_key_refused() {
        // Fuzz find (ws_handshake): 'X' leaves non-zero padding bits, so a strict base64
        // decoder (tungstenite's server) rejects the key the balancer had accepted.
        let raw = GOOD.replace("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZX==");
        assert_eq!(check(&raw), Err(HandshakeError::BadKey));
        for last in ['A', 'Q', 'g', 'w'] {
            let key = format!("dGhlIHNhbXBsZSBub25jZ{last}==");
            let raw = GOOD.replace("dGhlIHNhbXBsZSBub25jZQ==", &key);
            assert!(check(&raw).is_ok(), "{key}");
        }
    }
}
