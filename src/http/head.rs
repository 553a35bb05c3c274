//! HTTP/1.1 request and response heads: httparse plus the framing decisions a proxy must
//! make strictly (RFC 9112 §6), with hard limits. Pure and allocation-free: the caller owns
//! the header storage and the input.

use std::fmt;

use super::body::BodyKind;

/// Largest request/response head accepted (431 beyond).
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields accepted (431 beyond).
pub const MAX_HEADERS: usize = 100;

/// Storage for one parse; lives on the caller's stack.
pub type HeaderStorage<'b> = [httparse::Header<'b>; MAX_HEADERS];

/// Empty header storage.
pub fn header_storage<'b>() -> HeaderStorage<'b> {
    [httparse::EMPTY_HEADER; MAX_HEADERS]
}

/// Why a head was refused. Each variant has exactly one status code ([`HeadError::status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// More than [`MAX_HEAD`] bytes without the end of the head.
    TooLarge,
    /// More than [`MAX_HEADERS`] fields.
    TooManyHeaders,
    /// Not HTTP/1.x syntax.
    Malformed(httparse::Error),
    /// Content-Length not a plain decimal, overflowing, or several that disagree.
    BadContentLength,
    /// Transfer-Encoding whose final coding is not `chunked` (requests), or on HTTP/1.0.
    BadTransferEncoding,
    /// Both Content-Length and Transfer-Encoding.
    ConflictingFraming,
    /// HTTP/1.1 request without exactly one Host, or a Host that is not an authority
    /// (RFC 3986 §3.2: `host [":" port]`).
    BadHost,
    /// A request target that is neither origin-form (`/path`), `*`, nor an absolute `http`
    /// or `https` URI with a valid authority and no userinfo (RFC 9112 §3.2).
    BadTarget,
    /// A method the proxy does not relay (CONNECT).
    MethodNotAllowed,
}

impl HeadError {
    /// The one status code answered for this error.
    pub fn status(self) -> u16 {
        match self {
            HeadError::TooLarge | HeadError::TooManyHeaders => 431,
            HeadError::MethodNotAllowed => 405,
            _ => 400,
        }
    }
}

impl fmt::Display for HeadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeadError::TooLarge => f.write_str("head too large"),
            HeadError::TooManyHeaders => f.write_str("too many header fields"),
            HeadError::Malformed(e) => write!(f, "malformed head: {e}"),
            HeadError::BadContentLength => f.write_str("invalid Content-Length"),
            HeadError::BadTransferEncoding => f.write_str("invalid Transfer-Encoding"),
            HeadError::ConflictingFraming => {
                f.write_str("both Content-Length and Transfer-Encoding")
            }
            HeadError::BadHost => f.write_str("missing, repeated or invalid Host"),
            HeadError::BadTarget => f.write_str("invalid request target"),
            HeadError::MethodNotAllowed => f.write_str("method not relayed"),
        }
    }
}

impl std::error::Error for HeadError {}

/// A parsed request head borrowing the input.
#[derive(Debug)]
pub struct Request<'h, 'b> {
    /// Method token.
    pub method: &'b str,
    /// Request target as sent.
    pub path: &'b str,
    /// The target to forward: `path` itself, or for an absolute-form target
    /// (`http://a.test/x?q`) its path and query (`/x?q`; empty when it has neither, which
    /// is forwarded as `/`).
    pub origin: &'b str,
    /// The authority of an absolute-form target: it wins over the Host field (RFC 9112
    /// §3.2.2) and is forwarded as Host.
    pub authority: Option<&'b str>,
    /// Minor version: 0 or 1.
    pub version: u8,
    /// The header fields in order.
    pub headers: &'h [httparse::Header<'b>],
    /// Bytes of the head, including the final CRLF CRLF.
    pub head_len: usize,
    /// How the body is delimited.
    pub body: BodyKind,
    /// The client wants the connection kept open after this exchange.
    pub keep_alive: bool,
    /// `Upgrade` names `websocket` (validity is checked by `ws::handshake`).
    pub wants_websocket: bool,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
}

/// A parsed response head borrowing the input.
#[derive(Debug)]
pub struct Response<'h, 'b> {
    /// Status code.
    pub status: u16,
    /// Reason phrase as sent.
    pub reason: &'b str,
    /// Minor version: 0 or 1.
    pub version: u8,
    /// The header fields in order.
    pub headers: &'h [httparse::Header<'b>],
    /// Bytes of the head, including the final CRLF CRLF.
    pub head_len: usize,
    /// How the body is delimited.
    pub body: BodyKind,
    /// The backend is willing to keep the connection open.
    pub keep_alive: bool,
}

/// httparse accepts a bare LF as a line ending; a backend might not, so two parsers could
/// disagree about where a field ends. Refuse instead (RFC 9112 §2.2 permits either).
fn has_bare_lf(head: &[u8]) -> bool {
    let mut prev = 0u8;
    for &b in head {
        if b == b'\n' && prev != b'\r' {
            return true;
        }
        prev = b;
    }
    false
}

/// The limits and line-ending rule shared by requests and responses: `Ok(None)` while the
/// head is incomplete and under the size limit.
fn complete_head(parsed: httparse::Result<usize>, buf: &[u8]) -> Result<Option<usize>, HeadError> {
    let head_len = match parsed.map_err(map_httparse)? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial if buf.len() >= MAX_HEAD => return Err(HeadError::TooLarge),
        httparse::Status::Partial => return Ok(None),
    };
    if head_len > MAX_HEAD {
        return Err(HeadError::TooLarge);
    }
    if has_bare_lf(buf.get(..head_len).unwrap_or_default()) {
        return Err(HeadError::Malformed(httparse::Error::NewLine));
    }
    Ok(Some(head_len))
}

fn map_httparse(e: httparse::Error) -> HeadError {
    match e {
        httparse::Error::TooManyHeaders => HeadError::TooManyHeaders,
        other => HeadError::Malformed(other),
    }
}

/// Does a comma-separated header value contain `token` (case-insensitive)?
pub fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Finds the first header named `name`.
pub fn header<'b>(headers: &[httparse::Header<'b>], name: &str) -> Option<&'b [u8]> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

fn parse_decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Framing facts gathered from the header fields in one pass.
struct Framing {
    content_length: Option<u64>,
    transfer_encoding: bool,
    chunked_last: bool,
    chunked_twice_or_inner: bool,
    close: bool,
    keep_alive: bool,
    upgrade_websocket: bool,
    expect_continue: bool,
    hosts: usize,
    hosts_valid: bool,
}

fn scan(headers: &[httparse::Header<'_>]) -> Result<Framing, HeadError> {
    let mut f = Framing {
        content_length: None,
        transfer_encoding: false,
        chunked_last: false,
        chunked_twice_or_inner: false,
        close: false,
        keep_alive: false,
        upgrade_websocket: false,
        expect_continue: false,
        hosts: 0,
        hosts_valid: true,
    };
    for h in headers {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            // A list value ("5, 5") or repeated fields must all agree (RFC 9112 §6.3).
            for part in h.value.split(|&b| b == b',') {
                let n = parse_decimal(part.trim_ascii()).ok_or(HeadError::BadContentLength)?;
                match f.content_length {
                    Some(prev) if prev != n => return Err(HeadError::BadContentLength),
                    _ => f.content_length = Some(n),
                }
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            f.transfer_encoding = true;
            // The final coding decides framing, across all fields in order; chunked applied
            // twice (or anywhere but last) is invalid (RFC 9112 §6.1) and never repaired.
            for coding in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if f.chunked_last {
                    f.chunked_twice_or_inner = true;
                }
                f.chunked_last = coding.eq_ignore_ascii_case(b"chunked");
            }
        } else if name.eq_ignore_ascii_case("connection") {
            f.close |= has_token(h.value, "close");
            f.keep_alive |= has_token(h.value, "keep-alive");
        } else if name.eq_ignore_ascii_case("upgrade") {
            f.upgrade_websocket |= has_token(h.value, "websocket");
        } else if name.eq_ignore_ascii_case("expect") {
            f.expect_continue |= h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        } else if name.eq_ignore_ascii_case("host") {
            f.hosts += 1;
            f.hosts_valid &= is_authority(h.value.trim_ascii());
        }
    }
    Ok(f)
}

/// RFC 3986 §3.2 `authority` without userinfo: `host [":" port]`, where host is an IP
/// literal in brackets or a reg-name (unreserved, sub-delims, pct-encoded; may be empty,
/// as an HTTP/1.1 Host for a target without authority is).
pub fn is_authority(v: &[u8]) -> bool {
    let (host, port) = if let Some(rest) = v.strip_prefix(b"[") {
        let Some(end) = rest.iter().position(|&b| b == b']') else {
            return false;
        };
        let (literal, after) = rest.split_at(end);
        let literal_ok = !literal.is_empty()
            && literal
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
        if !literal_ok {
            return false;
        }
        match after.get(1..) {
            Some([]) | None => return true,
            Some([b':', port @ ..]) => (&[][..], port),
            Some(_) => return false,
        }
    } else {
        match v.iter().rposition(|&b| b == b':') {
            Some(i) => (
                v.get(..i).unwrap_or_default(),
                v.get(i + 1..).unwrap_or_default(),
            ),
            None => (v, &[][..]),
        }
    };
    let mut i = 0;
    while let Some(&b) = host.get(i) {
        let ok = match b {
            b'%' => {
                let hex = host.get(i + 1..i + 3).unwrap_or_default();
                i += 2;
                hex.len() == 2 && hex.iter().all(u8::is_ascii_hexdigit)
            }
            b'-' | b'.' | b'_' | b'~' => true,
            b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'=' => true,
            _ => b.is_ascii_alphanumeric(),
        };
        if !ok {
            return false;
        }
        i += 1;
    }
    port.iter().all(u8::is_ascii_digit)
}

/// Splits a request target into the authority of an absolute-form target and the target to
/// forward (RFC 9112 §3.2): origin-form and `*` pass unchanged; `http://` and `https://`
/// URIs (scheme in any case) give their authority, which must be a non-empty host without
/// userinfo, and their path and query. Anything else is refused.
fn split_target(path: &str) -> Result<(Option<&str>, &str), HeadError> {
    if path.starts_with('/') || path == "*" {
        return Ok((None, path));
    }
    let rest = ["http://", "https://"]
        .iter()
        .find_map(|scheme| {
            let head = path.get(..scheme.len())?;
            head.eq_ignore_ascii_case(scheme)
                .then(|| path.get(scheme.len()..))
                .flatten()
        })
        .ok_or(HeadError::BadTarget)?;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, origin) = rest.split_at(end);
    if origin.starts_with('#') {
        return Err(HeadError::BadTarget);
    }
    let host_present = !authority.is_empty() && !authority.starts_with(':');
    if !host_present || !is_authority(authority.as_bytes()) {
        return Err(HeadError::BadTarget);
    }
    Ok((Some(authority), origin))
}

/// RFC 9110 §2.5: a request with a higher HTTP/1.x minor version than we implement is
/// handled as HTTP/1.1. httparse refuses any version but 1.0 and 1.1, so this rewrites the
/// request line's `HTTP/1.D` (D = 2..9) to `HTTP/1.1` in place, before parsing. Returns
/// whether it changed anything (the caller then parses again). Only the first line is
/// looked at; nothing else is touched.
pub fn downgrade_minor_version(buf: &mut [u8]) -> bool {
    let Some(line_end) = buf.iter().position(|&b| b == b'\r') else {
        return false;
    };
    let Some(line) = buf.get_mut(..line_end) else {
        return false;
    };
    match line {
        [.., b' ', b'H', b'T', b'T', b'P', b'/', b'1', b'.', minor @ b'2'..=b'9'] => {
            *minor = b'1';
            true
        }
        _ => false,
    }
}

/// Parses a request head. `Ok(None)` = incomplete (and still under the size limit).
pub fn parse_request<'h, 'b>(
    buf: &'b [u8],
    storage: &'h mut HeaderStorage<'b>,
) -> Result<Option<Request<'h, 'b>>, HeadError> {
    let mut req = httparse::Request::new(storage);
    let Some(head_len) = complete_head(req.parse(buf), buf)? else {
        return Ok(None);
    };
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Err(HeadError::Malformed(httparse::Error::Token));
    };
    let headers: &'h [httparse::Header<'b>] = req.headers;
    let f = scan(headers)?;
    if method.eq_ignore_ascii_case("CONNECT") {
        return Err(HeadError::MethodNotAllowed);
    }
    if version == 1 && f.hosts != 1 || f.hosts > 1 || !f.hosts_valid {
        return Err(HeadError::BadHost);
    }
    let (authority, origin) = split_target(path)?;
    let body = match (f.transfer_encoding, f.content_length) {
        (true, Some(_)) => return Err(HeadError::ConflictingFraming),
        (true, None) if version == 0 || !f.chunked_last || f.chunked_twice_or_inner => {
            return Err(HeadError::BadTransferEncoding)
        }
        (true, None) => BodyKind::Chunked,
        (false, Some(0)) | (false, None) => BodyKind::Empty,
        (false, Some(n)) => BodyKind::Length(n),
    };
    let keep_alive = if version == 1 {
        !f.close
    } else {
        f.keep_alive && !f.close
    };
    Ok(Some(Request {
        method,
        path,
        origin,
        authority,
        version,
        headers,
        head_len,
        body,
        keep_alive,
        wants_websocket: f.upgrade_websocket,
        expect_continue: f.expect_continue,
    }))
}

/// Parses a response head to a request whose method was HEAD when `head_request`.
/// `Ok(None)` = incomplete (and still under the size limit).
pub fn parse_response<'h, 'b>(
    buf: &'b [u8],
    storage: &'h mut HeaderStorage<'b>,
    head_request: bool,
) -> Result<Option<Response<'h, 'b>>, HeadError> {
    let mut resp = httparse::Response::new(storage);
    let Some(head_len) = complete_head(resp.parse(buf), buf)? else {
        return Ok(None);
    };
    let (Some(code @ 100..), Some(version)) = (resp.code, resp.version) else {
        // httparse takes any three digits; below 100 is no status (RFC 9110 §15), and would be
        // relayed as a shorter number and taken for an interim answer.
        return Err(HeadError::Malformed(httparse::Error::Status));
    };
    let reason = resp.reason.unwrap_or("");
    let headers: &'h [httparse::Header<'b>] = resp.headers;
    let f = scan(headers)?;
    let body = if head_request || (100..200).contains(&code) || code == 204 || code == 304 {
        BodyKind::Empty
    } else {
        match (f.transfer_encoding, f.content_length) {
            (true, Some(_)) => return Err(HeadError::ConflictingFraming),
            (true, None) if version == 0 => return Err(HeadError::BadTransferEncoding),
            (true, None) if f.chunked_twice_or_inner => return Err(HeadError::BadTransferEncoding),
            (true, None) if f.chunked_last => BodyKind::Chunked,
            // A response whose final coding is not chunked is delimited by close (RFC 9112 §6.3).
            (true, None) => BodyKind::UntilClose,
            (false, Some(n)) => BodyKind::Length(n),
            (false, None) => BodyKind::UntilClose,
        }
    };
    let keep_alive = if version == 1 {
        !f.close
    } else {
        f.keep_alive && !f.close
    };
    Ok(Some(Response {
        status: code,
        reason,
        version,
        headers,
        head_len,
        body,
        keep_alive,
    }))
}

#[cfg(test)]
mod tests;
