//! Operations without dropped users (issue #20), with many real clients (Python
//! `websockets`, `tests/spread_clients.py`): SIGTERM spreads its 1001 closes over the drain
//! window; a drained backend's clients get 1012 over `--backend-drain-window`, reconnect
//! elsewhere, and the backend hears `drain_complete`; `--rebalance` evens out a new backend.
//!
//! `WSLB_SPREAD_CLIENTS` scales the runs (default 600 for SIGTERM, half that for the
//! others), e.g. `WSLB_SPREAD_CLIENTS=3000 cargo test --test spread_drain -- --nocapture`.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{mpsc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::Value;
use tungstenite::{Message, WebSocket};

/// Clients in the SIGTERM run; the other runs use half.
fn clients() -> usize {
    std::env::var("WSLB_SPREAD_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600)
}

/// One test at a time: each runs hundreds of Python clients and measures close times, which
/// two cores shared with the other tests would skew.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn exclusive() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner)
}

fn python_usable() -> bool {
    let ok = Command::new(python())
        .args(["-c", "import websockets.asyncio.client"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipped: python3 with websockets >= 13 is not installed");
    }
    ok
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One client's story, from the script's report.
#[derive(Debug)]
struct Story {
    first: String,
    now: Option<String>,
    /// (close code, unix time, backend it was on)
    closes: Vec<(u64, f64, String)>,
    errors: Vec<String>,
}

/// The Python clients: killed when dropped.
struct Clients {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl Clients {
    fn start(lb: SocketAddr, n: usize, reconnect: bool) -> Clients {
        let mut cmd = Command::new(python());
        cmd.arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/spread_clients.py"
        ))
        .arg(format!("ws://{lb}/"))
        .arg(n.to_string());
        if reconnect {
            cmd.arg("--reconnect");
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn python clients");
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Clients {
            child,
            stdin,
            lines,
        }
    }

    fn line(&self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    if let Some(rest) = l.strip_prefix(prefix) {
                        return rest.to_string();
                    }
                }
                Err(e) => panic!("clients: no {prefix:?} line within {timeout:?}: {e}"),
            }
        }
    }

    /// Waits until every client is open; how many landed on each backend.
    fn ready(&self) -> HashMap<String, usize> {
        let counts: HashMap<String, usize> =
            serde_json::from_str(&self.line("ready ", Duration::from_secs(60))).expect("ready");
        assert!(
            !counts.contains_key("null"),
            "some clients failed to connect: {counts:?}"
        );
        counts
    }

    /// Asks for the report now (`ask`) or waits for the script to send it unasked.
    fn report(&mut self, ask: bool, timeout: Duration) -> Vec<Story> {
        if ask {
            if let Some(s) = self.stdin.as_mut() {
                let _ = s.write_all(b"report\n");
                let _ = s.flush();
            }
        }
        let v: Value = serde_json::from_str(&self.line("report ", timeout)).expect("report");
        let text = |v: &Value| v.as_str().map(str::to_string);
        v["clients"]
            .as_array()
            .expect("clients")
            .iter()
            .map(|c| Story {
                first: text(&c["first"]).unwrap_or_default(),
                now: text(&c["now"]),
                closes: c["closes"]
                    .as_array()
                    .expect("closes")
                    .iter()
                    .map(|x| {
                        (
                            x[0].as_u64().unwrap_or(0),
                            x[1].as_f64().unwrap_or(0.0),
                            text(&x[2]).unwrap_or_default(),
                        )
                    })
                    .collect(),
                errors: c["errors"]
                    .as_array()
                    .map(|e| e.iter().filter_map(text).collect())
                    .unwrap_or_default(),
            })
            .collect()
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Control = WebSocket<TcpStream>;

/// Registers `backend` under `guid` on the balancer's control listener.
fn register(lb: &Balancer, guid: &str, backend: &Backend) -> Control {
    let addr = lb.control_addr();
    let url = format!("ws://{addr}/register");
    let (mut ws, _) = tungstenite::client::client(url.as_str(), connect(addr)).expect("control");
    let msg = serde_json::json!({"type": "register", "version": 1, "guid": guid,
        "bindings": [backend.url()]});
    ws.send(Message::text(msg.to_string())).expect("register");
    assert_eq!(
        next_control(&mut ws, Duration::from_secs(10))["type"],
        "registered"
    );
    ws
}

/// The next text message on a control connection, answering pings on the way.
fn next_control(ws: &mut Control, timeout: Duration) -> Value {
    let tcp = ws.get_ref();
    tcp.set_read_timeout(Some(timeout)).expect("read timeout");
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => return serde_json::from_str(t.as_str()).expect("json"),
            Ok(_) => {}
            Err(e) => panic!("control connection: {e}"),
        }
    }
}

/// Active connections per backend name (or guid), from the admin API.
fn actives(lb: &Balancer) -> HashMap<String, u64> {
    let r = http_request(
        lb.control_addr(),
        b"GET /api/backends HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
    );
    let v: Value = serde_json::from_slice(&r.body).expect("backends json");
    v.as_array()
        .expect("array")
        .iter()
        .map(|b| {
            let name = b["guid"].as_str().or(b["name"].as_str()).unwrap_or("?");
            (name.to_string(), b["active"].as_u64().unwrap_or(0))
        })
        .collect()
}

fn metric(lb: &Balancer, name: &str) -> u64 {
    let r = http_request(
        lb.control_addr(),
        b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
    );
    r.text()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

#[test]
fn sigterm_spreads_1001_closes_evenly_over_the_drain_window() {
    if !python_usable() {
        return;
    }
    let _turn = exclusive();
    const WINDOW: f64 = 6.0;
    const BINS: usize = 6;
    let n = clients();
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let mut lb = Balancer::start(&["--drain-timeout", "6s"], &[&a, &b]);
    let mut clients = Clients::start(lb.addr(), n, false);
    let counts = clients.ready();
    assert_eq!(counts.values().sum::<usize>(), n, "{counts:?}");

    let t0 = unix_now();
    lb.sigterm();
    let stories = clients.report(false, Duration::from_secs(30));
    let mut bins = [0usize; BINS];
    for s in &stories {
        assert!(s.errors.is_empty(), "{s:?}");
        let [(code, at, _)] = s.closes.as_slice() else {
            panic!("expected one close: {s:?}");
        };
        assert_eq!(*code, 1001, "{s:?}");
        let offset = at - t0;
        assert!(
            (0.0..WINDOW + 0.5).contains(&offset),
            "closed {offset:.3}s after SIGTERM: {s:?}"
        );
        let bin = ((offset / WINDOW * BINS as f64) as usize).min(BINS - 1);
        bins[bin] += 1;
    }
    let share = n as f64 / BINS as f64;
    eprintln!("SIGTERM close times of {n} clients over {WINDOW}s, per second: {bins:?}");
    for (i, count) in bins.iter().enumerate() {
        let ratio = *count as f64 / share;
        assert!(
            (0.5..=1.5).contains(&ratio),
            "second {i} holds {count} closes, {ratio:.2} of its share: {bins:?}"
        );
    }
    let status = lb.wait_exit(Duration::from_secs(10)).expect("wslb exits");
    assert!(status.success(), "{status}");
}

#[test]
fn drained_backend_clients_get_1012_reconnect_elsewhere_and_it_hears_drain_complete() {
    if !python_usable() {
        return;
    }
    let _turn = exclusive();
    const WINDOW: f64 = 3.0;
    let n = clients() / 2;
    let backends = [
        Backend::start("a"),
        Backend::start("b"),
        Backend::start("c"),
    ];
    let lb = Balancer::start(
        &[
            "--control",
            "127.0.0.1:0",
            "--heartbeat",
            "60s",
            "--backend-drain-window",
            "3s",
        ],
        &[],
    );
    let mut controls: Vec<Control> = backends
        .iter()
        .map(|b| register(&lb, &format!("g-{}", b.name), b))
        .collect();
    let mut clients = Clients::start(lb.addr(), n, true);
    let counts = clients.ready();
    let on_a = counts.get("a").copied().unwrap_or(0);
    assert!(on_a > 0, "{counts:?}");

    let t0 = unix_now();
    let ctl = &mut controls[0];
    ctl.send(Message::text(r#"{"type":"drain"}"#)).unwrap();
    let ack = next_control(ctl, Duration::from_secs(5));
    assert_eq!(
        (ack["type"].as_str(), ack["clients"].as_u64()),
        (Some("drained"), Some(on_a as u64)),
        "{ack}"
    );
    let done = next_control(ctl, Duration::from_secs(15));
    let finished = unix_now() - t0;
    assert_eq!(done["type"], "drain_complete", "{done}");
    assert_eq!(done["clients"].as_u64(), Some(on_a as u64), "{done}");
    assert!(
        finished < WINDOW + 2.0,
        "drain_complete {finished:.2}s after drain"
    );
    // Reconnected clients have said whoami by now, or do so within this.
    assert!(wait_until(Duration::from_secs(5), || {
        let act = actives(&lb);
        act.get("g-a") == Some(&0)
            && act.get("g-b").unwrap_or(&0) + act.get("g-c").unwrap_or(&0) == n as u64
    }));

    let stories = clients.report(true, Duration::from_secs(10));
    let mut moved = 0;
    for s in &stories {
        assert!(s.errors.is_empty(), "{s:?}");
        if s.first == "a" {
            let [(code, at, from)] = s.closes.as_slice() else {
                panic!("a client of a must be closed exactly once: {s:?}");
            };
            assert_eq!((*code, from.as_str()), (1012, "a"), "{s:?}");
            assert!(at - t0 < WINDOW + 1.0, "closed {:.2}s after drain", at - t0);
            assert!(
                matches!(s.now.as_deref(), Some("b" | "c")),
                "did not land on b or c: {s:?}"
            );
            moved += 1;
        } else {
            assert!(s.closes.is_empty(), "a client of b or c was closed: {s:?}");
            assert_eq!(s.now.as_ref(), Some(&s.first), "{s:?}");
        }
    }
    assert_eq!(moved, on_a);
    assert_eq!(metric(&lb, "wslb_backend_drain_closes_total"), on_a as u64);
    eprintln!("drain: {on_a} of {n} clients moved off a; {counts:?}");
}

#[test]
fn rebalance_evens_out_a_new_backend_without_closing_anyone_twice() {
    if !python_usable() {
        return;
    }
    let _turn = exclusive();
    let n = clients() / 2;
    let (a, b, c) = (
        Backend::start("a"),
        Backend::start("b"),
        Backend::start("c"),
    );
    let lb = Balancer::start(
        &[
            "--control",
            "127.0.0.1:0",
            "--heartbeat",
            "60s",
            "--rebalance",
            "50",
        ],
        &[&a, &b],
    );
    let mut clients = Clients::start(lb.addr(), n, true);
    let counts = clients.ready();
    assert_eq!(counts.get("c"), None);
    let _control = register(&lb, "g-c", &c);
    let started = Instant::now();

    // Connections younger than 10 s are never moved, then 50 a second at most.
    let third = n as f64 / 3.0;
    let balanced = |act: &HashMap<String, u64>| {
        act.len() == 3
            && act
                .values()
                .all(|v| (*v as f64 - third).abs() <= third * 0.1)
    };
    assert!(
        wait_until(Duration::from_secs(40), || balanced(&actives(&lb))),
        "not balanced: {:?}",
        actives(&lb)
    );
    let settled = started.elapsed();
    // Settled: nothing more moves.
    thread::sleep(Duration::from_secs(2));
    let act = actives(&lb);
    assert!(balanced(&act), "{act:?}");

    let stories = clients.report(true, Duration::from_secs(10));
    let mut finals: HashMap<String, usize> = HashMap::new();
    let mut closed = 0;
    for s in &stories {
        assert!(s.errors.is_empty(), "{s:?}");
        assert!(s.closes.len() <= 1, "closed more than once: {s:?}");
        for (code, _, from) in &s.closes {
            assert_eq!(*code, 1012, "{s:?}");
            assert_ne!(from, "c", "{s:?}");
            closed += 1;
        }
        *finals.entry(s.now.clone().unwrap_or_default()).or_default() += 1;
    }
    assert_eq!(metric(&lb, "wslb_rebalance_closes_total"), closed);
    eprintln!(
        "rebalance: {n} clients, {closed} moved, settled {settled:.1?} after c registered: {finals:?}"
    );
}

#[test]
fn agent_on_sigterm_keeps_its_backend_up_until_the_balancer_moved_every_client() {
    if !python_usable() {
        return;
    }
    let _turn = exclusive();
    let n = 40;
    let other = Backend::start("b");
    let lb = Balancer::start(
        &[
            "--control",
            "127.0.0.1:0",
            "--heartbeat",
            "60s",
            "--backend-drain-window",
            "2s",
        ],
        &[],
    );
    let _b = register(&lb, "g-b", &other);
    let port = free_port();
    let mut agent = Command::new(wslb_bin().expect("wslb"))
        .arg("agent")
        .args([
            "--balancer",
            &format!("ws://{}/register", lb.control_addr()),
        ])
        .args([
            "--binding",
            &format!("ws://127.0.0.1:{port}"),
            "--guid",
            "g-a",
        ])
        .arg("--")
        .arg(echo_backend_bin())
        .args(["--name", "a", "--listen", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wslb agent");
    let registered = wait_until(Duration::from_secs(10), || {
        actives(&lb).contains_key("g-a") && TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(registered, "agent did not register");
    let mut clients = Clients::start(lb.addr(), n, true);
    let on_a = clients.ready().get("a").copied().unwrap_or(0);
    assert!(on_a > 0);

    let t0 = unix_now();
    let kill = Command::new("kill").arg(agent.id().to_string()).status();
    assert!(kill.is_ok_and(|s| s.success()));
    let mut status = None;
    wait_until(Duration::from_secs(15), || {
        status = agent.try_wait().expect("try_wait");
        status.is_some()
    });
    let exited = unix_now() - t0;
    let Some(status) = status else {
        let _ = agent.kill();
        panic!("agent still running 15 s after SIGTERM");
    };
    let mut err = String::new();
    if let Some(mut e) = agent.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    assert!(status.success(), "{status}: {err}");
    assert!(err.contains("no client left"), "{err}");

    let stories = clients.report(true, Duration::from_secs(10));
    let mut last = 0.0f64;
    for s in stories.iter().filter(|s| s.first == "a") {
        // Stopped only after the balancer moved its clients: each got 1012 from the
        // balancer, none the 1001 of a backend that went away under it.
        let [(code, at, _)] = s.closes.as_slice() else {
            panic!("expected one close: {s:?}");
        };
        assert_eq!(*code, 1012, "{s:?}");
        assert_eq!(s.now.as_deref(), Some("b"), "{s:?}");
        last = last.max(at - t0);
    }
    assert!(
        exited >= last,
        "agent exited {exited:.2}s after SIGTERM, before its last client moved ({last:.2}s)"
    );
    eprintln!("agent: {on_a} clients moved, last at {last:.2}s, agent exited at {exited:.2}s");
}

#[test]
fn admin_drain_of_a_static_backend_moves_its_clients_with_1012() {
    if !python_usable() {
        return;
    }
    let _turn = exclusive();
    let n = 30;
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let lb = Balancer::start(
        &["--control", "127.0.0.1:0", "--backend-drain-window", "1s"],
        &[&a, &b],
    );
    let mut clients = Clients::start(lb.addr(), n, true);
    let on_a = clients.ready().get("a").copied().unwrap_or(0);
    assert!(on_a > 0);
    let name = a.url().replace(':', "%3A").replace('/', "%2F");
    let r = http_request(
        lb.control_addr(),
        format!(
            "POST /api/backends/{name}/drain HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let url = a.url();
    assert!(wait_until(Duration::from_secs(5), || {
        let act = actives(&lb);
        act.get(&url) == Some(&0) && act.get(&b.url()) == Some(&(n as u64))
    }));
    let stories = clients.report(true, Duration::from_secs(10));
    for s in &stories {
        let codes: Vec<u64> = s.closes.iter().map(|c| c.0).collect();
        let expected: &[u64] = if s.first == "a" { &[1012] } else { &[] };
        assert_eq!(codes, expected, "{s:?}");
        assert_eq!(s.now.as_deref(), Some("b"), "{s:?}");
    }
    assert_eq!(metric(&lb, "wslb_backend_drain_closes_total"), on_a as u64);
}

#[test]
fn rebalance_leaves_clients_a_sticky_session_placed_alone() {
    if !python_usable() {
        return;
    }
    let _turn = exclusive();
    let n = 40;
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    // Every client comes from 127.0.0.1: `--sticky ip` puts them all on one backend, as
    // uneven as it gets, and none of them may be moved.
    let lb = Balancer::start(
        &[
            "--control",
            "127.0.0.1:0",
            "--sticky",
            "ip",
            "--rebalance",
            "50",
        ],
        &[&a, &b],
    );
    let mut clients = Clients::start(lb.addr(), n, true);
    let counts = clients.ready();
    assert_eq!(counts.len(), 1, "{counts:?}");
    // Past the 10 s after which unpinned connections would be candidates, plus two rounds.
    thread::sleep(Duration::from_secs(13));
    let stories = clients.report(true, Duration::from_secs(10));
    assert!(stories.iter().all(|s| s.closes.is_empty()), "{stories:?}");
    assert_eq!(metric(&lb, "wslb_rebalance_closes_total"), 0);
}
