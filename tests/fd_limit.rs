//! Running out of file descriptors (issue 23): the connection limit comes from the
//! descriptor limit, so clients beyond it wait in the listen backlog instead of being
//! accepted and then refused with 502 when their backend connect hits EMFILE.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use tungstenite::Message;

const NOFILE: u64 = 512;

/// The connection limit wslb derived, from its startup line.
fn derived_limit(lb: &Balancer) -> usize {
    derived_limit_of(lb, NOFILE)
}

fn derived_limit_of(lb: &Balancer, nofile: u64) -> usize {
    assert!(lb.wait_log("limited by the descriptor limit", TIMEOUT));
    let lines = lb.stderr_lines();
    let line = lines
        .iter()
        .find(|l| l.contains("limited by the descriptor limit"))
        .unwrap();
    assert!(line.contains(&format!("fd_limit={nofile}")), "{line}");
    let n = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("max_connections="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no max_connections in {line}"));
    assert!(
        (100..nofile as usize / 2).contains(&n),
        "{n} connections for {nofile} descriptors"
    );
    n
}

/// A raw WebSocket upgrade on a new connection; the answer's status line once it comes.
fn send_upgrade(lb: &Balancer) -> TcpStream {
    let mut s = TcpStream::connect(lb.addr()).expect("connect (the backlog holds it)");
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .unwrap();
    s
}

fn status_within(s: &mut TcpStream, wait: Duration) -> Option<u16> {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).ok()?;
    std::str::from_utf8(buf[..n].get(9..12)?).ok()?.parse().ok()
}

#[test]
fn twice_as_many_websockets_as_fit_wait_or_get_503_never_502() {
    let b = Backend::start("a");
    let lb = Balancer::start_limited(&["--control", "127.0.0.1:0"], &[&b], Some(NOFILE));
    let fit = derived_limit(&lb);

    // The first `fit` are held and echo.
    let mut held: Vec<_> = (0..fit).map(|_| ws_connect(lb.addr(), "/ws")).collect();
    for (i, ws) in held.iter_mut().enumerate().step_by(17) {
        ws.send(Message::text(format!("m{i}"))).unwrap();
        assert_eq!(ws.read().unwrap(), Message::text(format!("m{i}")));
    }
    // As many again: they wait in the backlog (no answer) or are refused with 503.
    let mut waiting: Vec<TcpStream> = (0..fit).map(|_| send_upgrade(&lb)).collect();
    let mut early = Vec::new();
    for s in waiting.iter_mut().step_by(10) {
        early.extend(status_within(s, Duration::from_millis(100)));
    }
    assert!(
        early.iter().all(|&st| st == 503),
        "beyond the limit: {early:?}"
    );
    // The held ones still echo.
    for (i, ws) in held.iter_mut().enumerate().step_by(23) {
        ws.send(Message::text(format!("again{i}"))).unwrap();
        assert_eq!(ws.read().unwrap(), Message::text(format!("again{i}")));
    }
    let metrics = get(lb.control_addr(), "/metrics").text();
    assert!(
        metrics.contains(&format!("wslb_fd_limit {NOFILE}")),
        "{metrics}"
    );
    assert!(metrics.contains("wslb_fd_open "), "{metrics}");

    // The held ones leave: the waiting ones are accepted in turn, and none gets a 502.
    drop(held);
    let mut statuses = Vec::new();
    for s in &mut waiting {
        statuses.push(status_within(s, Duration::from_secs(10)));
    }
    assert!(
        statuses
            .iter()
            .all(|st| matches!(st, Some(101) | Some(503))),
        "after the first ones left: {:?}",
        statuses
            .iter()
            .filter(|st| **st != Some(101))
            .collect::<Vec<_>>()
    );
    drop(waiting);

    // A new client is served normally.
    assert!(wait_until(Duration::from_secs(10), || {
        let mut s = send_upgrade(&lb);
        status_within(&mut s, Duration::from_secs(2)) == Some(101)
    }));
    let mut ws = ws_connect(lb.addr(), "/ws");
    ws.send(Message::text("last")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("last"));

    // A bounded log: the startup lines and a few more, not one per refused client.
    let lines = lb.stderr_lines();
    assert!(lines.len() < 30, "{} log lines: {lines:#?}", lines.len());
    assert!(!lines.iter().any(|l| l.contains("502")), "{lines:#?}");
}

#[test]
fn max_connections_above_what_fits_is_lowered_with_one_warning() {
    let b = Backend::start("a");
    let lb = Balancer::start_limited(&["--max-connections", "5000"], &[&b], Some(NOFILE));
    assert!(lb.wait_log("--max-connections 5000 lowered to", TIMEOUT));
    let warned: Vec<_> = lb
        .stderr_lines()
        .into_iter()
        .filter(|l| l.contains("warn"))
        .collect();
    assert_eq!(warned.len(), 1, "{warned:#?}");
    assert!(
        warned[0].contains("descriptor limit is 512"),
        "{}",
        warned[0]
    );
    assert!(warned[0].contains("LimitNOFILE"), "{}", warned[0]);
    // What fits is served.
    let r = get(lb.addr(), "/");
    assert_eq!(r.status, 200);
}

#[test]
fn a_full_keep_alive_pool_gives_way_to_websockets_at_the_limit() {
    // The idle pool is not set aside from the descriptor limit: it uses what clients leave
    // free (closing when a client needs the descriptor: unit-tested in the registry; here
    // upgrades also take pooled connections). Fill it first (128 concurrent keep-alive
    // requests, then the clients leave: 128 idle descriptors, far more than the 32 kept
    // spare), then hold as many WebSockets as fit: every one must reach its backend.
    const LIMIT: u64 = 2048;
    let b = Backend::start("a");
    let lb = Balancer::start_limited(&[], &[&b], Some(LIMIT));
    let fit = derived_limit_of(&lb, LIMIT);
    let mut clients: Vec<HttpClient> = (0..128).map(|_| HttpClient::connect(lb.addr())).collect();
    for c in &mut clients {
        c.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n");
    }
    for c in &mut clients {
        assert_eq!(c.read_response().unwrap().status, 200);
    }
    drop(clients);
    let mut held: Vec<_> = (0..fit).map(|_| ws_connect(lb.addr(), "/ws")).collect();
    for (i, ws) in held.iter_mut().enumerate().step_by(7) {
        ws.send(Message::text(format!("m{i}"))).unwrap();
        assert_eq!(ws.read().unwrap(), Message::text(format!("m{i}")));
    }
    let lines = lb.stderr_lines();
    assert!(
        !lines.iter().any(|l| l.contains("out of file descriptors")),
        "{lines:#?}"
    );
}
