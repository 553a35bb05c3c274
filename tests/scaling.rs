//! docs/SCALING.md's recipe with real processes in network namespaces this test creates:
//! HAProxy (TCP mode, `send-proxy-v2`, health checks on `GET /ready`) in an L4 namespace in
//! front of two balancer namespaces, three backends registered with every balancer by
//! `wslb agent`, clients in a namespace of their own. Shown: backends see the clients' real
//! addresses; sticky-cookie WebSocket clients keep their backend when the balancer they
//! used is killed and they reconnect; with `--sticky ip` both balancers pick the same
//! backend for an address; no message is lost or answered twice.
//!
//! Skipped, saying why, where namespaces cannot be created (not root, no `ip`).
mod common;
#[path = "common/netns.rs"]
mod netns;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use netns::Lan;

const TOKEN: &str = "scaling-test-token";
const SECRET: &str = "one-secret-for-every-balancer";
/// Proxy and control ports of the cookie balancers and of the `--sticky ip` ones.
const COOKIE: (u16, u16) = (8080, 9090);
const IP: (u16, u16) = (8081, 9091);

fn admin_get(addr: SocketAddr, path: &str) -> Response {
    http_request(
        addr,
        format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
}

fn metric(addr: SocketAddr, series: &str) -> u64 {
    admin_get(addr, "/metrics")
        .text()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// The client side, in the clients' namespace. argv: L4 address, then the phases print one
/// JSON line each: `real` (X-Forwarded-For the backends saw), `ip` (backend per source
/// address through the `--sticky ip` balancers), `ready` (WebSocket clients open, first
/// half of their messages answered; waits for a line on stdin), `done` (second half, with
/// reconnects where a balancer died).
const CLIENTS: &str = r#"
import json, socket, sys, time, warnings
from websockets.sync.client import connect
# websockets 14+ asks for a context manager; these connections outlive one block.
warnings.simplefilter("ignore", DeprecationWarning)
l4 = sys.argv[1]
def http(port, path, source):
    s = socket.create_connection((l4, port), timeout=5, source_address=(source, 0))
    s.sendall(("GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path).encode())
    out = b""
    while True:
        d = s.recv(65536)
        if not d: break
        out += d
    return out.decode(errors="replace")
def say(obj):
    print(json.dumps(obj)); sys.stdout.flush()
xff = []
for _ in range(4):
    body = http(80, "/headers", "10.213.19.31")
    xff += [l.split(": ", 1)[1] for l in body.splitlines() if l.lower().startswith("x-forwarded-for:")]
say({"real": xff})
def backend_of(src):
    return next(l.split()[1] for l in http(81, "/", src).split("\n") if l.startswith("backend "))
ip = {src: sorted({backend_of(src) for _ in range(4)})
      for src in ["10.213.19.31", "10.213.19.32", "10.213.19.33"]}
say({"ip": ip})
URL = "ws://%s:80/" % l4
def open_ws(cookie):
    deadline = time.time() + 20
    while True:
        try:
            return connect(URL, additional_headers={"Cookie": cookie} if cookie else None,
                           open_timeout=3, close_timeout=1)
        except Exception:
            if time.time() > deadline: raise
            time.sleep(0.1)
def whoami(ws):
    ws.send("whoami")
    return ws.recv(timeout=5)
N, M = 6, 20
clients = []
for i in range(N):
    ws = open_ws(None)
    cookie = next((v.split(";")[0] for v in ws.response.headers.get_all("Set-Cookie")), None)
    clients.append({"ws": ws, "cookie": cookie, "before": whoami(ws), "after": None,
                    "got": [], "reconnects": 0})
def run(i, c, lo, hi):
    k = lo
    while k < hi:
        msg = "c%d-m%d" % (i, k)
        try:
            c["ws"].send(msg)
            c["got"].append(c["ws"].recv(timeout=5))
            k += 1
        except Exception:
            # The balancer went away: reconnect through the L4 tier with the cookie and send
            # the unanswered message again.
            c["reconnects"] += 1
            c["ws"] = open_ws(c["cookie"])
            c["after"] = whoami(c["ws"])
for i, c in enumerate(clients):
    run(i, c, 0, M // 2)
say({"ready": [c["before"] for c in clients], "cookies": sum(1 for c in clients if c["cookie"])})
sys.stdin.readline()
for i, c in enumerate(clients):
    run(i, c, M // 2, M)
say({"done": [{"before": c["before"], "after": c["after"], "got": c["got"],
               "reconnects": c["reconnects"]} for c in clients]})
"#;

#[test]
fn two_balancers_behind_haproxy_in_namespaces() {
    let mut lan = match Lan::create(&[("l4", 2), ("lb1", 11), ("lb2", 12), ("be", 21), ("cl", 31)])
    {
        Ok(l) => l,
        Err(e) => {
            println!("SKIPPED two_balancers_behind_haproxy_in_namespaces: cannot create network namespaces ({e})");
            return;
        }
    };
    if std::process::Command::new("haproxy")
        .arg("-v")
        .output()
        .is_err()
    {
        println!("SKIPPED two_balancers_behind_haproxy_in_namespaces: haproxy is not installed (make test-deps installs it)");
        return;
    }
    lan.add_addr("cl", 32).unwrap();
    lan.add_addr("cl", 33).unwrap();
    let wslb = wslb_bin().expect("CARGO_BIN_EXE_wslb");
    let wslb = wslb.to_str().unwrap();
    let l4 = lan.addr("l4").to_string();

    // Two balancers per balancer host: sticky cookies (the WebSocket part) and sticky ip.
    let mut cookie_lb1 = None;
    for host in ["lb1", "lb2"] {
        let me = lan.addr(host);
        for ((proxy, control), sticky) in [(COOKIE, "cookie"), (IP, "ip")] {
            let (l, c) = (format!("{me}:{proxy}"), format!("{me}:{control}"));
            let idx = lan.spawn(
                host,
                wslb,
                &[
                    "-l",
                    &l,
                    "--control",
                    &c,
                    "--token",
                    TOKEN,
                    "--proxy-protocol",
                    "--trusted-proxy",
                    &l4,
                    "--sticky",
                    sticky,
                    "--sticky-secret",
                    SECRET,
                ],
            );
            if host == "lb1" && sticky == "cookie" {
                cookie_lb1 = Some(idx);
            }
        }
    }
    let controls: Vec<SocketAddr> = ["lb1", "lb2"]
        .iter()
        .flat_map(|h| [COOKIE.1, IP.1].map(|p| SocketAddr::new(lan.addr(h), p)))
        .collect();
    // Three backends, each registered with all four balancers by its agent.
    let be = lan.addr("be");
    for n in 1..=3 {
        let binding = format!("{be}:{}", 7000 + n);
        let mut args: Vec<String> = vec!["agent".into()];
        for c in &controls {
            args.extend(["-b".into(), format!("ws://{c}/register")]);
        }
        args.extend([
            "--binding".into(),
            format!("ws://{binding}"),
            "--guid".into(),
            format!("be-{n}"),
            "--token".into(),
            TOKEN.into(),
            "--".into(),
            echo_backend_bin().to_string_lossy().into_owned(),
            "--name".into(),
            format!("be-{n}"),
            "--listen".into(),
            binding,
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        lan.spawn("be", wslb, &args);
    }
    for c in &controls {
        assert!(
            wait_until(Duration::from_secs(15), || {
                std::net::TcpStream::connect_timeout(c, Duration::from_millis(200)).is_ok()
                    && admin_get(*c, "/api/backends").text().matches("be-").count() >= 3
            }),
            "balancer {c}: backends did not register"
        );
        assert_eq!(admin_get(*c, "/ready").status, 200, "{c}");
    }

    // The L4 tier: round robin, PROXY v2, health checks on /ready with the admin token.
    let backend = |name: &str, (proxy, control): (u16, u16)| {
        format!(
            "backend {name}\n  balance roundrobin\n  option httpchk\n  \
             http-check send meth GET uri /ready hdr Authorization \"Bearer {TOKEN}\"\n  \
             server lb1 {}:{proxy} send-proxy-v2 check port {control} inter 300ms fall 1 rise 1\n  \
             server lb2 {}:{proxy} send-proxy-v2 check port {control} inter 300ms fall 1 rise 1\n",
            lan.addr("lb1"),
            lan.addr("lb2")
        )
    };
    let cfg = format!(
        "global\n  maxconn 500\ndefaults\n  mode tcp\n  timeout connect 1s\n  \
         timeout client 30s\n  timeout server 30s\n  retries 3\n  option redispatch\n\
         frontend cookie\n  bind {l4}:80\n  default_backend cookie_lbs\n\
         frontend ip\n  bind {l4}:81\n  default_backend ip_lbs\n{}{}",
        backend("cookie_lbs", COOKIE),
        backend("ip_lbs", IP)
    );
    let dir = std::env::temp_dir().join(format!("wslb-scaling-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg_file = dir.join("haproxy.cfg");
    std::fs::write(&cfg_file, cfg).unwrap();
    lan.spawn("l4", "haproxy", &["-db", "-f", cfg_file.to_str().unwrap()]);
    // Up when a request from this host (10.213.19.254) gets through on both frontends.
    for port in [80, 81] {
        let front = SocketAddr::new(lan.addr("l4"), port);
        assert!(
            wait_until(Duration::from_secs(10), || {
                std::net::TcpStream::connect_timeout(&front, Duration::from_millis(200)).is_ok()
                    && http_request(
                        front,
                        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    )
                    .status
                        == 200
            }),
            "haproxy {front} does not pass requests"
        );
    }

    // Killed on drop if an assertion fails first.
    let mut py = netns::Proc(
        lan.command("cl", python().to_str().unwrap(), &["-c", CLIENTS, &l4])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python clients"),
    );
    let mut stdin = py.0.stdin.take().unwrap();
    let mut lines = BufReader::new(py.0.stdout.take().unwrap()).lines();
    let mut next = |what: &str| -> serde_json::Value {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("clients ended before {what}"))
            .unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{what}: {e}: {line}"))
    };

    // Backends see the clients' address, not the L4 tier's.
    let real = next("real");
    assert_eq!(
        real["real"],
        serde_json::json!(vec!["10.213.19.31"; 4]),
        "{real}"
    );
    for c in [0, 2] {
        let headers = metric(controls[c], "wslb_proxy_protocol_headers_total");
        assert!(headers > 0, "balancer {} saw no PROXY header", controls[c]);
    }

    // --sticky ip: one backend per address whichever balancer answered (4 requests each,
    // round robin over the two balancers).
    let ip = next("ip");
    for src in ["10.213.19.31", "10.213.19.32", "10.213.19.33"] {
        let picked = ip["ip"][src].as_array().unwrap();
        assert_eq!(picked.len(), 1, "{src} went to several backends: {ip}");
    }
    for c in [1, 3] {
        assert!(
            metric(controls[c], "wslb_connections_accepted_total") >= 4,
            "sticky ip balancer {} took no share",
            controls[c]
        );
    }

    // WebSocket clients with sticky cookies; then the balancer of half of them dies.
    let ready = next("ready");
    assert_eq!(
        ready["cookies"], 6,
        "every client got a sticky cookie: {ready}"
    );
    lan.kill(cookie_lb1.expect("cookie balancer on lb1"));
    writeln!(stdin, "go").unwrap();
    let done = next("done");
    let clients = done["done"].as_array().unwrap();
    let mut reconnected = 0;
    for (i, c) in clients.iter().enumerate() {
        let want: Vec<String> = (0..20).map(|k| format!("c{i}-m{k}")).collect();
        assert_eq!(c["got"], serde_json::json!(want), "client {i}: {c}");
        if c["reconnects"].as_u64().unwrap() > 0 {
            reconnected += 1;
            assert_eq!(c["after"], c["before"], "client {i} changed backend: {c}");
        }
    }
    assert!(
        reconnected > 0 && reconnected < clients.len(),
        "round robin put no client (or every client) on the killed balancer: {done}"
    );
    println!(
        "recipe: {reconnected} of {} WebSocket clients lost their balancer, reconnected \
         through the other one and kept their backend; 20 of 20 answers each; sticky ip: {}",
        clients.len(),
        ip["ip"]
    );
    let _ = py.0.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
