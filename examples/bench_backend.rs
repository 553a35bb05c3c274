//! Benchmark backend for wslb: non-blocking, `--threads N` mio event loops sharing one
//! listener. Answers every HTTP/1.1 request with a fixed small keep-alive response and echoes
//! WebSocket data frames (client frames unmasked, echoed unmasked with the same FIN/opcode
//! byte), answers pings with pongs and a close with a close. A bench tool, not the balancer:
//! it trusts its peers (the load generator or a proxy) and closes on anything odd.
//!
//! `bench_backend [--listen ADDR] [--threads N]` prints `listening on 127.0.0.1:PORT`.

use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::Duration;
use std::{env, process, thread};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

const LISTENER: Token = Token(usize::MAX);
const BODY: &[u8] = b"hello from bench_backend\n";
const READ_CHUNK: usize = 64 * 1024;
/// A connection whose unparsed input grows past this is dropped (heads, frames).
const MAX_PENDING: usize = 16 << 20;

fn main() {
    let (mut listen, mut threads) = ("127.0.0.1:0".to_string(), "1".to_string());
    let mut args = env::args().skip(1);
    while let Some(arg) = args.next() {
        let slot = match arg.as_str() {
            "--listen" => &mut listen,
            "--threads" => &mut threads,
            _ => usage(&format!("unknown argument {arg}")),
        };
        *slot = args
            .next()
            .unwrap_or_else(|| usage(&format!("{arg} needs a value")));
    }
    let threads: usize = match threads.parse() {
        Ok(n) if (1..=256).contains(&n) => n,
        _ => usage("--threads must be 1..=256"),
    };
    let addr: SocketAddr = listen
        .parse()
        .unwrap_or_else(|_| usage(&format!("bad --listen {listen}")));
    let std_listener = std::net::TcpListener::bind(addr).unwrap_or_else(|e| {
        eprintln!("bench_backend: cannot listen on {listen}: {e}");
        process::exit(1)
    });
    std_listener.set_nonblocking(true).expect("nonblocking");
    let local = std_listener.local_addr().expect("local_addr");
    let mut handles = Vec::new();
    for _ in 0..threads {
        let l = std_listener.try_clone().expect("clone listener");
        handles.push(thread::spawn(move || {
            if let Err(e) = event_loop(TcpListener::from_std(l)) {
                eprintln!("bench_backend: event loop failed: {e}");
                process::exit(1);
            }
        }));
    }
    println!("listening on {local}");
    io::stdout().flush().expect("flush stdout");
    for h in handles {
        let _ = h.join();
    }
}

fn usage(msg: &str) -> ! {
    eprintln!("bench_backend: {msg}\nusage: bench_backend [--listen ADDR] [--threads N]");
    process::exit(2)
}

#[derive(PartialEq)]
enum Mode {
    Http,
    Ws,
}

struct Conn {
    sock: TcpStream,
    mode: Mode,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    /// Bytes of `wbuf` already written.
    wpos: usize,
    /// Registered for WRITABLE too (only while `wbuf` is not drained).
    want_write: bool,
    /// Close once `wbuf` drains (after a WebSocket close or `Connection: close`).
    close_after: bool,
}

fn event_loop(mut listener: TcpListener) -> io::Result<()> {
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut conns: slab::Slab<Conn> = slab::Slab::new();
    let mut events = Events::with_capacity(1024);
    let mut scratch = vec![0u8; READ_CHUNK];
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for ev in events.iter() {
            if ev.token() == LISTENER {
                accept_all(&listener, &poll, &mut conns);
                continue;
            }
            let key = ev.token().0;
            let Some(conn) = conns.get_mut(key) else {
                continue;
            };
            let keep = drive(
                conn,
                &mut scratch,
                ev.is_readable() || ev.is_read_closed(),
                ev.is_read_closed(),
            );
            let keep = keep && update_interest(conn, &poll, key);
            if !keep {
                let mut c = conns.remove(key);
                let _ = poll.registry().deregister(&mut c.sock);
            }
        }
    }
}

fn accept_all(listener: &TcpListener, poll: &Poll, conns: &mut slab::Slab<Conn>) {
    loop {
        match listener.accept() {
            Ok((mut sock, _)) => {
                let _ = sock.set_nodelay(true);
                let entry = conns.vacant_entry();
                let token = Token(entry.key());
                if poll
                    .registry()
                    .register(&mut sock, token, Interest::READABLE)
                    .is_ok()
                {
                    entry.insert(Conn {
                        sock,
                        mode: Mode::Http,
                        rbuf: Vec::new(),
                        wbuf: Vec::new(),
                        wpos: 0,
                        want_write: false,
                        close_after: false,
                    });
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            // EMFILE and friends: back off a little rather than spin.
            Err(_) => {
                thread::sleep(Duration::from_millis(1));
                return;
            }
        }
    }
}

/// Reads what is there, answers it, writes what it can. `false`: drop the connection.
/// `read_closed`: the peer's FIN came with this event; read on to the 0 that shows it (the
/// short-read shortcut would leave it unread, and no further edge comes: the connection
/// stayed half-closed, its proxy holding two descriptors for it).
fn drive(conn: &mut Conn, scratch: &mut [u8], readable: bool, read_closed: bool) -> bool {
    if readable && !conn.close_after {
        loop {
            match conn.sock.read(scratch) {
                Ok(0) => return false,
                Ok(n) => {
                    // Fast path: nothing buffered, parse straight from the scratch buffer.
                    let ok = if conn.rbuf.is_empty() {
                        let used = match process(conn, &scratch[..n]) {
                            Some(used) => used,
                            None => return false,
                        };
                        conn.rbuf.extend_from_slice(&scratch[used..n]);
                        true
                    } else {
                        conn.rbuf.extend_from_slice(&scratch[..n]);
                        let buf = std::mem::take(&mut conn.rbuf);
                        match process(conn, &buf) {
                            Some(used) => {
                                conn.rbuf = buf;
                                conn.rbuf.drain(..used);
                                true
                            }
                            None => false,
                        }
                    };
                    if !ok || conn.rbuf.len() > MAX_PENDING {
                        return false;
                    }
                    if n < scratch.len() && !read_closed {
                        break; // short read: the socket is drained (saves a read syscall)
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
    }
    if !flush(conn) {
        return false;
    }
    !(conn.close_after && conn.wpos == conn.wbuf.len())
}

/// Writes `wbuf`; `false` on a write error.
fn flush(conn: &mut Conn) -> bool {
    while conn.wpos < conn.wbuf.len() {
        match conn.sock.write(&conn.wbuf[conn.wpos..]) {
            Ok(0) => return false,
            Ok(n) => conn.wpos += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
    conn.wbuf.clear();
    conn.wpos = 0;
    true
}

fn update_interest(conn: &mut Conn, poll: &Poll, key: usize) -> bool {
    let pending = conn.wpos < conn.wbuf.len();
    if pending != conn.want_write {
        conn.want_write = pending;
        let interest = if pending {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        return poll
            .registry()
            .reregister(&mut conn.sock, Token(key), interest)
            .is_ok();
    }
    true
}

/// Consumes complete requests/frames from `input`, appending answers to `wbuf`. Returns the
/// bytes consumed, `None` to drop the connection.
fn process(conn: &mut Conn, input: &[u8]) -> Option<usize> {
    let mut used = 0;
    while used < input.len() && !conn.close_after {
        let n = match conn.mode {
            Mode::Http => http_one(conn, &input[used..])?,
            Mode::Ws => ws_one(conn, &input[used..])?,
        };
        if n == 0 {
            break;
        }
        used += n;
    }
    Some(used)
}

/// One HTTP request: `Some(0)` if incomplete.
fn http_one(conn: &mut Conn, input: &[u8]) -> Option<usize> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(input) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Some(0),
        Err(_) => return None,
    };
    let mut content_length = 0usize;
    let (mut upgrade, mut close, mut key) = (false, req.version == Some(0), None);
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            content_length = std::str::from_utf8(h.value).ok()?.trim().parse().ok()?;
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = h.value.eq_ignore_ascii_case(b"websocket");
        } else if h.name.eq_ignore_ascii_case("sec-websocket-key") {
            key = Some(h.value);
        } else if h.name.eq_ignore_ascii_case("connection") {
            let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
            if v.split(',').any(|t| t.trim() == "close") {
                close = true;
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return None; // bench clients never send chunked bodies
        }
    }
    if upgrade {
        let accept = tungstenite::handshake::derive_accept_key(key?.trim_ascii());
        conn.wbuf.extend_from_slice(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
        );
        conn.wbuf.extend_from_slice(accept.as_bytes());
        conn.wbuf.extend_from_slice(b"\r\n\r\n");
        conn.mode = Mode::Ws;
        return Some(head_len);
    }
    let total = head_len + content_length;
    if input.len() < total {
        return Some(0); // wait for the body (the caller buffers)
    }
    conn.wbuf
        .extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: ");
    conn.wbuf
        .extend_from_slice(BODY.len().to_string().as_bytes());
    if close {
        conn.wbuf.extend_from_slice(b"\r\nConnection: close");
        conn.close_after = true;
    }
    conn.wbuf.extend_from_slice(b"\r\n\r\n");
    if req.method != Some("HEAD") {
        conn.wbuf.extend_from_slice(BODY);
    }
    Some(total)
}

/// One WebSocket frame: `Some(0)` if incomplete.
fn ws_one(conn: &mut Conn, input: &[u8]) -> Option<usize> {
    if input.len() < 2 {
        return Some(0);
    }
    let (b0, b1) = (input[0], input[1]);
    let opcode = b0 & 0x0f;
    let masked = b1 & 0x80 != 0;
    let (len, mut pos) = match b1 & 0x7f {
        126 if input.len() >= 4 => (u16::from_be_bytes([input[2], input[3]]) as u64, 4),
        127 if input.len() >= 10 => (
            u64::from_be_bytes(input[2..10].try_into().expect("8 bytes")),
            10,
        ),
        126 | 127 => return Some(0),
        n => (n as u64, 2),
    };
    if len > MAX_PENDING as u64 {
        return None;
    }
    let len = len as usize;
    let mask = if masked {
        if input.len() < pos + 4 {
            return Some(0);
        }
        let m = [input[pos], input[pos + 1], input[pos + 2], input[pos + 3]];
        pos += 4;
        Some(m)
    } else {
        None
    };
    if input.len() < pos + len {
        return Some(0);
    }
    let payload = &input[pos..pos + len];
    let out_b0 = match opcode {
        0x0..=0x2 => b0,               // data: echo with the same FIN/opcode
        0x9 => (b0 & 0xf0) | 0xA,      // ping → pong
        0xA => return Some(pos + len), // pong: ignore
        0x8 => {
            conn.close_after = true;
            b0
        }
        _ => return None,
    };
    conn.wbuf.push(out_b0);
    if len < 126 {
        conn.wbuf.push(len as u8);
    } else if len <= u16::MAX as usize {
        conn.wbuf.push(126);
        conn.wbuf.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        conn.wbuf.push(127);
        conn.wbuf.extend_from_slice(&(len as u64).to_be_bytes());
    }
    let start = conn.wbuf.len();
    conn.wbuf.extend_from_slice(payload);
    if let Some(m) = mask {
        for (i, b) in conn.wbuf[start..].iter_mut().enumerate() {
            *b ^= m[i & 3];
        }
    }
    Some(pos + len)
}
