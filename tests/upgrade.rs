//! Binary upgrade (SIGUSR2 / `--takeover`): the listening sockets move to a new process
//! and no connection attempt is refused in between. Witnesses we did not write: Python
//! `websockets` holds the WebSockets (tests/peers/held_websockets.py) and curl makes some
//! of the HTTP requests; the rest come from plain std sockets, counted one by one.
//!
//! `WSLB_UPGRADE_WS=1000` holds more WebSockets (the default keeps the test short).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;

/// Counts of an HTTP load run.
#[derive(Default)]
struct Load {
    ok: AtomicUsize,
    refused: AtomicUsize,
    failed: AtomicUsize,
    non_2xx: AtomicUsize,
}

/// One `GET` on a fresh connection: the status, or why there was none.
fn one_request(addr: SocketAddr) -> Result<u16, std::io::Error> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.write_all(b"GET /upgrade-load HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let head = String::from_utf8_lossy(&resp);
    head.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {head:?}")))
}

/// Keep-alive requests on one connection at a time, a new one when an answer says
/// `Connection: close` (as the old process's answers do once it drains): the race between
/// a request on its way and an idle connection closing would show here as a failure.
fn keep_alive_load(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    counts: Arc<Load>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut conn: Option<HttpClient> = None;
        while !stop.load(Ordering::Relaxed) {
            let c = conn.get_or_insert_with(|| HttpClient::connect(addr));
            c.send(b"GET /keep-alive HTTP/1.1\r\nHost: t\r\n\r\n");
            match c.read_response() {
                Ok(r) if (200..300).contains(&r.status) => {
                    counts.ok.fetch_add(1, Ordering::Relaxed);
                    if r.header("connection")
                        .is_some_and(|v| v.eq_ignore_ascii_case("close"))
                    {
                        conn = None;
                    }
                }
                Ok(_) => {
                    counts.non_2xx.fetch_add(1, Ordering::Relaxed);
                    conn = None;
                }
                Err(_) => {
                    counts.failed.fetch_add(1, Ordering::Relaxed);
                    conn = None;
                }
            }
        }
    })
}

fn load(addr: SocketAddr, stop: Arc<AtomicBool>, counts: Arc<Load>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match one_request(addr) {
                Ok(200..=299) => counts.ok.fetch_add(1, Ordering::Relaxed),
                Ok(_) => counts.non_2xx.fetch_add(1, Ordering::Relaxed),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    counts.refused.fetch_add(1, Ordering::Relaxed)
                }
                Err(_) => counts.failed.fetch_add(1, Ordering::Relaxed),
            };
        }
    })
}

/// Kills the process that took over when the test ends, however it ends.
struct Reaper(Option<u32>);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
    }
}

fn pid_after(line: &str, marker: &str) -> Option<u32> {
    let rest = &line[line.find(marker)? + marker.len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[test]
fn sigusr2_hands_the_listeners_over_without_refusing_anyone() {
    let held: usize = std::env::var("WSLB_UPGRADE_WS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let a = Backend::start("static-a");
    let b = Backend::start("static-b");
    let mut old = Balancer::start(
        &["--control", "127.0.0.1:0", "--drain-timeout", "3s"],
        &[&a, &b],
    );
    let addr = old.addr();
    let control = old.control_addr();
    let balancer = format!("ws://{control}/register");
    let _agent = Agent::start(
        &["--balancer", &balancer, "--heartbeat", "300ms"],
        "upgrade-agent",
        "registered-c",
    );
    assert!(
        old.wait_log("server ready", TIMEOUT),
        "agent never registered"
    );

    // Held WebSockets (Python websockets), echoing every 200 ms until closed.
    let mut clients = Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/peers/held_websockets.py"
        ))
        .args([&format!("ws://{addr}/held"), &held.to_string(), "0.2", "30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 with websockets (make test-deps)");
    let mut out = BufReader::new(clients.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("read ready line");
    assert_eq!(
        line.trim(),
        format!("ready {held}"),
        "not every WebSocket opened"
    );

    // HTTP load on fresh connections through the whole upgrade.
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Load::default());
    let mut loaders: Vec<_> = (0..3)
        .map(|_| load(addr, Arc::clone(&stop), Arc::clone(&counts)))
        .collect();
    loaders.extend((0..2).map(|_| keep_alive_load(addr, Arc::clone(&stop), Arc::clone(&counts))));
    thread::sleep(Duration::from_millis(300));

    let ok = Command::new("kill")
        .args(["-USR2", &old.pid().to_string()])
        .status();
    assert!(ok.expect("run kill").success());
    let mut reaper = Reaper(None);
    assert!(
        old.wait_log("takeover complete: accepting", TIMEOUT),
        "no takeover; stderr: {:#?}",
        old.stderr_lines()
    );
    let new_pid = old
        .stderr_lines()
        .iter()
        .find_map(|l| pid_after(l, "takeover complete: accepting pid="))
        .expect("new pid in the log");
    reaper.0 = Some(new_pid);
    assert_ne!(new_pid, old.pid());

    // curl, during the old process's drain, reaches the new one.
    let curl = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://{addr}/by-curl"))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&curl.stdout), "200");

    let status = old.wait_exit(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.success()),
        "old process did not drain and exit: {status:?}"
    );
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        l.join().expect("load thread");
    }
    let (ok, refused, failed, non_2xx) = (
        counts.ok.load(Ordering::Relaxed),
        counts.refused.load(Ordering::Relaxed),
        counts.failed.load(Ordering::Relaxed),
        counts.non_2xx.load(Ordering::Relaxed),
    );
    eprintln!("upgrade under load: {ok} ok, {refused} refused, {failed} failed, {non_2xx} non-2xx");
    assert!(ok > 50, "too little load to mean anything: {ok}");
    assert_eq!((refused, failed, non_2xx), (0, 0, 0));

    // Every held WebSocket echoed until the old process's drain closed it with 1001.
    let mut summary = String::new();
    out.read_line(&mut summary).expect("summary line");
    let _ = clients.wait();
    let s: serde_json::Value = serde_json::from_str(&summary).expect("summary JSON");
    eprintln!("held websockets: {s}");
    assert_eq!(s["opened"], held);
    assert_eq!(s["mismatches"], 0);
    assert_eq!(s["echo_timeouts"], 0);
    assert_eq!(
        s["closes"]["1001"], held,
        "every one closed by the drain with 1001"
    );
    assert!(
        s["min_echoes"].as_u64().unwrap_or(0) >= 2,
        "echoed until closed"
    );

    // The new process serves WebSockets, and the agent registered with it.
    let mut ws = ws_connect(addr, "/after");
    let name = whoami(&mut ws);
    assert!(["static-a", "static-b", "registered-c"].contains(&name.as_str()));
    ws_close(ws);
    let backends = get(control, "/api/backends").text();
    assert!(
        backends.contains("upgrade-agent"),
        "agent not registered with the new process: {backends}"
    );
}

#[test]
fn takeover_of_a_missing_socket_is_a_clear_startup_error() {
    let (status, _, err) = run_wslb(&[
        "-l",
        "127.0.0.1:0",
        "--takeover",
        "/nonexistent/wslb-upgrade.sock",
    ]);
    assert!(!status.success());
    assert!(
        err.contains("--takeover /nonexistent/wslb-upgrade.sock"),
        "{err}"
    );
}

#[test]
fn a_new_process_that_dies_halfway_changes_nothing() {
    let a = Backend::start("static-a");
    let dir = std::env::temp_dir().join(format!("wslb-upgrade-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let sock = dir.join("upgrade.sock");
    let sock_arg = sock.to_string_lossy().into_owned();
    let lb = Balancer::start(
        &["--control", "127.0.0.1:0", "--upgrade-socket", &sock_arg],
        &[&a],
    );
    let control = lb.control_addr();
    let balancer = format!("ws://{control}/register");
    let _agent = Agent::start(
        &["--balancer", &balancer, "--heartbeat", "300ms"],
        "halfway-agent",
        "registered-h",
    );
    assert!(lb.wait_log("server ready", TIMEOUT));
    // A "new process" (Python) takes the descriptors, says it accepts control connections,
    // then dies before it accepts clients.
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
msg, fds, flags, addr = socket.recv_fds(s, 16384, 16)
assert b'"listeners"' in msg and len(fds) == 2, (msg, fds)
s.sendall(b"control\n")
"#;
    let status = Command::new(python())
        .args(["-c", script, &sock_arg])
        .status()
        .expect("python3");
    assert!(status.success());
    assert!(
        lb.wait_log("upgrade failed: the new process went away", TIMEOUT),
        "{:#?}",
        lb.stderr_lines()
    );
    // The agent lost its session to the handover and registers here again.
    assert!(wait_until(TIMEOUT, || {
        lb.stderr_lines()
            .iter()
            .filter(|l| l.contains("server ready"))
            .count()
            >= 2
    }));
    assert!(get(control, "/api/backends")
        .text()
        .contains("halfway-agent"));
    for _ in 0..20 {
        assert_eq!(get(lb.addr(), "/still-here").status, 200);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
