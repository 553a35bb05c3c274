//! Sticky sessions: signed cookies, several balancers sharing a secret, rendezvous hashing.
mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;

use common::*;
use tungstenite::client::IntoClientRequest;
use tungstenite::Message;

const SECRET: &str = "a shared secret of enough length";

/// `GET`/`POST` with an optional cookie; returns (backend name, Set-Cookie value if any).
fn request(addr: SocketAddr, method: &str, cookie: Option<&str>) -> (String, Option<String>) {
    let cookie_line = cookie.map_or(String::new(), |c| format!("Cookie: other=1; {c}\r\n"));
    let body = if method == "POST" { "hello" } else { "" };
    let raw = format!(
        "{method} /socket.io/?EIO=4 HTTP/1.1\r\nHost: x\r\n{cookie_line}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let r = http_request(addr, raw.as_bytes());
    assert!(r.status == 200, "{method}: {}", r.status);
    let name = r.header("x-backend").expect("X-Backend").to_string();
    (name, r.header("set-cookie").map(str::to_string))
}

/// `name=value` from a Set-Cookie header, checking the attributes.
fn cookie_pair(set_cookie: &str) -> String {
    assert!(set_cookie.contains("HttpOnly"), "{set_cookie}");
    assert!(set_cookie.contains("Path=/"), "{set_cookie}");
    assert!(set_cookie.contains("SameSite=Lax"), "{set_cookie}");
    set_cookie.split(';').next().unwrap().trim().to_string()
}

fn ws_with_cookie(addr: SocketAddr, cookie: &str) -> String {
    let mut req = format!("ws://{addr}/socket.io/?transport=websocket")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert("Cookie", cookie.parse().unwrap());
    let (mut ws, resp) = tungstenite::client::client(req, connect(addr)).unwrap();
    assert!(
        resp.headers().get("set-cookie").is_none(),
        "valid cookie is not re-issued"
    );
    ws.send(Message::text("whoami")).unwrap();
    ws.read().unwrap().into_text().unwrap().to_string()
}

#[test]
fn socket_io_like_flow_stays_on_one_backend() {
    let (a, b) = (Backend::start("sa"), Backend::start("sb"));
    let lb = Balancer::start(
        &["--sticky", "cookie", "--sticky-secret", SECRET],
        &[&a, &b],
    );
    for _ in 0..5 {
        let (first, set) = request(lb.addr(), "GET", None);
        let cookie = cookie_pair(&set.expect("first response sets the cookie"));
        assert!(cookie.starts_with("wslb="), "{cookie}");
        // Load the other backend so `fewest` alone would move this client.
        let mut others = Vec::new();
        for _ in 0..3 {
            let mut ws = ws_connect(lb.addr(), "/");
            whoami(&mut ws);
            others.push(ws);
        }
        for method in ["POST", "GET", "POST"] {
            let (name, set) = request(lb.addr(), method, Some(&cookie));
            assert_eq!(name, first, "{method} stayed");
            assert!(set.is_none(), "a valid cookie is not re-issued");
        }
        assert_eq!(ws_with_cookie(lb.addr(), &cookie), first, "upgrade stayed");
    }
    // Clients without the cookie are still spread by `fewest`.
    let mut names = BTreeMap::<String, usize>::new();
    let mut held = Vec::new();
    for _ in 0..6 {
        let mut ws = ws_connect(lb.addr(), "/");
        *names.entry(whoami(&mut ws)).or_default() += 1;
        held.push(ws);
    }
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn balancers_sharing_a_secret_agree_and_tampering_is_ignored() {
    let (a, b) = (Backend::start("ma"), Backend::start("mb"));
    let args = [
        "--sticky",
        "cookie:sid",
        "--sticky-secret",
        SECRET,
        "-a",
        "round-robin",
    ];
    let lb1 = Balancer::start(&args, &[&a, &b]);
    // The second balancer lists the backends in the other order: ids come from the URLs.
    let lb2 = Balancer::start(&args, &[&b, &a]);
    for _ in 0..4 {
        let (first, set) = request(lb1.addr(), "GET", None);
        let cookie = cookie_pair(&set.unwrap());
        assert!(cookie.starts_with("sid="));
        for _ in 0..3 {
            assert_eq!(request(lb2.addr(), "GET", Some(&cookie)).0, first);
        }
        // Tampered: a flipped character in the signed value.
        let mut bytes = cookie.into_bytes();
        let i = bytes.len() - 3;
        bytes[i] = if bytes[i] == b'0' { b'1' } else { b'0' };
        let tampered = String::from_utf8(bytes).unwrap();
        let (_, set) = request(lb2.addr(), "GET", Some(&tampered));
        assert!(set.is_some(), "a tampered cookie is replaced, not an error");
    }
    // A different secret does not accept the cookie.
    let lb3 = Balancer::start(
        &[
            "--sticky",
            "cookie:sid",
            "--sticky-secret",
            "another secret of enough length",
        ],
        &[&a, &b],
    );
    let (_, set) = request(lb1.addr(), "GET", None);
    let cookie = cookie_pair(&set.unwrap());
    assert!(request(lb3.addr(), "GET", Some(&cookie)).1.is_some());
}

#[test]
fn gone_sticky_target_falls_back_and_reissues() {
    let a = Backend::start("alive");
    let mut b = Some(Backend::start("doomed"));
    let lb = Balancer::start(
        &[
            "--sticky",
            "cookie",
            "--sticky-secret",
            SECRET,
            "-a",
            "round-robin",
        ],
        &[&a, b.as_ref().unwrap()],
    );
    let cookie = loop {
        let (name, set) = request(lb.addr(), "GET", None);
        if name == "doomed" {
            break cookie_pair(&set.unwrap());
        }
    };
    b.take(); // the backend process dies
    let (name, set) = request(lb.addr(), "GET", Some(&cookie));
    assert_eq!(name, "alive");
    assert!(set.is_some(), "cookie re-issued for the new backend");
}

/// Python: one request per client address 127.0.0.N, returns N → backend name.
fn per_ip_backends(addr: SocketAddr, n: u32) -> BTreeMap<u32, String> {
    let script = format!(
        r#"
import socket
for i in range(2, {last}):
    s = socket.socket()
    s.settimeout(10)
    s.bind(("127.0.0.%d" % i, 0))
    s.connect(("127.0.0.1", {port}))
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    name = [l.split(b":", 1)[1].strip().decode() for l in data.split(b"\r\n") if l.lower().startswith(b"x-backend:")][0]
    print(i, name)
"#,
        last = n + 2,
        port = addr.port()
    );
    let out = Command::new(common::python())
        .args(["-c", &script])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (i, name) = l.split_once(' ').unwrap();
            (i.parse().unwrap(), name.to_string())
        })
        .collect()
}

#[test]
fn ip_mode_remaps_only_the_removed_backends_clients() {
    let mut backends: Vec<Option<Backend>> = ["h0", "h1", "h2", "h3"]
        .iter()
        .map(|n| Some(Backend::start(n)))
        .collect();
    let refs: Vec<&Backend> = backends.iter().map(|b| b.as_ref().unwrap()).collect();
    let lb = Balancer::start(&["--sticky", "ip"], &refs);
    let before = per_ip_backends(lb.addr(), 200);
    let again = per_ip_backends(lb.addr(), 200);
    assert_eq!(before, again, "same address, same backend");
    let mut counts = BTreeMap::<&str, usize>::new();
    for name in before.values() {
        *counts.entry(name.as_str()).or_default() += 1;
    }
    assert_eq!(counts.len(), 4, "{counts:?}");
    assert!(
        counts.values().all(|&c| (25..=80).contains(&c)),
        "spread: {counts:?}"
    );
    drop(refs);
    backends[1].take(); // h1 goes away
    let after = per_ip_backends(lb.addr(), 200);
    let moved: Vec<_> = before
        .iter()
        .filter(|(i, name)| after[i] != **name)
        .collect();
    assert!(
        moved.iter().all(|(_, name)| name.as_str() == "h1"),
        "only h1's clients move"
    );
    assert_eq!(moved.len(), counts["h1"], "all of h1's clients moved");
    let share = moved.len() as f64 / 200.0;
    assert!(
        (0.12..=0.40).contains(&share),
        "remapped {share:.2} of clients, expected about a quarter"
    );
}

#[test]
fn header_mode_keys_on_the_header() {
    let (a, b, c) = (
        Backend::start("x1"),
        Backend::start("x2"),
        Backend::start("x3"),
    );
    let lb = Balancer::start(&["--sticky", "header:X-Session"], &[&a, &b, &c]);
    let mut seen = BTreeMap::<String, String>::new();
    for round in 0..3 {
        for user in 0..30 {
            let raw = format!(
                "GET / HTTP/1.1\r\nHost: x\r\nX-Session: user-{user}\r\nConnection: close\r\n\r\n"
            );
            let name = http_request(lb.addr(), raw.as_bytes())
                .header("x-backend")
                .unwrap()
                .to_string();
            let prev = seen
                .entry(format!("user-{user}"))
                .or_insert_with(|| name.clone());
            assert_eq!(*prev, name, "round {round}");
        }
    }
    let distinct: std::collections::BTreeSet<_> = seen.values().collect();
    assert_eq!(distinct.len(), 3, "30 keys use all 3 backends");
}

#[test]
fn bad_sticky_flags_exit_2() {
    for (flag, v) in [
        ("--sticky", "bogus"),
        ("--sticky", "header:"),
        ("--sticky-secret", "short"),
    ] {
        let (status, _, err) = run_wslb(&[flag, v]);
        assert_eq!(status.code(), Some(2), "{flag} {v}: {err}");
        assert!(err.contains(flag), "{err}");
    }
}
