//! Property checks shared by the fuzz targets (`fuzz/fuzz_targets/*.rs`) and the stable
//! corpus replay (`tests/fuzz_corpus.rs`). Each function takes the raw fuzzer input, calls the
//! same `pub` functions the event loop calls, and panics when a property does not hold.
//!
//! Only `wslb`, `tungstenite`, `httparse` (a `wslb` dependency, the request/response
//! reference) and `serde_json` (a `wslb` dependency, the control-message reference) are
//! used, so the file compiles in both crates.
#![allow(dead_code)]
// `is_multiple_of` needs Rust 1.87; wslb's rust-version is 1.85 and this file is part of its tests.
#![allow(unknown_lints, clippy::manual_is_multiple_of)]

use std::io::Cursor;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;
use wslb::config::{
    parse_args, parse_backend_url, parse_backends_file, parse_duration, parse_size, Command,
};
use wslb::http::body::{BodyError, BodyKind, BodyReader, MAX_SIZE_LINE};
use wslb::http::head::{
    downgrade_minor_version, header_storage, parse_request, parse_response, HeadError, Request,
    Response, MAX_HEAD, MAX_HEADERS,
};
use wslb::http::rewrite::{write_request, write_response, ClientId, ClientInfo};
use wslb::ws::frames::{encode_close, encode_header, Direction, FrameError, FrameTracker};
use wslb::ws::handshake::{validate_request, validate_response, WsKey};

/// A property check over one raw input; panics when a property fails.
pub type Check = fn(&[u8]);

/// Every target by name, for the corpus replay.
pub const TARGETS: &[(&str, Check)] = &[
    ("http_request", http_request),
    ("http_response", http_response),
    ("chunked", chunked),
    ("ws_handshake", ws_handshake),
    ("ws_frames", ws_frames),
    ("config_values", config_values),
    ("sticky_cookie", sticky_cookie),
    ("control_message", control_message),
    ("ws_inject", ws_inject),
    ("cidr", cidr),
    ("proxy_header", proxy_header),
    ("dispatch_ticket", dispatch_ticket),
];

/// A cheap deterministic hash, to derive choices (cut offsets, flags) from inputs that are
/// plain HTTP text, so seeds stay readable and the choices still vary with the input.
fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn show(data: &[u8]) -> String {
    String::from_utf8_lossy(&data[..data.len().min(2048)]).into_owned()
}

// ---------------------------------------------------------------------------------------
// HTTP heads: an independent reading of RFC 9112 §6.3 over httparse's fields.
// ---------------------------------------------------------------------------------------

fn trim(v: &[u8]) -> &[u8] {
    v.trim_ascii()
}

fn named<'a, 'b>(
    headers: &'a [httparse::Header<'b>],
    name: &'a str,
) -> impl Iterator<Item = &'b [u8]> + 'a {
    headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

fn list_items<'b>(values: impl Iterator<Item = &'b [u8]>) -> Vec<&'b [u8]> {
    values
        .flat_map(|v| v.split(|&b| b == b','))
        .map(trim)
        .collect()
}

fn list_has(headers: &[httparse::Header<'_>], name: &str, token: &str) -> bool {
    list_items(named(headers, name))
        .iter()
        .any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// What Content-Length says: `Ok(None)` absent, `Ok(Some(n))` all items agree on `n`.
fn ref_content_length(headers: &[httparse::Header<'_>]) -> Result<Option<u64>, ()> {
    let items = list_items(named(headers, "content-length"));
    let mut value = None;
    for item in items {
        // Plain decimal, at most 19 digits (the balancer's stated bound), fits a u64.
        if item.is_empty() || item.len() > 19 || !item.iter().all(u8::is_ascii_digit) {
            return Err(());
        }
        let n: u64 = std::str::from_utf8(item)
            .map_err(|_| ())?
            .parse()
            .map_err(|_| ())?;
        match value {
            Some(v) if v != n => return Err(()),
            _ => value = Some(n),
        }
    }
    Ok(value)
}

/// Transfer-Encoding: `None` absent; `Some(Err(()))` chunked applied twice or before another
/// coding (RFC 9112 §6.1); `Some(Ok(final coding is chunked))`. Codings run across all the
/// fields in order.
fn ref_transfer_encoding(headers: &[httparse::Header<'_>]) -> Option<Result<bool, ()>> {
    named(headers, "transfer-encoding").next()?;
    let codings = list_items(named(headers, "transfer-encoding"));
    let (last, before) = codings.split_last()?;
    if before.iter().any(|c| c.eq_ignore_ascii_case(b"chunked")) {
        return Some(Err(()));
    }
    Some(Ok(last.eq_ignore_ascii_case(b"chunked")))
}

fn ref_keep_alive(headers: &[httparse::Header<'_>], version: u8) -> bool {
    let close = list_has(headers, "connection", "close");
    if version == 1 {
        !close
    } else {
        list_has(headers, "connection", "keep-alive") && !close
    }
}

/// A line ending other than CRLF anywhere in the head (httparse takes a bare LF; the
/// balancer refuses it so no backend can read the lines differently).
fn has_bare_lf(head: &[u8]) -> bool {
    head.iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || head[i - 1] != b'\r'))
}

/// The reference verdict on a request head httparse accepted: every error that applies
/// (the balancer may report any one of them), or the body framing when none does.
/// RFC 3986 §3.2 authority without userinfo, read independently of `is_authority`:
/// `[ IPv6 / IPvFuture-ish ]` or a reg-name, then an optional all-digit port.
fn ref_authority(v: &[u8]) -> bool {
    let Ok(v) = std::str::from_utf8(v) else {
        return false;
    };
    let (host, port) = if let Some(inner) = v.strip_prefix('[') {
        let Some((literal, after)) = inner.split_once(']') else {
            return false;
        };
        if literal.is_empty()
            || !literal
                .chars()
                .all(|c| c.is_ascii_hexdigit() || ":.".contains(c))
        {
            return false;
        }
        match after {
            "" => return true,
            _ => match after.strip_prefix(':') {
                Some(port) => ("", port),
                None => return false,
            },
        }
    } else {
        v.rsplit_once(':').unwrap_or((v, ""))
    };
    let mut chars = host.chars();
    while let Some(c) = chars.next() {
        let ok = if c == '%' {
            let a = chars.next();
            let b = chars.next();
            a.is_some_and(|a| a.is_ascii_hexdigit()) && b.is_some_and(|b| b.is_ascii_hexdigit())
        } else {
            c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=".contains(c)
        };
        if !ok {
            return false;
        }
    }
    port.chars().all(|c| c.is_ascii_digit())
}

/// RFC 9112 §3.2 request-target forms the balancer relays: origin-form, `*`, or an
/// absolute http(s) URI with a non-empty host and no userinfo or fragment.
fn ref_target_ok(path: &str) -> bool {
    if path.starts_with('/') || path == "*" {
        return true;
    }
    let lower = path.to_ascii_lowercase();
    let Some(rest) = lower
        .strip_prefix("http://")
        .or_else(|| lower.strip_prefix("https://"))
    else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let after = &rest[authority.len()..];
    !authority.is_empty()
        && !authority.starts_with(':')
        && !after.starts_with('#')
        && ref_authority(authority.as_bytes())
}

fn ref_request(
    head: &[u8],
    method: &str,
    path: &str,
    version: u8,
    headers: &[httparse::Header<'_>],
) -> Result<BodyKind, Vec<HeadError>> {
    let mut errors = Vec::new();
    if !ref_target_ok(path) {
        errors.push(HeadError::BadTarget);
    }
    if has_bare_lf(head) {
        errors.push(HeadError::Malformed(httparse::Error::NewLine));
    }
    let cl = ref_content_length(headers);
    if cl.is_err() {
        errors.push(HeadError::BadContentLength);
    }
    let te = ref_transfer_encoding(headers);
    if method.eq_ignore_ascii_case("CONNECT") {
        errors.push(HeadError::MethodNotAllowed);
    }
    let hosts = named(headers, "host").count();
    let hosts_valid = named(headers, "host").all(|v| ref_authority(trim(v)));
    if (version == 1 && hosts != 1) || hosts > 1 || !hosts_valid {
        errors.push(HeadError::BadHost);
    }
    if te.is_some() && !matches!(cl, Ok(None)) {
        errors.push(HeadError::ConflictingFraming);
    }
    if te.is_some() && (version == 0 || te != Some(Ok(true))) {
        errors.push(HeadError::BadTransferEncoding);
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(match (te, cl) {
        (Some(_), _) => BodyKind::Chunked,
        (None, Ok(Some(n))) if n > 0 => BodyKind::Length(n),
        _ => BodyKind::Empty,
    })
}

fn ref_response(
    head: &[u8],
    code: u16,
    version: u8,
    head_request: bool,
    headers: &[httparse::Header<'_>],
) -> Result<BodyKind, Vec<HeadError>> {
    let mut errors = Vec::new();
    if has_bare_lf(head) {
        errors.push(HeadError::Malformed(httparse::Error::NewLine));
    }
    // RFC 9110 §15: status codes are 100..=599; below 100 cannot be re-serialised as
    // three digits either.
    if code < 100 {
        errors.push(HeadError::Malformed(httparse::Error::Status));
    }
    let cl = ref_content_length(headers);
    if cl.is_err() {
        errors.push(HeadError::BadContentLength);
    }
    let te = ref_transfer_encoding(headers);
    let no_body = head_request || (100..200).contains(&code) || code == 204 || code == 304;
    if !no_body {
        if te.is_some() && !matches!(cl, Ok(None)) {
            errors.push(HeadError::ConflictingFraming);
        }
        if te.is_some() && (version == 0 || te == Some(Err(()))) {
            errors.push(HeadError::BadTransferEncoding);
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(match (no_body, te, cl) {
        (true, _, _) => BodyKind::Empty,
        (false, Some(Ok(true)), _) => BodyKind::Chunked,
        (false, Some(_), _) => BodyKind::UntilClose,
        (false, None, Ok(Some(n))) => BodyKind::Length(n),
        (false, None, _) => BodyKind::UntilClose,
    })
}

/// What a request parse says, detached from the borrowed input.
#[derive(Debug, PartialEq, Eq)]
struct ReqSummary {
    method: String,
    path: String,
    version: u8,
    head_len: usize,
    headers: usize,
    body: BodyKind,
    keep_alive: bool,
    wants_websocket: bool,
    expect_continue: bool,
}

fn req_summary(buf: &[u8]) -> Result<Option<ReqSummary>, HeadError> {
    let mut st = header_storage();
    Ok(parse_request(buf, &mut st)?.map(|r| ReqSummary {
        method: r.method.to_string(),
        path: r.path.to_string(),
        version: r.version,
        head_len: r.head_len,
        headers: r.headers.len(),
        body: r.body,
        keep_alive: r.keep_alive,
        wants_websocket: r.wants_websocket,
        expect_continue: r.expect_continue,
    }))
}

#[derive(Debug, PartialEq, Eq)]
struct RespSummary {
    status: u16,
    reason: String,
    version: u8,
    head_len: usize,
    headers: usize,
    body: BodyKind,
    keep_alive: bool,
}

fn resp_summary(buf: &[u8], head_request: bool) -> Result<Option<RespSummary>, HeadError> {
    let mut st = header_storage();
    Ok(
        parse_response(buf, &mut st, head_request)?.map(|r| RespSummary {
            status: r.status,
            reason: r.reason.to_string(),
            version: r.version,
            head_len: r.head_len,
            headers: r.headers.len(),
            body: r.body,
            keep_alive: r.keep_alive,
        }),
    )
}

/// Our verdict when httparse itself said `Partial` or failed.
fn check_against_httparse_failure<T: std::fmt::Debug>(
    ours: &Result<Option<T>, HeadError>,
    theirs: &httparse::Result<usize>,
    input: &[u8],
) {
    match theirs {
        Err(httparse::Error::TooManyHeaders) => {
            assert!(matches!(ours, Err(HeadError::TooManyHeaders)), "{ours:?}")
        }
        Err(e) => assert_eq!(ours.as_ref().err(), Some(&HeadError::Malformed(*e))),
        Ok(httparse::Status::Partial) if input.len() >= MAX_HEAD => {
            assert!(matches!(ours, Err(HeadError::TooLarge)), "{ours:?}")
        }
        Ok(httparse::Status::Partial) => assert!(matches!(ours, Ok(None)), "{ours:?}"),
        Ok(httparse::Status::Complete(_)) => unreachable!(),
    }
}

/// A few cut points inside a head: the byte before the end, the middle, one from the hash.
fn cuts(head_len: usize, data: &[u8]) -> [usize; 3] {
    let h = fnv(data) as usize;
    [
        head_len.saturating_sub(1),
        head_len / 2,
        h % head_len.max(1),
    ]
}

/// Request-head target: httparse differential, RFC 9112 §6.3 reference framing, prefix and
/// trailing-bytes invariance, and the forwarded head (`write_request`) round trip.
pub fn http_request(data: &[u8]) {
    check_version_downgrade(data);
    let mut st = header_storage();
    let ours = parse_request(data, &mut st);
    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut theirs_req = httparse::Request::new(&mut hs);
    let theirs = theirs_req.parse(data);
    let n = match theirs {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return check_against_httparse_failure(&ours, &theirs, data),
    };
    let (Some(method), Some(path), Some(version)) =
        (theirs_req.method, theirs_req.path, theirs_req.version)
    else {
        panic!("httparse complete without request line");
    };
    if n > MAX_HEAD {
        assert_eq!(ours.err(), Some(HeadError::TooLarge));
        return;
    }
    let reference = ref_request(&data[..n], method, path, version, theirs_req.headers);
    let req = match (ours, reference) {
        (Ok(Some(req)), Ok(body)) => {
            assert_eq!(body, req.body, "{}", show(data));
            req
        }
        (Err(e), Err(allowed)) => {
            assert!(
                allowed.contains(&e),
                "{e:?} not in {allowed:?}: {}",
                show(data)
            );
            return;
        }
        (ours, reference) => panic!("ours {ours:?}, reference {reference:?}: {}", show(data)),
    };
    assert!(req.head_len <= data.len());
    assert_eq!(
        (
            req.head_len,
            req.method,
            req.path,
            req.version,
            req.headers.len()
        ),
        (n, method, path, version, theirs_req.headers.len())
    );
    assert_eq!(req.keep_alive, ref_keep_alive(req.headers, req.version));
    assert_eq!(
        req.wants_websocket,
        list_has(req.headers, "upgrade", "websocket")
    );

    // The head alone parses the same as the head plus whatever follows it, and every
    // strict prefix of it is incomplete, never an error.
    let whole = req_summary(data);
    assert_eq!(req_summary(&data[..n]), whole);
    for cut in cuts(n, data) {
        assert_eq!(req_summary(&data[..cut]), Ok(None), "cut {cut}");
    }

    check_forwarded_request(&req, data);
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "transfer-encoding",
    "upgrade",
    "http2-settings",
];

/// `downgrade_minor_version` changes at most the one minor-version digit at the end of the
/// first line, only from 2..9 to 1, and is idempotent.
fn check_version_downgrade(data: &[u8]) {
    let mut copy = data.to_vec();
    if !downgrade_minor_version(&mut copy) {
        assert_eq!(copy, data);
        return;
    }
    let changed: Vec<usize> = (0..data.len()).filter(|&i| copy[i] != data[i]).collect();
    let [at] = changed[..] else {
        panic!("changed {changed:?}");
    };
    assert!((b'2'..=b'9').contains(&data[at]) && copy[at] == b'1');
    assert_eq!(data.get(at + 1), Some(&b'\r'));
    assert!(data[..at].ends_with(b" HTTP/1."));
    assert!(!data[..at].contains(&b'\r'));
    assert!(!downgrade_minor_version(&mut copy));
}

/// The target the backend must see: origin-form, with an absolute-form target's authority
/// moved to Host.
fn forwarded_target(req: &Request<'_, '_>) -> String {
    match req.authority {
        Some(_) if !req.origin.starts_with('/') => format!("/{}", req.origin),
        _ => req.origin.to_string(),
    }
}

/// `write_request` output parses again to the same request line and framing and carries
/// no hop-by-hop field but the ones the balancer adds.
fn check_forwarded_request(req: &Request<'_, '_>, data: &[u8]) {
    let h = fnv(data);
    // As the event loop decides: only a validated handshake is forwarded as an upgrade.
    let websocket = req.wants_websocket && validate_request(req).is_ok();
    let peer = if h & 1 == 0 {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, (h >> 8) as u8))
    } else {
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, (h >> 8) as u16))
    };
    let client = ClientInfo {
        peer,
        tls: h & 2 != 0,
        trusted: h & 4 != 0,
        rfc7239: h & 8 != 0,
        client_id: (h & 16 != 0).then_some(ClientId {
            header: "X-Wslb-Client",
            instance: "fz",
            id: h,
        }),
    };
    let mut out = Vec::new();
    write_request(req, client, websocket, &mut out);
    let mut st = header_storage();
    let again = match parse_request(&out, &mut st) {
        Ok(Some(again)) => again,
        // Near the limits the three X-Forwarded-* fields may push the head over them.
        Err(HeadError::TooLarge) if out.len() > MAX_HEAD => return,
        Err(HeadError::TooManyHeaders) if req.headers.len() + 4 > MAX_HEADERS => return,
        other => panic!(
            "forwarded head does not parse: {other:?}\nin:  {}\nout: {}",
            show(&data[..req.head_len]),
            show(&out)
        ),
    };
    let ctx = || {
        format!(
            "\nin:  {}\nout: {}",
            show(&data[..req.head_len]),
            show(&out)
        )
    };
    assert_eq!(again.head_len, out.len(), "{}", ctx());
    assert_eq!(
        (again.method, again.path, again.version, again.body),
        (
            req.method,
            forwarded_target(req).as_str(),
            req.version,
            req.body
        ),
        "{}",
        ctx()
    );
    assert!(again.keep_alive, "{}", ctx());
    assert_eq!(again.wants_websocket, websocket, "{}", ctx());
    if websocket {
        assert_eq!(validate_request(&again), validate_request(req), "{}", ctx());
    }
    for name in HOP_BY_HOP {
        let count = named(again.headers, name).count();
        let allowed = match *name {
            "connection" => usize::from(websocket || req.version == 0),
            "transfer-encoding" => usize::from(req.body == BodyKind::Chunked),
            "upgrade" => usize::from(websocket),
            _ => 0,
        };
        assert_eq!(count, allowed, "{name}{}", ctx());
    }
    if req.body == BodyKind::Chunked {
        // The codings applied before chunked travel on, in order, in one field.
        let mut expected: Vec<&[u8]> = list_items(named(req.headers, "transfer-encoding"))
            .into_iter()
            .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case(b"chunked"))
            .collect();
        expected.push(b"chunked");
        let sent = list_items(named(again.headers, "transfer-encoding"));
        assert_eq!(sent, expected, "{}", ctx());
    }
    let cl: Vec<_> = named(again.headers, "content-length").collect();
    match req.body {
        BodyKind::Length(n) => assert_eq!(cl, [n.to_string().as_bytes()], "{}", ctx()),
        _ => assert!(cl.is_empty(), "{}", ctx()),
    }
    // Fields the client's Connection named are hop-by-hop too (RFC 9110 §7.6.1), unless the
    // balancer writes its own (X-Forwarded-*, framing, the upgrade pair).
    let own = [
        "x-forwarded-for",
        "forwarded",
        "x-real-ip",
        "x-forwarded-proto",
        "x-forwarded-host",
        "content-length",
        "transfer-encoding",
        "connection",
        "upgrade",
    ];
    for token in list_items(named(req.headers, "connection")) {
        let Ok(token) = std::str::from_utf8(token) else {
            continue;
        };
        if token.is_empty() || own.iter().any(|o| token.eq_ignore_ascii_case(o)) {
            continue;
        }
        // Host and the WebSocket handshake fields are never stripped, whatever Connection
        // says: the request would not be the same request without them.
        let protected = token.eq_ignore_ascii_case("host")
            || token
                .get(..14)
                .is_some_and(|p| p.eq_ignore_ascii_case("sec-websocket-"));
        let expected = if protected {
            named(req.headers, token).count()
        } else {
            0
        };
        assert_eq!(
            named(again.headers, token).count(),
            expected,
            "{token}{}",
            ctx()
        );
    }
    assert_eq!(named(again.headers, "x-forwarded-proto").count(), 1);
    assert_eq!(again.authority, None, "{}", ctx());
    if let Some(authority) = req.authority {
        // The target's authority wins over whatever Host said (RFC 9112 §3.2.2).
        let hosts: Vec<_> = named(again.headers, "host").collect();
        assert_eq!(hosts, [authority.as_bytes()], "{}", ctx());
    }
    check_forwarding_chain(req, &again, client, &ctx);
    // The client id field is the balancer's alone: exactly one, ours, when on; none of the
    // client's under the default name either way.
    let ids: Vec<_> = named(again.headers, "x-wslb-client").collect();
    let want: Vec<Vec<u8>> = client
        .client_id
        .map(|id| format!("fz.{}", id.id).into_bytes())
        .into_iter()
        .collect();
    assert_eq!(ids, want, "{}", ctx());
}

/// Exactly one forwarding field reaches the backend: the client's own chain only from a
/// trusted peer (its elements in order), always ending in the peer's address.
fn check_forwarding_chain(
    req: &Request<'_, '_>,
    again: &Request<'_, '_>,
    client: ClientInfo<'_>,
    ctx: &dyn Fn() -> String,
) {
    let (field, node) = match (client.rfc7239, client.peer) {
        (false, ip) => ("x-forwarded-for", ip.to_string()),
        (true, IpAddr::V4(ip)) => ("forwarded", format!("for={ip}")),
        (true, IpAddr::V6(ip)) => ("forwarded", format!("for=\"[{ip}]\"")),
    };
    for other in ["x-forwarded-for", "forwarded", "x-real-ip"] {
        let want = usize::from(other == field);
        assert_eq!(
            named(again.headers, other).count(),
            want,
            "{other}{}",
            ctx()
        );
    }
    let mut expected: Vec<Vec<u8>> = Vec::new();
    if client.trusted {
        expected = list_items(named(req.headers, field))
            .into_iter()
            .filter(|e| !e.is_empty())
            .map(<[u8]>::to_vec)
            .collect();
    }
    expected.push(node.into_bytes());
    let sent: Vec<Vec<u8>> = list_items(named(again.headers, field))
        .into_iter()
        .map(<[u8]>::to_vec)
        .collect();
    assert_eq!(sent, expected, "{}", ctx());
}

/// Response-head target: httparse differential, reference framing, and the relayed head
/// (`write_response`) round trip. The first byte picks the flags the event loop passes:
/// bit 0 = the request was HEAD, bit 1 = the balancer closes after this response.
pub fn http_response(data: &[u8]) {
    let Some((&flags, input)) = data.split_first() else {
        return;
    };
    let head_request = flags & 1 != 0;
    let close = flags & 2 != 0;
    let mut st = header_storage();
    let ours = parse_response(input, &mut st, head_request);
    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut theirs_resp = httparse::Response::new(&mut hs);
    let theirs = theirs_resp.parse(input);
    let n = match theirs {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return check_against_httparse_failure(&ours, &theirs, input),
    };
    let (Some(code), Some(version)) = (theirs_resp.code, theirs_resp.version) else {
        panic!("httparse complete without status line");
    };
    if n > MAX_HEAD {
        assert_eq!(ours.err(), Some(HeadError::TooLarge));
        return;
    }
    let reference = ref_response(
        &input[..n],
        code,
        version,
        head_request,
        theirs_resp.headers,
    );
    let resp = match (ours, reference) {
        (Ok(Some(resp)), Ok(body)) => {
            assert_eq!(body, resp.body, "{}", show(input));
            resp
        }
        (Err(e), Err(allowed)) => {
            assert!(
                allowed.contains(&e),
                "{e:?} not in {allowed:?}: {}",
                show(input)
            );
            return;
        }
        (ours, reference) => panic!("ours {ours:?}, reference {reference:?}: {}", show(input)),
    };
    assert!(resp.head_len <= input.len());
    assert_eq!(
        (resp.head_len, resp.status, resp.version, resp.reason),
        (n, code, version, theirs_resp.reason.unwrap_or(""))
    );
    assert_eq!(resp.keep_alive, ref_keep_alive(resp.headers, resp.version));

    let whole = resp_summary(input, head_request);
    assert_eq!(resp_summary(&input[..n], head_request), whole);
    for cut in cuts(n, input) {
        assert_eq!(
            resp_summary(&input[..cut], head_request),
            Ok(None),
            "cut {cut}"
        );
    }

    check_relayed_response(&resp, head_request, close, input);
}

fn check_relayed_response(resp: &Response<'_, '_>, head_request: bool, close: bool, input: &[u8]) {
    let websocket = resp.status == 101;
    let mut out = Vec::new();
    write_response(resp, close, websocket, &mut out);
    let ctx = || {
        format!(
            "\nin:  {}\nout: {}",
            show(&input[..resp.head_len]),
            show(&out)
        )
    };
    let mut st = header_storage();
    let again = match parse_response(&out, &mut st, head_request) {
        Ok(Some(again)) => again,
        Err(HeadError::TooLarge) if out.len() > MAX_HEAD => return,
        Err(HeadError::TooManyHeaders) if resp.headers.len() + 3 > MAX_HEADERS => return,
        other => panic!("relayed head does not parse: {other:?}{}", ctx()),
    };
    assert_eq!(again.head_len, out.len(), "{}", ctx());
    assert_eq!(
        (again.status, again.reason, again.version, again.body),
        (resp.status, resp.reason, 1, resp.body),
        "{}",
        ctx()
    );
    let wants_close = close && resp.status >= 200 && !websocket;
    assert_eq!(again.keep_alive, !wants_close, "{}", ctx());
    for name in HOP_BY_HOP {
        let count = named(again.headers, name).count();
        let allowed = match *name {
            "connection" => usize::from(websocket || wants_close),
            "transfer-encoding" => usize::from(resp.body == BodyKind::Chunked),
            "upgrade" => usize::from(websocket),
            _ => 0,
        };
        assert_eq!(count, allowed, "{name}{}", ctx());
    }
    assert!(
        named(again.headers, "content-length").count() <= 1,
        "{}",
        ctx()
    );
    if let BodyKind::Length(n) = resp.body {
        let cl: Vec<_> = named(again.headers, "content-length").collect();
        assert_eq!(cl, [n.to_string().as_bytes()], "{}", ctx());
    }
}

// ---------------------------------------------------------------------------------------
// Chunked bodies: an obviously-correct whole-input reference decoder.
// ---------------------------------------------------------------------------------------

/// What the reference decoder says about a whole input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefBody {
    /// The body is complete and ends at this offset.
    Done { end: usize, payload: u64 },
    /// Every byte so far is valid; more are needed.
    Incomplete { payload: u64 },
    /// The input cannot be a prefix of a valid chunked body.
    Invalid,
}

/// A line: `Ok(Some((content, next)))` complete (CRLF), `Ok(None)` not ended yet with the
/// content so far (a final lone CR included in `cr_pending`), `Err` for a bare LF or a CR
/// followed by anything but LF.
enum Line<'a> {
    Complete(&'a [u8], usize),
    /// The line has not ended; `ended` when its content is known to be final (CR seen).
    Partial(&'a [u8], bool),
}

fn line(input: &[u8], pos: usize) -> Result<Line<'_>, ()> {
    let rest = &input[pos..];
    match rest.iter().position(|&b| b == b'\r' || b == b'\n') {
        None => Ok(Line::Partial(rest, false)),
        Some(i) if rest[i] == b'\n' => Err(()),
        Some(i) => match rest.get(i + 1) {
            None => Ok(Line::Partial(&rest[..i], true)),
            Some(b'\n') => Ok(Line::Complete(&rest[..i], pos + i + 2)),
            Some(_) => Err(()),
        },
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `chunk-size [ chunk-ext ]` content (or a prefix of one when `!complete`); returns the size.
/// Size: 1 to 16 hex digits. Extension: `;` then VCHAR/SP/HTAB, at most 4096 bytes with the `;`.
fn size_line(content: &[u8], complete: bool) -> Result<Option<u64>, ()> {
    let digits = content.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let (hex, ext) = content.split_at(digits);
    if digits > 16 || (digits == 0 && (complete || !ext.is_empty())) {
        return Err(());
    }
    if let Some((&first, ext_rest)) = ext.split_first() {
        if first != b';' || ext.len() > 4096 {
            return Err(());
        }
        if !ext_rest
            .iter()
            .all(|&b| b.is_ascii_graphic() || b == b' ' || b == b'\t')
        {
            return Err(());
        }
    }
    if hex.is_empty() {
        return Ok(None);
    }
    let value = u128::from_str_radix(std::str::from_utf8(hex).map_err(|_| ())?, 16);
    // At most 2^63 - 1: larger sizes overflow backends that keep them signed.
    let value = value.map_err(|_| ())?;
    if value > i64::MAX as u128 {
        return Err(());
    }
    Ok(Some(value as u64))
}

/// `field-name ":" field-value` (or a prefix of one when `!complete`).
fn trailer_line(content: &[u8], complete: bool) -> bool {
    let name_len = content.iter().take_while(|&&b| is_tchar(b)).count();
    let (name, rest) = content.split_at(name_len);
    match rest.split_first() {
        None => !complete,
        Some((&b':', value)) => {
            !name.is_empty()
                && value
                    .iter()
                    .all(|&b| b.is_ascii_graphic() || b == b' ' || b == b'\t' || b >= 0x80)
        }
        Some(_) => false,
    }
}

/// RFC 9112 §7.1 chunked body with the balancer's limits (16 hex digits, 4 KiB extension,
/// 16 KiB trailer section), read line by line over the whole input.
pub fn reference_chunked(input: &[u8]) -> RefBody {
    let mut pos = 0;
    let mut payload = 0u64;
    loop {
        let size = match line(input, pos) {
            Err(()) => return RefBody::Invalid,
            Ok(Line::Partial(content, ended)) => {
                return match size_line(content, ended) {
                    Ok(_) => RefBody::Incomplete { payload },
                    Err(()) => RefBody::Invalid,
                }
            }
            Ok(Line::Complete(content, next)) => {
                pos = next;
                match size_line(content, true) {
                    Ok(Some(size)) => size,
                    _ => return RefBody::Invalid,
                }
            }
        };
        if size == 0 {
            break;
        }
        let available = (input.len() - pos) as u64;
        if available < size {
            return RefBody::Incomplete {
                payload: payload + available,
            };
        }
        payload += size;
        pos += size as usize;
        match &input[pos..] {
            [] | [b'\r'] => return RefBody::Incomplete { payload },
            [b'\r', b'\n', ..] => pos += 2,
            _ => return RefBody::Invalid,
        }
    }
    // Trailer section: lines until an empty one, at most 16 KiB including the final CRLF.
    let start = pos;
    loop {
        let verdict = match line(input, pos) {
            Err(()) => RefBody::Invalid,
            Ok(Line::Partial(content, ended)) => {
                if trailer_line(content, ended) || (ended && content.is_empty()) {
                    RefBody::Incomplete { payload }
                } else {
                    RefBody::Invalid
                }
            }
            Ok(Line::Complete(content, next)) => {
                if next - start > 16 * 1024 {
                    return RefBody::Invalid;
                }
                if content.is_empty() {
                    return RefBody::Done { end: next, payload };
                }
                if !trailer_line(content, true) {
                    return RefBody::Invalid;
                }
                pos = next;
                continue;
            }
        };
        // Not complete: the reader fails as soon as the section passes the limit.
        if input.len() - start > 16 * 1024 {
            return RefBody::Invalid;
        }
        return verdict;
    }
}

/// Feeds `parts` in order; returns (consumed, done, payload) or the error.
fn feed_body(kind: BodyKind, parts: &[&[u8]]) -> Result<(usize, bool, u64), BodyError> {
    let mut r = BodyReader::new(kind);
    let mut total = 0;
    // Bytes the reader held back (an incomplete chunk-size line), fed again with the next
    // part as the relay does.
    let mut held: Vec<u8> = Vec::new();
    for part in parts {
        if r.is_done() {
            break;
        }
        held.extend_from_slice(part);
        let p = match r.feed(&held) {
            Ok(p) => p,
            Err(e) => {
                // The error sticks.
                assert_eq!(r.feed(b"0\r\n\r\n"), Err(e));
                return Err(e);
            }
        };
        assert!(
            p.consumed <= held.len(),
            "consumed {} of {}",
            p.consumed,
            held.len()
        );
        assert_eq!(p.done, r.is_done());
        if !p.done {
            // Only an incomplete size line may be held back, and only by a chunked reader.
            let left = held.len() - p.consumed;
            assert!(left <= MAX_SIZE_LINE, "held back {left} bytes");
            assert!(
                left == 0 || kind == BodyKind::Chunked,
                "held back {left} bytes"
            );
        }
        held.drain(..p.consumed);
        total += p.consumed;
    }
    Ok((total, r.is_done(), r.payload_bytes()))
}

/// Chunked-body target. Byte 0: split offset selector (and, at 0xf8 and above, a
/// Content-Length / until-close body instead); the rest is the body bytes.
pub fn chunked(data: &[u8]) {
    let Some((&sel, input)) = data.split_first() else {
        return;
    };
    let kind = match sel {
        0xf8 => BodyKind::Empty,
        0xf9 => BodyKind::UntilClose,
        0xfa => BodyKind::Length(u64::MAX),
        0xfb..=0xff => BodyKind::Length(u64::from(sel - 0xfb) * 3),
        _ => BodyKind::Chunked,
    };
    let split = (sel as usize * input.len()) / 0xf7;
    let split = split.min(input.len());
    let whole = feed_body(kind, &[input]);
    let (a, b) = input.split_at(split);
    assert_eq!(feed_body(kind, &[a, b]), whole, "split at {split}");
    if input.len() <= 2048 {
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(feed_body(kind, &bytes), whole, "byte by byte");
    }
    let expected = match kind {
        BodyKind::Chunked => reference_chunked(input),
        BodyKind::Empty => RefBody::Done { end: 0, payload: 0 },
        BodyKind::UntilClose => RefBody::Incomplete {
            payload: input.len() as u64,
        },
        BodyKind::Length(n) => match usize::try_from(n) {
            Ok(n) if n <= input.len() => RefBody::Done {
                end: n,
                payload: n as u64,
            },
            _ => RefBody::Incomplete {
                payload: input.len() as u64,
            },
        },
    };
    let got = match whole {
        Ok((end, true, payload)) => RefBody::Done { end, payload },
        Ok((consumed, false, payload)) => {
            // All but an incomplete chunk-size line at the end.
            assert!(input.len() - consumed <= MAX_SIZE_LINE);
            RefBody::Incomplete { payload }
        }
        Err(_) => RefBody::Invalid,
    };
    assert_eq!(got, expected, "{:?}", show(input));
}

// ---------------------------------------------------------------------------------------
// WebSocket handshake.
// ---------------------------------------------------------------------------------------

/// Canonical base64 of 16 bytes: 22 symbols whose last carries 4 zero bits, then `==`.
fn canonical_key(key: &[u8]) -> bool {
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    key.len() == 24
        && key[..22].iter().all(|b| B64.contains(b))
        && B64
            .iter()
            .position(|&b| b == key[21])
            .is_some_and(|i| i & 0x0f == 0)
        && &key[22..] == b"=="
}

/// tungstenite's own server-side check of the same request, where the header fields can be
/// expressed as `http` types.
fn tungstenite_accepts(req: &Request<'_, '_>) -> Option<bool> {
    use tungstenite::http;
    let mut b = http::Request::builder()
        .method(http::Method::from_bytes(req.method.as_bytes()).ok()?)
        .uri(req.path)
        .version(if req.version == 1 {
            http::Version::HTTP_11
        } else {
            http::Version::HTTP_10
        });
    for h in req.headers {
        b = b.header(
            http::HeaderName::from_bytes(h.name.as_bytes()).ok()?,
            http::HeaderValue::from_bytes(h.value).ok()?,
        );
    }
    let r = b.body(()).ok()?;
    Some(tungstenite::handshake::server::create_response(&r).is_ok())
}

/// Handshake target: the input is a request head, optionally followed by a response head
/// after the first `\r\n\r\n`. A key is accepted only when canonical base64 of 16 bytes;
/// tungstenite agrees on the verdict where both read the fields the same way; the accept
/// value derived for an accepted key validates, and a response validates only with it.
pub fn ws_handshake(data: &[u8]) {
    let mut st = header_storage();
    let Ok(Some(req)) = parse_request(data, &mut st) else {
        return;
    };
    let verdict = validate_request(&req);
    let ctx = || show(&data[..req.head_len]);
    if let Ok(key) = verdict {
        assert!(req.method == "GET" && req.version == 1 && req.body == BodyKind::Empty);
        assert!(list_has(req.headers, "connection", "upgrade"), "{}", ctx());
        assert!(canonical_key(&key.0), "{}", ctx());
        let sent = named(req.headers, "sec-websocket-key").next().map(trim);
        assert_eq!(sent, Some(&key.0[..]));
    }
    if let Err(e) = verdict {
        assert!(matches!(e.status(), 400 | 426), "{e:?}");
    }

    // Differential: tungstenite reads the first of repeated fields and needs an exact
    // `Upgrade: websocket`; compare only where those readings coincide.
    let simple = |name: &str| named(req.headers, name).count() == 1;
    // `http::HeaderValue::to_str` (which tungstenite uses) fails on anything but visible
    // ASCII, SP and HTAB.
    let visible = req.headers.iter().all(|h| {
        h.value
            .iter()
            .all(|&b| b.is_ascii_graphic() || b == b' ' || b == b'\t')
    });
    let plain_upgrade =
        named(req.headers, "upgrade").all(|v| trim(v).eq_ignore_ascii_case(b"websocket"));
    if req.wants_websocket
        && visible
        && plain_upgrade
        && [
            "connection",
            "upgrade",
            "sec-websocket-version",
            "sec-websocket-key",
        ]
        .iter()
        .all(|n| simple(n))
        && req.body == BodyKind::Empty
    {
        let version = named(req.headers, "sec-websocket-version").next().map(trim);
        let conn_raw = named(req.headers, "connection").next().unwrap_or_default();
        // tungstenite also splits Connection on spaces and does not trim the key/version.
        let untrimmed = named(req.headers, "sec-websocket-version").next() == version
            && named(req.headers, "sec-websocket-key").next().map(trim)
                == named(req.headers, "sec-websocket-key").next();
        let same_connection = conn_raw
            .split(|&b| b == b',' || b == b' ')
            .any(|t| t.eq_ignore_ascii_case(b"upgrade"))
            == list_has(req.headers, "connection", "upgrade");
        // tungstenite takes keys that are not base64 of 16 bytes (`=` inside, non-zero pad
        // bits); RFC 6455 §4.2.1 does not, and neither do we: compare only where the key is
        // canonical or tungstenite refuses too.
        let canonical = named(req.headers, "sec-websocket-key")
            .next()
            .map(trim)
            .is_some_and(canonical_key);
        if untrimmed && same_connection {
            if let Some(theirs) = tungstenite_accepts(&req) {
                if canonical || !theirs {
                    assert_eq!(verdict.is_ok(), theirs, "{verdict:?}: {}", ctx());
                }
            }
        }
    }

    let key = verdict.unwrap_or(WsKey(*b"dGhlIHNhbXBsZSBub25jZQ=="));
    let accept = tungstenite::handshake::derive_accept_key(&key.0);
    let good = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    let mut st2 = header_storage();
    let Ok(Some(resp)) = parse_response(good.as_bytes(), &mut st2, false) else {
        panic!("own 101 does not parse");
    };
    assert_eq!(validate_response(&resp, &key), Ok(()));

    let rest = &data[req.head_len..];
    let mut st3 = header_storage();
    if let Ok(Some(resp)) = parse_response(rest, &mut st3, false) {
        if validate_response(&resp, &key).is_ok() {
            assert!(list_has(resp.headers, "upgrade", "websocket"));
            let got = named(resp.headers, "sec-websocket-accept").next().map(trim);
            assert_eq!(got, Some(accept.as_bytes()), "{}", show(rest));
        }
    }
}

// ---------------------------------------------------------------------------------------
// WebSocket frames: tungstenite's header parser as the boundary reference.
// ---------------------------------------------------------------------------------------

/// Everything observable on a tracker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub result: Result<(), FrameError>,
    pub frames: u64,
    pub messages: u64,
    pub frame_boundary: bool,
    pub message_boundary: bool,
    pub close_seen: bool,
    pub close_code: Option<u16>,
    pub violation: Option<FrameError>,
    pub released: u64,
    pub ignored: u64,
}

fn track(dir: Direction, max: u64, parts: &[&[u8]]) -> Seen {
    let mut t = FrameTracker::new(dir, max);
    let mut completed = 0u64;
    let mut result = Ok(());
    let mut fed = 0u64;
    for part in parts {
        let before = t.released();
        match t.feed(part) {
            Ok(n) => completed += n as u64,
            Err(e) => {
                assert_eq!(t.error(), Some(e));
                assert_eq!(t.feed(b"\x81\x00"), Err(e), "the error sticks");
                assert!(!t.at_frame_boundary());
                result = Err(e);
                break;
            }
        }
        fed += part.len() as u64;
        assert!(t.released() >= before, "released never shrinks");
        assert_eq!(
            t.released() + t.held_header().len() as u64 + t.ignored(),
            fed,
            "every byte fed is released, held or ignored"
        );
    }
    if result.is_ok() {
        assert_eq!(completed, t.frames(), "feed counts add up to frames()");
    }
    Seen {
        result,
        frames: t.frames(),
        messages: t.messages(),
        frame_boundary: t.at_frame_boundary(),
        message_boundary: t.at_message_boundary(),
        close_seen: t.close_seen(),
        close_code: t.close_code(),
        violation: t.violation(),
        released: t.released(),
        ignored: t.ignored(),
    }
}

/// Whole-input reference: frames delimited by `FrameHeader::parse` in a loop, payloads
/// skipped by count. Only the relay's own limits fail (`TooLarge`, `BadHeader`); the other
/// RFC 6455 rules are noted as violations and the frame is tracked on; the rest of the
/// input after a close frame is ignored.
pub fn reference_frames(dir: Direction, max: u64, input: &[u8]) -> Seen {
    let mut seen = Seen {
        result: Ok(()),
        frames: 0,
        messages: 0,
        frame_boundary: true,
        message_boundary: true,
        close_seen: false,
        close_code: None,
        violation: None,
        released: 0,
        ignored: 0,
    };
    let mut fragmented = false;
    let mut pos = 0usize;
    let fail = |mut seen: Seen, e| {
        seen.result = Err(e);
        seen.frame_boundary = false;
        seen.message_boundary = false;
        seen
    };
    while pos < input.len() {
        if seen.close_seen {
            seen.ignored = (input.len() - pos) as u64;
            break;
        }
        // tungstenite refuses reserved opcodes; parse a copy with a valid one of the same class.
        let op = input[pos] & 0x0f;
        let mut head: Vec<u8> = input[pos..input.len().min(pos + 14)].to_vec();
        if matches!(op, 3..=7 | 0xb..=0xf) {
            head[0] = (head[0] & 0xf0) | if op < 8 { 0x2 } else { 0x9 };
        }
        let mut cursor = Cursor::new(&head[..]);
        let (header, len) = match FrameHeader::parse(&mut cursor) {
            Ok(Some(h)) => h,
            Ok(None) if head.len() < 14 => {
                seen.frame_boundary = false;
                seen.message_boundary = false;
                return seen;
            }
            Ok(None) | Err(_) => return fail(seen, FrameError::BadHeader),
        };
        let header_len = cursor.position() as usize;
        if len >> 63 != 0 {
            return fail(seen, FrameError::BadHeader);
        }
        if len > max {
            return fail(seen, FrameError::TooLarge);
        }
        let mut violate = |e| {
            seen.violation.get_or_insert(e);
        };
        let masked = header.mask.is_some();
        if masked != (dir == Direction::ClientToServer) {
            violate(FrameError::Masking);
        }
        let (is_data, ends_message, is_close) = match OpCode::from(op) {
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                violate(FrameError::ReservedOpcode);
                (false, false, false)
            }
            OpCode::Control(c) => {
                if len > 125 {
                    violate(FrameError::ControlTooLong);
                }
                if !header.is_final {
                    violate(FrameError::FragmentedControl);
                }
                (false, false, c == Control::Close)
            }
            OpCode::Data(Data::Continue) => {
                if !fragmented {
                    violate(FrameError::UnexpectedContinuation);
                }
                (true, header.is_final, false)
            }
            OpCode::Data(_) => {
                if fragmented {
                    violate(FrameError::ExpectedContinuation);
                }
                (true, header.is_final, false)
            }
        };
        if is_data {
            fragmented = !ends_message;
        }
        let body_start = pos + header_len;
        let available = (input.len() - body_start) as u64;
        seen.released = (body_start as u64) + available.min(len);
        let mask = header.mask.unwrap_or_default();
        if is_close {
            // The code is the first two unmasked payload bytes, once the frame completes.
            let code: Vec<u8> = input[body_start..]
                .iter()
                .take(2)
                .zip(mask)
                .map(|(b, m)| b ^ m)
                .collect();
            if available >= len {
                seen.close_seen = true;
                seen.close_code = (len >= 2).then(|| u16::from_be_bytes([code[0], code[1]]));
            }
        }
        if available < len {
            seen.frame_boundary = false;
            seen.message_boundary = false;
            return seen;
        }
        seen.frames += 1;
        if is_data && ends_message {
            seen.messages += 1;
        }
        pos = body_start + len as usize;
    }
    seen.frame_boundary = true;
    seen.message_boundary = !fragmented && seen.violation.is_none();
    seen
}

const MAX_PAYLOADS: [u64; 8] = [0, 1, 125, 126, 65_535, 65_536, 1 << 20, u64::MAX];

/// Frame-tracker target. Byte 0: bit 0 = server-to-client (unmasked), bits 1-3 = payload
/// limit; byte 1: split offset selector; the rest is the stream of one direction.
pub fn ws_frames(data: &[u8]) {
    let [flags, sel, input @ ..] = data else {
        return;
    };
    let dir = if flags & 1 == 0 {
        Direction::ClientToServer
    } else {
        Direction::ServerToClient
    };
    let max = MAX_PAYLOADS[usize::from((flags >> 1) & 7)];
    let whole = track(dir, max, &[input]);
    let split = (usize::from(*sel) * input.len() / 255).min(input.len());
    let (a, b) = input.split_at(split);
    assert_eq!(track(dir, max, &[a, b]), whole, "split at {split}");
    if input.len() <= 2048 {
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(track(dir, max, &bytes), whole, "byte by byte");
    }
    assert_eq!(
        reference_frames(dir, max, input),
        whole,
        "differential vs tungstenite"
    );

    // The balancer's own frames: what it encodes tungstenite reads back, and a tracker
    // accepts it whole.
    let opcode = [0x1, 0x2, 0x8, 0x9, 0xa][usize::from(*sel) % 5];
    let len = u64::from_le_bytes(std::array::from_fn(|i| input.get(i).copied().unwrap_or(0)))
        >> (flags >> 2);
    let mut out = [0u8; 14];
    let n = encode_header(opcode, len, &mut out);
    let mut cursor = Cursor::new(&out[..n]);
    let (h, parsed) = FrameHeader::parse(&mut cursor)
        .ok()
        .flatten()
        .expect("own header");
    assert_eq!(
        (u8::from(h.opcode), parsed, cursor.position()),
        (opcode, len, n as u64)
    );
    assert!(h.is_final && h.mask.is_none() && !h.rsv1 && !h.rsv2 && !h.rsv3);
    let code = u16::from_be_bytes([*flags, *sel]);
    let mask = (flags & 1 == 0).then_some([*sel, *flags, 0x5a, 0xa5]);
    let mut close = [0u8; 8];
    let n = encode_close(code, mask, &mut close);
    let close_dir = if mask.is_some() {
        Direction::ClientToServer
    } else {
        Direction::ServerToClient
    };
    let seen = track(close_dir, 125, &[&close[..n]]);
    assert_eq!((seen.result, seen.close_code), (Ok(()), Some(code)));
}

// ---------------------------------------------------------------------------------------
// Flag values.
// ---------------------------------------------------------------------------------------

/// A duration in the coarsest unit that states it exactly (parse_duration only yields whole
/// milliseconds).
fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 3_600_000 == 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

fn format_size(n: u64) -> String {
    for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if n % (1 << shift) == 0 {
            return format!("{}{unit}", n >> shift);
        }
    }
    n.to_string()
}

/// Long flags whose values `parse_args` reads without the network. `--listen`, `--backend`
/// and `--control` resolve host names, so the target never passes them (an allowlist: a
/// flag added later stays out until it is known to be offline).
const OFFLINE_FLAGS: &[&str] = &[
    "algorithm",
    "protocols",
    "header-timeout",
    "connect-timeout",
    "idle-timeout",
    "drain-timeout",
    "heartbeat",
    "ws-idle-timeout",
    "max-connections",
    "max-connections-per-ip",
    "max-frame-size",
    "max-memory",
    "throttle",
    "allowed-origin",
    "token",
    "on-backend-lost",
    "log-format",
    "quiet",
    "verbose",
    "help",
    "version",
];

/// Short flags that never resolve anything (`-a` takes a value).
const OFFLINE_SHORT: &str = "aqvhV";

fn offline_arg(a: &str) -> bool {
    if a == "--" {
        true
    } else if let Some(long) = a.strip_prefix("--") {
        let name = long.split_once('=').map_or(long, |(n, _)| n);
        OFFLINE_FLAGS.contains(&name)
    } else if let Some(short) = a.strip_prefix('-') {
        // After `-a` the rest of the group is its value.
        let flags = short.split_once('a').map_or(short, |(f, _)| f);
        flags.chars().all(|c| OFFLINE_SHORT.contains(c))
    } else {
        true
    }
}

/// The fields a command line printed back from a [`wslb::Config`] must reproduce.
fn settings(c: &wslb::Config) -> String {
    format!(
        "{:?} ws={} http={} {:?} {:?} {:?} {:?} {} {} {:?} {}",
        c.algorithm,
        c.websocket,
        c.http,
        c.header_timeout,
        c.connect_timeout,
        c.idle_timeout,
        c.drain_timeout,
        c.max_connections,
        c.max_frame_size,
        c.log_format,
        c.verbosity
    )
}

/// Flag-value target: the input (as UTF-8, lossily) is given to each value parser whole;
/// split on NUL it is a command line for `parse_args`.
/// Every backend host in `text` is an IP literal (parsing resolves names: a fuzzer must not
/// ask DNS).
fn only_ip_hosts(text: &str) -> bool {
    text.split("://").skip(1).all(|rest| {
        let authority = rest.split(['/', ',', '\n', '#']).next().unwrap_or_default();
        let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
        host.starts_with('[') || host.bytes().all(|b| b.is_ascii_digit() || b == b'.')
    })
}

/// `--backends-file`: what parses holds no URL twice and no more backends than lines; a
/// refusal names a line that exists; comments and blank lines change nothing.
fn backends_file(s: &str) {
    if !only_ip_hosts(s) {
        return;
    }
    let lines = s.lines().count();
    match parse_backends_file(s) {
        Ok(specs) => {
            assert!(specs.len() <= lines, "{s:?}");
            for (i, a) in specs.iter().enumerate() {
                assert!(specs.iter().skip(i + 1).all(|b| b.url != a.url), "{s:?}");
                assert!((1..=1000).contains(&a.weight));
            }
            let commented = format!("# header\n\n{}\n  # trailer", s.replace('\n', "\n\n"));
            let again = parse_backends_file(&commented).unwrap_or_else(|e| panic!("{e}: {s:?}"));
            assert_eq!(again.len(), specs.len());
        }
        Err(e) => {
            let n: usize = e
                .strip_prefix("line ")
                .and_then(|r| r.split(':').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("refusal without a line: {e}"));
            assert!((1..=lines).contains(&n), "{e} of {lines} lines");
        }
    }
}

pub fn config_values(data: &[u8]) {
    let s = String::from_utf8_lossy(data);
    let s = s.as_ref();

    // Durations: positive, whitespace-insensitive, and printing one back reads the same.
    match parse_duration(s) {
        Ok(d) => {
            assert!(!d.is_zero());
            assert_eq!(d.subsec_nanos() % 1_000_000, 0);
            let again = format_duration(d);
            assert_eq!(parse_duration(&again), Ok(d), "{again}");
            assert_eq!(parse_duration(&format!(" {again}\t")), Ok(d));
        }
        Err(why) => assert!(!why.is_empty()),
    }
    assert_eq!(parse_duration(s.trim()), parse_duration(s));

    // Sizes: positive, unit case-insensitive, round trip.
    match parse_size(s) {
        Ok(n) => {
            assert!(n > 0);
            let again = format_size(n);
            assert_eq!(parse_size(&again), Ok(n), "{again}");
            assert_eq!(parse_size(&again.to_ascii_lowercase()), Ok(n));
        }
        Err(why) => assert!(!why.is_empty()),
    }
    assert_eq!(parse_size(&s.to_ascii_uppercase()), parse_size(s));
    assert_eq!(parse_size(&s.to_ascii_lowercase()), parse_size(s));

    // Backend URLs: the authority is the text right after the scheme, ends in a port
    // 1..=65535, and the same authority reads back from the same scheme with any path.
    if let Ok(auth) = parse_backend_url(s) {
        let (scheme, rest) = s.split_once("://").unwrap_or_else(|| panic!("{s:?}"));
        assert!(rest.starts_with(auth), "{s:?}");
        assert!(!auth.contains('/'));
        let port = auth.rsplit_once(':').map(|(_, p)| p.parse::<u16>());
        assert!(matches!(port, Some(Ok(1..))), "{s:?}");
        for url in [
            format!("{scheme}://{auth}"),
            format!("{scheme}://{auth}/x/y?z"),
        ] {
            assert_eq!(parse_backend_url(&url), Ok(auth));
        }
    }

    backends_file(s);

    // Command lines: a refused value names the flag it was given with; a successful parse
    // prints back to flags that parse to the same values.
    let args: Vec<&str> = s.split('\0').filter(|a| offline_arg(a)).collect();
    let cfg = match parse_args(&args) {
        Ok(Command::Run(cfg)) => cfg,
        Err(wslb::ConfigError::Value { flag, .. }) => {
            if let [only, _value] = args.as_slice() {
                if only.starts_with("--") && !only.contains('=') {
                    assert_eq!(flag, *only, "{args:?}");
                }
            }
            return;
        }
        _ => return,
    };
    for d in [
        cfg.header_timeout,
        cfg.connect_timeout,
        cfg.idle_timeout,
        cfg.drain_timeout,
    ] {
        assert!(!d.is_zero());
    }
    // max_connections 0 = sized from the descriptor limit at start.
    assert!(cfg.max_frame_size > 0);
    assert!(cfg.backends.is_empty());
    let alg = format!("{:?}", cfg.algorithm);
    let alg = match alg.as_str() {
        "Fewest" => "fewest",
        "Random" => "random",
        "RoundRobin" => "round-robin",
        "PowerOfTwo" => "p2c",
        other => panic!("unknown algorithm {other}"),
    };
    let protocols = match (cfg.websocket, cfg.http) {
        (true, true) => "ws,http",
        (true, false) => "ws",
        (false, true) => "http",
        // Every listed protocol is one of the two and the list is never empty.
        (false, false) => panic!("no protocol enabled: {args:?}"),
    };
    let mut printed: Vec<String> = vec![
        "--algorithm".into(),
        alg.into(),
        "--protocols".into(),
        protocols.into(),
        "--header-timeout".into(),
        format_duration(cfg.header_timeout),
        "--connect-timeout".into(),
        format_duration(cfg.connect_timeout),
        "--idle-timeout".into(),
        format_duration(cfg.idle_timeout),
        "--drain-timeout".into(),
        format_duration(cfg.drain_timeout),
        "--max-connections".into(),
        cfg.max_connections.to_string(),
        "--max-frame-size".into(),
        if cfg.max_frame_size == u64::MAX {
            "off".into()
        } else {
            format_size(cfg.max_frame_size)
        },
        "--log-format".into(),
        format!("{:?}", cfg.log_format).to_ascii_lowercase(),
    ];
    match cfg.verbosity {
        0 => printed.push("-q".into()),
        2 => printed.push("-v".into()),
        _ => {}
    }
    let Ok(Command::Run(again)) = parse_args(&printed) else {
        panic!("printed flags do not parse: {printed:?}");
    };
    assert_eq!(settings(&again), settings(&cfg), "{args:?} -> {printed:?}");
}

// ---- sticky_cookie ----

use wslb::sticky::{
    find_cookie, parse_mode, rendezvous_pick, set_cookie_value, static_backend_id, valid_id,
    CookieSigner, StickyMode, Verified, MAX_CLOCK_SKEW_SECS, MAX_ID_LEN,
};

/// The secret the committed seeds were signed with, and the clock they were signed against.
const STICKY_SECRET: &[u8] = b"wslb fuzz sticky secret";
const STICKY_NOW: u64 = 1_700_000_000;
const STICKY_MAX_AGE: u64 = 86_400;

fn sticky_fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `part` lies inside `whole` (the lookup borrows, never copies).
fn sticky_within(whole: &[u8], part: &[u8]) -> bool {
    let w = whole.as_ptr_range();
    let p = part.as_ptr_range();
    w.start <= p.start && p.end <= w.end
}

/// A value that verifies is canonical: re-issuing its id at its time gives the same bytes,
/// and it verifies only inside its time window.
fn sticky_check_value(signer: &CookieSigner, value: &[u8]) {
    let at = |now, max_age| signer.verify(value, now, max_age);
    let _ = (
        at(0, 0),
        at(u64::MAX, 0),
        at(0, u64::MAX),
        at(u64::MAX, u64::MAX),
    );
    if let Some(Verified { id, issued_secs }) = at(STICKY_NOW, STICKY_MAX_AGE) {
        assert!(valid_id(id));
        let again = signer.issue(id, issued_secs);
        assert_eq!(again.as_deref().map(str::as_bytes), Some(value));
        assert!(issued_secs <= STICKY_NOW + MAX_CLOCK_SKEW_SECS);
        assert!(STICKY_NOW.saturating_sub(issued_secs) <= STICKY_MAX_AGE);
        assert!(at(issued_secs, 0).is_some());
        // issued_secs is bounded by STICKY_NOW + skew here, but a checked sum keeps the
        // property from overflowing if those constants ever grow.
        if let Some(expired) = issued_secs
            .checked_add(STICKY_MAX_AGE)
            .and_then(|t| t.checked_add(1))
        {
            assert!(at(expired, STICKY_MAX_AGE).is_none());
        }
        assert!(CookieSigner::new(b"another secret")
            .verify(value, STICKY_NOW, u64::MAX)
            .is_none());
    }
}

pub fn sticky_cookie(data: &[u8]) {
    let signer = CookieSigner::new(STICKY_SECRET);
    let h = sticky_fnv(data);

    // The input as one Cookie header line, and as a bare cookie value.
    for name in ["wslb", "sid", "a", "x-y"] {
        if let Some(v) = find_cookie(data, name) {
            assert!(sticky_within(data, v));
            assert!(!v.contains(&b';'));
            sticky_check_value(&signer, v);
        }
    }
    assert_eq!(find_cookie(data, ""), None);
    sticky_check_value(&signer, data);

    // An id derived from the input: issue → Set-Cookie → Cookie lookup → verify round-trips;
    // any single-byte change does not verify.
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:";
    let id: String = data
        .iter()
        .take(MAX_ID_LEN)
        .map(|&b| char::from(ALPHABET[usize::from(b) % ALPHABET.len()]))
        .collect();
    let ts = h >> (h % 64);
    match signer.issue(&id, ts) {
        None => assert!(id.is_empty()),
        Some(value) => {
            assert!(valid_id(&id));
            let verified = signer.verify(value.as_bytes(), ts, 0);
            assert_eq!(
                verified,
                Some(Verified {
                    id: &id,
                    issued_secs: ts
                })
            );
            let set = set_cookie_value("wslb", &value, h & 1 == 1, STICKY_MAX_AGE);
            let header = format!("pre=1; {set}");
            assert_eq!(
                find_cookie(header.as_bytes(), "wslb"),
                Some(value.as_bytes())
            );
            let mut tampered = value.clone().into_bytes();
            let at = (h as usize) % tampered.len();
            tampered[at] ^= 1 << (h % 7);
            assert_eq!(signer.verify(&tampered, ts, u64::MAX), None);
            tampered.truncate(at);
            assert_eq!(signer.verify(&tampered, ts, u64::MAX), None);
        }
    }

    // The flag value: a parsed name is one the header/cookie code can match.
    if let Ok(s) = std::str::from_utf8(data) {
        match parse_mode(s) {
            Ok(StickyMode::Cookie { name } | StickyMode::Header { name }) => {
                assert!((1..=64).contains(&name.len()));
                assert!(!name.bytes().any(|b| b"=; :\"\t,".contains(&b)));
            }
            Ok(StickyMode::Ip) => assert_eq!(s, "ip"),
            Err(why) => assert!(!why.is_empty()),
        }
    }

    // Rendezvous on the input as a key: in range, deterministic, and removing a candidate
    // that was not chosen keeps the choice.
    let urls = [
        "ws://10.0.0.1:80",
        "ws://10.0.0.2:80",
        "ws://10.0.0.3:80",
        "ws://10.0.0.4:80",
    ];
    let ids: Vec<String> = urls.iter().map(|u| static_backend_id(u)).collect();
    let weights = [1 + (h & 3) as u32, 1, 2, ((h >> 8) & 1) as u32];
    let cands: Vec<(&str, u32)> = ids.iter().map(String::as_str).zip(weights).collect();
    let Some(best) = rendezvous_pick(data, cands.iter().copied()) else {
        panic!("some candidate has a non-zero weight");
    };
    assert!(best < cands.len() && cands[best].1 > 0);
    assert_eq!(rendezvous_pick(data, cands.iter().copied()), Some(best));
    let drop = (h as usize >> 16) % cands.len();
    if drop != best {
        let rest = cands.iter().enumerate().filter(|&(i, _)| i != drop);
        let pick = rendezvous_pick(data, rest.clone().map(|(_, c)| *c));
        let original = pick.and_then(|p| rest.map(|(i, _)| i).nth(p));
        assert_eq!(original, Some(best));
    }
}

// ---- control_message ----

use serde_json::Value;
use wslb::control::protocol::{
    binding_addr, decode as control_decode, encode as control_encode, error as control_error,
    registered, unreachable, BackendMsg, ControlError, Registration, MAX_BINDINGS, MAX_MESSAGE,
    MAX_TAGS,
};

/// What `decode` must answer, read independently from serde_json's value of the same text.
fn reference_control(text: &str) -> Result<&'static str, &'static str> {
    if text.len() > MAX_MESSAGE {
        return Err("too_large");
    }
    let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(text) else {
        return Err("bad_json");
    };
    match obj.get("type").and_then(Value::as_str) {
        Some("drain") => Ok("drain"),
        Some("deregister") => Ok("deregister"),
        Some("register") if obj.get("version").and_then(Value::as_u64) != Some(1) => {
            Err("bad_version")
        }
        // Field checks are the decoder's own rules; the invariants below hold them to it.
        Some("register") => Ok("register"),
        _ => Err("unknown_type"),
    }
}

fn check_registration(r: &Registration, text: &str) {
    assert!((1..=128).contains(&r.guid.len()), "{text}");
    assert!(r
        .guid
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)));
    assert!((1..=MAX_BINDINGS).contains(&r.bindings.len()));
    assert_eq!(r.bindings.len(), r.addrs.len());
    for (url, addr) in r.bindings.iter().zip(&r.addrs) {
        assert_eq!(binding_addr(url), Ok(*addr));
    }
    assert!((1..=1000).contains(&r.weight));
    assert!(r.tags.len() <= MAX_TAGS);
    // What the agent would send for this registration decodes to the same registration.
    let msg = BackendMsg::Register(r.clone());
    assert_eq!(control_decode(&control_encode(&msg)), Ok(msg));
}

/// The balancer's answers are JSON that carry any text (an input's bytes as a guid or
/// binding) through unchanged; an `unreachable` reason is only ever "unreachable".
fn check_answers(text: &str) {
    let parse = |s: String| serde_json::from_str::<Value>(&s).expect("answer is JSON");
    let v = parse(unreachable(text));
    assert_eq!(
        (v["binding"].as_str(), v["reason"].as_str()),
        (Some(text), Some("unreachable"))
    );
    let refused = ControlError::BindingRefused {
        binding: text.to_string(),
        rule: wslb::netpolicy::BindingRule::NotPeer,
    };
    let v = parse(control_error(&refused));
    assert_eq!(
        (
            v["binding"].as_str(),
            v["rule"].as_str(),
            v["code"].as_str()
        ),
        (
            Some(text),
            Some("not_peer_address"),
            Some("binding_refused")
        )
    );
    let v = parse(registered(text, 5000));
    assert_eq!(v["guid"].as_str(), Some(text));
    assert_eq!(v["type"], "registered");
}

pub fn control_message(data: &[u8]) {
    registration_message(data);
    backend_message(data);
}

fn registration_message(data: &[u8]) {
    // Control frames are text: the session refuses non-UTF-8 before decoding (1007).
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let got = control_decode(text);
    let want = reference_control(text);
    match (&got, want) {
        (Ok(BackendMsg::Drain), Ok("drain")) | (Ok(BackendMsg::Deregister), Ok("deregister")) => {}
        (Ok(BackendMsg::Register(r)), Ok("register")) => check_registration(r, text),
        (Err(ControlError::BadField(why)), Ok("register")) => assert!(!why.is_empty()),
        (Err(e), Err(code)) => assert_eq!(e.code(), code, "{text}"),
        _ => panic!("decode {text:?} = {got:?}, reference says {want:?}"),
    }
    if let Err(e) = &got {
        // Every refusal closes with a code a client library accepts, after valid JSON.
        assert!(serde_json::from_str::<Value>(&control_error(e)).is_ok());
        assert!([1000, 1003, 1008, 1009].contains(&e.close_code()));
    }
    check_answers(str_prefix(text, 256));
}

/// The session's decoders for messaging requests (issue 17), on any frame: a request that
/// decodes round-trips through the agent's encoders; registration messages decode exactly
/// as `protocol::decode` does; every refusal is answerable with valid JSON.
fn backend_message(data: &[u8]) {
    use wslb::control::messaging::{
        decode_binary, decode_text, encode_binary, encode_text, failed, Incoming, Op, Payload,
        Refusal,
    };
    const MAX: usize = 1024;
    let check_refusal = |r: &Refusal| match r {
        Refusal::Failed(id, e) => {
            assert!(serde_json::from_str::<Value>(&failed(*id, e)).is_ok());
        }
        Refusal::Fatal(e) => assert!(serde_json::from_str::<Value>(&control_error(e)).is_ok()),
    };
    match decode_binary(data, MAX) {
        Ok(req) => {
            let again = encode_binary(&req).expect("a decoded binary request re-encodes");
            assert_eq!(decode_binary(&again, MAX), Ok(req));
        }
        Err(r) => check_refusal(&r),
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match decode_text(text, MAX) {
        Ok(Incoming::Request(req)) => {
            let size = match &req.op {
                Op::Broadcast { payload, .. } | Op::Send { payload, .. } => payload.len(),
                _ => 0,
            };
            assert!(size <= MAX);
            let binary = matches!(
                &req.op,
                Op::Broadcast {
                    payload: Payload::Binary(_),
                    ..
                } | Op::Send {
                    payload: Payload::Binary(_),
                    ..
                }
            );
            assert!(!binary, "a text frame never makes a binary payload");
            assert_eq!(
                decode_text(&encode_text(&req), MAX),
                Ok(Incoming::Request(req))
            );
        }
        Ok(Incoming::Control(msg)) => assert_eq!(control_decode(text), Ok(msg)),
        Err(r) => check_refusal(&r),
    }
}

/// The longest prefix of `text` of at most `max` bytes that ends on a char boundary (a byte
/// count can land inside a multi-byte character, and slicing there panics).
fn str_prefix(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

// ---- ws_inject ----

/// One frame as tungstenite reads it: where it starts, its header and its whole length.
struct ParsedFrame {
    start: usize,
    fin: bool,
    opcode: OpCode,
    len: usize,
}

/// The complete frames at the start of a server-to-client stream, by tungstenite's parser
/// (it stops at the first incomplete one).
fn tungstenite_frames(stream: &[u8]) -> Vec<ParsedFrame> {
    let mut frames = Vec::new();
    let mut at = 0;
    while at < stream.len() {
        let mut cursor = Cursor::new(&stream[at..]);
        let Ok(Some((header, payload))) = FrameHeader::parse(&mut cursor) else {
            break;
        };
        let Some(len) = usize::try_from(cursor.position().saturating_add(payload))
            .ok()
            .filter(|&len| len <= stream.len() - at)
        else {
            break;
        };
        frames.push(ParsedFrame {
            start: at,
            fin: header.is_final,
            opcode: header.opcode,
            len,
        });
        at += len;
    }
    frames
}

/// Frame-injector target: the relay loop of `conn.rs` over one backend-to-client stream,
/// with the balancer's own text frames (Broadcast / WriteData) queued at input-chosen moments
/// and read sizes chosen by the input. Whatever the stream, the client must receive the
/// backend's bytes unchanged and in order, with each injected frame whole, between two
/// messages (never inside a frame, never between the fragments of a message), and nothing
/// after a close frame.
///
/// Input: last byte = length of the plan (×4, up to 60); the plan's bytes, one per round
/// (bit 7: queue a frame, bits 0-6: bytes to read, and the queued body's length); the
/// rest is the backend's stream.
pub fn ws_inject(data: &[u8]) {
    let Some((&last, steps)) = data.split_last() else {
        return;
    };
    let (plan, input) = steps.split_at(steps.len().min(usize::from(last) % 16 * 4));
    let mut t = FrameTracker::new(Direction::ServerToClient, 1 << 20);
    let mut out = Vec::with_capacity(input.len() + 64);
    let mut injected_at = Vec::new();
    let mut pending: Vec<Vec<u8>> = Vec::new();
    let mut rest = input;
    let mut round = 0usize;
    let mut relayed = 0usize;
    while !rest.is_empty() && t.error().is_none() {
        let choice = plan.get(round % plan.len().max(1)).copied().unwrap_or(7);
        round += 1;
        assert!(round <= input.len(), "every round reads at least one byte");
        if choice & 0x80 != 0 && pending.len() < 4 {
            // The admin API queues a message (its bytes come from the input too).
            let body = &input[..input.len().min(usize::from(choice & 0x3f))];
            let mut frame = [0u8; 14];
            let n = encode_header(0x1, body.len() as u64, &mut frame);
            let mut f = frame[..n].to_vec();
            f.extend_from_slice(body);
            pending.push(f);
        }
        if t.close_seen() {
            // conn.rs drops its queue here: nothing may follow a close.
            pending.clear();
        }
        let limit = if pending.is_empty() {
            u64::MAX
        } else if let Some(limit) = t.read_limit_for_injection() {
            limit
        } else {
            // A message boundary: conn.rs splices the whole queue, then reads on.
            assert!(t.at_message_boundary() && !t.close_seen());
            for f in pending.drain(..) {
                injected_at.push(out.len());
                out.extend_from_slice(&f);
            }
            u64::MAX
        };
        assert!(limit > 0, "a read limit of 0 would stall the relay");
        let n = usize::from(choice & 0x7f)
            .max(1)
            .min(rest.len())
            .min(usize::try_from(limit).unwrap_or(usize::MAX));
        let (chunk, tail) = rest.split_at(n);
        // conn.rs commits what the tracker releases: never a partial header, nor the
        // header that failed, nor what follows a close.
        let _ = t.feed(chunk);
        let released = usize::try_from(t.released()).unwrap_or(usize::MAX);
        assert!(released >= relayed && released <= input.len() - tail.len());
        out.extend_from_slice(&input[relayed..released]);
        relayed = released;
        rest = tail;
    }

    // The client's view, as far as frames are complete: injected frames exactly where they
    // were put, whole, between messages; everything else the backend's bytes in order.
    let frames = tungstenite_frames(&out);
    let complete = frames.last().map_or(0, |f| f.start + f.len);
    let mut backend_bytes = Vec::with_capacity(input.len());
    let mut in_fragmented = false;
    let mut injected = injected_at.iter().peekable();
    for f in &frames {
        if injected.peek() == Some(&&f.start) {
            injected.next();
            assert!(!in_fragmented, "injected frame inside a fragmented message");
            assert!(f.fin && f.opcode == OpCode::Data(Data::Text));
            continue;
        }
        if let OpCode::Data(_) = f.opcode {
            in_fragmented = !f.fin;
        }
        backend_bytes.extend_from_slice(&out[f.start..f.start + f.len]);
    }
    assert_eq!(
        injected.next(),
        None,
        "an injected frame does not start a frame (complete up to {complete})"
    );
    assert!(
        input.starts_with(&backend_bytes),
        "the backend's bytes reach the client unchanged"
    );
    assert_eq!(out.len() - complete, relayed - backend_bytes.len());
}

/// The bits of an address, most significant first (IPv4 as 32, IPv6 as 128).
fn ip_bits(ip: IpAddr) -> Vec<bool> {
    let octets = match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    octets
        .iter()
        .flat_map(|o| (0..8).rev().map(move |i| o >> i & 1 == 1))
        .collect()
}

fn ip_from_bits(v4: bool, bits: &[bool]) -> IpAddr {
    let octets: Vec<u8> = bits
        .chunks(8)
        .map(|c| c.iter().fold(0u8, |acc, &b| acc << 1 | u8::from(b)))
        .collect();
    if v4 {
        IpAddr::V4(Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3]))
    } else {
        let mut a = [0u8; 16];
        a.copy_from_slice(&octets);
        IpAddr::V6(Ipv6Addr::from(a))
    }
}

/// Reference membership, bit by bit, with IPv4-mapped IPv6 read as IPv4.
fn ref_contains(net: IpAddr, prefix: u8, ip: IpAddr) -> bool {
    // An IPv4-mapped block of at least /96 is the IPv4 block it maps.
    let (net, prefix) = match net {
        IpAddr::V6(n)
            if prefix >= 96 && n.octets()[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff] =>
        {
            let o = n.octets();
            (
                IpAddr::V4(Ipv4Addr::new(o[12], o[13], o[14], o[15])),
                prefix - 96,
            )
        }
        other => (other, prefix),
    };
    let ip = ip.to_canonical();
    if net.is_ipv4() != ip.is_ipv4() {
        return false;
    }
    ip_bits(net)[..usize::from(prefix)] == ip_bits(ip)[..usize::from(prefix)]
}

/// CIDR target (`--backend-allow`, `--trusted-proxy`): the first line is a block, the
/// others addresses. `parse_cidr` agrees with a reference reading (address by std, prefix
/// of 1-3 digits within the family's width, no host bits); accepted blocks print back to
/// themselves, hold their network address, and agree with a bit-by-bit membership test
/// for every listed address and for the addresses just inside and just outside the prefix.
pub fn cidr(data: &[u8]) {
    use wslb::netpolicy::parse_cidr;
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let block = lines.next().unwrap_or_default();
    let (addr, prefix) = match block.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (block, None),
    };
    let reference = addr.parse::<IpAddr>().ok().and_then(|net| {
        let width: u8 = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => width,
            Some(p) if (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u8>().ok().filter(|&n| n <= width)?
            }
            Some(_) => return None,
        };
        let host_bits_clear = ip_bits(net)[usize::from(prefix)..].iter().all(|b| !b);
        host_bits_clear.then_some((net, prefix))
    });
    let got = parse_cidr(block);
    match (&got, reference) {
        (Ok(c), Some((net, prefix))) => {
            assert_eq!((c.network(), c.prefix()), (net, prefix), "{block:?}");
            assert_eq!(parse_cidr(&c.to_string()).as_ref(), Ok(c), "{block:?}");
            assert!(c.contains(net));
            let mut probes: Vec<IpAddr> = lines.filter_map(|l| l.trim().parse().ok()).collect();
            let bits = ip_bits(net);
            for flip in [usize::from(prefix), usize::from(prefix).wrapping_sub(1)] {
                if let Some(b) = bits.get(flip) {
                    let mut changed = bits.clone();
                    changed[flip] = !*b;
                    probes.push(ip_from_bits(net.is_ipv4(), &changed));
                }
            }
            for ip in probes {
                assert_eq!(
                    c.contains(ip),
                    ref_contains(net, prefix, ip),
                    "{block:?} contains {ip}?"
                );
            }
        }
        (Err(why), None) => assert!(!why.is_empty()),
        (got, want) => panic!("{block:?}: parse_cidr {got:?}, reference {want:?}"),
    }
}

/// `wslb::proxy_protocol::parse`, the function the listener calls on the bytes it peeks at.
/// Properties: a header found is no longer than the input and the caps (107 bytes for v1,
/// `MAX_HEADER` for v2); the verdict is prefix-stable (every shorter prefix of a header is
/// `Partial`, and a verdict reached on a prefix — header or error, reason included — is the
/// verdict on the whole input, so peeking more bytes never changes an answer); and the
/// addresses of a header, encoded again by `encode` (what wslb sends backends) in either
/// version, parse back to themselves. A v2 reference reading (plain indexing of the fixed
/// layout) must agree on the length and addresses.
pub fn proxy_header(data: &[u8]) {
    use std::net::SocketAddr;
    use wslb::proxy_protocol::{encode, parse, Status, Version, MAX_HEADER, V1_MAX, V2_SIGNATURE};
    let data = &data[..data.len().min(MAX_HEADER + 64)];
    let whole = parse(data);
    let mut prefix_verdict = None;
    for k in 0..data.len() {
        match parse(&data[..k]) {
            Ok(Status::Partial) => {}
            v => {
                prefix_verdict.get_or_insert((k, v));
            }
        }
    }
    if let Some((k, v)) = prefix_verdict {
        assert_eq!(
            v, whole,
            "verdict at prefix {k} differs from the whole input's"
        );
    }
    let Ok(Status::Complete(h)) = whole else {
        return;
    };
    assert!(h.len <= data.len() && h.len <= MAX_HEADER);
    assert!(h.version == 2 || h.len <= V1_MAX);
    if let Some((k, _)) = prefix_verdict {
        assert_eq!(k, h.len, "complete before its own length");
    }
    assert_eq!(parse(&data[..h.len]), whole);
    if h.version == 2 {
        // Reference: the fixed 16 bytes as the specification draws them.
        assert_eq!(&data[..12], &V2_SIGNATURE);
        let len = 16 + usize::from(u16::from_be_bytes([data[14], data[15]]));
        assert_eq!(h.len, len);
        let (cmd, fam) = (data[12] & 0x0f, data[13]);
        let b = &data[16..];
        let want: Option<(SocketAddr, SocketAddr)> = match (cmd, fam) {
            (1, 0x11) => Some((
                SocketAddr::from(([b[0], b[1], b[2], b[3]], u16::from_be_bytes([b[8], b[9]]))),
                SocketAddr::from(([b[4], b[5], b[6], b[7]], u16::from_be_bytes([b[10], b[11]]))),
            )),
            (1, 0x21) => {
                let ip = |at: usize| {
                    let mut o = [0u8; 16];
                    o.copy_from_slice(&b[at..at + 16]);
                    Ipv6Addr::from(o)
                };
                Some((
                    SocketAddr::from((ip(0), u16::from_be_bytes([b[32], b[33]]))),
                    SocketAddr::from((ip(16), u16::from_be_bytes([b[34], b[35]]))),
                ))
            }
            _ => None,
        };
        assert_eq!(h.addrs.map(|a| (a.src, a.dst)), want);
    }
    if let (1, Some(a)) = (h.version, h.addrs) {
        // IPv4 text has one spelling (dotted quad, no leading zeros, like the ports): an
        // accepted TCP4 line is exactly what `encode` writes for its addresses.
        if data.starts_with(b"PROXY TCP4 ") {
            let mut out = Vec::new();
            encode(Version::V1, a.src, a.dst, &mut out);
            assert_eq!(&out[..], &data[..h.len], "TCP4 line is not canonical");
        }
    }
    if let Some(a) = h.addrs {
        for version in [Version::V1, Version::V2] {
            let mut out = Vec::new();
            encode(version, a.src, a.dst, &mut out);
            let Ok(Status::Complete(back)) = parse(&out) else {
                panic!("encode({version:?}) of {a:?} does not parse: {out:?}");
            };
            assert_eq!(back.len, out.len());
            let b = back.addrs.expect("addresses");
            let canon = |s: SocketAddr| (s.ip().to_canonical(), s.port());
            assert_eq!(canon(b.src), canon(a.src));
            assert_eq!(canon(b.dst), canon(a.dst));
        }
    }
}

/// `dispatch_ticket`: the ticket verifier a backend runs on untrusted query strings never
/// panics; a ticket it accepts is one the signer issued (re-issuing it gives the same
/// bytes); an issued ticket round-trips and any one changed byte is refused.
pub fn dispatch_ticket(data: &[u8]) {
    use wslb::ticket::{TicketError, TicketSigner, MAX_TICKET_LEN};
    let signer = TicketSigner::new(b"fuzz dispatch secret");
    let now = fnv(data) % 4_000_000_000;
    match signer.verify(data, now, None) {
        Ok(expires) => {
            assert!(expires > now && data.len() <= MAX_TICKET_LEN);
            let text = std::str::from_utf8(data).expect("accepted tickets are ASCII");
            let guid = &text[..text.len() - 66 - expires.to_string().len()];
            assert!(!guid.is_empty());
            assert_eq!(signer.issue(guid, expires).as_deref(), Some(text));
        }
        Err(TicketError::OtherBackend) => unreachable!("no guid was given"),
        Err(_) => {}
    }
    // A guid derived from the input: issue, verify, tamper.
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:";
    let guid: String = data
        .iter()
        .take(128)
        .map(|&b| char::from(ALPHABET[usize::from(b) % ALPHABET.len()]))
        .collect();
    let expires = now + 1 + fnv(data) % 1000;
    match signer.issue(&guid, expires) {
        None => assert!(guid.is_empty()),
        Some(t) => {
            assert_eq!(signer.verify(t.as_bytes(), now, Some(&guid)), Ok(expires));
            assert_eq!(
                signer.verify(t.as_bytes(), expires, None),
                Err(TicketError::Expired)
            );
            let i = (fnv(data) as usize) % t.len();
            let mut bad = t.clone().into_bytes();
            bad[i] ^= 0x01;
            assert!(signer.verify(&bad, now, Some(&guid)).is_err());
        }
    }
}
