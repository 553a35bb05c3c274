//! The live status page: `GET /api/live` as read by curl (snapshots, an event caused by a
//! drain), a page that never reads is dropped rather than buffered for, and the page in
//! headless Chromium draws its charts, keeps them moving and drains a backend on a click.
mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use std::{env, fs, thread};

use common::*;
use serde_json::Value;

const TOKEN: &str = "live-page-secret";

/// A child process killed when the test ends, however it ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start() -> (Backend, Backend, Balancer) {
    let (a, b) = (Backend::start("live-a"), Backend::start("live-b"));
    let lb = Balancer::start(
        &[
            "--control",
            "127.0.0.1:0",
            "--token",
            TOKEN,
            "-a",
            "round-robin",
        ],
        &[&a, &b],
    );
    (a, b, lb)
}

/// One admin request with the bearer token on a fresh connection.
fn admin(addr: SocketAddr, method: &str, target: &str) -> Response {
    let body = if method == "GET" {
        ""
    } else {
        "Content-Length: 0\r\n"
    };
    let raw = format!(
        "{method} {target} HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {TOKEN}\r\n{body}Connection: close\r\n\r\n"
    );
    http_request(addr, raw.as_bytes())
}

fn metric(lb: &Balancer, name: &str) -> u64 {
    let text = admin(lb.control_addr(), "GET", "/metrics").text();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// `curl -N` on the event stream; what it printed so far.
fn curl_stream(lb: &Balancer) -> (Reaped, Arc<Mutex<String>>) {
    let url = format!("http://{}/api/live?token={TOKEN}", lb.control_addr());
    let mut child = Command::new("curl")
        .args(["-sN", "--max-time", "60", &url])
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl (the third-party SSE client) is needed");
    let stdout = child.stdout.take().expect("stdout");
    let text: Arc<Mutex<String>> = Arc::default();
    let sink = Arc::clone(&text);
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let mut t = sink.lock().unwrap();
            t.push_str(&line);
            t.push('\n');
        }
    });
    (Reaped(child), text)
}

/// WebSocket clients on both backends exchanging messages until `stop`; a client closed
/// by a drain (1012) is replaced.
fn traffic(lb: &Balancer, stop: Arc<AtomicBool>) -> thread::JoinHandle<u64> {
    let addr = lb.addr();
    thread::spawn(move || {
        let mut clients: Vec<_> = (0..4).map(|_| ws_connect(addr, "/")).collect();
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            for c in &mut clients {
                let answered = c
                    .send(tungstenite::Message::text("whoami"))
                    .and_then(|()| c.read())
                    .is_ok();
                if answered {
                    n += 1;
                } else {
                    *c = ws_connect(addr, "/");
                }
            }
            thread::sleep(Duration::from_millis(20));
        }
        n
    })
}

/// `/api/backends/{url}/{what}` with the URL as one path segment.
fn backend_path(url: &str, what: &str) -> String {
    let name = url
        .replace('%', "%25")
        .replace('/', "%2F")
        .replace(':', "%3A");
    format!("/api/backends/{name}/{what}")
}

fn frames<'a>(text: &'a str, event: &str) -> Vec<&'a str> {
    let tag = format!("event: {event}\ndata: ");
    text.split("\n\n")
        .filter_map(|f| f.trim_start_matches('\n').strip_prefix(tag.as_str()))
        .collect()
}

#[test]
fn curl_receives_snapshots_and_the_event_of_a_drain() {
    let (a, _b, lb) = start();
    let ctl = lb.control_addr();
    let refused = get(ctl, "/api/live");
    assert_eq!(refused.status, 401, "the stream needs the token");
    let page = get(ctl, &format!("/?token={TOKEN}"));
    assert_eq!(page.status, 200);
    let csp = page.header("content-security-policy").unwrap_or_default();
    assert!(csp.contains("default-src 'self'"), "CSP: {csp:?}");
    assert!(page.text().contains("<script src=\"/status.js\"></script>"));
    let js = get(ctl, "/status.js");
    assert_eq!(js.status, 200, "the script holds no data: no token needed");
    assert!(js.text().contains("EventSource"));

    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(&lb, Arc::clone(&stop));
    let (_curl, text) = curl_stream(&lb);
    assert!(
        wait_until(Duration::from_secs(10), || frames(
            &text.lock().unwrap(),
            "snapshot"
        )
        .len()
            >= 2),
        "two snapshots within 10 s:\n{}",
        text.lock().unwrap()
    );
    let r = admin(ctl, "POST", &backend_path(&a.url(), "drain"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        wait_until(Duration::from_secs(5), || {
            let t = text.lock().unwrap();
            frames(&t, "event").iter().any(|e| {
                let v: Value = serde_json::from_str(e).unwrap_or_default();
                v["event"] == "backend_changed"
                    && v["change"] == "server draining"
                    && v["backend"] == a.url().as_str()
            })
        }),
        "no drain event in:\n{}",
        text.lock().unwrap()
    );
    // The next snapshots say so too, and carry the traffic as rates.
    assert!(wait_until(Duration::from_secs(5), || {
        let t = text.lock().unwrap();
        frames(&t, "snapshot").last().is_some_and(|s| {
            let v: Value = serde_json::from_str(s).unwrap_or_default();
            let drained = v["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|b| b["url"] == a.url().as_str() && b["state"] == "draining");
            let per_backend = v["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|b| b["up_s"].as_u64() > Some(0) && b["down_s"].as_u64() > Some(0));
            drained && v["up_s"].as_u64().unwrap_or(0) > 0 && per_backend
        })
    }));
    stop.store(true, Ordering::Relaxed);
    assert!(load.join().unwrap() > 0);
    let t = text.lock().unwrap();
    assert!(
        t.starts_with("retry: 2000\n\nevent: history\ndata: {"),
        "{t}"
    );
}

#[test]
fn a_page_that_never_reads_is_dropped_not_buffered_for() {
    let (a, _b, lb) = start();
    let ctl = lb.control_addr();
    let (_curl, text) = curl_stream(&lb);
    // A page that asks for the stream with a tiny receive window and never reads.
    let mut stalled = small_window_connect(ctl);
    write!(
        stalled,
        "GET /api/live?token={TOKEN} HTTP/1.1\r\nHost: admin\r\n\r\n"
    )
    .unwrap();
    assert!(wait_until(Duration::from_secs(5), || metric(
        &lb,
        "wslb_live_subscribers"
    ) == 2));
    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(&lb, Arc::clone(&stop));
    let rss_before = lb.rss_kib();
    // Each drain and undrain is an event pushed to every page at once: ~150 bytes each, so
    // a few thousand pass the 256 KiB queue plus what the kernel buffers.
    let path = |what: &str| backend_path(&a.url(), what);
    let mut max_queued = 0;
    for i in 0..6000 {
        let r = admin(
            ctl,
            "POST",
            &path(if i % 2 == 0 { "drain" } else { "undrain" }),
        );
        assert_eq!(r.status, 200);
        if i % 250 == 0 {
            max_queued = max_queued.max(metric(&lb, "wslb_live_queued_bytes"));
            if metric(&lb, "wslb_live_dropped_total") > 0 {
                break;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    eprintln!("most bytes queued for live pages: {max_queued}");
    assert_eq!(
        metric(&lb, "wslb_live_dropped_total"),
        1,
        "the stalled page"
    );
    assert_eq!(metric(&lb, "wslb_live_subscribers"), 1, "curl still reads");
    assert!(
        max_queued <= 2 * 256 * 1024,
        "queues bounded: {max_queued} bytes"
    );
    let rss_after = lb.rss_kib();
    assert!(
        rss_after < rss_before + 8 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    // The page that reads saw the events the stalled one missed.
    let t = text.lock().unwrap();
    assert!(frames(&t, "event").len() > 100, "curl kept up");
    drop(stalled);
}

/// A connection whose receive buffer is set small before connecting, so the window it
/// advertises is small from the start (set later, the kernel keeps the larger window).
fn small_window_connect(addr: SocketAddr) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.connect(&addr.into()).unwrap();
    s.into()
}

fn chromium() -> Option<PathBuf> {
    let in_path = env::var_os("PATH").and_then(|paths| {
        env::split_paths(&paths)
            .flat_map(|d| [d.join("chromium"), d.join("chromium-browser")])
            .find(|p| p.exists())
    });
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .or(in_path)
}

#[test]
fn chromium_draws_the_charts_updates_them_and_drains_on_a_click() {
    let Some(browser) = chromium() else {
        eprintln!("SKIPPED: chromium is not installed (apt-get install -y chromium)");
        return;
    };
    let (a, b, lb) = start();
    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(&lb, Arc::clone(&stop));
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let profile = out.join(format!("chromium-live-{}", std::process::id()));
    let _ = fs::remove_dir_all(&profile);
    let _chromium = Reaped(
        headless_chromium(&browser, &profile)
            .args(["--remote-debugging-port=0", "about:blank"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium"),
    );
    // Port 0: Chromium writes the port it took into the profile.
    let mut port = None;
    wait_until(Duration::from_secs(20), || {
        port = fs::read_to_string(profile.join("DevToolsActivePort"))
            .ok()
            .and_then(|s| s.lines().next()?.parse::<u16>().ok());
        port.is_some()
    });
    let port = port.expect("chromium did not open its DevTools port");
    let url = format!("http://{}/?token={TOKEN}", lb.control_addr());
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/status_page_cdp.py");
    let run = Command::new(python())
        .arg(&script)
        .args([
            &port.to_string(),
            &url,
            &a.url(),
            &out.display().to_string(),
        ])
        .output()
        .expect("run the CDP script");
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "CDP script failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let r: Value = serde_json::from_str(stdout.trim()).expect("CDP script output");
    assert_eq!(r["live"], true, "no snapshots reached the page: {r}");
    let charts = |k: &str| r[k].as_array().cloned().unwrap_or_default();
    let (first, second) = (charts("first"), charts("second"));
    assert_eq!(first.len(), 3, "a chart for all and one per backend: {r}");
    for name in ["all".to_string(), a.url(), b.url()] {
        let find = |cs: &[Value]| {
            cs.iter()
                .find(|c| c["name"] == name.as_str())
                .cloned()
                .unwrap_or_else(|| panic!("no chart for {name}: {r}"))
        };
        let (c1, c2) = (find(&first), find(&second));
        assert!(c1["points"].as_u64() > Some(0), "{name} drew nothing: {r}");
        assert!(
            c2["points"].as_u64() > c1["points"].as_u64() && c1["paths"] != c2["paths"],
            "{name}'s chart did not move in 3 s: {r}"
        );
    }
    assert_eq!(r["button"][2], "Drain", "{r}");
    assert_eq!(r["drained"], true, "the row did not turn draining: {r}");
    let events = r["events"].as_str().unwrap_or_default();
    assert!(events.contains("server draining"), "events list: {events}");
    let rows: Value =
        serde_json::from_str(&admin(lb.control_addr(), "GET", "/api/backends").text())
            .expect("backends JSON");
    let drained = rows
        .as_array()
        .into_iter()
        .flatten()
        .find(|row| row["name"] == a.url().as_str());
    assert_eq!(
        drained.map(|row| row["state"].clone()),
        Some("draining".into())
    );
    for shot in r["screenshots"].as_array().into_iter().flatten() {
        let path = shot.as_str().unwrap_or_default();
        let len = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        assert!(len > 5000, "screenshot {path}: {len} bytes");
        eprintln!("screenshot: {path}");
    }
    let _ = fs::remove_dir_all(&profile);
}

#[test]
fn at_most_sixteen_pages_stream_at_once() {
    let (_a, _b, lb) = start();
    let ctl = lb.control_addr();
    let open = |_| {
        let mut s = TcpStream::connect(ctl).unwrap();
        write!(
            s,
            "GET /api/live?token={TOKEN} HTTP/1.1\r\nHost: admin\r\n\r\n"
        )
        .unwrap();
        s
    };
    let pages: Vec<TcpStream> = (0..16).map(open).collect();
    assert!(wait_until(Duration::from_secs(5), || metric(
        &lb,
        "wslb_live_subscribers"
    ) == 16));
    let extra = admin(ctl, "GET", "/api/live");
    assert_eq!(extra.status, 503, "{}", extra.text());
    drop(pages);
    // Closed pages free their places (found out at the next push, within a second).
    assert!(wait_until(Duration::from_secs(5), || metric(
        &lb,
        "wslb_live_subscribers"
    ) == 0));
}
