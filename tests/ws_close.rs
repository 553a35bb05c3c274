//! WebSocket closing through the balancer (docs/LIFECYCLE.md, "WebSocket closing"): the
//! closing handshake is relayed and never decided by the balancer; it sends a close of its
//! own only for its limits, for a backend gone with no close in either direction, and then
//! lingers so the close is read, not reset away.
//!
//! Backends here are scripted raw sockets on 127.0.0.1:0 (one thread each), so what the
//! backend received and what it did are exact; clients are raw std sockets. Every read has
//! a timeout, every loop a bound.

mod common;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use tungstenite::handshake::derive_accept_key;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const STEP: Duration = Duration::from_secs(5);

/// A balancer in front of `backend`.
fn balancer(backend: SocketAddr, extra: &[&str]) -> Balancer {
    let url = format!("ws://{backend}");
    let mut args = vec!["-B", url.as_str()];
    args.extend_from_slice(extra);
    Balancer::start(&args, &[])
}

/// Reads one byte at a time up to the end of an HTTP head (so no frame byte is consumed).
fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert!(head.len() < 16 * 1024, "head too long");
        s.read_exact(&mut b).expect("head byte");
        head.push(b[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Backend side of the upgrade: reads the request, answers 101.
fn accept_upgrade(s: &mut TcpStream) {
    s.set_read_timeout(Some(STEP)).unwrap();
    let head = read_head(s);
    let key = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-key")
                .then(|| value.trim().to_string())
        })
        .expect("Sec-WebSocket-Key");
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    );
    s.write_all(answer.as_bytes()).unwrap();
}

/// Client side: connects through `lb` and upgrades.
fn open(lb: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(lb).expect("connect to wslb");
    s.set_read_timeout(Some(STEP)).unwrap();
    s.set_write_timeout(Some(STEP)).unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101"), "upgrade answer: {head}");
    s
}

/// One frame, unmasked (`mask: None`, server→client) or masked: (first byte, payload).
/// `Ok(None)` = clean EOF before the frame's first byte.
fn read_frame(s: &mut TcpStream) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut hdr = [0u8; 2];
    match s.read(&mut hdr[..1])? {
        0 => return Ok(None),
        _ => s.read_exact(&mut hdr[1..])?,
    }
    let len = match hdr[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b)?;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b)?;
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    let mut mask = [0u8; 4];
    if hdr[1] & 0x80 != 0 {
        s.read_exact(&mut mask)?;
    }
    let mut payload = vec![0u8; usize::try_from(len).unwrap()];
    s.read_exact(&mut payload)?;
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
    Ok(Some((hdr[0], payload)))
}

/// An unmasked (server) frame.
fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() <= 125);
    let mut out = vec![0x80 | opcode, payload.len() as u8];
    out.extend_from_slice(payload);
    out
}

fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    p
}

fn close_code(payload: &[u8]) -> Option<u16> {
    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]))
}

/// Everything until EOF (`Ok`) or an error such as a reset (`Err`), within `STEP`.
fn read_to_end(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + STEP;
    let mut all = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    while Instant::now() < deadline {
        match s.read(&mut buf)? {
            0 => return Ok(all),
            n => all.extend_from_slice(&buf[..n]),
        }
    }
    Err(io::Error::new(io::ErrorKind::TimedOut, "no EOF"))
}

/// A backend that accepts one connection, upgrades it and runs `script` on it.
fn one_shot_backend<T: Send + 'static>(
    script: impl FnOnce(TcpStream) -> T + Send + 'static,
) -> (SocketAddr, thread::JoinHandle<T>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        accept_upgrade(&mut s);
        script(s)
    });
    (addr, h)
}

#[test]
fn server_close_with_an_invalid_code_reaches_the_client_as_sent() {
    let (addr, backend) = one_shot_backend(|mut s| {
        // 999 may not be sent (RFC 6455 §7.4.2); what a client makes of it is its business.
        s.write_all(&server_frame(0x8, &close_payload(999, "odd")))
            .unwrap();
        s.shutdown(Shutdown::Both).unwrap();
    });
    let lb = balancer(addr, &[]);
    let mut c = open(lb.addr());
    let (b0, payload) = read_frame(&mut c).unwrap().expect("the server's close");
    assert_eq!((b0, close_code(&payload)), (0x88, Some(999)));
    assert_eq!(&payload[2..], b"odd");
    assert_eq!(read_to_end(&mut c).unwrap(), b"", "nothing after the close");
    backend.join().unwrap();
}

#[test]
fn server_that_drops_tcp_on_an_invalid_client_close_is_relayed_as_a_tcp_close() {
    let (addr, backend) = one_shot_backend(|mut s| {
        let (b0, payload) = read_frame(&mut s).unwrap().expect("client close");
        // Fails the connection the way Autobahn's own server does: no close frame.
        s.shutdown(Shutdown::Both).unwrap();
        (b0, close_code(&payload))
    });
    let lb = balancer(addr, &[]);
    let mut c = open(lb.addr());
    c.write_all(&ws_frame(0x8, true, &close_payload(1005, "")))
        .unwrap();
    assert_eq!(backend.join().unwrap(), (0x88, Some(1005)));
    // Not a 1011 (nor any close) of the balancer's: the TCP close, as directly.
    assert_eq!(read_to_end(&mut c).unwrap(), b"");
}

#[test]
fn frames_after_the_client_close_are_dropped_and_the_server_close_comes_back() {
    let (addr, backend) = one_shot_backend(|mut s| {
        let first = read_frame(&mut s).unwrap().expect("client close");
        s.write_all(&server_frame(0x8, &close_payload(1000, "")))
            .unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        // All the backend gets after the close, until the balancer's FIN.
        (first, read_to_end(&mut s))
    });
    let lb = balancer(addr, &[]);
    let mut c = open(lb.addr());
    let mut burst = ws_frame(0x8, true, &close_payload(1000, ""));
    for late in [
        ws_frame(0x8, true, &close_payload(1000, "again")),
        ws_frame(0x9, true, b"ping"),
        ws_frame(0x1, true, b"late text"),
        ws_frame(0x1, false, b"late fragment"),
    ] {
        burst.extend(late);
    }
    c.write_all(&burst).unwrap();
    let (b0, payload) = read_frame(&mut c).unwrap().expect("a close frame");
    assert_eq!(
        (b0, close_code(&payload)),
        (0x88, Some(1000)),
        "the server's close, not one of the balancer's"
    );
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_end(&mut c).unwrap(), b"");
    let ((b0, payload), rest) = backend.join().unwrap();
    assert_eq!((b0, close_code(&payload)), (0x88, Some(1000)));
    assert_eq!(rest.unwrap(), b"", "late frames reached the backend");
}

#[test]
fn backend_vanishing_mid_session_gets_the_client_1001_backend_went_away() {
    let (addr, backend) = one_shot_backend(|mut s| {
        let (_, msg) = read_frame(&mut s).unwrap().expect("a message");
        s.write_all(&server_frame(0x1, &msg)).unwrap();
        // Gone without a close frame; nothing unread, so a FIN, not a reset.
        s.shutdown(Shutdown::Both).unwrap();
    });
    let lb = balancer(addr, &[]);
    let mut c = open(lb.addr());
    c.write_all(&ws_frame(0x1, true, b"hello")).unwrap();
    assert_eq!(read_frame(&mut c).unwrap(), Some((0x81, b"hello".to_vec())));
    let (b0, payload) = read_frame(&mut c).unwrap().expect("the balancer's close");
    assert_eq!((b0, close_code(&payload)), (0x88, Some(1001)));
    assert_eq!(&payload[2..], b"backend went away");
    c.write_all(&ws_frame(0x8, true, &close_payload(1001, "")))
        .unwrap();
    assert_eq!(read_to_end(&mut c).unwrap(), b"");
    backend.join().unwrap();
}

#[test]
fn backend_reset_is_relayed_as_a_tcp_close_without_a_close_frame() {
    let (addr, backend) = one_shot_backend(|s| {
        // Wait for the client's frame to be queued here, then close without reading it:
        // the kernel answers with a reset (an abortive close, as Autobahn's server does).
        let mut b = [0u8; 1];
        s.peek(&mut b).unwrap();
        drop(s);
    });
    let lb = balancer(addr, &[]);
    let mut c = open(lb.addr());
    c.write_all(&ws_frame(0x1, true, b"unread")).unwrap();
    backend.join().unwrap();
    assert_eq!(read_to_end(&mut c).unwrap(), b"", "no close frame invented");
}

/// Sends a masked binary frame of `len` bytes in chunks, then a close and FIN; stops at the
/// first write error, which it returns.
fn send_big_then_close(mut s: TcpStream, len: usize) -> Option<io::Error> {
    let mut frame = vec![0x82, 0x80 | 127];
    frame.extend((len as u64).to_be_bytes());
    frame.extend([1, 2, 3, 4]);
    if let Err(e) = s.write_all(&frame) {
        return Some(e);
    }
    let chunk = vec![0x5a; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len());
        if let Err(e) = s.write_all(&chunk[..n]) {
            return Some(e);
        }
        left -= n;
    }
    let reply = ws_frame(0x8, true, &close_payload(1009, ""));
    s.write_all(&reply)
        .err()
        .or_else(|| s.shutdown(Shutdown::Write).err())
}

#[test]
fn oversized_message_gets_1009_to_the_client_and_a_close_to_the_backend_every_time() {
    const RUNS: usize = 20;
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    let backend = thread::spawn(move || {
        for _ in 0..RUNS {
            let (mut s, _) = l.accept().unwrap();
            accept_upgrade(&mut s);
            // Whatever arrives until a close frame or EOF: the oversized frame never does.
            let got = match read_frame(&mut s) {
                Ok(Some((b0, payload))) => Some((b0, close_code(&payload))),
                _ => None,
            };
            if got.is_some() {
                let _ = s.write_all(&server_frame(0x8, &close_payload(1001, "")));
            }
            let _ = s.shutdown(Shutdown::Write);
            let _ = read_to_end(&mut s);
            tx.send(got).unwrap();
        }
    });
    let lb = balancer(addr, &["--max-frame-size", "1MiB"]);
    for run in 0..RUNS {
        let mut c = open(lb.addr());
        // Far more than socket buffers hold: the client is still sending when the balancer
        // fails the connection, which used to reset it before the close frame was read.
        let writer = {
            let w = c.try_clone().unwrap();
            thread::spawn(move || send_big_then_close(w, 16 << 20))
        };
        let first = read_frame(&mut c);
        let (b0, payload) = first
            .unwrap_or_else(|e| panic!("run {run}: no close frame, {e}"))
            .unwrap_or_else(|| panic!("run {run}: EOF without a close frame"));
        assert_eq!((b0, close_code(&payload)), (0x88, Some(1009)), "run {run}");
        let write_error = writer.join().unwrap();
        assert!(
            write_error.is_none(),
            "run {run}: the client could not finish sending: {write_error:?}"
        );
        assert_eq!(
            read_to_end(&mut c).unwrap_or_else(|e| panic!("run {run}: {e}")),
            b"",
            "run {run}"
        );
        let backend_saw = rx.recv_timeout(STEP).unwrap();
        assert_eq!(
            backend_saw,
            Some((0x88, Some(1001))),
            "run {run}: the backend's close"
        );
    }
    backend.join().unwrap();
}
