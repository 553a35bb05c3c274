//! Dead backends: retried around while a live one exists, 502 when none answers, 503 when
//! the pool is empty.

mod common;

use std::net::TcpListener;

use common::*;
use tungstenite::Message;

/// A `ws://` URL whose port refuses connections (bound, then released).
fn dead_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    format!("ws://{}", listener.local_addr().unwrap())
}

#[test]
fn live_backend_takes_over_from_a_dead_one() {
    let live = Backend::start("live");
    let dead = dead_url();
    let lb = Balancer::start(&["-B", &dead], &[&live]);
    for i in 0..20 {
        let resp = get(lb.addr(), "/");
        assert_eq!(
            (resp.status, resp.header("x-backend")),
            (200, Some("live")),
            "request {i}"
        );
    }
    for i in 0..10 {
        let mut ws = ws_connect(lb.addr(), "/");
        assert_eq!(whoami(&mut ws), "live", "connection {i}");
        ws.send(Message::text(format!("hello {i}"))).unwrap();
        assert_eq!(ws.read().unwrap(), Message::text(format!("hello {i}")));
    }
}

#[test]
fn only_dead_backends_gives_502() {
    let (dead1, dead2) = (dead_url(), dead_url());
    let lb = Balancer::start(&["-B", &dead1, "-B", &dead2], &[]);
    for _ in 0..3 {
        assert_eq!(get(lb.addr(), "/").status, 502);
    }
}

#[test]
fn empty_pool_gives_503_with_retry_after() {
    let lb = Balancer::start(&[], &[]);
    let resp = get(lb.addr(), "/");
    assert_eq!(resp.status, 503);
    assert!(resp.header("retry-after").is_some(), "{resp:?}");
}
