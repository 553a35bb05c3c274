//! Test/demo backend for wslb: HTTP/1.1 and WebSocket echo on one port, one thread per
//! connection (blocking I/O keeps it obviously correct; it is not the balancer).
//!
//! `echo_backend [--name NAME] [--listen ADDR]` prints `listening on 127.0.0.1:PORT` once bound.
//! Every HTTP response carries `X-Backend: NAME`. Routes: `/` (and unknown paths), `POST /echo`,
//! `/chunked?n=&size=`, `/sse?n=&interval_ms=`, `/close`, `/big?bytes=`, `/slow?ms=`,
//! `/status?code=`, `/headers` (the request headers as the body), `/stats` (open WebSockets and
//! `/slow` requests in progress, pongs received). WebSocket: echo; `whoami` → NAME; `close-me` →
//! the TCP connection is dropped without a close frame; `frags N` → N text messages
//! `fragment-message-<i>`, each sent as 3 fragments with 1 ms between fragments (so frames
//! injected by a balancer have every chance to land mid-message if it were wrong).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use std::{env, process, thread};

use tungstenite::protocol::Role;
use tungstenite::{Message, WebSocket};

/// WebSocket connections open and `/slow` requests in progress (reported by `GET /stats`).
static WS_ACTIVE: AtomicUsize = AtomicUsize::new(0);
static SLOW_ACTIVE: AtomicUsize = AtomicUsize::new(0);
/// Pong frames received (`pongs`), and those whose payload starts with `wslb`, the prefix of
/// the balancer's own pings (`wslb_pongs`): the balancer must consume those itself.
static PONGS: AtomicUsize = AtomicUsize::new(0);
static WSLB_PONGS: AtomicUsize = AtomicUsize::new(0);
/// Pause between the fragments of a `frags N` message.
const FRAGMENT_PAUSE: Duration = Duration::from_millis(1);
const MAX_HEAD: usize = 1 << 20;
const BIG_WRITE: usize = 64 * 1024;

fn main() {
    let (mut name, mut listen) = ("echo".to_string(), "127.0.0.1:0".to_string());
    let mut args = env::args().skip(1);
    while let Some(arg) = args.next() {
        let slot = match arg.as_str() {
            "--name" => &mut name,
            "--listen" => &mut listen,
            _ => usage(&format!("unknown argument {arg}")),
        };
        *slot = args
            .next()
            .unwrap_or_else(|| usage(&format!("{arg} needs a value")));
    }
    let listener = TcpListener::bind(&listen).unwrap_or_else(|e| {
        eprintln!("echo_backend: cannot listen on {listen}: {e}");
        process::exit(1)
    });
    let addr = listener.local_addr().expect("local_addr");
    println!("listening on {addr}");
    io::stdout().flush().expect("flush stdout");
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let name = name.clone();
        thread::spawn(move || {
            let _ = serve(
                Conn {
                    stream,
                    buf: Vec::new(),
                },
                &name,
                addr.port(),
            );
        });
    }
}

fn usage(msg: &str) -> ! {
    eprintln!("echo_backend: {msg}\nusage: echo_backend [--name NAME] [--listen ADDR]");
    process::exit(2)
}

/// A blocking stream plus the bytes read past what has been consumed (clients pipeline).
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    /// Reads more bytes into `buf`; `false` on EOF.
    fn fill(&mut self) -> io::Result<bool> {
        let mut tmp = [0u8; 16 * 1024];
        let n = self.stream.read(&mut tmp)?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n > 0)
    }

    fn need(&mut self, n: usize) -> io::Result<()> {
        while self.buf.len() < n {
            if !self.fill()? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }

    fn take(&mut self, n: usize) -> io::Result<Vec<u8>> {
        self.need(n)?;
        Ok(self.buf.drain(..n).collect())
    }

    /// One CRLF-terminated line, without the CRLF.
    fn line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let mut l = self.take(i + 2)?;
                l.truncate(i);
                return Ok(l);
            }
            if self.buf.len() > MAX_HEAD || !self.fill()? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

struct Req {
    method: String,
    path: String,
    query: String,
    version: u8,
    headers: Vec<(String, String)>,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        let mut it = self.headers.iter();
        it.find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        let mut values = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name));
        values.any(|(_, v)| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }

    fn param(&self, key: &str, default: u64) -> u64 {
        let mut pairs = self.query.split('&').filter_map(|kv| kv.split_once('='));
        let value = pairs.find(|(k, _)| *k == key).map(|(_, v)| v.parse());
        value.and_then(Result::ok).unwrap_or(default)
    }
}

/// `Ok(None)` on a clean EOF between requests; `InvalidData` on a malformed head.
fn read_head(conn: &mut Conn) -> io::Result<Option<Req>> {
    loop {
        if !conn.buf.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; 128];
            let mut parsed = httparse::Request::new(&mut headers);
            let status = parsed
                .parse(&conn.buf)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
            if let httparse::Status::Complete(len) = status? {
                let target = parsed.path.unwrap_or("/");
                let (path, query) = target.split_once('?').unwrap_or((target, ""));
                let req = Req {
                    method: parsed.method.unwrap_or("GET").to_string(),
                    path: path.to_string(),
                    query: query.to_string(),
                    version: parsed.version.unwrap_or(1),
                    headers: parsed
                        .headers
                        .iter()
                        .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into()))
                        .collect(),
                };
                conn.buf.drain(..len);
                return Ok(Some(req));
            }
        }
        if conn.buf.len() > MAX_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "head too large"));
        }
        if !conn.fill()? {
            return Ok(None);
        }
    }
}

fn read_body(conn: &mut Conn, req: &Req) -> io::Result<Vec<u8>> {
    if req.has_token("transfer-encoding", "chunked") {
        let mut body = Vec::new();
        loop {
            let line = String::from_utf8_lossy(&conn.line()?).into_owned();
            let size = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size, 16).map_err(io::Error::other)?;
            if size == 0 {
                while !conn.line()?.is_empty() {} // trailers
                return Ok(body);
            }
            body.extend(conn.take(size)?);
            if !conn.line()?.is_empty() {
                return Err(io::Error::other("chunk not followed by CRLF"));
            }
        }
    }
    let len = req.header("content-length").map_or(Ok(0), str::parse);
    conn.take(len.map_err(io::Error::other)?)
}

fn serve(mut conn: Conn, name: &str, port: u16) -> io::Result<()> {
    loop {
        let req = match read_head(&mut conn) {
            Ok(Some(req)) => req,
            Ok(None) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return simple(&mut conn.stream, 400, name, false, &[], b"bad request\n");
            }
            Err(e) => return Err(e),
        };
        if req.method == "GET" && req.has_token("upgrade", "websocket") {
            return serve_ws(conn, &req, name);
        }
        if req.version == 1
            && req
                .header("expect")
                .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
        {
            conn.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let body = read_body(&mut conn, &req)?;
        let keep = req.version == 1 && !req.has_token("connection", "close");
        if !respond(&mut conn.stream, &req, body, name, port, keep)? || !keep {
            return Ok(());
        }
    }
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

fn response_head(code: u16, name: &str, keep: bool, extra: &[(&str, String)]) -> String {
    let mut head = format!("HTTP/1.1 {code} {}\r\nX-Backend: {name}\r\n", reason(code));
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !keep {
        head.push_str("Connection: close\r\n");
    }
    head + "\r\n"
}

/// Writes a Content-Length response (none for 1xx/204/304).
fn simple(
    s: &mut TcpStream,
    code: u16,
    name: &str,
    keep: bool,
    extra: &[(&str, String)],
    body: &[u8],
) -> io::Result<()> {
    let bodiless = code < 200 || code == 204 || code == 304;
    let mut headers = extra.to_vec();
    if !bodiless {
        headers.push(("Content-Length", body.len().to_string()));
    }
    let mut out = response_head(code, name, keep, &headers).into_bytes();
    if !bodiless {
        out.extend_from_slice(body);
    }
    s.write_all(&out)
}

fn chunk(s: &mut TcpStream, data: &[u8]) -> io::Result<()> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    s.write_all(&out)?;
    s.flush()
}

/// Answers one request; `Ok(false)` when the connection must close afterwards.
fn respond(
    s: &mut TcpStream,
    req: &Req,
    body: Vec<u8>,
    name: &str,
    port: u16,
    keep: bool,
) -> io::Result<bool> {
    let text = ("Content-Type", "text/plain".to_string());
    let chunked = ("Transfer-Encoding", "chunked".to_string());
    match req.path.as_str() {
        "/demo" => {
            let html = ("Content-Type", "text/html; charset=utf-8".to_string());
            simple(s, 200, name, keep, &[html], DEMO_PAGE.as_bytes())?;
        }
        "/echo" => {
            let len = ("X-Body-Len", body.len().to_string());
            simple(s, 200, name, keep, &[len], &body)?;
        }
        "/chunked" => {
            s.write_all(response_head(200, name, keep, &[text, chunked]).as_bytes())?;
            let size = req.param("size", 10) as usize;
            for i in 0..req.param("n", 5) {
                chunk(s, &vec![b'a' + (i % 26) as u8; size])?;
            }
            s.write_all(b"0\r\n\r\n")?;
        }
        "/sse" => {
            let sse = ("Content-Type", "text/event-stream".to_string());
            s.write_all(response_head(200, name, keep, &[sse, chunked]).as_bytes())?;
            for i in 0..req.param("n", 5) {
                if i > 0 {
                    thread::sleep(Duration::from_millis(req.param("interval_ms", 100)));
                }
                chunk(s, format!("data: {name} {i}\n\n").as_bytes())?;
            }
            s.write_all(b"0\r\n\r\n")?;
        }
        "/close" => {
            let head = response_head(200, name, false, &[text]);
            s.write_all(format!("{head}closed by {name}\n").as_bytes())?;
            s.shutdown(Shutdown::Write)?;
            return Ok(false);
        }
        "/big" => {
            let total = req.param("bytes", 0) as usize;
            let len = ("Content-Length", total.to_string());
            s.write_all(response_head(200, name, keep, &[len]).as_bytes())?;
            // body[i] = b'a' + i % 26, so a client can check any slice of it.
            let pattern: Vec<u8> = (0..BIG_WRITE + 26).map(|i| b'a' + (i % 26) as u8).collect();
            let mut sent = 0;
            while sent < total {
                let n = BIG_WRITE.min(total - sent);
                s.write_all(&pattern[sent % 26..sent % 26 + n])?;
                sent += n;
            }
        }
        "/status" => {
            let code = req.param("code", 200).clamp(200, 599) as u16;
            simple(
                s,
                code,
                name,
                keep,
                &[text],
                format!("status {code}\n").as_bytes(),
            )?;
        }
        "/headers" => {
            let lines: String = req
                .headers
                .iter()
                .map(|(k, v)| format!("{k}: {v}\n"))
                .collect();
            simple(s, 200, name, keep, &[text], lines.as_bytes())?;
        }
        "/stats" => {
            let (ws, slow) = (
                WS_ACTIVE.load(Ordering::SeqCst),
                SLOW_ACTIVE.load(Ordering::SeqCst),
            );
            let (pongs, wslb_pongs) = (
                PONGS.load(Ordering::SeqCst),
                WSLB_PONGS.load(Ordering::SeqCst),
            );
            let stats = format!(
                "ws_active {ws}\nslow_active {slow}\npongs {pongs}\nwslb_pongs {wslb_pongs}\n"
            );
            simple(s, 200, name, keep, &[text], stats.as_bytes())?;
        }
        path => {
            if path == "/slow" {
                SLOW_ACTIVE.fetch_add(1, Ordering::SeqCst);
                let _guard = ActiveGuard(&SLOW_ACTIVE);
                thread::sleep(Duration::from_millis(req.param("ms", 100)));
            }
            let body = format!("backend {name} port {port}\n");
            let body = if req.method == "HEAD" {
                ""
            } else {
                body.as_str()
            };
            simple(s, 200, name, keep, &[text], body.as_bytes())?;
        }
    }
    Ok(true)
}

/// Decrements its counter when dropped.
struct ActiveGuard(&'static AtomicUsize);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn serve_ws(mut conn: Conn, req: &Req, name: &str) -> io::Result<()> {
    let Some(key) = req.header("sec-websocket-key") else {
        simple(
            &mut conn.stream,
            400,
            name,
            false,
            &[],
            b"missing Sec-WebSocket-Key\n",
        )?;
        return Ok(());
    };
    let accept = tungstenite::handshake::derive_accept_key(key.trim().as_bytes());
    let head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\nX-Backend: {name}\r\n\r\n"
    );
    conn.stream.write_all(head.as_bytes())?;
    WS_ACTIVE.fetch_add(1, Ordering::SeqCst);
    let _guard = ActiveGuard(&WS_ACTIVE);
    // The id wslb gives this client (X-Wslb-Client), for backend → client messaging tests.
    let client_id = req
        .header("x-wslb-client")
        .unwrap_or("-")
        .trim()
        .to_string();
    let mut ws = WebSocket::from_partially_read(conn.stream, conn.buf, Role::Server, None);
    ws_echo(&mut ws, name, &client_id).map_err(io::Error::other)
}

fn ws_echo(ws: &mut WebSocket<TcpStream>, name: &str, client_id: &str) -> tungstenite::Result<()> {
    loop {
        match ws.read() {
            Ok(Message::Text(t)) if t.as_str() == "whoami" => ws.send(Message::text(name))?,
            Ok(Message::Text(t)) if t.as_str() == "whoami-id" => {
                ws.send(Message::text(client_id))?
            }
            Ok(Message::Text(t)) if t.as_str() == "close-me" => {
                // Abrupt loss: no close frame, just the TCP connection going away.
                return Ok(ws.get_ref().shutdown(Shutdown::Both)?);
            }
            Ok(Message::Text(t)) if t.as_str().starts_with("frags ") => {
                let n = t.as_str()["frags ".len()..].trim().parse().unwrap_or(0);
                send_fragmented(ws, n)?;
            }
            Ok(msg @ (Message::Text(_) | Message::Binary(_))) => ws.send(msg)?,
            Ok(Message::Pong(payload)) => {
                PONGS.fetch_add(1, Ordering::SeqCst);
                if payload.starts_with(b"wslb") {
                    WSLB_PONGS.fetch_add(1, Ordering::SeqCst);
                }
            }
            Ok(_) => {} // tungstenite answers pings and close frames itself
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                return Ok(())
            }
            Err(e) => return Err(e),
        }
    }
}

/// `frags N`: N text messages `fragment-message-<i>`, each as 3 frames (text, continuation,
/// final continuation), flushed one by one with a pause after each.
fn send_fragmented(ws: &mut WebSocket<TcpStream>, n: usize) -> tungstenite::Result<()> {
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    use tungstenite::protocol::frame::Frame;
    for i in 0..n {
        let text = format!("fragment-message-{i}");
        let (a, rest) = text.split_at(text.len() / 3);
        let (b, c) = rest.split_at(rest.len() / 2);
        let parts = [
            (a, OpCode::Data(Data::Text), false),
            (b, OpCode::Data(Data::Continue), false),
            (c, OpCode::Data(Data::Continue), true),
        ];
        for (part, opcode, fin) in parts {
            let frame = Frame::message(part.as_bytes().to_vec(), opcode, fin);
            ws.send(Message::Frame(frame))?;
            thread::sleep(FRAGMENT_PAUSE);
        }
    }
    Ok(())
}

/// The page `make run` points a browser at: each button press opens a WebSocket through the
/// balancer and shows which backend answered, so the balancing is visible.
const DEMO_PAGE: &str = r#"<!doctype html>
<meta charset="utf-8"><title>wslb demo</title>
<style>body{font:16px system-ui;margin:2em}li{font-family:monospace}</style>
<h1>wslb demo</h1>
<p>Each click opens a new WebSocket through the balancer and asks the backend its name.
Open sockets stay open, so <code>fewest</code> spreads them evenly.</p>
<button id="open">Open a WebSocket</button> <button id="http">Plain HTTP request</button>
<ul id="log"></ul>
<script>
const log = (t) => { const li = document.createElement("li"); li.textContent = t; document.getElementById("log").prepend(li); };
const held = [];
document.getElementById("open").onclick = () => {
  const ws = new WebSocket(location.origin.replace(/^http/, "ws") + "/ws");
  const n = held.push(ws);
  let named = false;
  ws.onopen = () => ws.send("whoami");
  ws.onmessage = async (e) => {
    // Binary frames (a broadcast sent as application/octet-stream) arrive as Blobs.
    const text = typeof e.data === "string" ? e.data : await e.data.text();
    if (!named) { named = true; log("websocket #" + n + " answered by backend " + text); }
    else log("websocket #" + n + " received: " + text);
  };
  ws.onclose = (e) => log("websocket #" + n + " closed, code " + e.code);
};
document.getElementById("http").onclick = async () => {
  const r = await fetch("/");
  log("http: " + (await r.text()).trim());
};
</script>
"#;
