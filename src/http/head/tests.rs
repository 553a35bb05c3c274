//! Unit tests of `head`, beside it.

use super::*;

fn req(bytes: &[u8]) -> Result<Option<(BodyKind, bool, bool, usize)>, HeadError> {
    let mut st = header_storage();
    parse_request(bytes, &mut st)
        .map(|o| o.map(|r| (r.body, r.keep_alive, r.wants_websocket, r.head_len)))
}

#[test]
fn request_framing_table() {
    use BodyKind::*;
    let ok: &[(&[u8], BodyKind, bool)] = &[
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", Empty, true),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            Empty,
            false,
        ),
        (b"GET / HTTP/1.0\r\n\r\n", Empty, false),
        (
            b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
            Empty,
            true,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n",
            Length(5),
            true,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n",
            Length(5),
            true,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
            Empty,
            true,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            Chunked,
            true,
        ),
    ];
    for (bytes, body, ka) in ok {
        let (b, k, _, n) = req(bytes).unwrap().unwrap();
        assert_eq!(
            (b, k, n),
            (*body, *ka, bytes.len()),
            "{}",
            String::from_utf8_lossy(bytes)
        );
        // Every strict prefix is incomplete, never an error (framing bugs live at boundaries).
        for cut in 0..bytes.len() {
            assert_eq!(req(&bytes[..cut]), Ok(None), "cut {cut}");
        }
    }
}

#[test]
fn request_errors_table() {
    let bad: &[(&[u8], HeadError)] = &[
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", HeadError::ConflictingFraming),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", HeadError::BadContentLength),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\n", HeadError::BadContentLength),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n", HeadError::BadContentLength),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n", HeadError::BadContentLength),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", HeadError::BadTransferEncoding),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", HeadError::BadTransferEncoding),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", HeadError::BadTransferEncoding),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", HeadError::BadTransferEncoding),
        (b"GET / HTTP/1.1\r\n\r\n", HeadError::BadHost),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", HeadError::BadHost),
        (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", HeadError::MethodNotAllowed),
    ];
    for (bytes, err) in bad {
        assert_eq!(req(bytes), Err(*err), "{}", String::from_utf8_lossy(bytes));
    }
    assert!(matches!(
        req(b"GET / HTTP/1.1\r\nbad header\r\n\r\n"),
        Err(HeadError::Malformed(_))
    ));
    assert!(matches!(
        req(b"\x00GET / HTTP/1.1\r\n\r\n"),
        Err(HeadError::Malformed(_))
    ));
}

#[test]
fn smuggling_prone_line_shapes_are_refused() {
    // RFC 9112 §2.2, §5.1, §5.2: never repaired into something a backend reads differently.
    for bad in [
        &b"GET / HTTP/1.1\nHost: a\n\n"[..],
        b"GET / HTTP/1.1\r\nHost: a\r\n\n",
        b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\x01b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\x7fb\r\n\r\n",
    ] {
        assert!(
            matches!(req(bad), Err(HeadError::Malformed(_))),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
    let mut st = header_storage();
    assert!(parse_response(b"HTTP/1.1 200 OK\nContent-Length: 0\n\n", &mut st, false).is_err());
}

#[test]
fn limits() {
    let mut big = b"GET / HTTP/1.1\r\nHost: a\r\nX: ".to_vec();
    big.resize(MAX_HEAD + 10, b'a');
    assert_eq!(req(&big), Err(HeadError::TooLarge));
    assert_eq!(HeadError::TooLarge.status(), 431);
    let mut many = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
    for i in 0..MAX_HEADERS {
        many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    assert_eq!(req(&many), Err(HeadError::TooManyHeaders));
}

#[test]
fn websocket_and_expect_flags() {
    let mut st = header_storage();
    let r = parse_request(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\nExpect: 100-continue\r\n\r\n",
        &mut st,
    )
    .unwrap()
    .unwrap();
    assert!(r.wants_websocket && r.expect_continue);
    assert_eq!(r.path, "/ws");
}

#[test]
fn response_framing() {
    use BodyKind::*;
    let cases: &[(&[u8], bool, BodyKind, bool)] = &[
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
            false,
            Length(3),
            true,
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
            true,
            Empty,
            true,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
            Chunked,
            true,
        ),
        (b"HTTP/1.1 200 OK\r\n\r\n", false, UntilClose, true),
        (b"HTTP/1.1 204 No Content\r\n\r\n", false, Empty, true),
        (
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            false,
            Empty,
            true,
        ),
        (b"HTTP/1.1 100 Continue\r\n\r\n", false, Empty, true),
        (
            b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n",
            false,
            Length(1),
            false,
        ),
        (
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
            false,
            Length(1),
            false,
        ),
    ];
    for (bytes, head, body, ka) in cases {
        let mut st = header_storage();
        let r = parse_response(bytes, &mut st, *head).unwrap().unwrap();
        assert_eq!(
            (r.body, r.keep_alive),
            (*body, *ka),
            "{}",
            String::from_utf8_lossy(bytes)
        );
    }
    let mut st = header_storage();
    assert_eq!(
        parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            &mut st,
            false
        )
        .unwrap_err(),
        HeadError::ConflictingFraming
    );
}

#[test]
fn status_below_100_refused() {
    // Fuzz find (http_response): "099" parsed as status 99, relayed as "HTTP/1.1 99".
    for raw in [
        &b"HTTP/1.1 099 OK\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
        b"HTTP/1.1 000 X\r\n\r\n",
    ] {
        let mut st = header_storage();
        assert_eq!(
            parse_response(raw, &mut st, false).unwrap_err(),
            HeadError::Malformed(httparse::Error::Status)
        );
    }
    let mut st = header_storage();
    let r = parse_response(b"HTTP/1.1 100 Continue\r\n\r\n", &mut st, false);
    assert_eq!(r.unwrap().unwrap().status, 100);
}

#[test]
fn tokens() {
    assert!(has_token(b"keep-alive, Upgrade", "upgrade"));
    assert!(!has_token(b"upgraded", "upgrade"));
}

#[test]
fn authorities() {
    for ok in [
        "a.test",
        "a.test:8080",
        "127.0.0.1",
        "127.0.0.1:80",
        "[::1]",
        "[::1]:443",
        "[2001:db8::1]",
        "",
        "xn--bcher-kva.example",
        "a%20b",
        "a_b~c",
        "h:",
    ] {
        assert!(is_authority(ok.as_bytes()), "{ok}");
    }
    for bad in [
        "a test",
        "a.test:80x",
        "user@a.test",
        "a/b",
        "[::1",
        "[::1]x",
        "[]",
        "[g::1]",
        "a%2",
        "a%zz",
        "a.test:80:80x",
        "\"a\"",
        "a\\b",
        "a{b}",
    ] {
        assert!(!is_authority(bad.as_bytes()), "{bad}");
    }
}

fn parse_target(target: &str, host: &str) -> Result<(String, Option<String>), HeadError> {
    let raw = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let mut st = header_storage();
    let req = parse_request(raw.as_bytes(), &mut st)?.expect("complete");
    Ok((req.origin.to_string(), req.authority.map(str::to_string)))
}

#[test]
fn absolute_form_targets_give_their_authority() {
    let ok = |t: &str, origin: &str, auth: Option<&str>| {
        assert_eq!(
            parse_target(t, "b.test"),
            Ok((origin.to_string(), auth.map(str::to_string))),
            "{t}"
        );
    };
    ok("/x?y", "/x?y", None);
    ok("*", "*", None);
    ok("http://a.test/abs", "/abs", Some("a.test"));
    ok("HTTPS://a.test:8443/p?q=1", "/p?q=1", Some("a.test:8443"));
    ok("http://a.test", "", Some("a.test"));
    ok("http://a.test?q", "?q", Some("a.test"));
    ok("http://[::1]:80/", "/", Some("[::1]:80"));
    for bad in [
        "ftp://a.test/",
        "http://",
        "http:///x",
        "http://u@a.test/",
        "http://a\"b/",
        "http://:80/",
        "x",
        "a.test:80",
        "http://a.test#frag",
    ] {
        assert_eq!(
            parse_target(bad, "b.test"),
            Err(HeadError::BadTarget),
            "{bad}"
        );
    }
}

#[test]
fn invalid_host_values_are_refused() {
    for bad in ["a b", "a.test:x", "u@a.test", "a/b", "[::1"] {
        assert_eq!(parse_target("/", bad), Err(HeadError::BadHost), "{bad}");
    }
    assert!(parse_target("/", "a.test:8080").is_ok());
}

#[test]
fn higher_minor_versions_become_1_1() {
    let mut raw = b"GET / HTTP/1.2\r\nHost: a\r\n\r\n".to_vec();
    let mut st = header_storage();
    assert_eq!(
        parse_request(&raw, &mut st).err(),
        Some(HeadError::Malformed(httparse::Error::Version))
    );
    assert!(downgrade_minor_version(&mut raw));
    assert_eq!(&raw[..16], b"GET / HTTP/1.1\r\n");
    let mut st = header_storage();
    assert_eq!(parse_request(&raw, &mut st).unwrap().unwrap().version, 1);
    assert!(!downgrade_minor_version(&mut raw));
    for unchanged in [
        &b"GET / HTTP/2.0\r\n\r\n"[..],
        b"GET / HTTP/1.0\r\n",
        b"GET / HTTP/1.2",
        b"GET /HTTP/1.2\r\n",
        b"GET / HTTP/1.22\r\n",
    ] {
        let mut copy = unchanged.to_vec();
        assert!(!downgrade_minor_version(&mut copy));
        assert_eq!(copy, unchanged);
    }
}
