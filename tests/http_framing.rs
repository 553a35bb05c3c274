//! The framing gaps a peer found after the hardening work (RFC 9112 / 9110): oversized
//! chunk sizes, absolute-form targets, invalid Host values and higher HTTP/1.x minor
//! versions. Each test checks what the client got over a raw socket and, with the
//! recording backend, what the backend received.

mod common;
#[path = "common/recorder.rs"]
mod recorder;

use std::io::Write;
use std::time::Duration;

use common::*;
use recorder::{contains, Mode, Recorder};

fn lb_for(rec: &Recorder) -> Balancer {
    let url = rec.url();
    Balancer::start(&["-B", url.as_str()], &[])
}

/// Sends `raw` on a new connection and returns the answer.
fn ask(lb: &Balancer, raw: &[u8]) -> Response {
    let mut c = HttpClient::connect(lb.addr());
    c.send(raw);
    c.read_response().expect("an answer")
}

#[test]
fn chunk_sizes_a_backend_could_overflow_on_are_refused_before_they_leave() {
    let rec = Recorder::start(Mode::Ok);
    let lb = lb_for(&rec);
    for size in [
        "FFFFFFFFFFFFFFFF",
        "8000000000000000",
        "ffffffffffffffffff",
        "00000000000000001",
    ] {
        let mut c = HttpClient::connect(lb.addr());
        // The head and a first valid chunk go first, so the backend connection is open and
        // streaming when the bad size line arrives, in two writes.
        c.send(
            b"POST /chunks HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
        );
        assert!(rec
            .wait_for(b"3\r\nabc\r\n", Duration::from_secs(10))
            .is_some());
        let (first, rest) = size.split_at(4);
        c.send(first.as_bytes());
        std::thread::sleep(Duration::from_millis(50)); // the line arrives in two reads
        c.send(format!("{rest}\r\nx\r\n0\r\n\r\n").as_bytes());
        let r = c.read_response().expect("answer");
        assert_eq!(r.status, 400, "{size}");
        // Not one byte of that chunk line reached the backend.
        let seen = rec.all_text();
        assert!(
            !contains(seen.as_bytes(), first.as_bytes()),
            "{size}: backend got {seen:?}"
        );
    }
    // The largest size accepted is 2^63 - 1: it is forwarded (the body is then cut short by
    // the client's close, which is fine: the backend sees a valid size).
    let mut c = HttpClient::connect(lb.addr());
    c.send(b"POST /big HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n7fffffffffffffff\r\nab");
    assert!(rec
        .wait_for(b"7fffffffffffffff\r\nab", Duration::from_secs(10))
        .is_some());
}

#[test]
fn absolute_form_target_is_forwarded_in_origin_form_with_its_authority_as_host() {
    let rec = Recorder::start(Mode::Ok);
    let lb = lb_for(&rec);
    let r = ask(
        &lb,
        b"GET http://a.test/abs?q=1 HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    let seen = rec.all_text();
    assert!(seen.starts_with("GET /abs?q=1 HTTP/1.1\r\n"), "{seen:?}");
    assert!(seen.contains("\r\nHost: a.test\r\n"), "{seen:?}");
    assert!(!seen.contains("b.test"), "{seen:?}");

    // Other schemes, userinfo and an empty authority are refused, and nothing is sent.
    let rec = Recorder::start(Mode::Ok);
    let lb = lb_for(&rec);
    for target in [
        "ftp://a.test/x",
        "http://user@a.test/",
        "http:///x",
        "a.test",
    ] {
        let raw = format!("GET {target} HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n");
        assert_eq!(ask(&lb, raw.as_bytes()).status, 400, "{target}");
    }
    assert_eq!(rec.total_bytes(), 0, "{}", rec.all_text());
}

#[test]
fn host_that_is_not_an_authority_is_refused() {
    let rec = Recorder::start(Mode::Ok);
    let lb = lb_for(&rec);
    for host in [
        "a b.test",
        "a.test:80x",
        "user@a.test",
        "a.test/x",
        "[::1",
        "a\"b",
    ] {
        let raw = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        assert_eq!(ask(&lb, raw.as_bytes()).status, 400, "{host}");
    }
    assert_eq!(rec.total_bytes(), 0, "{}", rec.all_text());
    // Valid ones pass: a port, an IPv6 literal, an empty Host (RFC 9112 §3.2).
    for host in ["a.test:8080", "[::1]:80", ""] {
        let raw = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        assert_eq!(ask(&lb, raw.as_bytes()).status, 200, "{host:?}");
    }
}

#[test]
fn http_1_2_is_answered_as_http_1_1() {
    let rec = Recorder::start(Mode::Ok);
    let lb = lb_for(&rec);
    let mut c = HttpClient::connect(lb.addr());
    c.send(b"GET /v HTTP/1.2\r\nHost: t\r\n\r\n");
    let r = c.read_response().expect("answer");
    assert_eq!(r.status, 200);
    // Kept alive as HTTP/1.1 is: a second request on the same connection works.
    c.stream
        .write_all(b"GET /w HTTP/1.9\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(c.read_response().expect("second answer").status, 200);
    let seen = rec.all_text();
    assert!(seen.contains("GET /v HTTP/1.1\r\n"), "{seen:?}");
    assert!(seen.contains("GET /w HTTP/1.1\r\n"), "{seen:?}");
    // HTTP/2.0 in an HTTP/1 request line stays a 400.
    let r = ask(&lb, b"GET / HTTP/2.0\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 400);
}
