//! SIGTERM: stop accepting, finish HTTP exchanges, close WebSockets with 1001 within
//! `--drain-timeout` (spread over it), exit 0.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;

/// True if a new connection is refused, closed or left unanswered instead of served.
fn not_serving(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return true;
    };
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    if s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return true;
    }
    !matches!(s.read(&mut [0u8; 1]), Ok(n) if n > 0)
}

fn assert_exits_0(lb: &mut Balancer) {
    let Some(status) = lb.wait_exit(Duration::from_secs(5)) else {
        panic!("wslb still running after drain: {:#?}", lb.stderr_lines());
    };
    assert!(status.success(), "wslb exited with {status}");
}

#[test]
fn websocket_gets_1001_within_drain_timeout_and_process_exits_0() {
    let a = Backend::start("a");
    let mut lb = Balancer::start(&["--drain-timeout", "1s"], &[&a]);
    let mut ws = ws_connect(lb.addr(), "/");
    ws.send(Message::text("before")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("before"));

    lb.sigterm();
    let signalled = Instant::now();
    assert!(
        wait_until(Duration::from_secs(3), || not_serving(lb.addr())),
        "still accepting"
    );

    // The 1001 closes are spread over the drain timeout (tests/spread_drain.rs): the one
    // client's comes at a random point of it, after any echo still on its way.
    let frame = loop {
        match ws.read() {
            Ok(Message::Close(Some(frame))) => break frame,
            Ok(Message::Text(_)) => {}
            other => panic!("expected a close frame with code 1001, got {other:?}"),
        }
    };
    assert_eq!(frame.code, CloseCode::Away, "{frame:?}");
    let waited = signalled.elapsed();
    assert!(
        waited <= Duration::from_secs(3),
        "closed only after {waited:?}"
    );
    while ws.read().is_ok() {} // flush our close reply, wait for the TCP close

    assert_exits_0(&mut lb);
}

#[test]
fn in_flight_http_exchange_completes_during_drain() {
    let a = Backend::start("a");
    let mut lb = Balancer::start(&["--drain-timeout", "2s"], &[&a]);
    let mut c = HttpClient::connect(lb.addr());
    c.send(b"GET /slow?ms=500 HTTP/1.1\r\nHost: test\r\n\r\n");
    assert!(
        wait_until(TIMEOUT, || a.stat("slow_active") == 1),
        "request never reached the backend"
    );

    lb.sigterm();
    let resp = c.read_response().unwrap();
    assert_eq!(
        (resp.status, resp.text().starts_with("backend a port ")),
        (200, true)
    );
    drop(c);
    // Whether wslb exits once nothing is left or at the 2 s drain timeout, 5 s covers both.
    assert_exits_0(&mut lb);
}
