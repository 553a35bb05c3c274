//! A client that stops reading must stall the backend, not grow the balancer's memory.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;

const SLACK_KIB: u64 = 32 * 1024;

/// RSS after one request has warmed up the balancer's buffers.
fn idle_rss(lb: &Balancer) -> u64 {
    assert_eq!(get(lb.addr(), "/").status, 200);
    lb.rss_kib()
}

/// Watches RSS for `window`; returns the peak, failing fast once it exceeds `limit`.
fn peak_rss(lb: &Balancer, limit: u64, window: Duration) -> u64 {
    let mut peak = 0;
    wait_until(window, || {
        peak = peak.max(lb.rss_kib());
        peak > limit
    });
    peak
}

#[test]
fn unread_http_download_keeps_memory_bounded() {
    let a = Backend::start("a");
    let lb = Balancer::start(&[], &[&a]);
    let idle = idle_rss(&lb);
    let mut c = HttpClient::connect(lb.addr());
    c.send(b"GET /big?bytes=200000000 HTTP/1.1\r\nHost: test\r\n\r\n");
    let peak = peak_rss(&lb, idle + SLACK_KIB, Duration::from_secs(2));
    assert!(
        peak <= idle + SLACK_KIB,
        "RSS grew from {idle} KiB to {peak} KiB"
    );

    // The stalled download resumes intact.
    let head = c.read_head().unwrap();
    assert_eq!(head.status, 200);
    let mut got = vec![0u8; 4 << 20];
    c.read_exact_body(&mut got).unwrap();
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, &b)| b == b'a' + (i % 26) as u8),
        "body corrupted"
    );
}

#[test]
fn unread_websocket_echoes_keep_memory_bounded() {
    let a = Backend::start("a");
    let lb = Balancer::start(&[], &[&a]);
    let idle = idle_rss(&lb);
    let ws = ws_connect(lb.addr(), "/");
    let mut raw = ws.into_inner();
    raw.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let frame = ws_frame(0x2, true, &vec![7u8; 1 << 20]);
    let started = Instant::now();
    let (mut sent, mut offset) = (0usize, 0usize);
    // Flood 100 MiB of binary messages, never reading the echoes; stop once writes block.
    while sent < 100 << 20 {
        match raw.write(&frame[offset..]) {
            Ok(n) => (sent, offset) = (sent + n, (offset + n) % frame.len()),
            Err(e) if is_timeout(&e) => break,
            Err(e) => panic!("flood write failed after {sent} bytes: {e}"),
        }
    }
    let peak = peak_rss(&lb, idle + SLACK_KIB, Duration::from_secs(1));
    assert!(
        peak <= idle + SLACK_KIB,
        "RSS grew from {idle} KiB to {peak} KiB after {sent} bytes"
    );
    assert!(
        sent < 100 << 20,
        "100 MiB accepted in {:?} without back-pressure",
        started.elapsed()
    );

    // Others still get service while that tunnel is stalled.
    let t = Instant::now();
    let resp = get(lb.addr(), "/");
    assert_eq!(resp.status, 200);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "GET / took {:?}",
        t.elapsed()
    );

    // Draining the echoes unblocks the tunnel.
    let mut buf = vec![0u8; 1 << 20];
    let mut drained = 0;
    while drained < 4 << 20 {
        drained += raw.read(&mut buf).unwrap();
    }
}
