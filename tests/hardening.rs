//! Hostile clients and hostile backends: malformed framing (RFC 9112), smuggling-prone
//! re-serialisation, bad backend answers, deadlines, WebSocket limits (RFC 6455), connection
//! limits, fd exhaustion and slowloris. `docs/SECURITY.md` cites these tests by name.
//!
//! What reached the backend is asserted on the wire with the recording backend
//! (`common/recorder.rs`), not taken from the balancer's logs. Every test starts its own
//! balancer and backends on port 0; every socket has a read timeout; every loop a deadline.

mod common;
#[path = "common/recorder.rs"]
mod recorder;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use recorder::{contains, Mode, Recorder};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A balancer whose only backend is `rec`.
fn lb_for(rec: &Recorder, extra: &[&str]) -> Balancer {
    let url = rec.url();
    let mut args = vec!["-B", url.as_str()];
    args.extend_from_slice(extra);
    Balancer::start(&args, &[])
}

fn lossy(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    if s.chars().count() > 300 {
        let head: String = s.chars().take(300).collect();
        format!("{head}…({} bytes)", b.len())
    } else {
        s.into_owned()
    }
}

/// What a raw client saw: every byte until EOF (or the deadline), and when.
#[derive(Debug)]
struct Outcome {
    raw: Vec<u8>,
    /// EOF or reset before the deadline.
    closed: bool,
    /// Time from the start of the exchange to the first response byte.
    first_byte: Option<Duration>,
    /// Time from the start of the exchange to EOF.
    closed_at: Option<Duration>,
}

impl Outcome {
    fn status(&self) -> Option<u16> {
        status_of(&self.raw)
    }
}

fn status_of(raw: &[u8]) -> Option<u16> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(raw) {
        Ok(httparse::Status::Complete(_)) => resp.code,
        _ => None,
    }
}

/// Reads until EOF/reset or `limit` after `start`.
fn read_to_close(s: &mut TcpStream, start: Instant, limit: Duration) -> Outcome {
    let mut out = Outcome {
        raw: Vec::new(),
        closed: false,
        first_byte: None,
        closed_at: None,
    };
    let mut tmp = [0u8; 16 * 1024];
    loop {
        let left = (start + limit).saturating_duration_since(Instant::now());
        if left.is_zero() {
            return out;
        }
        s.set_read_timeout(Some(left.min(Duration::from_millis(100))))
            .unwrap();
        match s.read(&mut tmp) {
            Ok(0) => {
                out.closed = true;
                out.closed_at = Some(start.elapsed());
                return out;
            }
            Ok(n) => {
                out.first_byte.get_or_insert(start.elapsed());
                out.raw.extend_from_slice(&tmp[..n]);
            }
            Err(e) if is_timeout(&e) => {}
            Err(_) => {
                out.closed = true;
                out.closed_at = Some(start.elapsed());
                return out;
            }
        }
    }
}

/// Sends `req` on a fresh connection and reads until the balancer closes (5 s at most).
fn hostile(addr: SocketAddr, req: &[u8]) -> Outcome {
    let mut s = connect(addr);
    let start = Instant::now();
    // The balancer may refuse before it has read everything; a failed write is not a failure.
    let _ = s.write_all(req);
    read_to_close(&mut s, start, Duration::from_secs(5))
}

/// True once `c`'s peer has closed (EOF/reset) within `limit`; unread bytes are discarded.
fn closed_within(c: &mut HttpClient, limit: Duration) -> bool {
    let start = Instant::now();
    read_to_close(&mut c.stream, start, limit).closed
}

/// Every byte the recorder received, connections concatenated in accept order.
fn all_bytes(rec: &Recorder) -> Vec<u8> {
    rec.records().into_iter().flat_map(|r| r.bytes).collect()
}

/// Sends a bad request; checks `status` + close, and that the recorder got nothing of it.
/// Returns a description of what went wrong instead of panicking, so a table reports all.
fn check_refused(
    lb: &Balancer,
    rec: &Recorder,
    name: &str,
    req: &[u8],
    status: u16,
) -> Vec<String> {
    let mut errors = Vec::new();
    let before = rec.total_bytes();
    let out = hostile(lb.addr(), req);
    if out.status() != Some(status) || !out.closed {
        errors.push(format!(
            "{name}: sent {:?}; expected {status} + close, got status {:?}, closed {}, raw {:?}",
            lossy(req),
            out.status(),
            out.closed,
            lossy(&out.raw)
        ));
    }
    if rec.total_bytes() != before {
        errors.push(format!(
            "{name}: backend received bytes: {:?}",
            lossy(&all_bytes(rec)[before..])
        ));
    }
    errors
}

/// Runs every refusal case against one balancer, then proves the backend works and received
/// exactly one request: the control `GET /after` (nothing of any refused request).
fn assert_all_refused(cases: &[(&str, &[u8], u16)]) {
    let rec = Recorder::start(Mode::Ok);
    let lb = lb_for(&rec, &[]);
    let mut errors = Vec::new();
    for (name, req, status) in cases {
        errors.extend(check_refused(&lb, &rec, name, req, *status));
    }
    let ok = get(lb.addr(), "/after");
    assert_eq!(ok.status, 200, "control request after the refusals");
    let recs = rec.records();
    if recs.len() != 1 || !recs[0].text().starts_with("GET /after HTTP/1.1\r\n") {
        errors.push(format!(
            "backend should have seen only GET /after, saw {} connections: {:?}",
            recs.len(),
            rec.all_text()
        ));
    }
    assert!(errors.is_empty(), "\n{}", errors.join("\n"));
}

/// Header lines of the first request head in `text` (lowercased names kept as sent).
fn head_lines(text: &str) -> Vec<String> {
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    head.split("\r\n").skip(1).map(str::to_string).collect()
}

fn lines_named<'a>(lines: &'a [String], name: &str) -> Vec<&'a String> {
    let prefix = format!("{}:", name.to_ascii_lowercase());
    lines
        .iter()
        .filter(|l| l.to_ascii_lowercase().starts_with(&prefix))
        .collect()
}

/// Sends `req`, expects a 200 from the recorder, returns the one forwarded request's text.
fn forwarded(req: &[u8]) -> String {
    let rec = Recorder::start(Mode::Ok);
    let lb = lb_for(&rec, &[]);
    let resp = http_request(lb.addr(), req);
    assert_eq!(resp.status, 200, "answer to {:?}", lossy(req));
    assert!(
        wait_until(Duration::from_secs(2), || rec.total_bytes() > 0),
        "nothing forwarded"
    );
    let recs = rec.records();
    assert_eq!(recs.len(), 1, "one backend connection expected");
    recs[0].text()
}

const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

fn upgrade_request(extra: &str) -> Vec<u8> {
    format!(
        "GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
    .into_bytes()
}

fn accept_101() -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {WS_ACCEPT}\r\n\r\n"
    )
    .into_bytes()
}

/// Opens a WebSocket through `addr` by hand (fixed key) and checks the 101.
fn ws_open(addr: SocketAddr, extra: &str) -> HttpClient {
    let mut c = HttpClient::connect(addr);
    c.send(&upgrade_request(extra));
    let head = c.read_head().expect("upgrade answer");
    assert_eq!(head.status, 101, "upgrade answer {head:?}");
    c
}

/// Reads one server frame: (first byte, payload).
fn read_frame(c: &mut HttpClient) -> io::Result<(u8, Vec<u8>)> {
    let mut hdr = [0u8; 2];
    c.read_exact_body(&mut hdr)?;
    assert_eq!(hdr[1] & 0x80, 0, "server frames are not masked");
    let len = match hdr[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            c.read_exact_body(&mut b)?;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            c.read_exact_body(&mut b)?;
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    let mut payload = vec![0u8; usize::try_from(len).unwrap()];
    c.read_exact_body(&mut payload)?;
    Ok((hdr[0], payload))
}

/// Skips data frames until a close frame; its status code. Then the TCP close.
fn expect_close(c: &mut HttpClient, code: u16) {
    c.stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    for _ in 0..16 {
        let (b0, payload) = read_frame(c).expect("a close frame");
        if b0 & 0x0f == 0x8 {
            assert!(b0 & 0x80 != 0, "close frame has FIN");
            assert!(payload.len() >= 2, "close frame without a code");
            assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), code);
            assert!(
                closed_within(c, Duration::from_secs(3)),
                "TCP not closed after close {code}"
            );
            return;
        }
    }
    panic!("no close frame");
}

// ---------------------------------------------------------------------------------------
// Request framing: 400 / 431 and nothing reaches the backend (RFC 9112 §6.1, §6.3, §5, §2.2)
// ---------------------------------------------------------------------------------------

#[test]
fn content_length_with_transfer_encoding_is_refused() {
    assert_all_refused(&[
        (
            "CL then TE",
            b"POST /bad HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            "TE then CL",
            b"POST /bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            "CL 0 with TE",
            b"POST /bad HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
    ]);
}

#[test]
fn differing_content_lengths_are_refused() {
    assert_all_refused(&[
        (
            "two fields",
            b"POST /bad HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nSMUGGLED",
            400,
        ),
        (
            "list 5, 6",
            b"POST /bad HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\nSMUGGLED",
            400,
        ),
        (
            "list 5, 5 then 6",
            b"POST /bad HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\nContent-Length: 6\r\n\r\nSMUGGLED",
            400,
        ),
    ]);
}

#[test]
fn non_decimal_content_length_is_refused() {
    let values = [
        "+5",
        "-5",
        "0x5",
        "5.0",
        "5 5",
        "",
        "five",
        "18446744073709551616",
        "99999999999999999999999",
        "5,",
    ];
    let reqs: Vec<(String, Vec<u8>)> = values
        .iter()
        .map(|v| {
            (
                format!("Content-Length: {v:?}"),
                format!("POST /bad HTTP/1.1\r\nHost: x\r\nContent-Length: {v}\r\n\r\nSMUGGLED")
                    .into_bytes(),
            )
        })
        .collect();
    let cases: Vec<(&str, &[u8], u16)> = reqs
        .iter()
        .map(|(n, r)| (n.as_str(), r.as_slice(), 400))
        .collect();
    assert_all_refused(&cases);
}

#[test]
fn transfer_encoding_not_ending_in_chunked_is_refused() {
    assert_all_refused(&[
        (
            "chunked, gzip",
            b"POST /bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            "gzip",
            b"POST /bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nSMUGGLED",
            400,
        ),
        (
            "chunked field then gzip field",
            b"POST /bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            "identity",
            b"POST /bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\n\r\nSMUGGLED",
            400,
        ),
        (
            "xchunked",
            b"POST /bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
            400,
        ),
    ]);
}

#[test]
fn transfer_encoding_on_http10_is_refused() {
    assert_all_refused(&[(
        "HTTP/1.0 chunked",
        b"POST /bad HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    )]);
}

#[test]
fn obs_fold_is_refused() {
    assert_all_refused(&[
        (
            "fold with space",
            b"GET /bad HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
            400,
        ),
        (
            "fold with tab",
            b"GET /bad HTTP/1.1\r\nHost: x\r\nX-A: a\r\n\tb\r\n\r\n",
            400,
        ),
        (
            "folded Transfer-Encoding",
            b"POST /bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
    ]);
}

#[test]
fn whitespace_before_colon_is_refused() {
    assert_all_refused(&[
        (
            "Transfer-Encoding SP :",
            b"POST /bad HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (
            "Content-Length HTAB :",
            b"POST /bad HTTP/1.1\r\nHost: x\r\nContent-Length\t: 3\r\n\r\nabc",
            400,
        ),
        ("Host SP :", b"GET /bad HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    ]);
}

#[test]
fn control_characters_in_field_values_are_refused() {
    assert_all_refused(&[
        (
            "NUL",
            b"GET /bad HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n",
            400,
        ),
        (
            "bare CR",
            b"GET /bad HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n",
            400,
        ),
        (
            "SOH",
            b"GET /bad HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n",
            400,
        ),
        (
            "ESC",
            b"GET /bad HTTP/1.1\r\nHost: x\r\nX-A: a\x1bb\r\n\r\n",
            400,
        ),
        (
            "DEL",
            b"GET /bad HTTP/1.1\r\nHost: x\r\nX-A: a\x7fb\r\n\r\n",
            400,
        ),
        (
            "NUL in Host",
            b"GET /bad HTTP/1.1\r\nHost: x\0y\r\n\r\n",
            400,
        ),
        (
            "bare CR in request line",
            b"GET /bad\rX HTTP/1.1\r\nHost: x\r\n\r\n",
            400,
        ),
    ]);
}

#[test]
fn bare_lf_line_endings_are_refused() {
    assert_all_refused(&[
        ("all LF", b"GET /bad HTTP/1.1\nHost: x\n\n", 400),
        (
            "one LF among CRLF",
            b"GET /bad HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n",
            400,
        ),
        ("LF ending the head", b"GET /bad HTTP/1.1\r\nHost: x\r\n\n", 400),
        (
            "LF hiding a Transfer-Encoding",
            b"POST /bad HTTP/1.1\r\nHost: x\r\nX-A: b\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc",
            400,
        ),
    ]);
}

#[test]
fn missing_host_on_http11_is_refused() {
    assert_all_refused(&[("no Host", b"GET /bad HTTP/1.1\r\nX-A: b\r\n\r\n", 400)]);
}

#[test]
fn repeated_host_is_refused() {
    assert_all_refused(&[
        (
            "two Host",
            b"GET /bad HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            400,
        ),
        (
            "Host and host",
            b"GET /bad HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n",
            400,
        ),
        (
            "two Host on HTTP/1.0",
            b"GET /bad HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
            400,
        ),
    ]);
}

#[test]
fn connect_method_is_refused() {
    assert_all_refused(&[(
        "CONNECT",
        b"CONNECT internal.example:443 HTTP/1.1\r\nHost: internal.example:443\r\n\r\n",
        405,
    )]);
}

#[test]
fn head_over_64kib_gets_431() {
    let mut endless = b"GET /bad HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    endless.extend(std::iter::repeat_n(b'a', 70 * 1024));
    let mut complete = endless.clone();
    complete.extend(b"\r\n\r\n");
    let mut many_lines = b"GET /bad HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..90 {
        many_lines.extend(format!("X-F{i}: {}\r\n", "b".repeat(800)).bytes());
    }
    many_lines.extend(b"\r\n");
    assert_all_refused(&[
        ("70 KiB never ending", &endless, 431),
        ("70 KiB complete", &complete, 431),
        ("90 fields of 800 bytes", &many_lines, 431),
    ]);
}

#[test]
fn head_just_under_64kib_is_forwarded() {
    let mut req = b"GET /big-head HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: ".to_vec();
    req.extend(std::iter::repeat_n(b'a', 60 * 1024));
    req.extend(b"\r\n\r\n");
    let text = forwarded(&req);
    assert!(text.starts_with("GET /big-head HTTP/1.1\r\n"));
}

#[test]
fn more_than_100_fields_gets_431() {
    let mut req = b"GET /bad HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..100 {
        req.extend(format!("X-F{i}: v\r\n").bytes());
    }
    req.extend(b"\r\n");
    assert_all_refused(&[("101 fields", &req, 431)]);
}

#[test]
fn exactly_100_fields_are_forwarded() {
    let mut req = b"GET /hundred HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".to_vec();
    for i in 0..98 {
        req.extend(format!("X-F{i}: v\r\n").bytes());
    }
    req.extend(b"\r\n");
    let text = forwarded(&req);
    assert!(text.contains("\r\nX-F97: v\r\n"), "{text}");
}

// ---------------------------------------------------------------------------------------
// Chunked body errors (RFC 9112 §7.1): 400, the backend leg is closed and never reused
// ---------------------------------------------------------------------------------------

fn check_bad_chunked(body: &[u8]) {
    let rec = Recorder::start(Mode::Ok);
    let lb = lb_for(&rec, &[]);
    let mut req =
        b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    req.extend_from_slice(body);
    let out = hostile(lb.addr(), &req);
    assert_eq!(
        (out.status(), out.closed),
        (Some(400), true),
        "answer to chunked body {:?}: {:?}",
        lossy(body),
        lossy(&out.raw)
    );
    // The head went to a backend connection; that connection must be closed.
    assert!(
        wait_until(Duration::from_secs(3), || rec.count() >= 1),
        "no backend connection was opened for the head"
    );
    assert!(
        wait_until(Duration::from_secs(3), || rec
            .records()
            .iter()
            .all(|r| r.eof)),
        "backend connection left open after a bad chunked body: {:?}",
        rec.records()
    );
    let used = rec.count();
    let resp = get(lb.addr(), "/after");
    assert_eq!(resp.status, 200);
    let idx = rec
        .wait_for(b"GET /after ", Duration::from_secs(2))
        .expect("GET /after reached no backend");
    assert!(
        idx >= used,
        "GET /after reused backend connection #{idx} that carried the bad body: {:?}",
        rec.records()[idx].text()
    );
    assert!(
        rec.records()[idx].text().starts_with("GET /after "),
        "GET /after arrived behind other bytes: {:?}",
        rec.records()[idx].text()
    );
}

macro_rules! bad_chunked {
    ($($name:ident: $body:expr;)*) => {$(
        #[test]
        fn $name() {
            check_bad_chunked(&$body);
        }
    )*};
}

fn long_extension() -> Vec<u8> {
    let mut b = b"5;".to_vec();
    b.extend(std::iter::repeat_n(b'a', 5000));
    b.extend(b"\r\nhello\r\n0\r\n\r\n");
    b
}

bad_chunked! {
    chunked_bad_hex_digit_gets_400: *b"zz\r\nhello\r\n0\r\n\r\n";
    chunked_0x_prefix_gets_400: *b"0x5\r\nhello\r\n0\r\n\r\n";
    chunked_plus_sign_gets_400: *b"+5\r\nhello\r\n0\r\n\r\n";
    chunked_minus_sign_gets_400: *b"-5\r\nhello\r\n0\r\n\r\n";
    chunked_leading_space_gets_400: *b" 5\r\nhello\r\n0\r\n\r\n";
    chunked_empty_size_gets_400: *b"\r\nhello\r\n0\r\n\r\n";
    chunked_bare_lf_in_size_line_gets_400: *b"5\nhello\r\n0\r\n\r\n";
    chunked_bare_cr_in_size_line_gets_400: *b"5\rhello\r\n0\r\n\r\n";
    chunked_data_not_followed_by_crlf_gets_400: *b"5\r\nhelloXX0\r\n\r\n";
    chunked_data_followed_by_bare_lf_gets_400: *b"5\r\nhello\n0\r\n\r\n";
    chunked_extension_over_4kib_gets_400: long_extension();
    chunked_17_hex_digits_gets_400: *b"00000000000000005\r\nhello\r\n0\r\n\r\n";
    chunked_size_overflow_gets_400: *b"fffffffffffffffff\r\nhello\r\n0\r\n\r\n";
    chunked_trailer_bare_lf_gets_400: *b"5\r\nhello\r\n0\r\nX-T: 1\n\r\n";
    chunked_trailer_obs_fold_gets_400: *b"5\r\nhello\r\n0\r\nX-T: 1\r\n 2\r\n\r\n";
}

#[test]
fn chunked_extension_under_4kib_is_forwarded() {
    let mut req =
        b"POST /ext HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n5;"
            .to_vec();
    req.extend(std::iter::repeat_n(b'a', 4000));
    req.extend(b"\r\nhello\r\n0\r\n\r\n");
    let text = forwarded(&req);
    assert!(
        text.ends_with("hello\r\n0\r\n\r\n"),
        "{:?}",
        lossy(text.as_bytes())
    );
}

// ---------------------------------------------------------------------------------------
// Re-serialisation (RFC 9112 §6.3, RFC 9110 §7.6.1, §7.8)
// ---------------------------------------------------------------------------------------

#[test]
fn equal_content_length_list_is_forwarded_as_one_field() {
    for (what, cl) in [
        ("list", "Content-Length: 5, 5\r\n"),
        ("two fields", "Content-Length: 5\r\nContent-Length: 5\r\n"),
    ] {
        let req = format!("POST /cl HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{cl}\r\nhello");
        let text = forwarded(req.as_bytes());
        let lines = head_lines(&text);
        let cls = lines_named(&lines, "content-length");
        assert_eq!(cls, vec!["Content-Length: 5"], "{what}: {text:?}");
        assert!(text.ends_with("\r\n\r\nhello"), "{what}: {text:?}");
    }
}

#[test]
fn chunked_is_forwarded_as_one_transfer_encoding() {
    let req = b"POST /te HTTP/1.1\r\nHost: x\r\nConnection: close\r\ntransfer-encoding:   CHUNKED \r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let text = forwarded(req);
    let lines = head_lines(&text);
    assert_eq!(
        lines_named(&lines, "transfer-encoding"),
        vec!["Transfer-Encoding: chunked"],
        "{text:?}"
    );
    assert!(lines_named(&lines, "content-length").is_empty(), "{text:?}");
    assert!(
        text.ends_with("\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
        "{text:?}"
    );
}

/// RFC 9112 §6.1: a coding applied before chunked is part of the message; dropping it from
/// the forwarded field would hand the backend a gzip body labelled as plain.
#[test]
fn codings_before_chunked_are_not_dropped() {
    let rec = Recorder::start(Mode::Ok);
    let lb = lb_for(&rec, &[]);
    let out = hostile(
        lb.addr(),
        b"POST /gz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    );
    match out.status() {
        // Refusing is fine (RFC 9112 §6.1 allows 501 for an unknown coding; 400 too).
        Some(400 | 501) => assert_eq!(rec.total_bytes(), 0, "refused but forwarded"),
        Some(200) => {
            let text = rec.records()[0].text();
            let lines = head_lines(&text);
            let te: Vec<String> = lines_named(&lines, "transfer-encoding")
                .iter()
                .map(|l| l.to_ascii_lowercase().replace(' ', ""))
                .collect();
            assert_eq!(
                te,
                vec!["transfer-encoding:gzip,chunked"],
                "forwarded head lost the gzip coding: {text:?}"
            );
        }
        other => panic!("unexpected answer {other:?}: {:?}", lossy(&out.raw)),
    }
}

#[test]
fn hop_by_hop_fields_are_removed() {
    let req = b"GET /hop HTTP/1.1\r\nHost: x\r\n\
        Connection: keep-alive, X-Secret, x-other\r\nX-Secret: 1\r\nX-Other: 2\r\n\
        Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n\
        Trailer: X-T\r\nX-Keep: yes\r\nConnection: close\r\n\r\n";
    let text = forwarded(req);
    let lines = head_lines(&text);
    for name in [
        "x-secret",
        "x-other",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
    ] {
        assert!(
            lines_named(&lines, name).is_empty(),
            "{name} was forwarded: {text:?}"
        );
    }
    for c in lines_named(&lines, "connection") {
        let c = c.to_ascii_lowercase();
        assert!(
            !c.contains("x-secret") && !c.contains("x-other"),
            "Connection forwarded as {c:?}"
        );
    }
    assert_eq!(lines_named(&lines, "x-keep"), vec!["X-Keep: yes"]);
}

/// `Connection: Content-Length` must not make the body framing disappear (RFC 9110 §7.6.1
/// removal happens on the re-serialised head, which re-emits the framing it parsed).
#[test]
fn connection_naming_framing_fields_keeps_the_framing() {
    let text = forwarded(
        b"POST /cl HTTP/1.1\r\nHost: x\r\nConnection: close, Content-Length\r\nContent-Length: 5\r\n\r\nhello",
    );
    let lines = head_lines(&text);
    assert_eq!(
        lines_named(&lines, "content-length"),
        vec!["Content-Length: 5"],
        "{text:?}"
    );
    let text = forwarded(
        b"POST /te HTTP/1.1\r\nHost: x\r\nConnection: close, Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    );
    let lines = head_lines(&text);
    assert_eq!(
        lines_named(&lines, "transfer-encoding"),
        vec!["Transfer-Encoding: chunked"],
        "{text:?}"
    );
}

#[test]
fn h2c_upgrade_is_stripped() {
    let rec = Recorder::start(Mode::Ok);
    let lb = lb_for(&rec, &[]);
    let mut c = HttpClient::connect(lb.addr());
    c.send(
        b"GET /h2c HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n\
          Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    );
    let resp = c.read_response().expect("answer");
    assert_eq!(
        resp.status, 200,
        "h2c upgrade must be served as plain HTTP/1.1"
    );
    let text = rec.records()[0].text();
    let lines = head_lines(&text);
    assert!(lines_named(&lines, "upgrade").is_empty(), "{text:?}");
    assert!(lines_named(&lines, "http2-settings").is_empty(), "{text:?}");
    for c in lines_named(&lines, "connection") {
        assert!(!c.to_ascii_lowercase().contains("upgrade"), "{text:?}");
    }
    // The client connection is still HTTP/1.1.
    c.send(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(c.read_response().expect("second answer").status, 200);
}

#[test]
fn client_forwarded_proto_and_host_are_replaced() {
    let req = b"GET /xf HTTP/1.1\r\nHost: real.example\r\nConnection: close\r\n\
        X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\n\r\n";
    let text = forwarded(req);
    let lines = head_lines(&text);
    assert_eq!(
        lines_named(&lines, "x-forwarded-proto"),
        vec!["X-Forwarded-Proto: http"],
        "{text:?}"
    );
    assert_eq!(
        lines_named(&lines, "x-forwarded-host"),
        vec!["X-Forwarded-Host: real.example"],
        "{text:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Hostile backend answers (RFC 9112 §6.3, RFC 6455 §4.2.2 / §4.1)
// ---------------------------------------------------------------------------------------

fn check_bad_response(raw: &[u8], request: &[u8], expected: u16) {
    let rec = Recorder::start(Mode::Raw(raw.to_vec()));
    let lb = lb_for(&rec, &[]);
    let out = hostile(lb.addr(), request);
    assert_eq!(
        (out.status(), out.closed),
        (Some(expected), true),
        "backend answered {:?}; client got {:?}",
        lossy(raw),
        lossy(&out.raw)
    );
    assert!(
        wait_until(Duration::from_secs(3), || rec
            .records()
            .iter()
            .all(|r| r.eof)),
        "backend connection with a bad answer left open"
    );
}

const PLAIN_GET: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

macro_rules! bad_response {
    ($($name:ident: $raw:expr;)*) => {$(
        #[test]
        fn $name() {
            check_bad_response(&$raw, PLAIN_GET, 502);
        }
    )*};
}

fn huge_response_head() -> Vec<u8> {
    let mut b = b"HTTP/1.1 200 OK\r\nX-Big: ".to_vec();
    b.extend(std::iter::repeat_n(b'a', 70 * 1024));
    b
}

bad_response! {
    response_with_content_length_and_transfer_encoding_gets_502:
        *b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    response_with_differing_content_lengths_gets_502:
        *b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok";
    response_with_bare_lf_gets_502: *b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok";
    response_garbage_gets_502: *b"SSH-2.0-OpenSSH_9.6\r\n\r\n";
    response_with_nul_in_field_gets_502: *b"HTTP/1.1 200 OK\r\nX-A: a\0b\r\nContent-Length: 2\r\n\r\nok";
    response_head_over_64kib_gets_502: huge_response_head();
    response_with_cr_in_field_gets_502: *b"HTTP/1.1 200 OK\r\nX-A: a\rSet-Cookie: x=1\r\nContent-Length: 2\r\n\r\nok";
}

/// Once the head went out the status cannot change: the only honest signal is a close
/// before the chunked terminator, so the client sees a truncated message.
#[test]
fn response_with_bad_chunked_body_is_cut() {
    let rec = Recorder::start(Mode::Raw(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n0\r\n\r\n"
            .to_vec(),
    ));
    let lb = lb_for(&rec, &[]);
    let out = hostile(lb.addr(), PLAIN_GET);
    assert_eq!(
        (out.status(), out.closed),
        (Some(200), true),
        "{:?}",
        lossy(&out.raw)
    );
    assert!(
        !contains(&out.raw, b"zz") && !contains(&out.raw, b"0\r\n\r\n"),
        "client got a complete-looking body: {:?}",
        lossy(&out.raw)
    );
    assert!(
        wait_until(Duration::from_secs(3), || rec
            .records()
            .iter()
            .all(|r| r.eof)),
        "backend connection with a bad body left open"
    );
}

#[test]
fn status_101_to_a_plain_request_gets_502() {
    check_bad_response(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        PLAIN_GET,
        502,
    );
}

#[test]
fn status_101_with_a_wrong_accept_key_gets_502() {
    check_bad_response(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n",
        &upgrade_request(""),
        502,
    );
}

/// A backend that refuses an upgrade must not leave a tunnel behind: the client connection
/// stays HTTP, so what follows is parsed (and forwarded with X-Forwarded-For) as a request,
/// and WebSocket bytes are a malformed request.
#[test]
fn refused_upgrade_keeps_the_connection_http() {
    let rec = Recorder::start(Mode::Each(
        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n".to_vec(),
    ));
    let lb = lb_for(&rec, &[]);
    let mut c = HttpClient::connect(lb.addr());
    c.send(&upgrade_request(""));
    let resp = c.read_response().expect("answer to the upgrade");
    assert_eq!(resp.status, 403);
    c.send(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n");
    let resp = c.read_response().expect("answer to GET /next");
    assert_eq!(resp.status, 403, "GET /next answered by the backend");
    let idx = rec
        .wait_for(b"GET /next HTTP/1.1\r\n", Duration::from_secs(2))
        .expect("GET /next reached no backend");
    let text = rec.records()[idx].text();
    let next = &text[text.find("GET /next").unwrap()..];
    assert!(
        next.contains("\r\nX-Forwarded-For: 127.0.0.1\r\n"),
        "GET /next was relayed raw, not parsed: {next:?}"
    );
    let frame = ws_frame(0x1, true, b"hello through a tunnel");
    c.send(&frame);
    let out = read_to_close(&mut c.stream, Instant::now(), Duration::from_secs(5));
    assert_eq!(
        (status_of(&out.raw), out.closed),
        (Some(400), true),
        "a WebSocket frame on an HTTP connection: {:?}",
        lossy(&out.raw)
    );
    assert!(
        !contains(&all_bytes(&rec), &frame[6..]),
        "the frame reached the backend"
    );
}

/// Same, with the follow-up request pipelined behind the upgrade before the 403 arrives.
#[test]
fn refused_upgrade_pipelined_request_is_parsed_as_http() {
    let rec = Recorder::start(Mode::Each(
        b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n".to_vec(),
    ));
    let lb = lb_for(&rec, &[]);
    let mut c = HttpClient::connect(lb.addr());
    let mut req = upgrade_request("");
    req.extend(b"GET /internal HTTP/1.1\r\nHost: x\r\n\r\n");
    c.send(&req);
    assert_eq!(c.read_response().expect("upgrade answer").status, 426);
    assert_eq!(c.read_response().expect("/internal answer").status, 426);
    let idx = rec
        .wait_for(b"GET /internal HTTP/1.1\r\n", Duration::from_secs(2))
        .expect("GET /internal reached no backend");
    let text = rec.records()[idx].text();
    let next = &text[text.find("GET /internal").unwrap()..];
    assert!(
        next.contains("\r\nX-Forwarded-For: 127.0.0.1\r\n"),
        "GET /internal was relayed raw: {next:?}"
    );
}

#[test]
fn silent_backend_gets_504_after_idle_timeout() {
    let rec = Recorder::start(Mode::Raw(Vec::new()));
    let lb = lb_for(&rec, &["--idle-timeout", "1s"]);
    let out = hostile(lb.addr(), PLAIN_GET);
    assert_eq!(out.status(), Some(504), "{:?}", lossy(&out.raw));
    let t = out.first_byte.unwrap();
    assert!(
        t >= Duration::from_millis(800) && t <= Duration::from_millis(2500),
        "504 after {t:?}"
    );
    assert!(out.closed);
}

// ---------------------------------------------------------------------------------------
// Deadlines
// ---------------------------------------------------------------------------------------

#[test]
fn trickled_head_gets_408_at_header_timeout() {
    let b = Backend::start("a");
    let lb = Balancer::start(&["--header-timeout", "1s"], &[&b]);
    let mut s = connect(lb.addr());
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let start = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .unwrap();
    let mut raw = Vec::new();
    let mut first = None;
    let mut writing = true;
    let mut tmp = [0u8; 4096];
    let closed_at = loop {
        assert!(
            start.elapsed() < Duration::from_secs(6),
            "never closed: {raw:?}"
        );
        if writing && s.write_all(b"a").is_err() {
            writing = false;
        }
        match s.read(&mut tmp) {
            Ok(0) => break start.elapsed(),
            Ok(n) => {
                first.get_or_insert(start.elapsed());
                raw.extend_from_slice(&tmp[..n]);
                writing = false;
            }
            Err(e) if is_timeout(&e) => {}
            Err(_) => break start.elapsed(),
        }
    };
    assert_eq!(status_of(&raw), Some(408), "{:?}", lossy(&raw));
    let first = first.unwrap();
    assert!(
        first >= Duration::from_millis(800) && first <= Duration::from_millis(2500),
        "408 after {first:?}"
    );
    assert!(
        closed_at <= Duration::from_millis(3000),
        "closed after {closed_at:?}"
    );
}

#[test]
fn silent_client_is_closed_at_header_timeout() {
    let b = Backend::start("a");
    let lb = Balancer::start(&["--header-timeout", "1s"], &[&b]);
    let mut s = connect(lb.addr());
    let out = read_to_close(&mut s, Instant::now(), Duration::from_secs(5));
    assert!(out.closed, "silent connection still open after 5 s");
    let t = out.closed_at.unwrap();
    assert!(
        t >= Duration::from_millis(800) && t <= Duration::from_millis(2500),
        "closed after {t:?}"
    );
    assert!(
        out.raw.is_empty() || status_of(&out.raw) == Some(408),
        "unexpected bytes {:?}",
        lossy(&out.raw)
    );
}

#[test]
fn header_timeout_restarts_after_a_kept_alive_503() {
    // The 503 is the balancer's own answer (no backend) and keeps the connection: the
    // header timeout must run from the next request, not from the first one.
    let lb = Balancer::start(&["--header-timeout", "1s", "--idle-timeout", "10s"], &[]);
    let mut c = HttpClient::connect(lb.addr());
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let first = c.read_response().unwrap();
    assert_eq!(first.status, 503);
    assert_ne!(first.header("connection"), Some("close"));
    thread::sleep(Duration::from_millis(1500));
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(c.read_response().unwrap().status, 503);
}

#[test]
fn idle_keep_alive_connection_is_closed_at_idle_timeout() {
    let b = Backend::start("a");
    let lb = Balancer::start(&["--idle-timeout", "1s"], &[&b]);
    let mut c = HttpClient::connect(lb.addr());
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(c.read_response().unwrap().status, 200);
    let start = Instant::now();
    let out = read_to_close(&mut c.stream, start, Duration::from_secs(5));
    assert!(out.closed && out.raw.is_empty(), "{out:?}");
    let t = out.closed_at.unwrap();
    assert!(
        t >= Duration::from_millis(800) && t <= Duration::from_millis(2500),
        "closed after {t:?}"
    );
}

// ---------------------------------------------------------------------------------------
// WebSocket (RFC 6455 §4.2.1, §5.1-5.5, §7.4.1)
// ---------------------------------------------------------------------------------------

#[test]
fn oversized_frame_gets_1009_and_is_not_relayed() {
    let rec = Recorder::start(Mode::Raw(accept_101()));
    let lb = lb_for(&rec, &["--max-frame-size", "1KiB"]);
    let mut c = ws_open(lb.addr(), "");
    let frame = ws_frame(0x2, true, &[b'Z'; 2048]);
    c.send(&frame);
    expect_close(&mut c, 1009);
    assert!(
        rec.wait_eof(0, Duration::from_secs(3)),
        "backend leg left open"
    );
    let text = rec.records()[0].bytes.clone();
    let head_end = text.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let after = &text[head_end..];
    assert!(
        !contains(after, &frame[8..40]),
        "payload of the oversized frame reached the backend"
    );
    // The backend, which did nothing wrong, is told its peer is going away (masked close).
    assert!(
        after.len() >= 8 && after[0] == 0x88 && after[1] & 0x80 != 0,
        "backend received {after:?} after the handshake"
    );
    let mask = &after[2..6];
    let code = u16::from_be_bytes([after[6] ^ mask[0], after[7] ^ mask[1]]);
    assert_eq!(code, 1001, "close code sent to the backend");
}

#[test]
fn frame_at_max_frame_size_is_relayed() {
    let b = Backend::start("a");
    let lb = Balancer::start(&["--max-frame-size", "1KiB"], &[&b]);
    let mut c = ws_open(lb.addr(), "");
    c.send(&ws_frame(0x2, true, &[b'Y'; 1024]));
    let (b0, payload) = read_frame(&mut c).expect("echo");
    assert_eq!((b0, payload.len()), (0x82, 1024));
}

/// RSV bits belong to extensions negotiated end to end (Sec-WebSocket-Extensions is
/// relayed), so the balancer passes them through and leaves the check to the backend.
#[test]
fn rsv_bits_are_relayed_to_the_backend() {
    let rec = Recorder::start(Mode::Raw(accept_101()));
    let lb = lb_for(&rec, &[]);
    let mut c = ws_open(lb.addr(), "");
    let mut frame = ws_frame(0x1, true, b"compressed?");
    frame[0] |= 0x40; // RSV1
    c.send(&frame);
    assert!(
        wait_until(Duration::from_secs(3), || contains(
            &all_bytes(&rec),
            &frame
        )),
        "RSV1 frame not relayed intact"
    );
}

/// RFC 6455 rules the endpoints enforce are theirs: a frame that breaks one is relayed to the
/// backend unchanged and the balancer sends nothing of its own (the backend fails the
/// connection the way it would without a balancer).
#[test]
fn rule_breaking_client_frames_are_relayed_for_the_backend_to_judge() {
    let cases: [(&str, Vec<u8>); 5] = [
        ("unmasked", vec![0x81, 0x02, b'h', b'i']),
        ("reserved data opcode", ws_frame(0x3, true, b"x")),
        ("reserved control opcode", ws_frame(0xB, true, b"x")),
        (
            "control frame over 125 bytes",
            ws_frame(0x9, true, &[b'p'; 126]),
        ),
        ("fragmented control frame", ws_frame(0x9, false, b"p")),
    ];
    for (name, frame) in cases {
        let rec = Recorder::start(Mode::Raw(accept_101()));
        let lb = lb_for(&rec, &[]);
        let mut c = ws_open(lb.addr(), "");
        let before = rec.total_bytes();
        c.send(&frame);
        assert!(
            wait_until(Duration::from_secs(3), || rec.total_bytes()
                >= before + frame.len()),
            "{name}: frame not relayed"
        );
        let text = all_bytes(&rec);
        assert!(text.ends_with(&frame), "{name}: relayed bytes changed");
        c.stream.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 16];
        match c.stream.read(&mut buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            other => panic!("{name}: the balancer answered by itself: {other:?}"),
        }
    }
}

#[test]
fn idle_websocket_gets_1001() {
    let b = Backend::start("a");
    let lb = Balancer::start(&["--ws-idle-timeout", "300ms"], &[&b]);
    let mut c = ws_open(lb.addr(), "");
    let start = Instant::now();
    expect_close(&mut c, 1001);
    let t = start.elapsed();
    assert!(
        t >= Duration::from_millis(200) && t <= Duration::from_millis(2000),
        "close 1001 after {t:?}"
    );
}

#[test]
fn active_websocket_outlives_ws_idle_timeout() {
    let b = Backend::start("a");
    let lb = Balancer::start(&["--ws-idle-timeout", "300ms"], &[&b]);
    let mut c = ws_open(lb.addr(), "");
    for _ in 0..8 {
        thread::sleep(Duration::from_millis(100));
        c.send(&ws_frame(0x1, true, b"tick"));
        let (b0, payload) = read_frame(&mut c).expect("echo");
        assert_eq!((b0, payload.as_slice()), (0x81, &b"tick"[..]));
    }
}

fn origin_answer(origin: Option<&str>) -> u16 {
    let b = Backend::start("a");
    let lb = Balancer::start(&["--allowed-origin", "https://good.example"], &[&b]);
    let extra = origin.map_or(String::new(), |o| format!("Origin: {o}\r\n"));
    let mut c = HttpClient::connect(lb.addr());
    c.send(&upgrade_request(&extra));
    c.read_head().expect("upgrade answer").status
}

#[test]
fn upgrade_from_a_foreign_origin_gets_403() {
    assert_eq!(origin_answer(Some("https://evil.example")), 403);
    assert_eq!(
        origin_answer(Some("https://good.example.evil.example")),
        403
    );
}

#[test]
fn upgrade_without_origin_gets_403_when_origins_are_restricted() {
    assert_eq!(origin_answer(None), 403);
}

#[test]
fn upgrade_from_an_allowed_origin_gets_101() {
    assert_eq!(origin_answer(Some("https://good.example")), 101);
}

#[test]
fn malformed_upgrades_are_refused() {
    let b = Backend::start("a");
    let lb = Balancer::start(&[], &[&b]);
    let cases: [(&str, Vec<u8>, u16); 6] = [
        (
            "body on upgrade",
            upgrade_request("Content-Length: 5\r\n"),
            400,
        ),
        (
            "no Connection: upgrade",
            upgrade_request("").replace_all(b"Connection: Upgrade", b"Connection: keep-alive"),
            400,
        ),
        (
            "version 8",
            upgrade_request("").replace_all(b"Version: 13", b"Version: 8"),
            426,
        ),
        (
            "short key",
            upgrade_request("").replace_all(WS_KEY.as_bytes(), b"c2hvcnQ="),
            400,
        ),
        (
            "POST upgrade",
            upgrade_request("").replace_all(b"GET /ws", b"POST /ws"),
            400,
        ),
        (
            "HTTP/1.0 upgrade",
            upgrade_request("").replace_all(b"HTTP/1.1", b"HTTP/1.0"),
            400,
        ),
    ];
    for (what, req, status) in cases {
        let out = hostile(lb.addr(), &req);
        assert_eq!(out.status(), Some(status), "{what}: {:?}", lossy(&out.raw));
        if status == 426 {
            assert!(
                contains(&out.raw, b"Sec-WebSocket-Version: 13"),
                "426 without the supported version"
            );
        }
    }
}

trait ReplaceAll {
    fn replace_all(self, from: &[u8], to: &[u8]) -> Vec<u8>;
}

impl ReplaceAll for Vec<u8> {
    fn replace_all(self, from: &[u8], to: &[u8]) -> Vec<u8> {
        let s = String::from_utf8(self).unwrap();
        s.replace(
            std::str::from_utf8(from).unwrap(),
            std::str::from_utf8(to).unwrap(),
        )
        .into_bytes()
    }
}

// ---------------------------------------------------------------------------------------
// Connection limits and throttling
// ---------------------------------------------------------------------------------------

#[test]
fn third_connection_from_one_ip_gets_429() {
    let b = Backend::start("a");
    let lb = Balancer::start(&["--max-connections-per-ip", "2"], &[&b]);
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = HttpClient::connect(lb.addr());
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(c.read_response().unwrap().status, 200);
        held.push(c);
    }
    let out = hostile(lb.addr(), PLAIN_GET);
    assert_eq!(
        (out.status(), out.closed),
        (Some(429), true),
        "{:?}",
        lossy(&out.raw)
    );
    // The held connections are still served.
    held[1].send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(held[1].read_response().unwrap().status, 200);
    drop(held.remove(0));
    let served = wait_until(Duration::from_secs(3), || {
        let out = hostile(
            lb.addr(),
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        out.status() == Some(200)
    });
    assert!(served, "no slot freed after closing one of two connections");
}

#[test]
fn connections_over_max_connections_wait_in_the_backlog() {
    let b = Backend::start("a");
    let lb = Balancer::start(&["--max-connections", "20"], &[&b]);
    let mut conns: Vec<(TcpStream, Vec<u8>)> = (0..30)
        .map(|_| {
            let mut s = connect(lb.addr());
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            s.set_nonblocking(true).unwrap();
            (s, Vec::new())
        })
        .collect();
    let poll = |conns: &mut Vec<(TcpStream, Vec<u8>)>| {
        let mut tmp = [0u8; 4096];
        for (s, buf) in conns.iter_mut() {
            if let Ok(n) = s.read(&mut tmp) {
                buf.extend_from_slice(&tmp[..n]);
            }
        }
        conns
            .iter()
            .filter(|(_, b)| contains(b, b"\r\n\r\n"))
            .count()
    };
    let twenty = wait_until(Duration::from_secs(3), || poll(&mut conns) >= 20);
    // Give any 21st answer a chance to show up before counting.
    let settle = Instant::now() + Duration::from_millis(300);
    while Instant::now() < settle {
        poll(&mut conns);
        thread::sleep(Duration::from_millis(10));
    }
    let answered = poll(&mut conns);
    assert!(twenty, "only {answered} of 30 answered");
    assert_eq!(answered, 20, "--max-connections 20 answered {answered}");
    for (_, buf) in &conns {
        if !buf.is_empty() {
            assert_eq!(status_of(buf), Some(200), "{:?}", lossy(buf));
        }
    }
    // Close ten answered ones: the ten waiting get their turn.
    let mut closed = 0;
    conns.retain(|(_, b)| {
        let drop_it = closed < 10 && !b.is_empty();
        closed += usize::from(drop_it);
        !drop_it
    });
    assert_eq!(conns.len(), 20);
    let all = wait_until(Duration::from_secs(5), || poll(&mut conns) == 20);
    assert!(all, "waiting connections not served after others closed");
}

#[test]
fn throttle_limits_download_rate() {
    let b = Backend::start("a");
    let lb = Balancer::start(&["--throttle", "100KiB"], &[&b]);
    let start = Instant::now();
    let resp = get(lb.addr(), "/big?bytes=300000");
    let t = start.elapsed();
    assert_eq!((resp.status, resp.body.len()), (200, 300_000));
    assert!(
        t >= Duration::from_secs(2) && t < Duration::from_secs(8),
        "300000 bytes at 100KiB/s took {t:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Resource exhaustion
// ---------------------------------------------------------------------------------------

/// A wslb started under `sh -c 'ulimit -n N; exec ...'`, killed on drop.
struct LimitedLb {
    child: Child,
    addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Drop for LimitedLb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl LimitedLb {
    fn start(nofile: u32, backend: &Backend) -> LimitedLb {
        let wslb = env!("CARGO_BIN_EXE_wslb");
        let script = format!("ulimit -n {nofile} && exec \"$0\" \"$@\"");
        let url = backend.url();
        let mut child = Command::new("sh")
            .args(["-c", &script, wslb, "-l", "127.0.0.1:0", "-B", &url])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let stderr = child.stderr.take().unwrap();
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = Arc::clone(&lines);
        thread::spawn(move || {
            use std::io::BufRead;
            for line in io::BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut addr = None;
        wait_until(TIMEOUT, || {
            addr = lines.lock().unwrap().iter().find_map(|l| {
                let rest = &l[l.find("listening on ")? + "listening on ".len()..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
                    .unwrap_or(rest.len());
                rest[..end].parse().ok()
            });
            addr.is_some()
        });
        let addr = addr.unwrap_or_else(|| panic!("no listening line: {:?}", lines.lock()));
        LimitedLb { child, addr, lines }
    }

    /// utime + stime in clock ticks.
    fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        // Fields 14 and 15 of stat(5); `after` starts at field 3.
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    }
}

fn clock_ticks_per_sec() -> u64 {
    let out = Command::new("getconf").arg("CLK_TCK").output();
    out.ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

#[test]
fn fd_exhaustion_does_not_spin_and_recovers() {
    let b = Backend::start("a");
    let lb = LimitedLb::start(48, &b);
    let held: Vec<TcpStream> = (0..60).map(|_| connect(lb.addr)).collect();
    // The connection limit comes from the descriptor limit, so the clients that do not fit
    // wait in the backlog instead of being accepted into EMFILE.
    let paused = wait_until(Duration::from_secs(3), || {
        let lines = lb.lines.lock().unwrap();
        lines
            .iter()
            .any(|l| l.contains("limited by the descriptor limit") && l.contains("fd_limit=48"))
    });
    assert!(
        paused,
        "connection limit not taken from the descriptor limit? stderr: {:?}",
        lb.lines.lock().unwrap()
    );
    let hz = clock_ticks_per_sec();
    let before = lb.cpu_ticks();
    let start = Instant::now();
    thread::sleep(Duration::from_secs(1));
    let used = lb.cpu_ticks() - before;
    let wall = start.elapsed();
    let cpu = Duration::from_millis(used * 1000 / hz);
    assert!(
        cpu < Duration::from_millis(300),
        "wslb used {cpu:?} CPU in {wall:?} while out of descriptors"
    );
    drop(held);
    let recovered = wait_until(Duration::from_secs(5), || {
        let Ok(mut s) = TcpStream::connect(lb.addr) else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let out = read_to_close(&mut s, Instant::now(), Duration::from_millis(1000));
        out.status() == Some(200)
    });
    assert!(recovered, "no answer after descriptors were freed");
}

#[test]
fn slowloris_is_cut_off_and_normal_clients_are_served() {
    let b = Backend::start("a");
    let lb = Balancer::start(&["--header-timeout", "1s"], &[&b]);
    let addr = lb.addr();
    let start = Instant::now();
    let trickler = thread::spawn(move || {
        let mut socks: Vec<Option<TcpStream>> = (0..200)
            .map(|_| {
                let mut s = connect(addr);
                s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                    .unwrap();
                s.set_nonblocking(true).unwrap();
                Some(s)
            })
            .collect();
        let mut tmp = [0u8; 1024];
        loop {
            for slot in socks.iter_mut() {
                let Some(s) = slot else { continue };
                let mut gone = s.write(b"a").is_err_and(|e| !is_timeout(&e));
                loop {
                    match s.read(&mut tmp) {
                        Ok(0) => gone = true,
                        Ok(_) => continue,
                        Err(e) if is_timeout(&e) => {}
                        Err(_) => gone = true,
                    }
                    break;
                }
                if gone {
                    *slot = None;
                }
            }
            let open = socks.iter().filter(|s| s.is_some()).count();
            if open == 0 || start.elapsed() > Duration::from_secs(6) {
                return (open, start.elapsed());
            }
            thread::sleep(Duration::from_millis(200));
        }
    });
    let mut worst = Duration::ZERO;
    for _ in 0..4 {
        thread::sleep(Duration::from_millis(300));
        let t = Instant::now();
        let resp = get(addr, "/");
        assert_eq!(resp.status, 200);
        worst = worst.max(t.elapsed());
    }
    let (open, when) = trickler.join().unwrap();
    assert_eq!(
        open, 0,
        "{open} slowloris connections still open after {when:?}"
    );
    assert!(
        when <= Duration::from_millis(2500),
        "slowloris cut off only after {when:?}"
    );
    assert!(
        worst < Duration::from_secs(1),
        "a normal GET took {worst:?}"
    );
}

#[test]
fn request_body_slower_than_min_body_rate_gets_408() {
    let b = Backend::start("a");
    let lb = Balancer::start(&["--min-body-rate", "1KiB"], &[&b]);
    let mut s = connect(lb.addr());
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let start = Instant::now();
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        .unwrap();
    let mut raw = Vec::new();
    let mut tmp = [0u8; 4096];
    let mut writing = true;
    loop {
        assert!(start.elapsed() < Duration::from_secs(20), "never answered");
        // 100 bytes every 200 ms = 500 B/s, half the required rate.
        if writing && s.write_all(&[b'x'; 100]).is_err() {
            writing = false;
        }
        match s.read(&mut tmp) {
            Ok(0) => break,
            Ok(n) => {
                raw.extend_from_slice(&tmp[..n]);
                writing = false;
            }
            Err(e) if is_timeout(&e) => {}
            Err(_) => break,
        }
    }
    assert_eq!(status_of(&raw), Some(408), "{:?}", lossy(&raw));
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(15),
        "{took:?}"
    );
    // A body at a normal pace is untouched.
    let mut c = HttpClient::connect(lb.addr());
    let body = vec![b'y'; 300_000];
    let mut req = format!(
        "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    c.send(&req);
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), body.len());
}
