//! Issue 15: each hole an attacker found, reproduced against the real `wslb` binary. Every
//! test here failed on the code before the fix (see docs/SECURITY.md, "Threat model").
mod common;
#[path = "common/netns.rs"]
mod netns;
#[path = "common/recorder.rs"]
mod recorder;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use recorder::{Mode, Recorder};
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

type Ws = WebSocket<TcpStream>;

/// A TCP connection to `addr` from `source` (any 127/8 address is local on Linux, so a
/// second loopback address stands in for "another host" where only the address matters).
fn connect_from(source: IpAddr, addr: SocketAddr) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::new(source, 0).into()).unwrap();
    s.connect(&addr.into()).unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn control_from(
    source: IpAddr,
    addr: SocketAddr,
    authorization: Option<&str>,
) -> Result<Ws, tungstenite::Error> {
    let mut req = format!("ws://{addr}/register").into_client_request()?;
    if let Some(a) = authorization {
        req.headers_mut()
            .insert("Authorization", a.parse().unwrap());
    }
    tungstenite::client::client(req, connect_from(source, addr))
        .map(|(ws, _)| ws)
        .map_err(|e| match e {
            tungstenite::HandshakeError::Failure(e) => e,
            tungstenite::HandshakeError::Interrupted(_) => panic!("blocking handshake interrupted"),
        })
}

const LO: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
const LO2: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

fn control(addr: SocketAddr) -> Ws {
    control_from(LO, addr, None).expect("control upgrade")
}

fn register_msg(guid: &str, binding: &str) -> String {
    format!(r#"{{"type":"register","version":1,"guid":"{guid}","bindings":["{binding}"]}}"#)
}

/// Next text message, skipping pings/pongs; `None` if the connection closes first.
fn next_text(ws: &mut Ws) -> Option<String> {
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => return Some(t.to_string()),
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(_) | Err(_) => return None,
        }
    }
}

/// Sends a registration and returns the balancer's first answer.
fn try_register(ws: &mut Ws, guid: &str, binding: &str) -> String {
    ws.send(Message::text(register_msg(guid, binding))).unwrap();
    next_text(ws).unwrap_or_default()
}

fn metrics(lb: &Balancer) -> String {
    get(lb.control_addr(), "/metrics").text()
}

// ---------------------------------------------------------------------------------------
// Hole 1: bindings pointed anywhere
// ---------------------------------------------------------------------------------------

#[test]
fn bindings_breaking_a_fixed_rule_are_refused_whatever_the_flags() {
    let lb = Balancer::start(
        &[
            "--control",
            "127.0.0.1:0",
            "--backend-allow",
            "0.0.0.0/0",
            "--backend-allow",
            "::/0",
        ],
        &[],
    );
    let (proxy, ctl) = (lb.addr(), lb.control_addr());
    let cases = [
        (format!("http://0.0.0.0:{}", proxy.port()), "unspecified"),
        ("ws://[::]:80".to_string(), "unspecified"),
        ("http://255.255.255.255:80".to_string(), "broadcast"),
        ("http://224.0.0.1:80".to_string(), "multicast"),
        ("http://169.254.169.254:80".to_string(), "link_local"),
        ("ws://[fe80::1]:80".to_string(), "link_local"),
        (format!("ws://{proxy}"), "own_listener"),
        (format!("http://localhost:{}", proxy.port()), "own_listener"),
        (format!("ws://{ctl}"), "own_listener"),
    ];
    for (binding, rule) in &cases {
        let mut ws = control(ctl);
        let answer = try_register(&mut ws, "probe", binding);
        assert!(
            answer.contains(r#""code":"binding_refused""#)
                && answer.contains(&format!(r#""rule":"{rule}""#)),
            "{binding}: {answer}"
        );
        assert!(
            next_text(&mut ws).is_none(),
            "{binding}: closed after the error"
        );
    }
    assert_eq!(get(proxy, "/").status, 503, "nothing was registered");
    let m = metrics(&lb);
    assert!(
        m.contains("wslb_registrations_refused_total{rule=\"own_listener\"} 3"),
        "{m}"
    );
    assert!(lb.wait_log("registration refused", TIMEOUT));
}

#[test]
fn binding_to_another_address_than_the_peer_is_refused_unless_allowed() {
    let lb = Balancer::start(&["--control", "127.0.0.1:0"], &[]);
    let service = Backend::start("loopback-only");
    // The registrant connects from 127.0.0.2 and points at a service on 127.0.0.1.
    let mut ws = control_from(LO2, lb.control_addr(), None).unwrap();
    let answer = try_register(&mut ws, "api-x", &service.url());
    assert!(answer.contains(r#""rule":"not_peer_address""#), "{answer}");
    assert_eq!(get(lb.addr(), "/").status, 503);

    // --backend-allow relaxes exactly that rule.
    let lb = Balancer::start(
        &["--control", "127.0.0.1:0", "--backend-allow", "127.0.0.0/8"],
        &[],
    );
    let mut ws = control_from(LO2, lb.control_addr(), None).unwrap();
    let answer = try_register(&mut ws, "api-x", &service.url());
    assert!(answer.contains(r#""type":"registered""#), "{answer}");
    assert!(get(lb.addr(), "/").text().contains("loopback-only"));
}

#[test]
fn unreachable_says_only_unreachable() {
    let lb = Balancer::start(&["--control", "127.0.0.1:0"], &[]);
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut ws = control(lb.control_addr());
    assert!(try_register(&mut ws, "ghost", &format!("ws://{dead}")).contains("registered"));
    assert_eq!(get(lb.addr(), "/").status, 502);
    let text = next_text(&mut ws).unwrap();
    assert!(text.contains(r#""type":"unreachable""#), "{text}");
    assert!(text.contains(r#""reason":"unreachable""#), "{text}");
    assert!(!text.to_ascii_lowercase().contains("refused"), "{text}");
}

// ---------------------------------------------------------------------------------------
// Hole 2: the loopback-only control API reached through the proxy
// ---------------------------------------------------------------------------------------

#[test]
fn control_api_cannot_be_reached_through_the_proxy() {
    let lb = Balancer::start(&["--control", "127.0.0.1:0"], &[]);
    let ctl = lb.control_addr();
    let mut ws = control(ctl);
    let answer = try_register(&mut ws, "relay", &format!("http://{ctl}"));
    assert!(answer.contains(r#""rule":"own_listener""#), "{answer}");
    // What the remote client tried: the admin API through the proxy.
    for path in ["/api/clients", "/metrics", "/api/backends"] {
        let r = get(lb.addr(), path);
        assert_eq!(r.status, 503, "{path}: {}", r.text());
    }
}

// ---------------------------------------------------------------------------------------
// Hole 3: self-loop
// ---------------------------------------------------------------------------------------

#[test]
fn static_backend_on_wslbs_own_listener_exits_2() {
    for (listen, backend) in [("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1")] {
        let port = free_port();
        let l = format!("{listen}:{port}");
        let b = format!("ws://{backend}:{port}");
        let (status, _, err) = run_wslb(&["-l", &l, "-B", &b]);
        assert_eq!(status.code(), Some(2), "{l} {b}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains("own listener"), "{err}");
    }
    let port = free_port();
    let c = format!("127.0.0.1:{port}");
    let b = format!("http://127.0.0.1:{port}");
    let (status, _, err) = run_wslb(&["-l", "127.0.0.1:0", "--control", &c, "-B", &b]);
    assert_eq!(status.code(), Some(2), "control port as -B: {err}");
}

#[test]
fn registered_self_loop_is_refused_and_memory_stays_flat() {
    let lb = Balancer::start(&["--control", "127.0.0.1:0"], &[]);
    let rss_before = lb.rss_kib();
    let mut ws = control(lb.control_addr());
    let answer = try_register(&mut ws, "loop", &format!("http://{}", lb.addr()));
    assert!(answer.contains(r#""rule":"own_listener""#), "{answer}");
    let r = get(lb.addr(), "/");
    assert_eq!(r.status, 503);
    assert!(lb.rss_kib() < rss_before + 16 * 1024, "RSS grew");
}

// ---------------------------------------------------------------------------------------
// Hole 4: guid takeover
// ---------------------------------------------------------------------------------------

#[test]
fn live_guid_cannot_be_taken_over_from_another_address() {
    let (a, b) = (Backend::start("owner"), Backend::start("thief"));
    let lb = Balancer::start(
        &[
            "--control",
            "127.0.0.1:0",
            "--token",
            "shared",
            "--backend-allow",
            "127.0.0.0/8",
        ],
        &[],
    );
    let ctl = lb.control_addr();
    let mut owner = control_from(LO, ctl, Some("Bearer shared")).unwrap();
    assert!(try_register(&mut owner, "api-1", &a.url()).contains("registered"));
    let mut thief = control_from(LO2, ctl, Some("Bearer shared")).unwrap();
    let answer = try_register(&mut thief, "api-1", &b.url());
    assert!(answer.contains(r#""code":"guid_in_use""#), "{answer}");
    for _ in 0..5 {
        assert!(get(lb.addr(), "/").text().contains("owner"));
    }
    // The owner was not told "replaced": it still answers and stays registered.
    owner.send(Message::Ping(Vec::new().into())).unwrap();
    owner
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    match owner.read() {
        Ok(Message::Pong(_) | Message::Ping(_)) => {}
        other => panic!("owner got {other:?}"),
    }
    // Once the owner is gone, the guid is free.
    drop(owner);
    let deadline = Instant::now() + TIMEOUT;
    let _next = loop {
        let mut next = control_from(LO2, ctl, Some("Bearer shared")).unwrap();
        let answer = try_register(&mut next, "api-1", &b.url());
        if answer.contains("registered") {
            break next;
        }
        assert!(Instant::now() < deadline, "guid never freed: {answer}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(get(lb.addr(), "/").text().contains("thief"));
}

#[test]
fn token_file_tokens_register_their_own_guid_only_and_reload_on_sighup() {
    let a = Backend::start("tf");
    let dir = std::env::temp_dir().join(format!("wslb-sec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tokens");
    std::fs::write(&file, "# guid token\napi-1 tok-one\napi-2 tok-two\n").unwrap();
    let lb = Balancer::start(
        &[
            "--control",
            "127.0.0.1:0",
            "--token-file",
            file.to_str().unwrap(),
        ],
        &[],
    );
    let ctl = lb.control_addr();
    let mut ws = control_from(LO, ctl, Some("Bearer tok-two")).unwrap();
    let answer = try_register(&mut ws, "api-1", &a.url());
    assert!(answer.contains(r#""code":"guid_not_allowed""#), "{answer}");
    let mut ws = control_from(LO, ctl, Some("bearer tok-two")).unwrap();
    assert!(try_register(&mut ws, "api-2", &a.url()).contains("registered"));
    // A backend token does not open the admin API; no token at all does not either.
    let admin = |auth: &str| {
        http_request(
            ctl,
            format!("GET /metrics HTTP/1.1\r\nHost: c\r\nAuthorization: {auth}\r\n\r\n").as_bytes(),
        )
        .status
    };
    assert_eq!(admin("Bearer tok-two"), 403);
    assert_eq!(
        get(ctl, "/metrics").status,
        401,
        "loopback alone is not enough"
    );
    assert!(matches!(
        control_from(LO, ctl, Some("Bearer tok-three")),
        Err(tungstenite::Error::Http(r)) if r.status() == 401
    ));
    std::fs::write(&file, "api-3 tok-three\n").unwrap();
    let ok = Command::new("kill")
        .args(["-HUP", &lb.pid().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    assert!(lb.wait_log("token file reloaded", TIMEOUT));
    let mut ws = control_from(LO, ctl, Some("Bearer tok-three")).unwrap();
    assert!(try_register(&mut ws, "api-3", &a.url()).contains("registered"));
    assert!(matches!(
        control_from(LO, ctl, Some("Bearer tok-one")),
        Err(tungstenite::Error::Http(r)) if r.status() == 401
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------
// Hole 5: X-Forwarded-For spoofing
// ---------------------------------------------------------------------------------------

const SPOOFED: &str = "X-Forwarded-For: 1.2.3.4\r\nForwarded: for=9.9.9.9\r\n\
                       X-Forwarded-For: 5.6.7.8\r\nX-Real-IP: 7.7.7.7\r\n";

/// Request headers the echo backend saw, lower-cased names.
fn seen_headers(lb: &Balancer) -> Vec<(String, String)> {
    let r = http_request(
        lb.addr(),
        format!("GET /headers HTTP/1.1\r\nHost: h\r\nConnection: close\r\n{SPOOFED}\r\n")
            .as_bytes(),
    );
    assert_eq!(r.status, 200);
    r.text()
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
        .collect()
}

fn named<'a>(seen: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    seen.iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

#[test]
fn forwarding_headers_from_untrusted_and_trusted_peers() {
    let a = Backend::start("hdr");
    let lb = Balancer::start(&[], &[&a]);
    let seen = seen_headers(&lb);
    assert_eq!(named(&seen, "x-forwarded-for"), ["127.0.0.1"], "{seen:?}");
    assert!(named(&seen, "forwarded").is_empty(), "{seen:?}");
    assert!(named(&seen, "x-real-ip").is_empty(), "{seen:?}");

    let lb = Balancer::start(&["--trusted-proxy", "127.0.0.0/8"], &[&a]);
    let seen = seen_headers(&lb);
    assert_eq!(
        named(&seen, "x-forwarded-for"),
        ["1.2.3.4, 5.6.7.8, 127.0.0.1"],
        "{seen:?}"
    );
    assert!(named(&seen, "x-real-ip").is_empty(), "{seen:?}");

    let lb = Balancer::start(&["--forwarded"], &[&a]);
    let seen = seen_headers(&lb);
    assert_eq!(named(&seen, "forwarded"), ["for=127.0.0.1"], "{seen:?}");
    assert!(named(&seen, "x-forwarded-for").is_empty(), "{seen:?}");
}

#[test]
fn websocket_upgrade_gets_the_same_forwarding_rule() {
    let accept =
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
    let rec = Recorder::start(Mode::Raw(accept.as_bytes().to_vec()));
    let url = rec.url();
    let lb = Balancer::start(&["-B", &url], &[]);
    let mut c = connect(lb.addr());
    c.write_all(
        format!(
            "GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{SPOOFED}\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let mut buf = [0u8; 12];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"HTTP/1.1 101");
    let text = rec.all_text();
    let head = text
        .split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let xff: Vec<&str> = head
        .lines()
        .filter(|l| l.starts_with("x-forwarded-for:"))
        .collect();
    assert_eq!(xff, ["x-forwarded-for: 127.0.0.1"], "{head}");
    assert!(
        !head.contains("forwarded: for=") && !head.contains("x-real-ip"),
        "{head}"
    );
}

// ---------------------------------------------------------------------------------------
// Item 6: the smaller ones
// ---------------------------------------------------------------------------------------

#[test]
fn unauthorized_is_a_proper_401_and_bearer_is_case_insensitive() {
    let a = Backend::start("auth");
    let lb = Balancer::start(&["--control", "127.0.0.1:0", "--token", "s3cret"], &[]);
    let ctl = lb.control_addr();
    let mut c = connect(ctl);
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: c\r\nAuthorization: Bearer nope\r\n\r\n")
        .unwrap();
    let mut raw = Vec::new();
    let _ = c.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{text}");
    assert!(text.contains("\r\nWWW-Authenticate: Bearer"), "{text}");
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let mut ws = control_from(LO, ctl, Some(&format!("{scheme} s3cret")))
            .unwrap_or_else(|e| panic!("{scheme}: {e}"));
        assert!(try_register(&mut ws, "case", &a.url()).contains("registered"));
    }
}

#[test]
fn stalled_control_body_gets_408() {
    let lb = Balancer::start(&["--control", "127.0.0.1:0", "--header-timeout", "1s"], &[]);
    let mut c = connect(lb.control_addr());
    c.write_all(
        b"POST /api/broadcast HTTP/1.1\r\nHost: c\r\nContent-Length: 100\r\n\r\nonly ten..",
    )
    .unwrap();
    let started = Instant::now();
    let mut raw = Vec::new();
    let _ = c.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    assert!(
        text.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{text}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn tokenless_control_on_a_network_address_warns_at_startup() {
    let lb = Balancer::start(&["--control", "0.0.0.0:0"], &[]);
    assert!(
        lb.wait_log("warn: no --token on control listener 0.0.0.0:", TIMEOUT),
        "{:#?}",
        lb.stderr_lines()
    );
    let lb = Balancer::start(&["--control", "127.0.0.1:0"], &[]);
    lb.control_addr();
    assert!(!lb.stderr_lines().iter().any(|l| l.contains("warn:")));
}

// ---------------------------------------------------------------------------------------
// A remote peer: a network namespace joined to this host by a veth pair
// ---------------------------------------------------------------------------------------

/// `ip netns` + veth with 10.213.7.1 (host) and 10.213.7.2 (namespace); removed on drop.
struct RemoteNet {
    ns: String,
    veth: String,
}

impl RemoteNet {
    const HOST: &'static str = "10.213.7.1";
    const PEER: &'static str = "10.213.7.2";

    fn create() -> Result<RemoteNet, String> {
        let id = std::process::id() % 100_000;
        let net = RemoteNet {
            ns: format!("wslbsec{id}"),
            veth: format!("wsh{id}"),
        };
        let peer = format!("wsp{id}");
        let steps: Vec<Vec<&str>> = vec![
            vec!["netns", "add", &net.ns],
            vec![
                "link", "add", &net.veth, "type", "veth", "peer", "name", &peer,
            ],
            vec!["link", "set", &peer, "netns", &net.ns],
            vec!["addr", "add", "10.213.7.1/24", "dev", &net.veth],
            vec!["link", "set", &net.veth, "up"],
            vec!["-n", &net.ns, "addr", "add", "10.213.7.2/24", "dev", &peer],
            vec!["-n", &net.ns, "link", "set", &peer, "up"],
            vec!["-n", &net.ns, "link", "set", "lo", "up"],
        ];
        for args in steps {
            netns::ip(&args)?;
        }
        Ok(net)
    }

    /// Runs a Python 3 script inside the namespace; returns its stdout.
    fn python(&self, script: &str, args: &[&str]) -> String {
        let out = Command::new("timeout")
            .args([
                "20", "ip", "netns", "exec", &self.ns, "python3", "-c", script,
            ])
            .args(args)
            .output()
            .expect("run python3 in the namespace");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "python in netns failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }
}

impl Drop for RemoteNet {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, and with it the pair.
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// argv: control host:port, token, binding, then `wait` to also print the next message.
/// Speaks just enough RFC 6455 (masked text frames out, unmasked frames in).
const PY_REGISTER: &str = r#"
import base64, json, os, socket, struct, sys
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port)), timeout=8)
key = base64.b64encode(os.urandom(16)).decode()
s.sendall(("GET /register HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer %s\r\n\r\n"
    % (key, sys.argv[2])).encode())
buf = b""
while b"\r\n\r\n" not in buf:
    d = s.recv(4096)
    if not d: break
    buf += d
head, _, buf = buf.partition(b"\r\n\r\n")
print(head.split(b"\r\n")[0].decode())
if b" 101 " not in head.split(b"\r\n")[0]: sys.exit(0)
msg = json.dumps({"type": "register", "version": 1, "guid": "remote-1",
                  "bindings": [sys.argv[3]]}).encode()
mask = os.urandom(4)
s.sendall(bytes([0x81, 0x80 | 126]) + struct.pack("!H", len(msg)) + mask
          + bytes(b ^ mask[i % 4] for i, b in enumerate(msg)))
def frame():
    global buf
    while True:
        if len(buf) >= 2:
            n, off = buf[1] & 0x7f, 2
            if n == 126: n, off = struct.unpack("!H", buf[2:4])[0], 4
            if len(buf) >= off + n:
                op, data, buf = buf[0] & 0x0f, buf[off:off + n], buf[off + n:]
                return op, data
        d = s.recv(4096)
        if not d: return None, b""
        buf += d
want = 2 if len(sys.argv) > 4 else 1
while want:
    op, data = frame()
    if op is None: break
    if op == 1:
        print(data.decode()); sys.stdout.flush(); want -= 1
"#;

/// argv: proxy host:port. A GET /headers with spoofed forwarding fields; prints the body.
const PY_GET: &str = r#"
import socket, sys
host, port = sys.argv[1].rsplit(":", 1)
s = socket.create_connection((host, int(port)), timeout=8)
s.sendall(b"GET /headers HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
          b"X-Forwarded-For: 1.2.3.4\r\nX-Real-IP: 7.7.7.7\r\n\r\n")
out = b""
while True:
    d = s.recv(65536)
    if not d: break
    out += d
print(out.decode(errors="replace"))
"#;

fn listening_on(lb: &Balancer, marker: &str) -> u16 {
    let mut port = None;
    wait_until(TIMEOUT, || {
        port = lb.stderr_lines().iter().find_map(|l| {
            let rest = &l[l.find(marker)? + marker.len()..];
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        });
        port.is_some()
    });
    port.unwrap_or_else(|| panic!("no {marker:?} in {:#?}", lb.stderr_lines()))
}

#[test]
fn remote_peer_is_held_to_its_own_address() {
    let net = match RemoteNet::create() {
        Ok(n) => n,
        Err(e) => {
            println!("SKIPPED remote_peer_is_held_to_its_own_address: cannot create a network namespace ({e})");
            return;
        }
    };
    let public = Backend::start("public");
    let secret = Backend::start("loopback-only-secret");
    let lb = Balancer::start(
        &[
            "-l",
            "0.0.0.0:0",
            "--control",
            "0.0.0.0:0",
            "--token",
            "shared",
        ],
        &[&public],
    );
    let proxy = format!(
        "{}:{}",
        RemoteNet::HOST,
        listening_on(&lb, "listening on 0.0.0.0:")
    );
    let ctl = format!(
        "{}:{}",
        RemoteNet::HOST,
        listening_on(&lb, "control listening on 0.0.0.0:")
    );

    // Hole 1 from a remote host: a loopback-only service behind the proxy.
    let out = net.python(PY_REGISTER, &[&ctl, "shared", &secret.url()]);
    assert!(out.contains("101"), "{out}");
    assert!(
        out.contains(r#""rule": "not_peer_address""#)
            || out.contains(r#""rule":"not_peer_address""#),
        "{out}"
    );

    // Its own address is fine; the failed dial reports only "unreachable".
    let own = format!("http://{}:{}", RemoteNet::PEER, 9);
    let lb2 = &lb;
    let waiter = std::thread::scope(|scope| {
        let h = scope.spawn(|| net.python(PY_REGISTER, &[&ctl, "shared", &own, "wait"]));
        assert!(
            lb2.wait_log("server ready", TIMEOUT),
            "{:#?}",
            lb2.stderr_lines()
        );
        // Fewest connections with one backend down: keep asking until remote-1 is tried.
        wait_until(TIMEOUT, || {
            get(lb2.addr(), "/");
            lb2.wait_log(
                "backend connect failed backend=remote-1",
                Duration::from_millis(50),
            )
        });
        h.join().unwrap()
    });
    assert!(
        waiter.contains(r#""type":"registered""#) || waiter.contains(r#""type": "registered""#),
        "{waiter}"
    );
    assert!(waiter.contains("unreachable"), "{waiter}");
    let notice = waiter
        .lines()
        .find(|l| l.contains("unreachable"))
        .unwrap_or_default();
    assert!(notice.contains(r#""reason":"unreachable""#), "{notice}");

    // Hole 5 from a remote host: the backend sees the real peer, once.
    let body = net.python(PY_GET, &[&proxy]);
    let xff: Vec<&str> = body
        .lines()
        .filter(|l| l.to_ascii_lowercase().starts_with("x-forwarded-for:"))
        .collect();
    assert_eq!(
        xff,
        [format!("X-Forwarded-For: {}", RemoteNet::PEER)],
        "{body}"
    );
    assert!(!body.to_ascii_lowercase().contains("x-real-ip"), "{body}");

    // Without any token, a control listener on a network address refuses remote peers.
    let open = Balancer::start(&["--control", "0.0.0.0:0"], &[]);
    let ctl = format!(
        "{}:{}",
        RemoteNet::HOST,
        listening_on(&open, "control listening on 0.0.0.0:")
    );
    let out = net.python(PY_REGISTER, &[&ctl, "anything", &own]);
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
}
