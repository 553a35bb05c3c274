//! The admin API on the control listener and the balancer's own messages: Broadcast,
//! WriteData, Ping, close, drain, `/metrics`, the status page, `--events`, `--ws-ping`, and the
//! library's `ServerHandle`. Every test starts its own balancer and backends.
mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use std::{env, fs, process, thread};

use common::*;
use serde_json::Value;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::CloseFrame;
use tungstenite::{Message, WebSocket};

type Ws = WebSocket<TcpStream>;

/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------------------------
// Helpers

/// One admin request on a fresh connection to the control listener.
fn admin_req(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut raw = format!("{method} {target} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n");
    for (k, v) in headers {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    if method != "GET" || !body.is_empty() {
        raw.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    raw.push_str("\r\n");
    let mut raw = raw.into_bytes();
    raw.extend_from_slice(body);
    http_request(addr, &raw)
}

fn admin_get(lb: &Balancer, target: &str) -> Response {
    admin_req(lb.control_addr(), "GET", target, &[], b"")
}

/// `POST target` with an optional Content-Type; asserts 200 and returns the `"sent"` count.
fn admin_post(lb: &Balancer, target: &str, ctype: Option<&str>, body: &[u8]) -> u64 {
    let headers: Vec<(&str, &str)> = ctype.map(|c| ("Content-Type", c)).into_iter().collect();
    let r = admin_req(lb.control_addr(), "POST", target, &headers, body);
    assert_eq!(r.status, 200, "POST {target}: {}", r.text());
    sent_count(&r)
}

fn json_body(r: &Response) -> Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", r.text()))
}

fn sent_count(r: &Response) -> u64 {
    let v = json_body(r);
    v["sent"]
        .as_u64()
        .unwrap_or_else(|| panic!("no \"sent\" count in {v}"))
}

/// Opens the control WebSocket and registers `guid` with one binding.
fn register(lb: &Balancer, guid: &str, binding: &str) -> Ws {
    let addr = lb.control_addr();
    let url = format!("ws://{addr}/register");
    let (mut ws, _) = tungstenite::client::client(url.as_str(), connect(addr))
        .unwrap_or_else(|e| panic!("control handshake: {e}"));
    let msg = format!(
        r#"{{"type":"register","version":1,"guid":"{guid}","bindings":["{binding}"],"weight":1}}"#
    );
    ws.send(Message::text(msg)).expect("send register");
    let answer = next_data(&mut ws).into_text().expect("text answer");
    assert!(answer.contains(r#""type":"registered""#), "{answer}");
    assert!(answer.contains(guid), "{answer}");
    ws
}

/// Next data or close message, skipping pings and pongs (tungstenite answers pings).
fn next_data(ws: &mut Ws) -> Message {
    loop {
        match ws.read() {
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(m) => return m,
            Err(e) => panic!("WebSocket read: {e}"),
        }
    }
}

/// Like `whoami`, but skips pings that arrive before the answer (`--ws-ping`).
fn ask_name(ws: &mut Ws) -> String {
    ws.send(Message::text("whoami")).expect("send whoami");
    match next_data(ws) {
        Message::Text(t) => t.to_string(),
        m => panic!("expected the backend's name, got {m:?}"),
    }
}

/// Asserts that no data message arrives within [`QUIET`]; restores the usual read timeout.
fn assert_quiet(ws: &mut Ws, who: &str) {
    ws.get_ref().set_read_timeout(Some(QUIET)).unwrap();
    let deadline = Instant::now() + QUIET;
    while Instant::now() < deadline {
        match ws.read() {
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(m) => panic!("{who} should have received nothing, got {m:?}"),
            Err(tungstenite::Error::Io(e)) if is_timeout(&e) => break,
            Err(e) => panic!("{who}: {e}"),
        }
    }
    ws.get_ref().set_read_timeout(Some(TIMEOUT)).unwrap();
}

/// `GET /api/clients` as JSON.
fn clients(lb: &Balancer) -> Vec<Value> {
    let r = admin_get(lb, "/api/clients");
    assert_eq!(r.status, 200, "{}", r.text());
    json_body(&r).as_array().expect("array").clone()
}

/// The balancer's id for the WebSocket client `ws` (matched by its local address).
fn client_id(lb: &Balancer, ws: &Ws) -> u64 {
    let me = ws.get_ref().local_addr().unwrap().to_string();
    let mut id = None;
    wait_until(TIMEOUT, || {
        id = clients(lb)
            .iter()
            .find(|c| c["peer"] == me.as_str() && c["websocket"] == true)
            .and_then(|c| c["id"].as_u64());
        id.is_some()
    });
    id.unwrap_or_else(|| panic!("{me} not in /api/clients: {:?}", clients(lb)))
}

/// A fresh path under the system temp directory (removed when dropped).
struct TempPath(PathBuf);

impl TempPath {
    fn new(name: &str) -> TempPath {
        let p = env::temp_dir().join(format!("wslb-admin-{}-{name}", process::id()));
        let _ = fs::remove_dir_all(&p);
        let _ = fs::remove_file(&p);
        TempPath(p)
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
        let _ = fs::remove_file(&self.0);
    }
}

/// Runs `cmd` to completion with stdout/stderr captured, killed after `limit`.
fn run_with_deadline(mut cmd: Command, limit: Duration) -> (bool, String, String) {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut text = Vec::new();
            let _ = pipe.read_to_end(&mut text);
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let mut status = None;
    wait_until(limit, || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    });
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    (status.is_some_and(|s| s.success()), out, err)
}

/// The samples of a Prometheus text exposition, parsed by the reference Python client:
/// `(name, labels) -> value`.
type Samples = BTreeMap<(String, BTreeMap<String, String>), f64>;

fn parse_metrics(text: &str) -> Samples {
    let have = Command::new(common::python())
        .args(["-c", "import prometheus_client"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    assert!(
        have.is_ok_and(|s| s.success()),
        "python3 with prometheus_client is needed to check /metrics: `make test` installs it \
         (pip install prometheus_client)"
    );
    const SCRIPT: &str = r#"
import sys, json
from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append({"family": fam.name, "type": fam.type, "name": s.name,
                    "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;
    let mut child = Command::new(common::python())
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().expect("python3 output");
    assert!(
        out.status.success(),
        "prometheus_client rejected /metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: Vec<Value> = serde_json::from_slice(&out.stdout).expect("parser JSON");
    parsed
        .iter()
        .map(|s| {
            let labels = s["labels"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect();
            let name = s["name"].as_str().unwrap().to_string();
            ((name, labels), s["value"].as_f64().unwrap())
        })
        .collect()
}

/// The value of sample `name{labels}`; panics if it is absent.
fn sample(m: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    *m.get(&(name.to_string(), labels.clone()))
        .unwrap_or_else(|| panic!("no sample {name}{labels:?} in {m:#?}"))
}

/// Sum of every sample called `name` (across labels).
fn sum(m: &Samples, name: &str) -> f64 {
    m.iter()
        .filter(|((n, _), _)| n == name)
        .map(|(_, v)| v)
        .sum()
}

// ---------------------------------------------------------------------------------------------
// 1. Broadcast at message boundaries

/// What one client saw: fragmented messages from its backend and broadcasts, in order.
#[derive(Debug, Default)]
struct Seen {
    frags: Vec<String>,
    broadcasts: Vec<(usize, Message)>, // (fragment messages seen before it, message)
    error: Option<String>,
}

#[test]
fn broadcast_reaches_every_client_between_fragmented_messages() {
    const FRAGS: usize = 200;
    const BROADCASTS: usize = 5;
    let (a, b) = (Backend::start("frag-a"), Backend::start("frag-b"));
    let lb = Balancer::start(
        &["--control", "127.0.0.1:0", "-a", "round-robin"],
        &[&a, &b],
    );
    let mut sockets: Vec<Ws> = (0..4).map(|_| ws_connect(lb.addr(), "/")).collect();
    let mut names: Vec<String> = sockets.iter_mut().map(whoami).collect();
    names.sort();
    assert_eq!(names, ["frag-a", "frag-a", "frag-b", "frag-b"]);
    let n = sockets.len();

    let progress: Arc<Vec<AtomicUsize>> = Arc::new((0..n).map(|_| AtomicUsize::new(0)).collect());
    let readers: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, mut ws)| {
            let progress = Arc::clone(&progress);
            thread::spawn(move || {
                let mut seen = Seen::default();
                if let Err(e) = ws.send(Message::text(format!("frags {FRAGS}"))) {
                    seen.error = Some(format!("send frags: {e}"));
                    return seen;
                }
                while seen.frags.len() < FRAGS || seen.broadcasts.len() < BROADCASTS {
                    match ws.read() {
                        Ok(Message::Text(t)) if t.starts_with("fragment-message-") => {
                            seen.frags.push(t.to_string());
                            progress[i].store(seen.frags.len(), Ordering::SeqCst);
                        }
                        Ok(m @ (Message::Text(_) | Message::Binary(_))) => {
                            seen.broadcasts.push((seen.frags.len(), m))
                        }
                        Ok(Message::Ping(_) | Message::Pong(_)) => {}
                        Ok(other) => {
                            seen.error = Some(format!("unexpected {other:?}"));
                            break;
                        }
                        Err(e) => {
                            seen.error = Some(format!("read: {e}"));
                            break;
                        }
                    }
                }
                progress[i].store(usize::MAX, Ordering::SeqCst); // done or failed
                seen
            })
        })
        .collect();

    // Broadcast k goes out once every client has read 30 * (k + 1) fragmented messages, so
    // all of them land while both backends are still streaming.
    let mut expected = Vec::new();
    for k in 0..BROADCASTS {
        let want = 30 * (k + 1);
        wait_until(TIMEOUT, || {
            progress.iter().all(|p| p.load(Ordering::SeqCst) >= want)
        });
        let (ctype, msg) = if k % 2 == 0 {
            let text = format!("broadcast-{k}");
            (Some("text/plain"), Message::text(text))
        } else {
            let bytes = vec![0xB0, k as u8, 0, 0xff, 0x80];
            (Some("application/octet-stream"), Message::binary(bytes))
        };
        let body = msg.clone().into_data();
        assert_eq!(
            admin_post(&lb, "/api/broadcast", ctype, &body),
            n as u64,
            "broadcast {k} reaches every WebSocket client"
        );
        expected.push(msg);
    }

    let want_frags: Vec<String> = (0..FRAGS)
        .map(|i| format!("fragment-message-{i}"))
        .collect();
    for (i, reader) in readers.into_iter().enumerate() {
        let seen = reader.join().expect("reader thread");
        assert_eq!(seen.error, None, "client {i}: {seen:?}");
        assert_eq!(
            seen.frags, want_frags,
            "client {i}: fragmented messages intact, in order"
        );
        let got: Vec<&Message> = seen.broadcasts.iter().map(|(_, m)| m).collect();
        let want: Vec<&Message> = expected.iter().collect();
        assert_eq!(
            got, want,
            "client {i}: each broadcast exactly once, in order"
        );
        // The point of the test: broadcasts landed between the backend's messages.
        assert!(
            seen.broadcasts.iter().any(|(at, _)| *at < FRAGS),
            "client {i}: no broadcast arrived while the backend was streaming: {:?}",
            seen.broadcasts
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 2. WriteData

#[test]
fn write_data_reaches_one_client_only() {
    let a = Backend::start("wd");
    let lb = Balancer::start(&["--control", "127.0.0.1:0"], &[&a]);
    let mut socks: Vec<Ws> = (0..3).map(|_| ws_connect(lb.addr(), "/")).collect();
    for s in &mut socks {
        assert_eq!(whoami(s), "wd");
    }
    let id = client_id(&lb, &socks[0]);

    let path = format!("/api/clients/{id}/send");
    assert_eq!(admin_post(&lb, &path, Some("text/plain"), b"just-you"), 1);
    assert_eq!(next_data(&mut socks[0]), Message::text("just-you"));
    assert_eq!(
        admin_post(
            &lb,
            &path,
            Some("application/octet-stream"),
            &[0, 1, 2, 0xff]
        ),
        1
    );
    assert_eq!(
        next_data(&mut socks[0]),
        Message::binary(vec![0, 1, 2, 0xff])
    );
    // No Content-Type means text.
    assert_eq!(admin_post(&lb, &path, None, b"untyped"), 1);
    assert_eq!(next_data(&mut socks[0]), Message::text("untyped"));
    for (i, s) in socks.iter_mut().enumerate().skip(1) {
        assert_quiet(s, &format!("client {i}"));
    }
    // The target's stream is still a working tunnel.
    assert_eq!(whoami(&mut socks[0]), "wd");

    // No such client, and a client that is not a WebSocket: 404.
    let r = admin_req(
        lb.control_addr(),
        "POST",
        "/api/clients/999999/send",
        &[],
        b"x",
    );
    assert_eq!(r.status, 404, "{}", r.text());
    let mut http = HttpClient::connect(lb.addr());
    http.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(http.read_response().unwrap().status, 200);
    let me = http.stream.local_addr().unwrap().to_string();
    let list = clients(&lb);
    let plain = list
        .iter()
        .find(|c| c["peer"] == me.as_str())
        .unwrap_or_else(|| panic!("keep-alive client {me} not listed: {list:?}"));
    assert_eq!(plain["websocket"], false, "{plain}");
    let path = format!("/api/clients/{}/send", plain["id"]);
    let r = admin_req(lb.control_addr(), "POST", &path, &[], b"x");
    assert_eq!(r.status, 404, "WriteData to an HTTP client: {}", r.text());
}

// ---------------------------------------------------------------------------------------------
// 3. Ping

#[test]
fn balancer_ping_is_answered_and_its_pong_never_reaches_the_backend() {
    let a = Backend::start("pinged");
    let lb = Balancer::start(&["--control", "127.0.0.1:0"], &[&a]);
    let mut ws = ws_connect(lb.addr(), "/");
    let mut other = ws_connect(lb.addr(), "/");
    assert_eq!(whoami(&mut ws), "pinged");
    assert_eq!(whoami(&mut other), "pinged");
    let id = client_id(&lb, &ws);

    assert_eq!(
        admin_post(&lb, &format!("/api/clients/{id}/ping"), None, b""),
        1
    );
    match ws.read().expect("ping") {
        Message::Ping(p) => assert!(p.starts_with(b"wslb"), "ping payload {p:?}"),
        m => panic!("expected a ping, got {m:?}"),
    }
    ws.flush().expect("send the pong tungstenite queued");
    // A pong of the client's own, then a message: once its echo is back, the backend has read
    // everything sent before it.
    ws.send(Message::Pong(b"mine".to_vec().into()))
        .expect("own pong");
    assert_eq!(whoami(&mut ws), "pinged");
    assert_eq!(a.stat("pongs"), 1, "the client's own pong is relayed");
    assert_eq!(
        a.stat("wslb_pongs"),
        0,
        "the answer to the balancer's ping is not"
    );
    assert_quiet(&mut other, "the client that was not pinged");

    // Ping everyone: both answer, neither answer is relayed.
    assert_eq!(admin_post(&lb, "/api/ping", None, b""), 2);
    for s in [&mut ws, &mut other] {
        match s.read().expect("ping") {
            Message::Ping(p) => assert!(p.starts_with(b"wslb"), "ping payload {p:?}"),
            m => panic!("expected a ping, got {m:?}"),
        }
        s.flush().unwrap();
        assert_eq!(whoami(s), "pinged");
    }
    assert_eq!(a.stat("wslb_pongs"), 0, "balancer pongs consumed");
    assert_eq!(a.stat("pongs"), 1);

    let r = admin_req(
        lb.control_addr(),
        "POST",
        "/api/clients/424242/ping",
        &[],
        b"",
    );
    assert_eq!(r.status, 404, "{}", r.text());
}

// ---------------------------------------------------------------------------------------------
// 4. Close a client

#[test]
fn delete_client_closes_it_with_the_given_code() {
    let a = Backend::start("closer");
    let lb = Balancer::start(&["--control", "127.0.0.1:0"], &[&a]);
    let mut ws = ws_connect(lb.addr(), "/");
    let mut plain = ws_connect(lb.addr(), "/");
    assert_eq!(whoami(&mut ws), "closer");
    assert_eq!(whoami(&mut plain), "closer");
    assert!(wait_until(TIMEOUT, || a.stat("ws_active") == 2));
    let id = client_id(&lb, &ws);

    // Codes that may not be sent on the wire are refused.
    for bad in ["1005", "1006", "999", "5000", "abc"] {
        let r = admin_req(
            lb.control_addr(),
            "DELETE",
            &format!("/api/clients/{id}?code={bad}"),
            &[],
            b"",
        );
        assert_eq!(r.status, 400, "code={bad}: {}", r.text());
    }
    let r = admin_req(
        lb.control_addr(),
        "DELETE",
        &format!("/api/clients/{id}?code=4001"),
        &[],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(sent_count(&r), 1);
    match next_data(&mut ws) {
        Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::from(4001)),
        m => panic!("expected close 4001, got {m:?}"),
    }

    // Default code: 1000.
    let id2 = client_id(&lb, &plain);
    let r = admin_req(
        lb.control_addr(),
        "DELETE",
        &format!("/api/clients/{id2}"),
        &[],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    match next_data(&mut plain) {
        Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Normal),
        m => panic!("expected close 1000, got {m:?}"),
    }
    // Both tunnels are gone on the backend side too, and from the client list.
    assert!(
        wait_until(TIMEOUT, || a.stat("ws_active") == 0),
        "backend still holds {} WebSockets",
        a.stat("ws_active")
    );
    assert!(
        wait_until(TIMEOUT, || clients(&lb).is_empty()),
        "{:?}",
        clients(&lb)
    );
    let r = admin_req(
        lb.control_addr(),
        "DELETE",
        &format!("/api/clients/{id}"),
        &[],
        b"",
    );
    assert_eq!(r.status, 404, "closed client: {}", r.text());
}

// ---------------------------------------------------------------------------------------------
// 5. /metrics and the JSON views

#[test]
fn metrics_and_json_views_match_what_happened() {
    const WS: usize = 3;
    const HTTP: usize = 4;
    const BROADCASTS: usize = 2;
    let (st, rg) = (Backend::start("m-static"), Backend::start("m-registered"));
    let lb = Balancer::start(&["--control", "127.0.0.1:0", "-a", "round-robin"], &[&st]);
    let _ctrl = register(&lb, "guid-metrics", &rg.url());

    let mut socks: Vec<Ws> = (0..WS).map(|_| ws_connect(lb.addr(), "/")).collect();
    for ws in &mut socks {
        for m in ["one", "two"] {
            ws.send(Message::text(m)).unwrap();
            assert_eq!(next_data(ws), Message::text(m));
        }
    }
    for _ in 0..HTTP {
        assert_eq!(get(lb.addr(), "/").status, 200);
    }
    for k in 0..BROADCASTS {
        let body = format!("news {k}");
        assert_eq!(
            admin_post(&lb, "/api/broadcast", Some("text/plain"), body.as_bytes()),
            WS as u64
        );
        for ws in &mut socks {
            assert_eq!(next_data(ws), Message::text(body.as_str()));
        }
    }
    // The HTTP connections are closed on our side; wait until the balancer has reaped them.
    assert!(
        wait_until(TIMEOUT, || clients(&lb).len() == WS),
        "{:?}",
        clients(&lb)
    );

    let resp = admin_get(&lb, "/metrics");
    assert_eq!(resp.status, 200);
    let ctype = resp.header("content-type").unwrap_or_default();
    assert!(ctype.starts_with("text/plain"), "{ctype}");
    let m = parse_metrics(&resp.text());
    let v = |name: &str| sample(&m, name, &[]);
    let (ws, http, bc) = (WS as f64, HTTP as f64, BROADCASTS as f64);
    assert_eq!(v("wslb_websocket_opened_total"), ws);
    assert_eq!(v("wslb_connections_accepted_total"), ws + http);
    assert_eq!(v("wslb_connections_rejected_total"), 0.0);
    assert_eq!(v("wslb_websocket_injected_frames_total"), bc * ws);
    assert_eq!(v("wslb_tls_handshake_failures_total"), 0.0);
    assert_eq!(v("wslb_server_connected_total"), 1.0);
    assert_eq!(v("wslb_server_ready_total"), 1.0);
    assert_eq!(v("wslb_server_disconnected_total"), 0.0);
    assert_eq!(v("wslb_websocket_messages_up_total"), 2.0 * ws);
    assert!(
        v("wslb_websocket_messages_down_total") >= 2.0 * ws,
        "{m:#?}"
    );
    let up = sample(&m, "wslb_websocket_bytes_total", &[("direction", "up")]);
    let down = sample(&m, "wslb_websocket_bytes_total", &[("direction", "down")]);
    // "one"/"two": 3 bytes of payload each way, per message.
    assert!(up >= 2.0 * ws * 3.0, "bytes up {up}");
    assert!(down >= 2.0 * ws * 3.0, "bytes down {down}");
    let class = |c: &str| sample(&m, "wslb_http_responses_total", &[("class", c)]);
    assert_eq!(class("2xx"), http, "{m:#?}");
    assert_eq!(class("1xx"), ws, "one 101 per WebSocket");
    assert_eq!(class("5xx"), 0.0);
    assert_eq!(class("4xx"), 0.0);
    assert_eq!(class("3xx"), 0.0);
    assert_eq!(v("wslb_connections_active"), ws);
    assert_eq!(v("wslb_websocket_active"), ws);
    assert_eq!(sum(&m, "wslb_backend_active_connections"), ws);
    assert_eq!(sum(&m, "wslb_backend_selected_total"), ws + http);
    for name in ["guid-metrics", st.url().as_str()] {
        assert_eq!(
            sample(
                &m,
                "wslb_backend_state",
                &[("backend", name), ("state", "ready")]
            ),
            1.0
        );
        for state in ["draining", "gone"] {
            let labels = [("backend", name), ("state", state)];
            assert_eq!(sample(&m, "wslb_backend_state", &labels), 0.0);
        }
        assert!(sample(&m, "wslb_backend_selected_total", &[("backend", name)]) >= 1.0);
    }

    // GET /api/backends
    let r = admin_get(&lb, "/api/backends");
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap_or_default()
        .contains("json"));
    let list = json_body(&r);
    let list = list.as_array().expect("array");
    assert_eq!(list.len(), 2, "{list:?}");
    for b in list {
        for key in [
            "id",
            "name",
            "guid",
            "state",
            "bindings",
            "weight",
            "active",
            "selected",
            "last_heartbeat_secs_ago",
            "down",
            "tags",
        ] {
            assert!(b.get(key).is_some(), "{key} missing in {b}");
        }
        assert!(
            b["id"].is_u64() && b["name"].is_string() && b["bindings"].is_array(),
            "{b}"
        );
        assert_eq!(b["state"], "ready", "{b}");
        assert_eq!(b["down"], false, "{b}");
        assert!(b["weight"].as_u64().is_some_and(|w| w >= 1), "{b}");
        assert!(b["tags"].is_object(), "{b}");
        assert!(b["selected"].as_u64().is_some_and(|n| n >= 1), "{b}");
    }
    let reg = list
        .iter()
        .find(|b| b["guid"] == "guid-metrics")
        .unwrap_or_else(|| panic!("registered backend missing: {list:?}"));
    assert_eq!(reg["bindings"], serde_json::json!([rg.url()]));
    assert!(reg["last_heartbeat_secs_ago"].is_u64(), "{reg}");
    let stat = list
        .iter()
        .find(|b| b["guid"].is_null())
        .unwrap_or_else(|| panic!("static backend missing: {list:?}"));
    assert!(stat["last_heartbeat_secs_ago"].is_null(), "{stat}");
    let active: u64 = list.iter().map(|b| b["active"].as_u64().unwrap()).sum();
    assert_eq!(active, WS as u64);

    // GET /api/clients
    let mine: Vec<String> = socks
        .iter()
        .map(|w| w.get_ref().local_addr().unwrap().to_string())
        .collect();
    let list = clients(&lb);
    assert_eq!(list.len(), WS, "{list:?}");
    for c in &list {
        for key in [
            "id",
            "peer",
            "backend",
            "websocket",
            "age_secs",
            "bytes_up",
            "bytes_down",
        ] {
            assert!(c.get(key).is_some(), "{key} missing in {c}");
        }
        assert!(c["id"].is_u64(), "{c}");
        assert!(
            mine.iter().any(|p| c["peer"] == p.as_str()),
            "{c} not ours {mine:?}"
        );
        assert_eq!(c["websocket"], true, "{c}");
        assert!(!c["backend"].is_null(), "{c}");
        assert!(c["age_secs"].is_u64(), "{c}");
        assert!(c["bytes_up"].as_u64().is_some_and(|n| n > 0), "{c}");
        assert!(c["bytes_down"].as_u64().is_some_and(|n| n > 0), "{c}");
    }
    let mut ids: Vec<u64> = list.iter().map(|c| c["id"].as_u64().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), WS, "client ids are distinct");
}

// ---------------------------------------------------------------------------------------------
// 6. Status page in a real browser

fn chromium() -> PathBuf {
    let candidates = ["/usr/bin/chromium", "/usr/bin/chromium-browser"];
    if let Some(p) = candidates.iter().map(Path::new).find(|p| p.exists()) {
        return p.to_path_buf();
    }
    let in_path = env::var_os("PATH").and_then(|paths| {
        env::split_paths(&paths)
            .flat_map(|d| [d.join("chromium"), d.join("chromium-browser")])
            .find(|p| p.exists())
    });
    in_path.unwrap_or_else(|| {
        panic!(
            "chromium is not installed: the status page test needs a headless browser. \
             `make test` installs it (apt-get install -y chromium)"
        )
    })
}

#[test]
fn status_page_in_headless_chromium_lists_registered_backends() {
    let browser = chromium();
    let (a, b) = (Backend::start("page-a"), Backend::start("page-b"));
    let lb = Balancer::start(&["--control", "127.0.0.1:0"], &[]);
    let _ca = register(&lb, "guid-page-alpha", &a.url());
    let _cb = register(&lb, "guid-page-beta", &b.url());
    let mut client = ws_connect(lb.addr(), "/");
    whoami(&mut client);

    let profile = TempPath::new("chromium-profile");
    let url = format!("http://{}/", lb.control_addr());
    let mut cmd = Command::new(&browser);
    cmd.args(CHROMIUM_FLAGS)
        .arg(format!("--user-data-dir={}", profile.0.display()))
        .args(["--dump-dom", &url]);
    let (ok, dom, err) = run_with_deadline(cmd, Duration::from_secs(60));
    assert!(ok, "{} failed; stderr:\n{err}", browser.display());
    assert!(
        dom.contains("id=\"backends\""),
        "no backends table in:\n{dom}"
    );
    assert!(dom.contains("id=\"totals\""), "no totals line in:\n{dom}");
    for guid in ["guid-page-alpha", "guid-page-beta"] {
        assert!(dom.contains(guid), "{guid} not on the status page:\n{dom}");
    }
    let rows = dom.matches("<tr class=\"ready\"").count();
    assert_eq!(rows, 2, "one ready row per backend:\n{dom}");
}

// ---------------------------------------------------------------------------------------------
// 7. --events

fn read_events(path: &Path) -> Vec<Value> {
    let text = fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad event line {l:?}: {e}")))
        .collect()
}

fn names(events: &[&Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["event"].as_str().unwrap_or("?").to_string())
        .collect()
}

#[test]
fn events_file_records_a_client_life_and_a_backend_life() {
    let file = TempPath::new("events.jsonl");
    let a = Backend::start("ev");
    let path = file.0.to_str().unwrap().to_string();
    let lb = Balancer::start(&["--control", "127.0.0.1:0", "--events", &path], &[]);
    let ctrl = register(&lb, "guid-events", &a.url());
    let ctrl_peer = ctrl.get_ref().local_addr().unwrap().to_string();

    let mut ws = ws_connect(lb.addr(), "/");
    let ws_peer = ws.get_ref().local_addr().unwrap().to_string();
    for m in ["first", "second"] {
        ws.send(Message::text(m)).unwrap();
        assert_eq!(next_data(&mut ws), Message::text(m));
    }
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .unwrap();
    loop {
        match ws.read() {
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => break,
            Err(tungstenite::Error::Io(e)) if !is_timeout(&e) => break,
            Err(e) => panic!("closing: {e}"),
        }
    }
    drop(ws); // our side of TCP closes too
    let mut http = HttpClient::connect(lb.addr());
    let http_peer = http.stream.local_addr().unwrap().to_string();
    http.send(b"GET /events-probe HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    assert_eq!(http.read_response().unwrap().status, 200);
    drop(ctrl); // the backend's control connection goes away

    let complete = |evs: &[Value]| {
        let has = |name: &str| evs.iter().any(|e| e["event"] == name);
        has("server_disconnect") && has("http_request") && has("client_disconnect")
    };
    let mut events = Vec::new();
    let done = wait_until(TIMEOUT, || {
        events = read_events(&file.0);
        complete(&events)
    });
    assert!(done, "events incomplete:\n{events:#?}");
    for e in &events {
        assert!(e["ts"].is_number(), "no ts: {e}");
        assert!(e["event"].is_string(), "no event: {e}");
    }

    // The WebSocket client's life, in order.
    let id = events
        .iter()
        .find(|e| e["event"] == "client_connect" && e["peer"] == ws_peer.as_str())
        .and_then(|e| e["client"].as_u64())
        .unwrap_or_else(|| panic!("no client_connect for {ws_peer}: {events:#?}"));
    let life: Vec<&Value> = events.iter().filter(|e| e["client"] == id).collect();
    assert_eq!(
        names(&life),
        ["client_connect", "paired", "handshake", "client_disconnect"],
        "{life:#?}"
    );
    assert_eq!(life[0]["tls"], false, "{}", life[0]);
    for e in &life {
        assert_eq!(e["peer"], ws_peer.as_str(), "{e}");
    }
    let paired = life[1];
    assert!(!paired["backend"].is_null(), "{paired}");
    assert_eq!(paired["reused"], false, "{paired}");
    let gone = life[3];
    assert!(gone["bytes_up"].as_u64().is_some_and(|n| n > 0), "{gone}");
    assert!(gone["bytes_down"].as_u64().is_some_and(|n| n > 0), "{gone}");
    assert_eq!(gone["close_code"], 1000, "{gone}");
    assert!(gone["duration_ms"].is_u64(), "{gone}");

    // The HTTP request.
    let hid = events
        .iter()
        .find(|e| e["event"] == "client_connect" && e["peer"] == http_peer.as_str())
        .and_then(|e| e["client"].as_u64())
        .unwrap_or_else(|| panic!("no client_connect for {http_peer}: {events:#?}"));
    let req = events
        .iter()
        .find(|e| e["event"] == "http_request" && e["client"] == hid)
        .unwrap_or_else(|| panic!("no http_request for client {hid}: {events:#?}"));
    assert_eq!(req["status"], 200, "{req}");
    assert!(
        req["request"]
            .as_str()
            .is_some_and(|r| r.contains("GET /events-probe")),
        "{req}"
    );
    assert!(req["ms"].is_u64(), "{req}");

    // The backend's life, in order.
    let server: Vec<&Value> = events
        .iter()
        .filter(|e| {
            e["event"]
                .as_str()
                .is_some_and(|n| n.starts_with("server_"))
        })
        .collect();
    assert_eq!(
        names(&server),
        ["server_connect", "server_ready", "server_disconnect"],
        "{server:#?}"
    );
    assert_eq!(server[0]["peer"], ctrl_peer.as_str(), "{}", server[0]);
    assert_eq!(server[1]["guid"], "guid-events", "{}", server[1]);
    assert_eq!(server[1]["peer"], ctrl_peer.as_str(), "{}", server[1]);
    assert_eq!(server[1]["bindings"], serde_json::json!([a.url()]));
    assert_eq!(server[1]["updated"], false, "{}", server[1]);
    assert_eq!(server[2]["guid"], "guid-events", "{}", server[2]);
}

// ---------------------------------------------------------------------------------------------
// 8. Token

#[test]
fn admin_api_requires_the_token_when_one_is_set() {
    let a = Backend::start("tok");
    let lb = Balancer::start(&["--control", "127.0.0.1:0", "--token", "s3cret"], &[&a]);
    let addr = lb.control_addr();
    let mut ws = ws_connect(lb.addr(), "/");
    assert_eq!(whoami(&mut ws), "tok");

    let endpoints: [(&str, &str); 6] = [
        ("GET", "/"),
        ("GET", "/metrics"),
        ("GET", "/api/backends"),
        ("GET", "/api/clients"),
        ("POST", "/api/broadcast"),
        ("POST", "/api/ping"),
    ];
    for (method, path) in endpoints {
        let with_q = |q: &str| format!("{path}?{q}");
        let refused: [(String, Vec<(&str, &str)>); 5] = [
            (path.to_string(), vec![]),
            (path.to_string(), vec![("Authorization", "Bearer wrong")]),
            (path.to_string(), vec![("Authorization", "Bearer s3cre")]),
            (path.to_string(), vec![("Authorization", "s3cret")]),
            (with_q("token=s3cret2"), vec![]),
        ];
        for (target, headers) in &refused {
            let r = admin_req(addr, method, target, headers, b"no");
            assert_eq!(r.status, 401, "{method} {target} {headers:?}: {}", r.text());
        }
    }
    // Nothing got through: no broadcast, no ping.
    assert_quiet(&mut ws, "client after refused admin requests");

    for (method, path) in endpoints {
        let r = admin_req(
            addr,
            method,
            path,
            &[("Authorization", "Bearer s3cret")],
            b"ok",
        );
        assert_eq!(r.status, 200, "{method} {path} with bearer: {}", r.text());
        let r = admin_req(addr, method, &format!("{path}?token=s3cret"), &[], b"ok");
        assert_eq!(r.status, 200, "{method} {path}?token=: {}", r.text());
    }
    // Two broadcasts and two pings went through.
    let mut texts = 0;
    let mut pings = 0;
    ws.get_ref().set_read_timeout(Some(QUIET)).unwrap();
    while texts < 2 || pings < 2 {
        match ws.read() {
            Ok(Message::Text(t)) => {
                assert_eq!(t.as_str(), "ok");
                texts += 1;
            }
            Ok(Message::Ping(p)) => {
                assert!(p.starts_with(b"wslb"));
                pings += 1;
            }
            other => panic!("after {texts} broadcasts and {pings} pings: {other:?}"),
        }
    }
    // A query token alongside other parameters.
    let target = "/api/broadcast?backend=nobody&token=s3cret";
    assert_eq!(admin_post(&lb, target, Some("text/plain"), b"x"), 0);
}

// ---------------------------------------------------------------------------------------------
// 9. --ws-ping

#[test]
fn ws_ping_keeps_live_clients_and_closes_silent_ones() {
    let a = Backend::start("pinger");
    let lb = Balancer::start(&["--control", "127.0.0.1:0", "--ws-ping", "200ms"], &[&a]);
    let mut live = ws_connect(lb.addr(), "/");
    let mut silent = ws_connect(lb.addr(), "/");
    assert_eq!(ask_name(&mut live), "pinger");
    assert_eq!(ask_name(&mut silent), "pinger");
    let started = Instant::now();
    let (live_id, silent_id) = (client_id(&lb, &live), client_id(&lb, &silent));

    // The live client reads all the time, so tungstenite answers every ping.
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let reader = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            live.get_ref()
                .set_read_timeout(Some(Duration::from_millis(20)))
                .unwrap();
            let mut pings = 0;
            while !stop.load(Ordering::SeqCst) {
                match live.read() {
                    Ok(Message::Ping(p)) => {
                        assert!(p.starts_with(b"wslb"), "{p:?}");
                        pings += 1;
                        let _ = tx.send(pings);
                    }
                    Ok(m) => panic!("live client got {m:?}"),
                    Err(tungstenite::Error::Io(e)) if is_timeout(&e) => {}
                    Err(e) => panic!("live client: {e}"),
                }
            }
            live.get_ref().set_read_timeout(Some(TIMEOUT)).unwrap();
            (live, pings)
        })
    };

    // The silent client never reads again: no pongs. 3 unanswered pings at 200 ms each.
    let listed = |id: u64| clients(&lb).iter().any(|c| c["id"] == id);
    let gone = wait_until(Duration::from_millis(1500), || !listed(silent_id));
    let took = started.elapsed();
    assert!(gone, "silent client still connected after {took:?}");
    assert!(
        took >= Duration::from_millis(500),
        "closed too early: {took:?}"
    );
    let mut raw = silent.get_ref().try_clone().unwrap();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + TIMEOUT;
    loop {
        assert!(
            Instant::now() < deadline,
            "silent client's socket never closed"
        );
        match raw.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue, // the pings it never answered
            Err(e) if is_timeout(&e) => panic!("silent client's socket still open"),
            Err(_) => break, // reset
        }
    }

    // The live client has been connected 1.5 s by now and is still served.
    let at_least = Duration::from_millis(1500);
    if let Some(rest) = at_least.checked_sub(started.elapsed()) {
        thread::sleep(rest); // a duration under test, not a synchronisation
    }
    assert!(listed(live_id), "live client was dropped");
    let pings_seen = rx.try_iter().last().unwrap_or(0);
    assert!(
        pings_seen >= 3,
        "live client saw {pings_seen} pings in 1.5 s"
    );
    stop.store(true, Ordering::SeqCst);
    let (mut live, _) = reader.join().expect("live reader");
    assert_eq!(ask_name(&mut live), "pinger");
    assert_eq!(
        a.stat("wslb_pongs"),
        0,
        "balancer pongs never reach the backend"
    );
}

// ---------------------------------------------------------------------------------------------
// 10. Drain

#[test]
fn drained_backend_gets_no_new_clients() {
    let (a, b) = (Backend::start("drain-a"), Backend::start("drain-b"));
    let lb = Balancer::start(&["--control", "127.0.0.1:0", "-a", "round-robin"], &[]);
    let _ca = register(&lb, "guid-drain-a", &a.url());
    let _cb = register(&lb, "guid-drain-b", &b.url());
    let mut before: Vec<Ws> = (0..4).map(|_| ws_connect(lb.addr(), "/")).collect();
    let mut names: Vec<String> = before.iter_mut().map(whoami).collect();
    names.sort();
    assert_eq!(names, ["drain-a", "drain-a", "drain-b", "drain-b"]);

    assert_eq!(
        admin_post(&lb, "/api/backends/guid-drain-a/drain", None, b""),
        1
    );
    let r = admin_req(
        lb.control_addr(),
        "POST",
        "/api/backends/nobody/drain",
        &[],
        b"",
    );
    assert_eq!(r.status, 404, "{}", r.text());

    for i in 0..6 {
        let mut ws = ws_connect(lb.addr(), "/");
        assert_eq!(whoami(&mut ws), "drain-b", "new WebSocket {i}");
        let r = get(lb.addr(), "/");
        assert!(
            r.text().contains("drain-b"),
            "new HTTP request {i}: {}",
            r.text()
        );
    }
    // Existing clients of the drained backend are kept.
    let names: Vec<String> = before.iter_mut().map(whoami).collect();
    assert_eq!(names.iter().filter(|n| *n == "drain-a").count(), 2);

    let list = json_body(&admin_get(&lb, "/api/backends"));
    let state = |guid: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|b| b["guid"] == guid)
            .map(|b| b["state"].clone())
    };
    assert_eq!(state("guid-drain-a"), Some("draining".into()), "{list}");
    assert_eq!(state("guid-drain-b"), Some("ready".into()), "{list}");
    let m = parse_metrics(&admin_get(&lb, "/metrics").text());
    let labels = [("backend", "guid-drain-a"), ("state", "draining")];
    assert_eq!(sample(&m, "wslb_backend_state", &labels), 1.0);
}

#[test]
fn static_backend_can_be_drained_by_its_url() {
    let (a, b) = (Backend::start("url-a"), Backend::start("url-b"));
    let lb = Balancer::start(&["--control", "127.0.0.1:0"], &[&a, &b]);
    let encoded = a.url().replace(':', "%3A").replace('/', "%2F");
    assert_eq!(
        admin_post(&lb, &format!("/api/backends/{encoded}/drain"), None, b""),
        1
    );
    for _ in 0..6 {
        assert!(get(lb.addr(), "/").text().contains("url-b"));
    }
}

// ---------------------------------------------------------------------------------------------
// Library: ServerHandle

#[test]
fn server_handle_sends_broadcasts_drains_and_shuts_down() {
    use wslb::config::{parse_args, Command as Cli};
    use wslb::{Outgoing, Server, Target};

    let (a, b) = (Backend::start("lib-a"), Backend::start("lib-b"));
    let args = ["-l", "127.0.0.1:0", "-B", &a.url(), "-B", &b.url(), "-q"];
    let Ok(Cli::Run(cfg)) = parse_args(&args) else {
        panic!("parse_args({args:?})");
    };
    let (tx, rx) = mpsc::channel();
    let runner = thread::spawn(move || {
        let server = Server::bind(*cfg).expect("bind");
        tx.send((server.handle(), server.local_addrs()[0])).unwrap();
        server.run()
    });
    let (handle, addr) = rx.recv_timeout(TIMEOUT).expect("server bound");

    let mut one = ws_connect(addr, "/");
    let mut two = ws_connect(addr, "/");
    let mut names = [whoami(&mut one), whoami(&mut two)];
    names.sort();
    assert_eq!(names, ["lib-a", "lib-b"]);
    let (mut on_a, mut on_b) = if whoami(&mut one) == "lib-a" {
        (one, two)
    } else {
        (two, one)
    };

    assert_eq!(handle.broadcast("hello all"), Ok(2));
    for ws in [&mut on_a, &mut on_b] {
        assert_eq!(next_data(ws), Message::text("hello all"));
    }
    let bytes = vec![9, 8, 7];
    assert_eq!(
        handle.send(Target::Backend(a.url()), Outgoing::Binary(bytes.clone())),
        Ok(1)
    );
    assert_eq!(next_data(&mut on_a), Message::binary(bytes));
    assert_quiet(&mut on_b, "client of the other backend");
    assert_eq!(handle.send(Target::Client(u64::MAX), Outgoing::Ping), Ok(0));

    assert_eq!(handle.drain_backend(&a.url()), Ok(1));
    assert!(handle.drain_backend("ws://127.0.0.1:1").is_err());
    for _ in 0..4 {
        let mut ws = ws_connect(addr, "/");
        assert_eq!(whoami(&mut ws), "lib-b");
    }

    // lib-b's clients: `on_b`, plus those just dropped if not reaped yet.
    let closed = handle.send(Target::Backend(b.url()), Outgoing::Close(4002));
    assert!(matches!(closed, Ok(n) if n >= 1), "{closed:?}");
    match next_data(&mut on_b) {
        Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::from(4002)),
        m => panic!("expected close 4002, got {m:?}"),
    }

    handle.shutdown();
    drop(on_a);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !runner.is_finished() {
        assert!(
            Instant::now() < deadline,
            "Server::run did not return after shutdown"
        );
        thread::sleep(Duration::from_millis(10));
    }
    runner.join().unwrap().expect("run ends cleanly");
}
