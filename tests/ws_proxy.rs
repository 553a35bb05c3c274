//! WebSocket relay through wslb: echo of every payload-length class, fragmentation with an
//! interleaved ping, spreading over backends, backend loss (1001 "backend went away") and client loss.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::Shutdown;
use std::time::Duration;

use common::*;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;

#[test]
fn echoes_text_and_binary_of_every_length_class() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let lb = Balancer::start(&[], &[&a, &b]);
    let mut ws = ws_connect(lb.addr(), "/");
    // 7-bit, 16-bit and 64-bit length encodings and their edges.
    for len in [1, 125, 126, 65535, 65536, 1 << 20] {
        let text: String = (0..len).map(|i| (b'a' + (i % 26) as u8) as char).collect();
        ws.send(Message::text(text.clone())).unwrap();
        assert_eq!(
            ws.read().unwrap(),
            Message::text(text),
            "text of {len} bytes"
        );
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        ws.send(Message::binary(data.clone())).unwrap();
        assert_eq!(
            ws.read().unwrap(),
            Message::binary(data),
            "binary of {len} bytes"
        );
    }
    ws_close(ws);
}

#[test]
fn relays_fragmented_message_with_interleaved_ping() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let lb = Balancer::start(&[], &[&a, &b]);
    let mut ws = ws_connect(lb.addr(), "/");
    let mut raw = ws_frame(0x1, false, b"Hel"); // text, not final
    raw.extend(ws_frame(0x0, false, b"lo, ")); // continuation
    raw.extend(ws_frame(0x9, true, b"ping!")); // control frames may interleave
    raw.extend(ws_frame(0x0, true, b"world")); // final continuation
    ws.get_mut().write_all(&raw).unwrap();
    assert_eq!(ws.read().unwrap(), Message::Pong("ping!".into()));
    assert_eq!(ws.read().unwrap(), Message::text("Hello, world"));
    // The stream is still in sync after the raw frames.
    assert_eq!(whoami(&mut ws).len(), 1);
    ws_close(ws);
}

#[test]
fn spreads_connections_over_both_backends() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let lb = Balancer::start(&[], &[&a, &b]);
    let mut held = Vec::new();
    let mut names = BTreeSet::new();
    for _ in 0..10 {
        let mut ws = ws_connect(lb.addr(), "/");
        names.insert(whoami(&mut ws));
        held.push(ws);
    }
    assert_eq!(names, BTreeSet::from(["a".to_string(), "b".to_string()]));
}

#[test]
fn backend_loss_closes_client_with_1001() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let lb = Balancer::start(&[], &[&a, &b]);
    let mut ws = ws_connect(lb.addr(), "/");
    ws.send(Message::text("close-me")).unwrap();
    match ws.read() {
        Ok(Message::Close(Some(frame))) => {
            assert_eq!(frame.code, CloseCode::Away, "{frame:?}");
            assert_eq!(frame.reason.as_str(), "backend went away");
        }
        other => panic!("expected a close frame with code 1001, got {other:?}"),
    }
    // The balancer still serves new tunnels.
    let mut ws = ws_connect(lb.addr(), "/");
    ws.send(Message::text("still there")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("still there"));
}

#[test]
fn client_loss_closes_backend_connection() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let lb = Balancer::start(&[], &[&a, &b]);
    let mut ws = ws_connect(lb.addr(), "/");
    let backend = if whoami(&mut ws) == "a" { &a } else { &b };
    assert!(wait_until(TIMEOUT, || backend.stat("ws_active") == 1));
    ws.get_ref().shutdown(Shutdown::Both).unwrap(); // no close frame
    drop(ws);
    assert!(
        wait_until(Duration::from_secs(5), || backend.stat("ws_active") == 0),
        "backend {} still holds the tunnel",
        backend.name
    );
    let mut ws = ws_connect(lb.addr(), "/");
    assert!(["a", "b"].contains(&whoami(&mut ws).as_str()));
}
