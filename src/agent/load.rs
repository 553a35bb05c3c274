//! Dispatch mode (issue 18): the backend's live client count, sent to every balancer as
//! `{"type":"load","clients":N}` with each heartbeat ping. Dispatched clients connect to the
//! backend directly, so only the backend can count them.
//!
//! Two hooks feed it: the library call [`Agent::report_load`] (a Rust backend counts its
//! own clients), and `wslb agent --load-url http://127.0.0.1:PORT/PATH`, which polls that
//! URL once per heartbeat and reads the body as a decimal count (whitespace around it
//! ignored; anything else, or no answer within the heartbeat, keeps the last count).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use super::{Agent, Shared};

/// Longest `--load-url` answer read: a count is a few bytes, plus the response head.
const MAX_ANSWER: u64 = 8 * 1024;

impl Agent {
    /// Sets the client count sent with each heartbeat to every balancer (until the next call).
    pub fn report_load(&self, clients: u32) {
        report(&self.shared, clients);
    }

    /// A handle that reports the count from another thread (the `--load-url` poller).
    pub fn load_reporter(&self) -> LoadReporter {
        LoadReporter(Arc::clone(&self.shared))
    }
}

fn report(shared: &Shared, clients: u32) {
    shared.update(|b| b.load = Some(clients));
}

/// Reports the client count for an [`Agent`]; see [`Agent::report_load`].
#[derive(Debug, Clone)]
pub struct LoadReporter(Arc<Shared>);

impl LoadReporter {
    /// Same as [`Agent::report_load`].
    pub fn report(&self, clients: u32) {
        report(&self.0, clients);
    }
}

/// Checks `--load-url`: `http://IP:PORT/PATH` (a loopback or IP literal: polled from a
/// plain thread with a blocking socket, no DNS). Returns the address and the path.
pub fn parse_load_url(url: &str) -> Result<(SocketAddr, String), &'static str> {
    const WHY: &str = "expected http://IP:PORT/PATH";
    let rest = url.strip_prefix("http://").ok_or(WHY)?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let addr = authority.parse().map_err(|_| WHY)?;
    let path = if path.is_empty() { "/" } else { path };
    if !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(WHY);
    }
    Ok((addr, path.to_string()))
}

/// One `GET` of the load URL: the count in a 200 answer's body.
pub fn fetch_load(addr: SocketAddr, path: &str, timeout: Duration) -> Option<u32> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = Vec::new();
    s.take(MAX_ANSWER).read_to_end(&mut answer).ok()?;
    parse_answer(&answer)
}

/// The count in a raw HTTP answer: status 200, body a decimal number.
fn parse_answer(answer: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(answer).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?;
    (status == "200").then_some(())?;
    body.trim().parse().ok()
}

/// Polls the load URL every `every` until `stop`, reporting each count read.
pub fn spawn_poller(
    reporter: LoadReporter,
    (addr, path): (SocketAddr, String),
    every: Duration,
    stop: Arc<AtomicBool>,
) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("wslb-agent-load".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(n) = fetch_load(addr, &path, every) {
                    reporter.report(n);
                }
                thread::sleep(every);
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_answers() {
        let (addr, path) = parse_load_url("http://127.0.0.1:8000/load").unwrap();
        assert_eq!((addr.port(), path.as_str()), (8000, "/load"));
        assert_eq!(parse_load_url("http://127.0.0.1:1").unwrap().1, "/");
        for bad in [
            "https://127.0.0.1:1/",
            "http://host:1/",
            "http://127.0.0.1/",
            "x",
        ] {
            assert!(parse_load_url(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_answer(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n 42\n"),
            Some(42)
        );
        assert_eq!(parse_answer(b"HTTP/1.1 500 X\r\n\r\n42"), None);
        assert_eq!(parse_answer(b"HTTP/1.1 200 OK\r\n\r\n-1"), None);
        assert_eq!(parse_answer(b"HTTP/1.1 200 OK\r\n\r\nlots"), None);
    }
}
