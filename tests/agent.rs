//! The registration agent (library and `wslb agent`) against a fake control server: a
//! `tungstenite::accept_hdr` listener on 127.0.0.1:0 that checks the bearer token, records
//! what it receives and answers like docs/PROTOCOL.md says (or misbehaves on purpose).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::http::StatusCode;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::Message;
use wslb::agent::{spawn, AgentConfig, LinkState};
use wslb::control::protocol::{self, BackendMsg, ControlError, Registration};

/// Deadline for anything that should happen "soon".
const DEADLINE: Duration = Duration::from_secs(10);

/// Polls `cond` every 5 ms until it holds (`true`) or `timeout` passes (`false`).
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

/// How the fake answers a `register`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `registered`, then serve `drain`/`deregister` like a balancer.
    Normal,
    /// `registered`, then drop the TCP connection.
    DropAfterRegister,
    /// `error` (bad_version), then close 1008.
    ErrorThenClose,
    /// `registered`, then never read again (so never answer pings).
    Silent,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    /// An upgrade was accepted; the Authorization header it carried.
    Connected(Option<String>),
    /// An upgrade was refused with 401.
    Refused,
    Register(Registration),
    Drain,
    Deregister,
}

struct Fake {
    addr: SocketAddr,
    events: Arc<Mutex<Vec<Event>>>,
    stop: Arc<AtomicBool>,
    /// Clones of accepted sockets, so the fake can cut them.
    streams: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<JoinHandle<()>>,
}

impl Fake {
    fn start(mode: Mode, token: Option<&str>) -> Fake {
        Fake::bind("127.0.0.1:0".parse().unwrap(), mode, token)
    }

    /// Listens on `addr` (std sets SO_REUSEADDR, so a port just released binds again).
    fn bind(addr: SocketAddr, mode: Mode, token: Option<&str>) -> Fake {
        let listener = TcpListener::bind(addr).unwrap();
        let addr = listener.local_addr().unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let streams = Arc::new(Mutex::new(Vec::new()));
        let token = token.map(String::from);
        let (ev, st, ss) = (events.clone(), stop.clone(), streams.clone());
        let accept = thread::spawn(move || {
            for s in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(s) = s else { continue };
                ss.lock().unwrap().push(s.try_clone().unwrap());
                let (ev, st, token) = (ev.clone(), st.clone(), token.clone());
                thread::spawn(move || serve(s, mode, token, ev, st));
            }
        });
        Fake {
            addr,
            events,
            stop,
            streams,
            accept: Some(accept),
        }
    }

    fn url(&self) -> String {
        format!("ws://{}/register", self.addr)
    }

    fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    fn count(&self, f: impl Fn(&Event) -> bool) -> usize {
        self.events.lock().unwrap().iter().filter(|e| f(e)).count()
    }

    fn registrations(&self) -> usize {
        self.count(|e| matches!(e, Event::Register(_)))
    }

    /// Cuts every open connection; keeps listening.
    fn kick(&self) {
        for s in self.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Stops listening and cuts every connection.
    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.accept.take() {
            // Wakes the blocking accept so the thread sees `stop` and drops the listener.
            let _ = TcpStream::connect(self.addr);
            h.join().unwrap();
        }
        self.kick();
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.shutdown();
    }
}

// tungstenite's `Callback` fixes the error type to a full `http::Response`.
#[allow(clippy::result_large_err)]
fn serve(
    stream: TcpStream,
    mode: Mode,
    token: Option<String>,
    events: Arc<Mutex<Vec<Event>>>,
    stop: Arc<AtomicBool>,
) {
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let record = |e: Event| events.lock().unwrap().push(e);
    let mut auth = None;
    let mut refused = false;
    let check = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        auth = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        match &token {
            Some(t) if auth.as_deref() != Some(format!("Bearer {t}").as_str()) => {
                refused = true;
                let mut r = ErrorResponse::new(Some("unauthorized".into()));
                *r.status_mut() = StatusCode::UNAUTHORIZED;
                Err(r)
            }
            _ => Ok(resp),
        }
    };
    let ws = tungstenite::accept_hdr(stream, check);
    let Ok(mut ws) = ws else {
        if refused {
            record(Event::Refused);
        }
        return;
    };
    record(Event::Connected(auth));
    converse(&mut ws, mode, &record, &stop);
    // The accept loop holds a clone of this socket (for `kick`): dropping ours alone
    // would not close the connection.
    let _ = ws.get_ref().shutdown(Shutdown::Both);
}

fn converse(
    ws: &mut tungstenite::WebSocket<TcpStream>,
    mode: Mode,
    record: &dyn Fn(Event),
    stop: &AtomicBool,
) {
    loop {
        let text = match ws.read() {
            Ok(Message::Text(t)) => t,
            Ok(_) => continue,
            Err(_) => return,
        };
        match protocol::decode(&text).unwrap() {
            BackendMsg::Register(r) => {
                let guid = r.guid.clone();
                record(Event::Register(r));
                match mode {
                    Mode::ErrorThenClose => {
                        let _ = ws.send(Message::text(protocol::error(&ControlError::BadVersion)));
                        let _ = ws.close(Some(CloseFrame {
                            code: CloseCode::Policy,
                            reason: "bad_version".into(),
                        }));
                    }
                    _ => {
                        ws.send(Message::text(protocol::registered(&guid, 5000)))
                            .unwrap();
                    }
                }
                match mode {
                    Mode::DropAfterRegister => return,
                    Mode::Silent => {
                        while !stop.load(Ordering::SeqCst) {
                            thread::park_timeout(Duration::from_millis(20));
                        }
                        return;
                    }
                    _ => {}
                }
            }
            BackendMsg::Drain => {
                record(Event::Drain);
                let _ = ws.send(Message::text(protocol::ack("drained")));
            }
            BackendMsg::Deregister => {
                record(Event::Deregister);
                let _ = ws.send(Message::text(protocol::ack("deregistered")));
                let _ = ws.close(None);
            }
            // Dispatch-mode load reports (issue 18) are not what these tests look at.
            BackendMsg::Load(_) => {}
        }
    }
}

/// A config for `fake` with a fixed guid and one unreachable-but-valid binding.
fn config(balancers: &[&Fake]) -> AgentConfig {
    let mut cfg = AgentConfig::new(&balancers[0].url(), "ws://127.0.0.1:9001");
    cfg.balancers = balancers.iter().map(|f| f.url()).collect();
    cfg.guid = "api-1".into();
    cfg
}

#[test]
fn registers_with_config_fields_and_token() {
    let fake = Fake::start(Mode::Normal, Some("s3cret"));
    let mut cfg = config(&[&fake]);
    cfg.bindings.push("http://localhost:9002".into());
    cfg.token = Some("s3cret".into());
    cfg.weight = 3;
    cfg.max_connections = 7;
    cfg.tags = BTreeMap::from([("zone".to_string(), "a".to_string())]);
    let agent = spawn(cfg).unwrap();
    assert!(agent.wait_registered(DEADLINE), "{:?}", fake.events());
    assert_eq!(agent.status(), [(fake.url(), LinkState::Registered)]);
    let events = fake.events();
    assert_eq!(events[0], Event::Connected(Some("Bearer s3cret".into())));
    let Event::Register(r) = &events[1] else {
        panic!("{events:?}")
    };
    assert_eq!(r.guid, "api-1");
    assert_eq!(r.bindings, ["ws://127.0.0.1:9001", "http://localhost:9002"]);
    assert_eq!((r.weight, r.max_connections), (3, 7));
    assert_eq!(r.tags.get("zone").map(String::as_str), Some("a"));
    agent.stop();
}

#[test]
fn reconnects_when_the_connection_drops() {
    let fake = Fake::start(Mode::DropAfterRegister, None);
    let agent = spawn(config(&[&fake])).unwrap();
    assert!(
        wait_until(DEADLINE, || fake.registrations() >= 2),
        "{:?}",
        fake.events()
    );
    agent.stop();
}

#[test]
fn reregisters_with_a_restarted_balancer_on_the_same_port() {
    let mut old = Fake::start(Mode::Normal, None);
    let agent = spawn(config(&[&old])).unwrap();
    assert!(agent.wait_registered(DEADLINE));
    let addr = old.addr;
    old.shutdown();
    assert!(wait_until(DEADLINE, || agent.status()[0].1 != LinkState::Registered));
    let new = Fake::bind(addr, Mode::Normal, None);
    assert!(agent.wait_registered(DEADLINE), "{:?}", agent.status());
    assert_eq!(new.registrations(), 1);
    agent.stop();
}

#[test]
fn registers_with_two_balancers() {
    let (a, b) = (
        Fake::start(Mode::Normal, None),
        Fake::start(Mode::Normal, None),
    );
    let agent = spawn(config(&[&a, &b])).unwrap();
    assert!(agent.wait_registered(DEADLINE), "{:?}", agent.status());
    assert_eq!(
        agent.status(),
        [
            (a.url(), LinkState::Registered),
            (b.url(), LinkState::Registered)
        ]
    );
    assert_eq!((a.registrations(), b.registrations()), (1, 1));
    agent.stop();
}

#[test]
fn refused_registration_is_retried_with_backoff() {
    let fake = Fake::start(Mode::ErrorThenClose, None);
    let started = Instant::now();
    let agent = spawn(config(&[&fake])).unwrap();
    assert!(
        wait_until(DEADLINE, || fake.registrations() >= 2),
        "{:?}",
        fake.events()
    );
    // A measurement window, not synchronisation: how many attempts fit in 2 s.
    thread::sleep(Duration::from_secs(2).saturating_sub(started.elapsed()));
    let attempts = fake.registrations();
    assert!(attempts < 50, "{attempts} attempts in 2 s: a tight loop");
    assert_ne!(agent.status()[0].1, LinkState::Registered);
    agent.stop();
}

#[test]
fn wrong_token_is_retried_and_never_registers() {
    let fake = Fake::start(Mode::Normal, Some("right"));
    let mut cfg = config(&[&fake]);
    cfg.token = Some("wrong".into());
    let agent = spawn(cfg).unwrap();
    assert!(
        wait_until(DEADLINE, || fake.count(|e| *e == Event::Refused) >= 2),
        "{:?}",
        fake.events()
    );
    assert_eq!(fake.registrations(), 0);
    assert_ne!(agent.status()[0].1, LinkState::Registered);
    agent.stop();
}

#[test]
fn drain_and_stop_send_drain_then_deregister() {
    let fake = Fake::start(Mode::Normal, None);
    let agent = spawn(config(&[&fake])).unwrap();
    assert!(agent.wait_registered(DEADLINE));
    agent.drain();
    assert!(wait_until(DEADLINE, || fake.count(|e| *e == Event::Drain) == 1));
    agent.stop();
    let kinds: Vec<&str> = fake
        .events()
        .iter()
        .map(|e| match e {
            Event::Connected(_) => "connected",
            Event::Refused => "refused",
            Event::Register(_) => "register",
            Event::Drain => "drain",
            Event::Deregister => "deregister",
        })
        .collect();
    assert_eq!(kinds, ["connected", "register", "drain", "deregister"]);
}

#[test]
fn drain_is_sent_again_after_a_reconnect() {
    let fake = Fake::start(Mode::Normal, None);
    let agent = spawn(config(&[&fake])).unwrap();
    assert!(agent.wait_registered(DEADLINE));
    agent.drain();
    assert!(wait_until(DEADLINE, || fake.count(|e| *e == Event::Drain) == 1));
    fake.kick();
    assert!(
        wait_until(DEADLINE, || fake.count(|e| *e == Event::Drain) == 2),
        "{:?}",
        fake.events()
    );
    assert_eq!(fake.registrations(), 2);
    agent.stop();
}

#[test]
fn silent_balancer_is_detected_by_heartbeat() {
    let fake = Fake::start(Mode::Silent, None);
    let mut cfg = config(&[&fake]);
    cfg.heartbeat = Duration::from_millis(100);
    let agent = spawn(cfg).unwrap();
    assert!(
        wait_until(DEADLINE, || fake.registrations() >= 2),
        "{:?}",
        fake.events()
    );
    agent.stop();
}

#[test]
fn answered_pings_keep_a_quiet_link_up() {
    let fake = Fake::start(Mode::Normal, None);
    let mut cfg = config(&[&fake]);
    // Short enough for many liveness periods in the window, long enough that a loaded CI
    // machine answers a ping within 3 of them.
    cfg.heartbeat = Duration::from_millis(150);
    let agent = spawn(cfg).unwrap();
    assert!(agent.wait_registered(DEADLINE));
    // A measurement window of over two liveness periods (3 × 150 ms): nothing may be lost.
    thread::sleep(Duration::from_millis(1000));
    assert_eq!(fake.registrations(), 1, "{:?}", fake.events());
    assert_eq!(agent.status()[0].1, LinkState::Registered);
    agent.stop();
}

// ---- `wslb agent` ----

/// Kills and reaps the child when dropped (a failed assertion must not leak processes).
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wslb_agent(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wslb"));
    c.arg("agent").args(args).env_remove("WSLB_TOKEN");
    c
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let mut status = None;
    wait_until(timeout, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    status
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// A fresh path in the temp dir, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(tag: &str) -> TempFile {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        TempFile(
            std::env::temp_dir().join(format!("wslb-agent-{tag}-{}-{nanos}", std::process::id())),
        )
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.0)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn cli_bad_flag_exits_2_naming_it() {
    for (args, flag) in [
        (
            &[
                "--balancer",
                "ws://127.0.0.1:1/register",
                "--binding",
                "ws://127.0.0.1:2",
                "--weight",
                "x",
            ][..],
            "--weight",
        ),
        (
            &["--binding", "ws://127.0.0.1:2", "--balancer", "ftp://x"][..],
            "--balancer",
        ),
        (
            &[
                "--balancer",
                "ws://127.0.0.1:1/register",
                "--binding",
                "ws://127.0.0.1:2",
                "--heartbeat",
                "5x",
            ][..],
            "--heartbeat",
        ),
        (&["--nope"][..], "nope"),
    ] {
        let out = wslb_agent(args).stdin(Stdio::null()).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(flag), "{args:?}: {err:?} does not name {flag}");
    }
}

#[test]
fn cli_restarts_the_command_and_exits_0_on_sigterm() {
    let fake = Fake::start(Mode::Normal, None);
    let file = TempFile::new("restart");
    let script = format!("echo started >> '{}'; exit 1", file.0.display());
    let url = fake.url();
    let child = wslb_agent(&[
        "--balancer",
        &url,
        "--binding",
        "ws://127.0.0.1:1",
        "--guid",
        "cli-1",
        "--",
        "sh",
        "-c",
        &script,
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut child = ChildGuard(child);
    assert!(
        wait_until(DEADLINE, || file.lines().len() >= 2),
        "{:?}",
        file.lines()
    );
    assert!(wait_until(DEADLINE, || fake.registrations() >= 1));
    sigterm(&child.0);
    let status = wait_exit(&mut child.0, DEADLINE).expect("wslb agent did not exit on SIGTERM");
    let mut err = String::new();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(err.contains("restarting in"), "{err}");
    assert!(err.contains("registered with"), "{err}");
    assert_eq!(
        fake.count(|e| *e == Event::Deregister),
        1,
        "{:?}",
        fake.events()
    );
}

#[test]
fn cli_sigterm_reaches_the_command() {
    let fake = Fake::start(Mode::Normal, None);
    let file = TempFile::new("term");
    let f = file.0.display();
    // `sleep` in the foreground would delay the trap; `wait` returns at once on a signal.
    let script =
        format!("trap 'kill $p; echo term >> \"{f}\"; exit 0' TERM; echo up >> \"{f}\"; sleep 30 & p=$!; wait");
    let url = fake.url();
    let child = wslb_agent(&[
        "--balancer",
        &url,
        "--binding",
        "ws://127.0.0.1:1",
        "--",
        "sh",
        "-c",
        &script,
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let mut child = ChildGuard(child);
    assert!(wait_until(DEADLINE, || file.lines() == ["up"]));
    assert!(wait_until(DEADLINE, || fake.registrations() >= 1));
    sigterm(&child.0);
    let status = wait_exit(&mut child.0, DEADLINE).expect("wslb agent did not exit on SIGTERM");
    assert_eq!(status.code(), Some(0));
    assert_eq!(file.lines(), ["up", "term"]);
    assert_eq!(fake.count(|e| *e == Event::Deregister), 1);
}

// ---- examples ----

/// Runs `cmd`, forwarding its stdout lines to a channel (read with deadlines).
fn spawn_with_lines(mut cmd: Command) -> (ChildGuard, mpsc::Receiver<String>) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (ChildGuard(child), rx)
}

/// The next line starting with `prefix`, within the deadline.
fn line_starting(rx: &mpsc::Receiver<String>, prefix: &str) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.starts_with(prefix) => return l,
            Ok(_) => {}
            Err(e) => panic!("no line starting with {prefix:?}: {e}"),
        }
    }
}

/// Registration as the example backend announces it, and its echo working.
fn check_example_backend(fake: &Fake, rx: &mpsc::Receiver<String>, registered: &str) {
    let addr = line_starting(rx, "listening on ")["listening on ".len()..].to_string();
    if !registered.is_empty() {
        line_starting(rx, registered);
    }
    assert!(wait_until(DEADLINE, || fake.registrations() >= 1));
    let Some(Event::Register(r)) = fake
        .events()
        .into_iter()
        .find(|e| matches!(e, Event::Register(_)))
    else {
        unreachable!()
    };
    assert_eq!(r.bindings, [format!("ws://{addr}")]);
    let (mut ws, _) = tungstenite::connect(format!("ws://{addr}/")).unwrap();
    ws.send(Message::text("ping?")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("ping?"));
    fake.kick();
    assert!(
        wait_until(DEADLINE, || fake.registrations() >= 2),
        "{:?}",
        fake.events()
    );
}

#[test]
fn python_example_registers_and_reconnects() {
    let usable = Command::new(python())
        .args(["-c", "import websockets"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !usable {
        eprintln!("skipped: python3 with the websockets package is not installed");
        return;
    }
    let fake = Fake::start(Mode::Normal, Some("py-token"));
    let mut cmd = Command::new(python());
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/python_backend.py"
    ))
    .arg(fake.url())
    .env("WSLB_TOKEN", "py-token");
    let (_child, rx) = spawn_with_lines(cmd);
    check_example_backend(&fake, &rx, "registered");
    assert!(fake
        .events()
        .contains(&Event::Connected(Some("Bearer py-token".into()))));
}

#[test]
fn rust_example_registers_and_reconnects() {
    // `cargo test` builds examples; `cargo test --test agent` alone does not.
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_wslb"))
        .with_file_name("examples")
        .join("rust_backend");
    if !bin.exists() {
        eprintln!(
            "skipped: {} not built (run cargo build --examples)",
            bin.display()
        );
        return;
    }
    let fake = Fake::start(Mode::Normal, None);
    let mut cmd = Command::new(bin);
    cmd.args(["--balancer", &fake.url(), "--guid", "rs-1"])
        .env_remove("WSLB_TOKEN");
    let (_child, rx) = spawn_with_lines(cmd);
    check_example_backend(&fake, &rx, "");
}

/// The project's virtual environment (`make test-deps`), else `python3`.
fn python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python3");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}
