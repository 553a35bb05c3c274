//! A recording backend for hostile-input tests: a std `TcpListener` on `127.0.0.1:0` whose
//! accept thread stores every byte received, per connection and in accept order, and notes
//! when each connection reached EOF. It answers according to a [`Mode`].
//!
//! Tests assert on what crossed the balancer ("the backend received nothing", "exactly one
//! Content-Length", "this connection was closed and never reused") rather than on what the
//! balancer says it did.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// The canned answer of [`Mode::Ok`].
pub const OK_RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

/// How the recorder answers.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Parse request heads (and Content-Length / chunked bodies, minimally) and answer each
    /// complete request with [`OK_RESPONSE`], keep-alive.
    Ok,
    /// Like [`Mode::Ok`] but answering each complete request with these exact bytes.
    Each(Vec<u8>),
    /// After the first complete request head on a connection, write these exact bytes once
    /// and keep reading (an empty vector = a backend that never answers).
    Raw(Vec<u8>),
}

/// What one backend connection carried.
#[derive(Debug, Clone, Default)]
pub struct Record {
    /// Every byte received, in order.
    pub bytes: Vec<u8>,
    /// The balancer closed its side (read returned 0 or failed).
    pub eof: bool,
}

impl Record {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

type Shared = Arc<Mutex<Vec<Record>>>;

/// Stops the threads when dropped.
pub struct Recorder {
    addr: SocketAddr,
    records: Shared,
    stop: Arc<AtomicBool>,
}

impl Recorder {
    pub fn start(mode: Mode) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind recorder");
        let addr = listener.local_addr().expect("recorder addr");
        let records: Shared = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (sink, flag) = (Arc::clone(&records), Arc::clone(&stop));
        thread::spawn(move || {
            for stream in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let idx = {
                    let mut recs = sink.lock().unwrap();
                    recs.push(Record::default());
                    recs.len() - 1
                };
                let (sink, flag, mode) = (Arc::clone(&sink), Arc::clone(&flag), mode.clone());
                thread::spawn(move || serve(stream, idx, &sink, &flag, &mode));
            }
        });
        Recorder {
            addr,
            records,
            stop,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `-B` value pointing the balancer here.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A snapshot of every connection so far, in accept order.
    pub fn records(&self) -> Vec<Record> {
        self.records.lock().unwrap().clone()
    }

    /// Connections accepted so far.
    pub fn count(&self) -> usize {
        self.records.lock().unwrap().len()
    }

    /// Bytes received over all connections.
    pub fn total_bytes(&self) -> usize {
        self.records
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.bytes.len())
            .sum()
    }

    /// Everything received, connections concatenated in accept order (lossy UTF-8).
    pub fn all_text(&self) -> String {
        self.records().iter().map(Record::text).collect()
    }

    /// Waits until some connection's bytes contain `needle`; its index.
    pub fn wait_for(&self, needle: &[u8], timeout: Duration) -> Option<usize> {
        let mut found = None;
        wait_until(timeout, || {
            found = self
                .records()
                .iter()
                .position(|r| contains(&r.bytes, needle));
            found.is_some()
        });
        found
    }

    /// Waits until connection `idx` has seen EOF.
    pub fn wait_eof(&self, idx: usize, timeout: Duration) -> bool {
        wait_until(timeout, || self.records().get(idx).is_some_and(|r| r.eof))
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

/// Polls `cond` every 5 ms until it holds or `timeout` passes (self-contained so this file
/// can be included with `#[path]` or as `common::recorder`).
fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

fn serve(mut stream: TcpStream, idx: usize, records: &Shared, stop: &AtomicBool, mode: &Mode) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let mut pending = Vec::new(); // bytes not yet consumed by the request parser
    let mut raw_sent = false;
    let mut broken = false; // the parser gave up: keep recording, stop answering
    let started = Instant::now();
    let mut tmp = [0u8; 16 * 1024];
    loop {
        if stop.load(Ordering::SeqCst) || started.elapsed() > Duration::from_secs(120) {
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
        let n = match stream.read(&mut tmp) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => break,
        };
        let fresh = &tmp[..n];
        records.lock().unwrap()[idx].bytes.extend_from_slice(fresh);
        match mode {
            Mode::Raw(bytes) => {
                if !raw_sent {
                    pending.extend_from_slice(fresh);
                    if contains(&pending, b"\r\n\r\n") {
                        raw_sent = true;
                        pending.clear();
                        if stream.write_all(bytes).is_err() {
                            break;
                        }
                    }
                }
            }
            Mode::Ok | Mode::Each(_) => {
                if broken {
                    continue;
                }
                pending.extend_from_slice(fresh);
                let answer: &[u8] = match mode {
                    Mode::Each(b) => b,
                    _ => OK_RESPONSE,
                };
                loop {
                    match parse_request(&pending) {
                        Parsed::Complete(len) => {
                            pending.drain(..len);
                            if stream.write_all(answer).is_err() {
                                broken = true;
                                break;
                            }
                        }
                        Parsed::Partial => break,
                        Parsed::Invalid => {
                            broken = true;
                            break;
                        }
                    }
                }
            }
        }
    }
    records.lock().unwrap()[idx].eof = true;
}

enum Parsed {
    /// A whole request (head and body) of this many bytes.
    Complete(usize),
    Partial,
    Invalid,
}

fn parse_request(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Invalid,
    };
    let mut chunked = false;
    let mut length = 0usize;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = String::from_utf8_lossy(h.value)
                .to_ascii_lowercase()
                .trim_end()
                .ends_with("chunked");
        } else if h.name.eq_ignore_ascii_case("content-length") {
            match std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
            {
                Some(n) => length = n,
                None => return Parsed::Invalid,
            }
        }
    }
    let body = &buf[head_len..];
    if !chunked {
        return if body.len() >= length {
            Parsed::Complete(head_len + length)
        } else {
            Parsed::Partial
        };
    }
    match chunked_len(body) {
        Parsed::Complete(n) => Parsed::Complete(head_len + n),
        other => other,
    }
}

/// Length of a complete chunked body (with trailers) at the start of `body`.
fn chunked_len(body: &[u8]) -> Parsed {
    let mut pos = 0;
    loop {
        let Some(eol) = find(&body[pos..], b"\r\n") else {
            return Parsed::Partial;
        };
        let line = &body[pos..pos + eol];
        let size = line.split(|&b| b == b';').next().unwrap_or_default();
        let Some(size) = std::str::from_utf8(size)
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
        else {
            return Parsed::Invalid;
        };
        pos += eol + 2;
        if size == 0 {
            // Trailer fields, then an empty line.
            loop {
                let Some(eol) = find(&body[pos..], b"\r\n") else {
                    return Parsed::Partial;
                };
                pos += eol + 2;
                if eol == 0 {
                    return Parsed::Complete(pos);
                }
            }
        }
        if body.len() < pos + size + 2 {
            return Parsed::Partial;
        }
        if &body[pos + size..pos + size + 2] != b"\r\n" {
            return Parsed::Invalid;
        }
        pos += size + 2;
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
