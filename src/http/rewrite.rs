//! What the balancer writes: forwarded request/response heads re-serialised from what was
//! parsed (one framing header, hop-by-hop fields removed, X-Forwarded-* added), and the
//! canned error answers. Pure: writes into a caller's `Vec`.

use std::net::IpAddr;

use super::body::BodyKind;
use super::head::{has_token, Request, Response};

/// Fields that describe one hop (RFC 9110 §7.6.1) or that the balancer re-emits itself
/// (framing, X-Forwarded-Proto/Host), so a client cannot smuggle its own copy through.
const DROPPED: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "http2-settings",
];

fn named_by_connection(headers: &[httparse::Header<'_>], name: &str) -> bool {
    headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .any(|h| has_token(h.value, name))
}

/// Fields a request cannot be forwarded without: a `Connection` header naming them is
/// ignored for them (found by fuzzing: `Connection: host` would strip the Host).
fn is_protected(name: &str) -> bool {
    name.eq_ignore_ascii_case("host")
        || name
            .get(..14)
            .is_some_and(|p| p.eq_ignore_ascii_case("sec-websocket-"))
}

fn is_dropped(headers: &[httparse::Header<'_>], name: &str) -> bool {
    DROPPED.iter().any(|d| name.eq_ignore_ascii_case(d))
        || (!is_protected(name) && named_by_connection(headers, name))
}

/// Decimal digits without an intermediate `String` (this runs for every request).
fn put_decimal(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        if let Some(d) = digits.get_mut(i) {
            *d = b'0' + (n % 10) as u8;
        }
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    out.extend_from_slice(digits.get(i..).unwrap_or_default());
}

fn put_ip(out: &mut Vec<u8>, ip: IpAddr) {
    use std::io::Write as _;
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{ip}");
}

fn put_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes the framing field. For chunked, the codings the sender applied before chunked
/// (e.g. `gzip, chunked`) are kept, in order, in one field: dropping them would hand the
/// backend a compressed body labelled as plain.
fn put_framing(out: &mut Vec<u8>, body: BodyKind, headers: &[httparse::Header<'_>]) {
    if body == BodyKind::Chunked {
        out.extend_from_slice(b"Transfer-Encoding: ");
        for h in headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
        {
            for coding in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if coding.is_empty() || coding.eq_ignore_ascii_case(b"chunked") {
                    continue;
                }
                out.extend_from_slice(coding);
                out.extend_from_slice(b", ");
            }
        }
        out.extend_from_slice(b"chunked\r\n");
        return;
    }
    match body {
        BodyKind::Length(n) => {
            out.extend_from_slice(b"Content-Length: ");
            put_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        BodyKind::Chunked | BodyKind::Empty | BodyKind::UntilClose => {}
    }
}

/// How the client reached the balancer, for X-Forwarded-*, and who it is.
#[derive(Debug, Clone, Copy)]
pub struct ClientInfo<'a> {
    /// Peer address of the client socket.
    pub peer: IpAddr,
    /// Arrived over TLS.
    pub tls: bool,
    /// The peer is in `--trusted-proxy`: its forwarding chain is kept and extended.
    pub trusted: bool,
    /// `--forwarded`: RFC 7239 `Forwarded` instead of `X-Forwarded-For`.
    pub rfc7239: bool,
    /// `--client-id-header`: the client's id for the backend; `None` = off.
    pub client_id: Option<ClientId<'a>>,
}

/// The default client-id field name. Removed from client requests even when the feature is
/// off or renamed: a backend written for wslb may read it, and must never read a client's.
pub const DEFAULT_CLIENT_ID_HEADER: &str = "X-Wslb-Client";

/// The client-id field: `NAME: INSTANCE.N`, the id backends use to message this client.
#[derive(Debug, Clone, Copy)]
pub struct ClientId<'a> {
    /// Header name (`--client-id-header`).
    pub header: &'a str,
    /// The balancer's `--instance-id`.
    pub instance: &'a str,
    /// The connection's number.
    pub id: u64,
}

/// Writes `NAME: INSTANCE.N`. Any field of that name from the client was dropped: a
/// client that names itself could have a backend message another client.
fn put_client_id(out: &mut Vec<u8>, id: ClientId<'_>) {
    out.extend_from_slice(id.header.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(id.instance.as_bytes());
    out.push(b'.');
    put_decimal(out, id.id);
    out.extend_from_slice(b"\r\n");
}

/// Fields that carry a forwarding chain. A client can write anything into them, so they
/// are believed only from a trusted proxy, and always re-emitted as one field of ours.
fn is_forwarding(name: &str) -> bool {
    name.eq_ignore_ascii_case("x-forwarded-for")
        || name.eq_ignore_ascii_case("forwarded")
        || name.eq_ignore_ascii_case("x-real-ip")
}

/// The one forwarding field the backend gets. From a trusted peer, every incoming list
/// element of the same kind (X-Forwarded-For, or Forwarded with `--forwarded`) is kept in
/// order; the peer's address is appended either way.
fn put_forwarding(out: &mut Vec<u8>, headers: &[httparse::Header<'_>], client: ClientInfo<'_>) {
    let (name, field): (&[u8], &str) = if client.rfc7239 {
        (b"Forwarded: ", "forwarded")
    } else {
        (b"X-Forwarded-For: ", "x-forwarded-for")
    };
    out.extend_from_slice(name);
    if client.trusted {
        let elements = headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(field))
            .flat_map(|h| h.value.split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|e| !e.is_empty());
        for e in elements {
            out.extend_from_slice(e);
            out.extend_from_slice(b", ");
        }
    }
    let peer = client.peer.to_canonical();
    match (client.rfc7239, peer) {
        // RFC 7239 §6: an IPv6 node is bracketed, and the brackets and colons make it a
        // quoted-string.
        (true, IpAddr::V6(_)) => {
            out.extend_from_slice(b"for=\"[");
            put_ip(out, peer);
            out.extend_from_slice(b"]\"");
        }
        (true, IpAddr::V4(_)) => {
            out.extend_from_slice(b"for=");
            put_ip(out, peer);
        }
        (false, _) => put_ip(out, peer),
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes the head forwarded to a backend. `websocket` re-adds the upgrade fields (which
/// are hop-by-hop and so dropped with the rest) for a validated WebSocket handshake.
pub fn write_request(
    req: &Request<'_, '_>,
    client: ClientInfo<'_>,
    websocket: bool,
    out: &mut Vec<u8>,
) {
    // One allocation: the forwarded head is the parsed one plus a few fields.
    out.reserve(req.head_len + 192);
    out.extend_from_slice(req.method.as_bytes());
    out.push(b' ');
    // Absolute-form goes on in origin-form: the authority travels as Host (below).
    if req.authority.is_some() && !req.origin.starts_with('/') {
        out.push(b'/');
    }
    out.extend_from_slice(req.origin.as_bytes());
    out.extend_from_slice(if req.version == 0 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    let mut host: Option<&[u8]> = None;
    for h in req.headers {
        if is_dropped(req.headers, h.name)
            || is_forwarding(h.name)
            || h.name.eq_ignore_ascii_case("x-forwarded-proto")
            || h.name.eq_ignore_ascii_case("x-forwarded-host")
            || h.name.eq_ignore_ascii_case(DEFAULT_CLIENT_ID_HEADER)
            || client
                .client_id
                .is_some_and(|id| h.name.eq_ignore_ascii_case(id.header))
        {
            continue;
        }
        if h.name.eq_ignore_ascii_case("host") {
            // The target's authority wins over the Host field (RFC 9112 §3.2.2).
            let value = req.authority.map_or(h.value, str::as_bytes);
            host = Some(value);
            put_header(out, h.name, value);
            continue;
        }
        put_header(out, h.name, h.value);
    }
    if let (None, Some(authority)) = (host, req.authority) {
        // HTTP/1.0 may omit Host; the backend still learns which host was asked for.
        put_header(out, "Host", authority.as_bytes());
        host = Some(authority.as_bytes());
    }
    put_forwarding(out, req.headers, client);
    put_header(
        out,
        "X-Forwarded-Proto",
        if client.tls { b"https" } else { b"http" },
    );
    if let Some(host) = host {
        put_header(out, "X-Forwarded-Host", host);
    }
    if let Some(id) = client.client_id {
        put_client_id(out, id);
    }
    if websocket {
        out.extend_from_slice(b"Upgrade: websocket\r\nConnection: Upgrade\r\n");
    } else if req.version == 0 {
        // Without this an HTTP/1.0 request closes the pooled backend connection.
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    put_framing(out, req.body, req.headers);
    out.extend_from_slice(b"\r\n");
}

/// Writes the head relayed to the client. `close` adds `Connection: close` (the balancer
/// will close the client connection after this response); `websocket` is for a 101.
pub fn write_response(resp: &Response<'_, '_>, close: bool, websocket: bool, out: &mut Vec<u8>) {
    out.reserve(resp.head_len + 96);
    out.extend_from_slice(b"HTTP/1.1 ");
    put_decimal(out, u64::from(resp.status));
    out.push(b' ');
    out.extend_from_slice(resp.reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in resp.headers {
        if is_dropped(resp.headers, h.name) {
            continue;
        }
        put_header(out, h.name, h.value);
    }
    match resp.body {
        BodyKind::Chunked | BodyKind::Length(_) => put_framing(out, resp.body, resp.headers),
        // 204/304/HEAD answers keep the Content-Length the backend declared: it describes
        // the representation, not this message's framing.
        BodyKind::Empty | BodyKind::UntilClose => {
            if let Some(cl) = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            {
                if resp.status >= 200 && resp.body == BodyKind::Empty {
                    put_header(out, "Content-Length", cl.value.trim_ascii());
                }
            }
        }
    }
    if websocket {
        out.extend_from_slice(b"Upgrade: websocket\r\nConnection: Upgrade\r\n");
    } else if close && resp.status >= 200 {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A complete answer generated by the balancer itself (errors). Always closes unless the
/// status is 503/502 on a healthy connection; the caller decides and passes `close`.
pub fn write_error(status: u16, close: bool, out: &mut Vec<u8>) {
    let (reason, body) = match status {
        400 => ("Bad Request", "bad request\n"),
        401 => ("Unauthorized", "unauthorized\n"),
        403 => ("Forbidden", "forbidden\n"),
        405 => ("Method Not Allowed", "method not allowed\n"),
        408 => ("Request Timeout", "request timeout\n"),
        411 => ("Length Required", "length required\n"),
        413 => ("Content Too Large", "content too large\n"),
        426 => ("Upgrade Required", "upgrade required\n"),
        429 => ("Too Many Requests", "too many requests\n"),
        431 => (
            "Request Header Fields Too Large",
            "request header fields too large\n",
        ),
        501 => ("Not Implemented", "not implemented\n"),
        502 => ("Bad Gateway", "bad gateway\n"),
        503 => ("Service Unavailable", "no backend available\n"),
        504 => ("Gateway Timeout", "gateway timeout\n"),
        _ => ("Internal Server Error", "internal error\n"),
    };
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\nContent-Type: text/plain\r\nContent-Length: ");
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    if status == 503 {
        out.extend_from_slice(b"Retry-After: 1\r\n");
    }
    if status == 401 {
        // RFC 9110 §11.6.1: a 401 names the scheme that would work.
        out.extend_from_slice(b"WWW-Authenticate: Bearer realm=\"wslb\"\r\n");
    }
    if status == 405 {
        // RFC 9110 §15.5.6: a 405 lists the methods that would work (the dispatch path's).
        out.extend_from_slice(b"Allow: GET\r\n");
    }
    if status == 426 {
        out.extend_from_slice(b"Sec-WebSocket-Version: 13\r\n");
    }
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::head::{header_storage, parse_request, parse_response};

    fn forward(raw: &[u8], ws: bool) -> String {
        let mut st = header_storage();
        let req = parse_request(raw, &mut st).unwrap().unwrap();
        let mut out = Vec::new();
        let client = ClientInfo {
            peer: "10.0.0.9".parse().unwrap(),
            tls: false,
            trusted: false,
            rfc7239: false,
            client_id: None,
        };
        write_request(&req, client, ws, &mut out);
        String::from_utf8(out).unwrap()
    }

    fn forward_as(raw: &[u8], peer: &str, trusted: bool, rfc7239: bool) -> String {
        let mut st = header_storage();
        let req = parse_request(raw, &mut st).unwrap().unwrap();
        let mut out = Vec::new();
        let client = ClientInfo {
            peer: peer.parse().unwrap(),
            tls: false,
            trusted,
            rfc7239,
            client_id: None,
        };
        write_request(&req, client, false, &mut out);
        String::from_utf8(out).unwrap()
    }

    const SPOOFED: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.2.3.4\r\nforwarded: for=9.9.9.9\r\nX-Forwarded-For: 5.6.7.8, ,6.7.8.9\r\nX-Real-IP: 7.7.7.7\r\n\r\n";

    #[test]
    fn untrusted_peer_gets_exactly_one_forwarded_for_with_its_address() {
        let out = forward_as(SPOOFED, "10.0.0.9", false, false);
        assert_eq!(
            out,
            "GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 10.0.0.9\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: a\r\n\r\n"
        );
        let out = forward_as(SPOOFED, "::ffff:10.0.0.9", false, false);
        assert!(out.contains("\r\nX-Forwarded-For: 10.0.0.9\r\n"), "{out}");
    }

    #[test]
    fn trusted_peer_chain_is_merged_in_order() {
        let out = forward_as(SPOOFED, "10.0.0.9", true, false);
        assert!(
            out.contains("\r\nX-Forwarded-For: 1.2.3.4, 5.6.7.8, 6.7.8.9, 10.0.0.9\r\n"),
            "{out}"
        );
        assert_eq!(out.matches("X-Forwarded-For").count(), 1);
        assert!(
            !out.contains("orwarded: for") && !out.contains("X-Real-IP"),
            "{out}"
        );
    }

    #[test]
    fn rfc7239_forwarded() {
        let out = forward_as(SPOOFED, "10.0.0.9", false, true);
        assert!(out.contains("\r\nForwarded: for=10.0.0.9\r\n"), "{out}");
        assert!(
            !out.contains("X-Forwarded-For") && !out.contains("9.9.9.9"),
            "{out}"
        );
        let out = forward_as(SPOOFED, "2001:db8::1", false, true);
        assert!(
            out.contains("\r\nForwarded: for=\"[2001:db8::1]\"\r\n"),
            "{out}"
        );
        let out = forward_as(SPOOFED, "2001:db8::1", true, true);
        assert!(
            out.contains("\r\nForwarded: for=9.9.9.9, for=\"[2001:db8::1]\"\r\n"),
            "{out}"
        );
        // What was written parses back.
        let mut st = header_storage();
        assert!(parse_request(out.as_bytes(), &mut st).unwrap().is_some());
    }

    #[test]
    fn hop_by_hop_removed_and_forwarded_for_appended() {
        let out = forward(
            b"GET /p HTTP/1.1\r\nHost: ex\r\nConnection: keep-alive, Foo\r\nFoo: secret\r\nKeep-Alive: 5\r\nTE: trailers\r\nProxy-Connection: x\r\nUpgrade: h2c\r\nHTTP2-Settings: AA\r\nX-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: https\r\nAccept: */*\r\n\r\n",
            false,
        );
        assert_eq!(
            out,
            "GET /p HTTP/1.1\r\nHost: ex\r\nAccept: */*\r\nX-Forwarded-For: 10.0.0.9\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: ex\r\n\r\n"
        );
        // What was written parses back to the same framing.
        let mut st = header_storage();
        let again = parse_request(out.as_bytes(), &mut st).unwrap().unwrap();
        assert_eq!(again.head_len, out.len());
    }

    #[test]
    fn connection_cannot_strip_host_or_websocket_fields() {
        let out = forward(
            b"GET / HTTP/1.1\r\nHost: ex\r\nConnection: host, Upgrade, Sec-WebSocket-Key\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            true,
        );
        assert!(out.contains("\r\nHost: ex\r\n"), "{out}");
        assert!(
            out.contains("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"),
            "{out}"
        );
    }

    #[test]
    fn framing_reserialised_once() {
        let out = forward(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n",
            false,
        );
        assert!(out.contains("\r\nContent-Length: 5\r\n"));
        assert_eq!(out.matches("Content-Length").count(), 1);
        let out = forward(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        );
        assert!(out.contains("\r\nTransfer-Encoding: chunked\r\n"));
        let out = forward(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        );
        assert!(
            out.contains("\r\nTransfer-Encoding: gzip, chunked\r\n"),
            "{out}"
        );
        assert_eq!(out.matches("Transfer-Encoding").count(), 1);
    }

    #[test]
    fn websocket_upgrade_fields_readded() {
        let out = forward(
            b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            true,
        );
        assert!(out.ends_with("Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n"));
        assert!(out.contains("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"));
    }

    #[test]
    fn response_rewrite() {
        let raw = b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nContent-Length: 3\r\nX-A: b\r\n\r\n";
        let mut st = header_storage();
        let resp = parse_response(raw, &mut st, false).unwrap().unwrap();
        let mut out = Vec::new();
        write_response(&resp, true, false, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nX-A: b\r\nContent-Length: 3\r\nConnection: close\r\n\r\n"
        );
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n";
        let mut st = header_storage();
        let resp = parse_response(raw, &mut st, true).unwrap().unwrap();
        let mut out = Vec::new();
        write_response(&resp, false, false, &mut out);
        assert!(
            String::from_utf8(out)
                .unwrap()
                .contains("Content-Length: 42"),
            "HEAD keeps it"
        );
    }

    #[test]
    fn decimals() {
        for n in [0u64, 7, 10, 1234567890, u64::MAX] {
            let mut out = Vec::new();
            put_decimal(&mut out, n);
            assert_eq!(out, n.to_string().into_bytes());
        }
    }

    #[test]
    fn errors_are_complete_messages() {
        for status in [400, 401, 403, 408, 413, 431, 502, 503, 504] {
            let mut out = Vec::new();
            write_error(status, true, &mut out);
            let mut st = header_storage();
            let r = parse_response(&out, &mut st, false).unwrap().unwrap();
            assert_eq!(r.status, status);
            assert_ne!(r.reason, "Internal Server Error", "{status}");
            let BodyKind::Length(n) = r.body else {
                panic!()
            };
            assert_eq!(r.head_len + n as usize, out.len());
        }
        let mut out = Vec::new();
        write_error(401, true, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{text}");
        assert!(text.contains("\r\nWWW-Authenticate: Bearer"), "{text}");
        let mut out = Vec::new();
        write_error(503, false, &mut out);
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("Retry-After: 1\r\n"));
    }

    #[test]
    fn client_id_replaces_any_the_client_sent() {
        let raw = b"GET /chat HTTP/1.1\r\nHost: a\r\nx-wslb-client: evil.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nX-WSLB-CLIENT: evil.2\r\nAccept: */*\r\n\r\n";
        let mut st = header_storage();
        let req = parse_request(raw, &mut st).unwrap().unwrap();
        let with = |client_id| {
            let mut out = Vec::new();
            let client = ClientInfo {
                peer: "10.0.0.9".parse().unwrap(),
                tls: false,
                trusted: true,
                rfc7239: false,
                client_id,
            };
            write_request(&req, client, true, &mut out);
            String::from_utf8(out).unwrap()
        };
        let out = with(Some(ClientId {
            header: "X-Wslb-Client",
            instance: "lb1",
            id: 42,
        }));
        assert!(out.contains("\r\nX-Wslb-Client: lb1.42\r\n"), "{out}");
        assert!(!out.contains("evil"), "{out}");
        assert_eq!(out.to_ascii_lowercase().matches("x-wslb-client").count(), 1);
        assert!(out.ends_with("Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n"));
        // Renamed: the new name is the one stripped and written.
        let renamed = with(Some(ClientId {
            header: "X-Client",
            instance: "lb1",
            id: 7,
        }));
        assert!(renamed.contains("\r\nX-Client: lb1.7\r\n"), "{renamed}");
        assert!(!renamed.contains("evil"), "{renamed}");
        // Off: nothing added, and still nothing of the client's under the default name.
        let off = with(None);
        assert!(!off.contains("lb1.") && !off.contains("evil"), "{off}");
    }
}
