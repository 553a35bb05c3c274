//! Shared harness: real `echo_backend` processes, a real `wslb` process, raw HTTP and
//! WebSocket clients over std sockets. Every wait has a deadline; every socket a read timeout.
//!
//! `WSLB_TEST_DIRECT=1` validates the clients without a balancer: `Balancer::start` spawns
//! nothing and hands out the first backend's address (and pid, for `rss_kib`).
#![allow(dead_code)] // each test binary uses a different subset

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use std::{env, fs, thread};

use tungstenite::WebSocket;

/// Read/write timeout on every client socket and deadline for process start-up.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Polls `cond` every 5 ms until it holds (`true`) or `timeout` passes (`false`).
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
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

/// `wslb` in the real crate; `None` in the scratch crate that only has the backend.
pub fn wslb_bin() -> Option<PathBuf> {
    option_env!("CARGO_BIN_EXE_wslb").map(PathBuf::from)
}

/// `examples/echo_backend`: next to the `wslb` binary (`target/<profile>/examples/`), or a
/// `[[bin]]` of the same name in the scratch crate.
pub fn echo_backend_bin() -> PathBuf {
    if let Some(bin) = option_env!("CARGO_BIN_EXE_echo_backend") {
        return bin.into();
    }
    let wslb =
        wslb_bin().expect("neither CARGO_BIN_EXE_echo_backend nor CARGO_BIN_EXE_wslb is set");
    let dir = wslb.parent().expect("binary directory");
    let bin = dir.join("examples").join("echo_backend");
    // `cargo test` builds examples, `cargo test --test NAME` does not.
    assert!(
        bin.exists(),
        "{} missing: run `cargo build --examples`",
        bin.display()
    );
    bin
}

fn direct_mode() -> bool {
    env::var_os("WSLB_TEST_DIRECT").is_some_and(|v| v == "1")
}

/// The `127.0.0.1:PORT` following "listening on" in a log line.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    if line.contains("control listening on ") || line.contains("tls listening on ") {
        return None;
    }
    addr_after(line, "listening on ")
}

fn addr_after(line: &str, marker: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(marker)? + marker.len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Kills and reaps the child when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Backend {
    child: ChildGuard,
    addr: SocketAddr,
    pub name: String,
}

impl Backend {
    pub fn start(name: &str) -> Backend {
        let mut child = Command::new(echo_backend_bin())
            .args(["--name", name])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn echo_backend");
        let stdout = child.stdout.take().expect("stdout");
        let child = ChildGuard(child);
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read echo_backend stdout");
        let addr = listening_addr(&line).unwrap_or_else(|| panic!("echo_backend said {line:?}"));
        Backend {
            child,
            addr,
            name: name.to_string(),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// A counter from the backend's `GET /stats`: `ws_active` or `slow_active`.
    pub fn stat(&self, name: &str) -> usize {
        let body = get(self.addr, "/stats").text();
        let mut values = body
            .lines()
            .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' '));
        values
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {body:?}"))
    }
}

pub struct Balancer {
    child: Option<ChildGuard>,
    addr: SocketAddr,
    pid: u32,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Balancer {
    /// `wslb -l 127.0.0.1:0 -B <url>... <extra>...`, waiting for its "listening on" line.
    pub fn start(extra: &[&str], backends: &[&Backend]) -> Balancer {
        Balancer::start_limited(extra, backends, None)
    }

    /// Like [`Balancer::start`], with the process's descriptor limit (soft and hard) set to
    /// `nofile` before it starts.
    pub fn start_limited(
        extra: &[&str],
        backends: &[&Backend],
        nofile: Option<libc::rlim_t>,
    ) -> Balancer {
        if direct_mode() {
            let b = backends.first().expect("direct mode needs a backend");
            let lines = Arc::default();
            return Balancer {
                child: None,
                addr: b.addr(),
                pid: b.pid(),
                lines,
            };
        }
        let mut cmd = Command::new(wslb_bin().expect("CARGO_BIN_EXE_wslb is not set"));
        cmd.args(["-l", "127.0.0.1:0"]);
        for b in backends {
            cmd.args(["-B", &b.url()]);
        }
        cmd.args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            let lim = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: setrlimit is async-signal-safe and only reads `lim`, copied in.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::last_os_error())
                    }
                });
            }
        }
        let mut child = cmd.spawn().expect("spawn wslb");
        let stderr = child.stderr.take().expect("stderr");
        let mut child = ChildGuard(child);
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = Arc::clone(&lines);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut addr = None;
        let started = wait_until(TIMEOUT, || {
            addr = lines.lock().unwrap().iter().find_map(|l| listening_addr(l));
            addr.is_some() || matches!(child.0.try_wait(), Ok(Some(_)))
        });
        let (true, Some(addr)) = (started, addr) else {
            panic!(
                "wslb did not start listening; stderr: {:#?}",
                lines.lock().unwrap()
            );
        };
        let pid = child.0.id();
        Balancer {
            child: Some(child),
            addr,
            pid,
            lines,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The `--control` listener's address (pass `--control 127.0.0.1:0`).
    pub fn control_addr(&self) -> SocketAddr {
        let mut addr = None;
        wait_until(TIMEOUT, || {
            addr = self
                .stderr_lines()
                .iter()
                .find_map(|l| addr_after(l, "control listening on "));
            addr.is_some()
        });
        addr.expect("no control listener in stderr")
    }

    /// The first `--tls-listen` listener's address.
    pub fn tls_addr(&self) -> SocketAddr {
        let mut addr = None;
        wait_until(TIMEOUT, || {
            addr = self
                .stderr_lines()
                .iter()
                .find_map(|l| addr_after(l, "tls listening on "));
            addr.is_some()
        });
        addr.expect("no tls listener in stderr")
    }

    /// Waits until a stderr line contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || {
            self.stderr_lines().iter().any(|l| l.contains(needle))
        })
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Resident set size from /proc/PID/status.
    pub fn rss_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid)).expect("proc status");
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .expect("VmRSS");
        line.split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .expect("VmRSS value")
    }

    pub fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        assert!(ok.expect("run kill").success(), "kill -TERM {}", self.pid);
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = &mut self
            .child
            .as_mut()
            .expect("no wslb process in direct mode")
            .0;
        let mut status = None;
        wait_until(timeout, || {
            status = child.try_wait().expect("try_wait");
            status.is_some()
        });
        status
    }
}

/// Runs `wslb ARGS` to completion (killed after `TIMEOUT`): (status, stdout, stderr).
pub fn run_wslb(args: &[&str]) -> (ExitStatus, String, String) {
    let mut cmd = Command::new(wslb_bin().expect("CARGO_BIN_EXE_wslb is not set"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = ChildGuard(cmd.spawn().expect("spawn wslb"));
    let drain = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut text = String::new();
            pipe.read_to_string(&mut text).map(|_| text)
        })
    };
    let out = drain(Box::new(child.0.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.0.stderr.take().expect("stderr")));
    let mut status = None;
    wait_until(TIMEOUT, || {
        status = child.0.try_wait().expect("try_wait");
        status.is_some()
    });
    drop(child); // kills it if still running, so the pipes reach EOF
    let (out, err) = (
        out.join().unwrap().expect("stdout"),
        err.join().unwrap().expect("stderr"),
    );
    let status = status.unwrap_or_else(|| panic!("wslb {args:?} did not exit; stderr: {err}"));
    (status, out, err)
}

pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(TIMEOUT)).unwrap();
    stream
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        let mut it = self.headers.iter();
        it.find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn is_chunked(&self) -> bool {
        self.header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    }
}

/// A keep-alive HTTP/1.1 client; `buf` keeps bytes past the current response (pipelining).
pub struct HttpClient {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl HttpClient {
    pub fn is_timeout(e: &io::Error) -> bool {
        matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        )
    }

    pub fn connect(addr: SocketAddr) -> HttpClient {
        HttpClient {
            stream: connect(addr),
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, raw: &[u8]) {
        self.stream.write_all(raw).expect("send request");
    }

    /// Reads more bytes into the buffer; `Ok(false)` on EOF.
    pub fn fill(&mut self) -> io::Result<bool> {
        let mut tmp = [0u8; 64 * 1024];
        let n = self.stream.read(&mut tmp)?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n > 0)
    }

    fn take(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if !self.fill()? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    fn line(&mut self) -> io::Result<String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.take(i + 2)?;
                return Ok(String::from_utf8_lossy(&line[..i]).into_owned());
            }
            if !self.fill()? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Status line and headers; `body` is left empty for the caller to read.
    pub fn read_head(&mut self) -> io::Result<Response> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut parsed = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(len) =
                parsed.parse(&self.buf).map_err(io::Error::other)?
            {
                let headers = (parsed.headers.iter())
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                let status = parsed.code.expect("status code");
                self.buf.drain(..len);
                return Ok(Response {
                    status,
                    headers,
                    body: Vec::new(),
                });
            }
            if !self.fill()? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Fills `out` with the next body bytes (for a body read piecemeal).
    pub fn read_exact_body(&mut self, out: &mut [u8]) -> io::Result<()> {
        out.copy_from_slice(&self.take(out.len())?);
        Ok(())
    }

    /// The next chunk of a chunked body; `None` after the last chunk (trailers consumed).
    pub fn read_chunk(&mut self) -> io::Result<Option<Vec<u8>>> {
        let line = self.line()?;
        let size = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size, 16).map_err(io::Error::other)?;
        if size == 0 {
            while !self.line()?.is_empty() {}
            return Ok(None);
        }
        let data = self.take(size)?;
        assert_eq!(self.line()?, "", "chunk data not followed by CRLF");
        Ok(Some(data))
    }

    /// Reads the body of `resp` (whose head was just read) by its framing.
    pub fn read_body(&mut self, resp: &mut Response) -> io::Result<()> {
        if resp.status < 200 || resp.status == 204 || resp.status == 304 {
            return Ok(());
        }
        if resp.is_chunked() {
            while let Some(data) = self.read_chunk()? {
                resp.body.extend(data);
            }
        } else if let Some(len) = resp.header("content-length") {
            resp.body = self.take(len.trim().parse().map_err(io::Error::other)?)?;
        } else {
            while self.fill()? {}
            resp.body = std::mem::take(&mut self.buf);
        }
        Ok(())
    }

    pub fn read_response(&mut self) -> io::Result<Response> {
        let mut resp = self.read_head()?;
        self.read_body(&mut resp)?;
        Ok(resp)
    }

    /// True once the peer has closed: EOF or reset, not a timeout. Unread bytes count as open.
    pub fn is_closed(&mut self) -> bool {
        self.buf.is_empty()
            && match self.fill() {
                Ok(more) => !more,
                Err(e) => !is_timeout(&e),
            }
    }
}

/// One request on a fresh connection.
pub fn http_request(addr: SocketAddr, raw: &[u8]) -> Response {
    let mut client = HttpClient::connect(addr);
    client.send(raw);
    client.read_response().expect("read response")
}

/// `GET path` with `Connection: close` on a fresh connection.
pub fn get(addr: SocketAddr, path: &str) -> Response {
    http_request(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

pub fn ws_connect(addr: SocketAddr, path: &str) -> WebSocket<TcpStream> {
    let url = format!("ws://{addr}{path}");
    let (ws, _resp) = tungstenite::client::client(url.as_str(), connect(addr))
        .unwrap_or_else(|e| panic!("WebSocket handshake with {url}: {e}"));
    ws
}

/// Sends `whoami` and returns the backend's name.
pub fn whoami(ws: &mut WebSocket<TcpStream>) -> String {
    ws.send(tungstenite::Message::text("whoami"))
        .expect("send whoami");
    ws.read()
        .expect("whoami answer")
        .into_text()
        .expect("text")
        .to_string()
}

/// Close handshake, then wait for the server side to close TCP (the balancer is done with it).
pub fn ws_close(mut ws: WebSocket<TcpStream>) {
    ws.close(None).expect("send close");
    loop {
        match ws.read() {
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => return,
            Err(tungstenite::Error::Io(e)) if !is_timeout(&e) => return,
            Err(e) => panic!("closing WebSocket: {e}"),
        }
    }
}

/// One masked client frame (RFC 6455 §5.2), for fragmentation and flooding tests.
pub fn ws_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![opcode | if fin { 0x80 } else { 0 }];
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n @ 126..=0xffff => out.extend([0x80 | 126].into_iter().chain((n as u16).to_be_bytes())),
        n => out.extend([0x80 | 127].into_iter().chain((n as u64).to_be_bytes())),
    }
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// A loopback port nothing listens on right now (bound, then released).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// `wslb agent ARGS --binding ws://127.0.0.1:P --guid GUID -- echo_backend --name NAME`, the
/// backend on a free port and supervised by the agent.
pub struct Agent(Child);

impl Agent {
    pub fn start(args: &[&str], guid: &str, name: &str) -> Agent {
        let child = Agent::command(args, guid, name)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn wslb agent");
        Agent(child)
    }

    /// Like [`Agent::start`] with `--local 127.0.0.1:0 --local-token TOKEN`; returns the
    /// local messaging endpoint's address too (from the agent's stderr).
    pub fn start_local(args: &[&str], guid: &str, name: &str, token: &str) -> (Agent, SocketAddr) {
        let mut child = Agent::command(args, guid, name)
            .args_before_child(&["--local", "127.0.0.1:0", "--local-token", token])
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wslb agent");
        let stderr = child.stderr.take().expect("stderr");
        let agent = Agent(child);
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(a) = addr_after(&line, "local endpoint on http://") {
                    let _ = tx.send(a);
                }
            }
        });
        let addr = rx
            .recv_timeout(TIMEOUT)
            .expect("agent's local endpoint line");
        (agent, addr)
    }

    fn command(args: &[&str], guid: &str, name: &str) -> AgentCommand {
        let port = free_port();
        let mut flags: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        flags.extend([
            "--binding".into(),
            format!("ws://127.0.0.1:{port}"),
            "--guid".into(),
            guid.into(),
        ]);
        let child = vec![
            echo_backend_bin().display().to_string(),
            "--name".into(),
            name.into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
        ];
        AgentCommand { flags, child }
    }
}

/// `wslb agent FLAGS -- CHILD`, built up before it is spawned.
pub struct AgentCommand {
    flags: Vec<String>,
    child: Vec<String>,
}

impl AgentCommand {
    fn args_before_child(mut self, more: &[&str]) -> AgentCommand {
        self.flags.extend(more.iter().map(|a| a.to_string()));
        self
    }

    fn stderr(self, to: Stdio) -> Command {
        let mut c = Command::new(wslb_bin().expect("CARGO_BIN_EXE_wslb is not set"));
        c.arg("agent")
            .args(&self.flags)
            .arg("--")
            .args(&self.child)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(to);
        c
    }
}

impl Drop for Agent {
    /// SIGTERM, not SIGKILL: the agent then stops its child too.
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

/// Headless Chromium without a sandbox, GPU, QUIC or background traffic (docs in
/// /work/shared/PEERS.md).
pub const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
];

/// The Python the tests drive third-party peers with: the project's virtual environment
/// (`make test-deps` creates `.venv` and installs the peers there), else `python3`.
pub fn python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python3");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// A program from the project's virtual environment (`gunicorn`, `uvicorn`), else from PATH.
pub fn venv_tool(name: &str) -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(".venv/bin")
        .join(name);
    if venv.exists() {
        venv
    } else {
        PathBuf::from(name)
    }
}

/// Headless Chromium with the flags PEERS.md lists (no network of its own, no first-run
/// work) and a fresh profile in `profile`; the caller adds what to do.
pub fn headless_chromium(browser: &std::path::Path, profile: &std::path::Path) -> Command {
    let mut cmd = Command::new(browser);
    cmd.args(CHROMIUM_FLAGS)
        .arg(format!("--user-data-dir={}", profile.display()));
    cmd
}
