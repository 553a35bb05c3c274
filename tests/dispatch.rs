//! Dispatch mode (issue 18, docs/DISPATCH.md): the balancer answers with a backend's public
//! binding and the client connects there itself. Real processes on 127.0.0.1; backends
//! that report their load are simulated over the control WebSocket.
mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tungstenite::Message;

const DISPATCH: &[&str] = &["--dispatch-path", "/connect"];

/// `GET /connect` on a keep-alive connection, parsed.
fn dispatch(client: &mut HttpClient, cookie: Option<&str>) -> (Response, Value) {
    let cookie = cookie.map_or(String::new(), |c| format!("Cookie: {c}\r\n"));
    client.send(format!("GET /connect?unknown=1 HTTP/1.1\r\nHost: t\r\n{cookie}\r\n").as_bytes());
    let resp = client
        .read_response()
        .unwrap_or_else(|e| panic!("dispatch answer: {e}"));
    let json = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
    (resp, json)
}

/// A backend that registers with public bindings and reports `base + dispatched_to_it`
/// every `period` from its own thread (answering the balancer's pings meanwhile).
struct SimBackend {
    guid: String,
    /// Dispatches the test counted for it; the next report includes them.
    dispatched: Arc<AtomicU32>,
    reports: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    /// Set: send `drain` next; the thread then keeps reporting.
    drain: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl SimBackend {
    fn start(control: SocketAddr, guid: &str, base: u32, period: Duration) -> SimBackend {
        let stream = TcpStream::connect(control).expect("control connect");
        let url = format!("ws://{control}/register");
        let (mut ws, _) = tungstenite::client::client(url.as_str(), stream).expect("control ws");
        // Never dialled in dispatch mode, but it must pass the binding rules (not one of
        // the balancer's own listeners).
        let port = free_port();
        let register = serde_json::json!({
            "type": "register", "version": 1, "guid": guid,
            "bindings": [format!("ws://127.0.0.1:{port}")],
            "public_bindings": [format!("ws://{guid}.example:443/")],
        });
        ws.send(Message::text(register.to_string())).unwrap();
        ws.get_mut()
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let (dispatched, reports) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        let (stop, drain) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let (d, r, s, dr) = (
            Arc::clone(&dispatched),
            Arc::clone(&reports),
            Arc::clone(&stop),
            Arc::clone(&drain),
        );
        let thread = thread::spawn(move || {
            let mut next = Instant::now();
            while !s.load(Ordering::SeqCst) {
                if dr.swap(false, Ordering::SeqCst) {
                    let _ = ws.send(Message::text(r#"{"type":"drain"}"#));
                }
                if Instant::now() >= next {
                    let n = base + d.load(Ordering::SeqCst);
                    let load = format!(r#"{{"type":"load","clients":{n}}}"#);
                    if ws.send(Message::text(load)).is_err() {
                        return;
                    }
                    r.fetch_add(1, Ordering::SeqCst);
                    next += period;
                }
                match ws.read() {
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {}
                    Err(_) => return,
                }
            }
            // Dropping the socket without a close frame: the control connection is lost.
        });
        SimBackend {
            guid: guid.to_string(),
            dispatched,
            reports,
            stop,
            drain,
            thread: Some(thread),
        }
    }

    /// Waits for two more reports: the balancer has one sent after `dispatched` was read.
    fn await_fresh_report(&self) {
        let seen = self.reports.load(Ordering::SeqCst);
        assert!(
            wait_until(TIMEOUT, || self.reports.load(Ordering::SeqCst) >= seen + 2),
            "{} stopped reporting",
            self.guid
        );
    }

    /// Stops the thread, which drops the control socket without a close frame.
    fn lose_connection(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for SimBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// `GET /api/backends` of the control listener, by guid.
fn backends(lb: &Balancer) -> BTreeMap<String, Value> {
    let body = get(lb.control_addr(), "/api/backends").body;
    let list: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| Some((b["guid"].as_str()?.to_string(), b.clone())))
        .collect()
}

fn start_with_reporters(bases: &[(&str, u32)], extra: &[&str]) -> (Balancer, Vec<SimBackend>) {
    // Backends report every 200 ms (at least once per heartbeat, as required); the
    // balancer's own heartbeat is longer so that a test thread starved for a moment on a
    // busy 2-core machine is not taken for a lost backend (3 silent heartbeats).
    let mut args = vec!["--control", "127.0.0.1:0", "--heartbeat", "1s"];
    args.extend_from_slice(DISPATCH);
    args.extend_from_slice(extra);
    let lb = Balancer::start(&args, &[]);
    let sims: Vec<SimBackend> = bases
        .iter()
        .map(|(g, base)| SimBackend::start(lb.control_addr(), g, *base, Duration::from_millis(200)))
        .collect();
    let all_reported = wait_until(TIMEOUT, || {
        let b = backends(&lb);
        sims.iter()
            .all(|s| b.get(&s.guid).is_some_and(|v| v["reported_load"].is_u64()))
    });
    assert!(
        all_reported,
        "backends did not report: {:?} {:?}",
        backends(&lb),
        lb.stderr_lines()
    );
    (lb, sims)
}

#[test]
fn reported_loads_converge_under_bursts() {
    let bases = [("conv-a", 100), ("conv-b", 200), ("conv-c", 700)];
    let (lb, sims) = start_with_reporters(&bases, &["--algorithm", "fewest"]);
    let mut client = HttpClient::connect(lb.addr());
    for _burst in 0..30 {
        for _ in 0..100 {
            let (resp, json) = dispatch(&mut client, None);
            assert_eq!(resp.status, 200, "{json} {:?}", lb.stderr_lines());
            let guid = json["guid"].as_str().expect("guid");
            let sim = sims.iter().find(|s| s.guid == guid).expect("known guid");
            assert_eq!(json["url"], format!("ws://{guid}.example:443/"));
            sim.dispatched.fetch_add(1, Ordering::SeqCst);
        }
        // The next burst starts after every backend reported what it got.
        sims.iter().for_each(SimBackend::await_fresh_report);
    }
    let loads: Vec<u32> = sims
        .iter()
        .zip(bases)
        .map(|(s, (_, base))| base + s.dispatched.load(Ordering::SeqCst))
        .collect();
    let spread = loads.iter().max().unwrap() - loads.iter().min().unwrap();
    // Measure: max - min of (base + dispatched) after 3,000 dispatches (ideal 4000/3 each).
    eprintln!("final loads {loads:?}, spread (max-min) {spread}");
    assert_eq!(loads.iter().sum::<u32>(), 4000);
    assert!(spread <= 3, "loads did not converge: {loads:?}");
    let metrics = get(lb.control_addr(), "/metrics").text();
    for s in &sims {
        let line = format!(
            "wslb_dispatches_total{{backend=\"{}\"}} {}",
            s.guid,
            s.dispatched.load(Ordering::SeqCst)
        );
        assert!(metrics.contains(&line), "no {line:?} in metrics");
    }
}

#[test]
fn drained_or_lost_backends_are_never_handed_out_again() {
    let bases = [("keep", 0), ("drains", 0), ("vanishes", 0)];
    let (lb, mut sims) = start_with_reporters(&bases, &["--algorithm", "round-robin"]);
    let mut client = HttpClient::connect(lb.addr());
    let mut seen = BTreeMap::<String, u32>::new();
    for _ in 0..30 {
        let (_, json) = dispatch(&mut client, None);
        *seen
            .entry(json["guid"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(seen.len(), 3, "all three handed out before: {seen:?}");

    sims[1].drain.store(true, Ordering::SeqCst);
    assert!(wait_until(TIMEOUT, || backends(&lb)["drains"]["state"] == "draining"));
    sims[2].lose_connection();
    assert!(wait_until(TIMEOUT, || !backends(&lb)
        .get("vanishes")
        .is_some_and(|b| b["state"] == "ready")));
    for _ in 0..100 {
        let (resp, json) = dispatch(&mut client, None);
        assert_eq!((resp.status, json["guid"].as_str()), (200, Some("keep")));
    }
    sims[0].lose_connection_and_expect_503(&lb);
}

impl SimBackend {
    /// With the last eligible backend gone the answer is 503 JSON.
    fn lose_connection_and_expect_503(&mut self, lb: &Balancer) {
        self.lose_connection();
        let unavailable = wait_until(TIMEOUT, || {
            let (resp, _) = dispatch(&mut HttpClient::connect(lb.addr()), None);
            resp.status == 503
        });
        assert!(unavailable);
        let (resp, json) = dispatch(&mut HttpClient::connect(lb.addr()), None);
        assert_eq!(resp.header("content-type"), Some("application/json"));
        assert_eq!(json["error"], "no backend available");
    }
}

/// Three static backends with public bindings (never dialled in dispatch mode).
fn static_args(extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = DISPATCH.iter().map(|s| s.to_string()).collect();
    for p in 1..=3 {
        v.push("-B".into());
        v.push(format!("ws://127.0.0.1:{p},public=ws://s{p}.example/"));
    }
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn start_static(extra: &[&str]) -> Balancer {
    let args = static_args(extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Balancer::start(&args, &[])
}

#[test]
fn sticky_clients_get_the_same_url_every_time() {
    // Cookie mode: the first answer sets the cookie; a client that keeps it (a cookie jar
    // of one) gets that backend 100 times out of 100.
    let lb = start_static(&["--sticky", "cookie", "--algorithm", "random"]);
    let mut client = HttpClient::connect(lb.addr());
    let (first, json) = dispatch(&mut client, None);
    let set = first.header("set-cookie").expect("sticky cookie set");
    let jar = set.split(';').next().unwrap().to_string();
    let url = json["url"].clone();
    for _ in 0..100 {
        let (resp, json) = dispatch(&mut client, Some(&jar));
        assert_eq!(json["url"], url);
        assert!(resp.header("set-cookie").is_none(), "cookie already right");
    }
    // Without the cookie, `random` spreads: stickiness is what kept the URL.
    let urls: std::collections::BTreeSet<String> = (0..60)
        .map(|_| dispatch(&mut client, None).1["url"].to_string())
        .collect();
    assert!(urls.len() > 1, "random never varied: {urls:?}");

    // ip mode: same client address, same backend.
    let lb = start_static(&["--sticky", "ip", "--algorithm", "round-robin"]);
    let mut client = HttpClient::connect(lb.addr());
    let url = dispatch(&mut client, None).1["url"].clone();
    for _ in 0..100 {
        assert_eq!(dispatch(&mut client, None).1["url"], url);
    }
}

#[test]
fn redirect_websocket_and_bad_input() {
    let lb = start_static(&[]);
    let resp = get(lb.addr(), "/connect?redirect=1&foo=bar");
    assert_eq!(resp.status, 307);
    let location = resp.header("location").expect("Location").to_string();
    assert!(
        location.starts_with("ws://s") && location.ends_with(".example/"),
        "{location}"
    );

    let mut ws = ws_connect(lb.addr(), "/connect?x=y");
    let Message::Text(text) = ws.read().expect("dispatch message") else {
        panic!("expected a text message")
    };
    let json: Value = serde_json::from_str(text.as_str()).unwrap();
    assert!(
        json["url"].as_str().unwrap().starts_with("ws://s"),
        "{json}"
    );
    assert!(
        json["expires"].is_u64() && json["guid"].is_string(),
        "{json}"
    );
    match ws.read() {
        Ok(Message::Close(Some(f))) => assert_eq!(u16::from(f.code), 1000),
        other => panic!("expected close 1000, got {other:?}"),
    }

    let post = http_request(
        lb.addr(),
        b"POST /connect HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert_eq!((post.status, post.header("allow")), (405, Some("GET")));

    for (args, flag) in [
        (vec!["--dispatch-path", "connect"], "--dispatch-path"),
        (vec!["-B", "ws://127.0.0.1:1,public=ftp://x"], "--backend"),
        (vec!["-B", "ws://127.0.0.1:1,public=ws://a b"], "--backend"),
    ] {
        let (status, _, err) = run_wslb(&args);
        assert_eq!(status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains(flag), "{err}");
    }
}

#[test]
fn python_verifier_accepts_fresh_tickets_only() {
    const SECRET: &str = "dispatch-test-secret-0123";
    let lb = start_static(&["--dispatch-secret", SECRET, "--dispatch-ttl", "30s"]);
    let (_, json) = dispatch(&mut HttpClient::connect(lb.addr()), None);
    let url = json["url"].as_str().unwrap().to_string();
    let guid = json["guid"].as_str().unwrap().to_string();
    let expires = json["expires"].as_u64().unwrap();
    assert!(url.contains("?wslb_ticket="), "{url}");
    let verifier = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/verify_ticket.py");
    let verify = |text: &str, extra: &[&str]| {
        let out = Command::new(python())
            .arg(&verifier)
            .args([SECRET, text, "--guid", &guid])
            .args(extra)
            .output()
            .expect("run python");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = verify(&url, &[]);
    assert_eq!(code, Some(0), "fresh ticket refused: {out}");
    // Tampered: one hex digit of the MAC changed, or the expiry pushed out.
    let last = url.chars().last().unwrap();
    let tampered = format!(
        "{}{}",
        &url[..url.len() - 1],
        if last == '0' { '1' } else { '0' }
    );
    assert_eq!(verify(&tampered, &[]).0, Some(1));
    let longer = url.replace(&format!(".{expires}."), &format!(".{}.", expires + 3600));
    assert_eq!(verify(&longer, &[]).1.trim(), "refused: bad mac");
    // Expired, and the same ticket replayed after its expiry.
    let at = expires.to_string();
    assert_eq!(verify(&url, &["--now", &at]).1.trim(), "refused: expired");
    let later = (expires + 600).to_string();
    assert_eq!(verify(&url, &["--now", &later]).0, Some(1));
    // Another backend's ticket.
    let out = Command::new(python())
        .arg(&verifier)
        .args([SECRET, &url, "--guid", "someone-else"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

// ---------------------------------------------------------------------------------------------
// A page in headless Chromium asks the dispatch endpoint (WebSocket), then opens the
// WebSocket to the URL it got and asks the backend its name.

fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

const PAGE: &str = r#"<!doctype html><meta charset="utf-8"><title>dispatch</title>
<p id="out">pending</p><img src="/done" alt="">
<script>
const out = document.getElementById("out");
const report = (t) => { out.textContent = t; fetch("/result?" + encodeURIComponent(t)); };
const d = new WebSocket("ws://LB/connect");
d.onmessage = (e) => {
  const url = JSON.parse(e.data).url;
  const b = new WebSocket(url);
  b.onopen = () => b.send("whoami");
  b.onmessage = (m) => report("reached " + m.data + " at " + url);
  b.onerror = () => report("error opening " + url);
};
d.onerror = () => report("dispatch failed");
</script>"#;

/// A tiny HTTP/1.1 server on 127.0.0.1: `answer(path)` is the body of each `200`.
fn serve_http(answer: impl Fn(&str) -> String + Send + Sync + 'static) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = Arc::new(answer);
    thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let answer = Arc::clone(&answer);
            thread::spawn(move || {
                let mut line = String::new();
                let _ = BufReader::new(&stream).read_line(&mut line);
                let body = answer(line.split(' ').nth(1).unwrap_or("/"));
                let mut s = &stream;
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    addr
}

/// Serves [`PAGE`]; `/done` (an image the page waits for, so the load event and
/// `--dump-dom` come after it) is answered once the page posted its result to `/result`.
fn serve_page(lb: SocketAddr) -> SocketAddr {
    let result: Arc<Mutex<Option<String>>> = Arc::default();
    let page = PAGE.replace("LB", &lb.to_string());
    serve_http(move |path| {
        if let Some(r) = path.strip_prefix("/result?") {
            *result.lock().unwrap() = Some(r.to_string());
        } else if path == "/done" {
            wait_until(Duration::from_secs(20), || result.lock().unwrap().is_some());
        } else {
            return page.clone();
        }
        String::new()
    })
}

#[test]
fn agent_reports_load_from_its_load_url_and_announces_public_bindings() {
    let lb = Balancer::start(
        &[
            "--control",
            "127.0.0.1:0",
            "--heartbeat",
            "200ms",
            "--dispatch-path",
            "/connect",
        ],
        &[],
    );
    let load = serve_http(|path| {
        if path == "/load" {
            "7\n".into()
        } else {
            String::new()
        }
    });
    let balancer = format!("ws://{}/register", lb.control_addr());
    let load_url = format!("http://{load}/load");
    let _agent = common::Agent::start(
        &[
            "--balancer",
            &balancer,
            "--heartbeat",
            "200ms",
            "--public-binding",
            "wss://agent.example/ws",
            "--load-url",
            &load_url,
        ],
        "agent-dispatch",
        "agent-echo",
    );
    let reported = wait_until(TIMEOUT, || {
        backends(&lb)
            .get("agent-dispatch")
            .is_some_and(|b| b["reported_load"] == 7)
    });
    assert!(reported, "no load 7 reported: {:?}", backends(&lb));
    let (resp, json) = dispatch(&mut HttpClient::connect(lb.addr()), None);
    assert_eq!(resp.status, 200);
    assert_eq!(json["url"], "wss://agent.example/ws");
    assert_eq!(json["guid"], "agent-dispatch");
}

#[test]
fn browser_dispatch_then_direct_websocket() {
    let Some(browser) = chromium() else {
        eprintln!("SKIPPED: chromium is not installed (apt-get install -y chromium)");
        return;
    };
    let echo = Backend::start("direct-echo");
    let spec = format!("{},public={}/", echo.url(), echo.url());
    let lb = Balancer::start(&["--dispatch-path", "/connect", "-B", &spec], &[]);
    let page = serve_page(lb.addr());
    let profile =
        std::env::temp_dir().join(format!("wslb-dispatch-chromium-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&profile);
    let mut cmd = Command::new("timeout");
    cmd.arg("60")
        .arg(&browser)
        .args(CHROMIUM_FLAGS)
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--dump-dom", &format!("http://{page}/")]);
    let out = cmd.output().expect("run chromium");
    let _ = std::fs::remove_dir_all(&profile);
    let dom = String::from_utf8_lossy(&out.stdout);
    let want = format!("reached direct-echo at {}/", echo.url());
    assert!(
        dom.contains(&want),
        "{want:?} not in DOM:\n{dom}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
