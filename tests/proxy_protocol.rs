//! Issue 19: `--proxy-protocol` listeners. Good headers (v1, v2, split anywhere, on plain
//! and TLS listeners) make the header's source the client everywhere; bad ones (truncated,
//! oversized, unknown version, spoofed family or length, untrusted sender, too late) close
//! the connection, are counted by reason, and reach no backend. Third-party senders: curl
//! (`--haproxy-protocol`, v1, over TLS) and HAProxy (`send-proxy`, `send-proxy-v2`).
mod common;
#[path = "common/recorder.rs"]
mod recorder;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use recorder::{Mode, Recorder};

const LO: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const V2_SIG: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
const GET_HEADERS: &[u8] = b"GET /headers HTTP/1.1\r\nHost: pp\r\nConnection: close\r\n\r\n";

/// A balancer expecting PROXY headers from 127.0.0.1, with an admin listener for metrics.
fn pp_balancer(extra: &[&str], backends: &[&Backend]) -> Balancer {
    let mut args = vec![
        "--proxy-protocol",
        "--trusted-proxy",
        "127.0.0.1",
        "--control",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    Balancer::start(&args, backends)
}

/// One sample of `/metrics` (0 when absent).
fn metric(lb: &Balancer, series: &str) -> u64 {
    get(lb.control_addr(), "/metrics")
        .text()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

fn error_count(lb: &Balancer, reason: &str) -> u64 {
    metric(
        lb,
        &format!("wslb_proxy_protocol_errors_total{{reason=\"{reason}\"}}"),
    )
}

/// A v2 PROXY TCP/IPv4 header.
fn v2_inet(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut v = V2_SIG.to_vec();
    v.extend_from_slice(&[0x21, 0x11, 0, 12]);
    v.extend_from_slice(&src);
    v.extend_from_slice(&dst);
    v.extend_from_slice(&sport.to_be_bytes());
    v.extend_from_slice(&dport.to_be_bytes());
    v
}

fn v2_raw(ver_cmd: u8, fam: u8, len: u16, body: &[u8]) -> Vec<u8> {
    let mut v = V2_SIG.to_vec();
    v.extend_from_slice(&[ver_cmd, fam]);
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// The X-Forwarded-For values the echo backend saw in a response to GET /headers.
fn xff(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.split_once(": "))
        .filter(|(k, _)| k.eq_ignore_ascii_case("x-forwarded-for"))
        .map(|(_, v)| v.to_string())
        .collect()
}

/// Sends `bytes` then reads the whole answer (the request says `Connection: close`).
fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut c = connect(addr);
    c.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn with(header: &[u8], request: &[u8]) -> Vec<u8> {
    [header, request].concat()
}

/// The balancer closed the connection (EOF or reset) without answering anything.
fn closed_silently(c: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    let started = Instant::now();
    loop {
        match c.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => return false,
            Err(e) if is_timeout(&e) => return false,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return started.elapsed() < TIMEOUT,
        }
    }
}

#[test]
fn v1_and_v2_headers_make_the_header_source_the_client() {
    let a = Backend::start("pp");
    let events = std::env::temp_dir().join(format!("wslb-pp-events-{}", std::process::id()));
    let lb = pp_balancer(&["--events", events.to_str().unwrap()], &[&a]);

    // Header and request in one segment: the request behind the header must survive.
    let v1 = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 80\r\n";
    let body = exchange(lb.addr(), &with(v1, GET_HEADERS));
    assert_eq!(xff(&body), ["192.0.2.7"], "{body}");
    let v2 = v2_inet([198, 51, 100, 9], 40001, [10, 0, 0, 1], 80);
    let body = exchange(lb.addr(), &with(&v2, GET_HEADERS));
    assert_eq!(xff(&body), ["198.51.100.9"], "{body}");
    // IPv6 in v1, and a header dribbled one byte per segment.
    let mut c = connect(lb.addr());
    c.set_nodelay(true).unwrap();
    for b in b"PROXY TCP6 2001:db8::5 2001:db8::1 40002 80\r\n" {
        c.write_all(&[*b]).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    c.write_all(GET_HEADERS).unwrap();
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    assert_eq!(xff(&out), ["2001:db8::5"], "{out}");
    // LOCAL (the L4 tier's own health check) and UNKNOWN: the socket's peer is the client.
    let body = exchange(lb.addr(), &with(&v2_raw(0x20, 0, 0, &[]), GET_HEADERS));
    assert_eq!(xff(&body), ["127.0.0.1"], "{body}");
    let body = exchange(lb.addr(), &with(b"PROXY UNKNOWN\r\n", GET_HEADERS));
    assert_eq!(xff(&body), ["127.0.0.1"], "{body}");
    assert_eq!(metric(&lb, "wslb_proxy_protocol_headers_total"), 5);
    // Events name the header's source too.
    assert!(
        wait_until(TIMEOUT, || std::fs::read_to_string(&events)
            .unwrap_or_default()
            .contains(r#""peer":"192.0.2.7:40000""#)),
        "{}",
        std::fs::read_to_string(&events).unwrap_or_default()
    );
    let _ = std::fs::remove_file(&events);

    // --max-connections-per-ip counts header sources, not the L4 balancer's address.
    let lb = pp_balancer(&["--max-connections-per-ip", "1"], &[&a]);
    let mut held = connect(lb.addr());
    held.write_all(b"PROXY TCP4 192.0.2.50 10.0.0.1 1 80\r\nGET /hea")
        .unwrap();
    let clients = get(lb.control_addr(), "/api/clients").text();
    assert!(
        wait_until(TIMEOUT, || get(lb.control_addr(), "/api/clients")
            .text()
            .contains("\"192.0.2.50:1\"")),
        "{clients}"
    );
    let second = exchange(
        lb.addr(),
        &with(b"PROXY TCP4 192.0.2.50 10.0.0.1 2 80\r\n", GET_HEADERS),
    );
    assert!(second.starts_with("HTTP/1.1 429"), "{second}");
    let other = exchange(
        lb.addr(),
        &with(b"PROXY TCP4 192.0.2.51 10.0.0.1 3 80\r\n", GET_HEADERS),
    );
    assert_eq!(xff(&other), ["192.0.2.51"], "{other}");
    held.write_all(b"ders HTTP/1.1\r\nHost: pp\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = held.read_to_string(&mut out);
    assert_eq!(xff(&out), ["192.0.2.50"], "{out}");
}

#[test]
fn bad_headers_are_closed_counted_and_reach_no_backend() {
    let rec = Recorder::start(Mode::Ok);
    let url = rec.url();
    let lb = pp_balancer(&["-B", &url, "--header-timeout", "400ms"], &[]);
    let mut long_v1 = b"PROXY UNKNOWN ".to_vec();
    long_v1.resize(120, b'x');
    // (what is sent, then half-close?, reason counted)
    let cases: Vec<(&str, Vec<u8>, bool, &str)> = vec![
        (
            "truncated v1",
            b"PROXY TCP4 192.0.2.1 ".to_vec(),
            true,
            "truncated",
        ),
        (
            "truncated v2",
            v2_inet([192, 0, 2, 1], 1, [10, 0, 0, 1], 2)[..20].to_vec(),
            true,
            "truncated",
        ),
        ("v1 over 107 bytes", long_v1, false, "oversized"),
        (
            "v2 length 2000",
            v2_raw(0x21, 0x11, 2000, &[0; 64]),
            false,
            "oversized",
        ),
        ("plain HTTP", GET_HEADERS.to_vec(), false, "unknown_version"),
        (
            "TLS ClientHello",
            b"\x16\x03\x01\x02\x00\x01".to_vec(),
            false,
            "unknown_version",
        ),
        (
            "v2 version 3",
            v2_raw(0x31, 0x11, 12, &[0; 12]),
            false,
            "unknown_version",
        ),
        (
            "v1 TCP4 with an IPv6 source",
            b"PROXY TCP4 ::1 10.0.0.1 1 2\r\n".to_vec(),
            false,
            "bad_family",
        ),
        (
            "v2 family 4",
            v2_raw(0x21, 0x41, 12, &[0; 12]),
            false,
            "bad_family",
        ),
        (
            "v2 INET6 in 12 bytes",
            v2_raw(0x21, 0x21, 12, &[0; 12]),
            false,
            "bad_address_length",
        ),
        (
            "v2 command 2",
            v2_raw(0x22, 0x11, 12, &[0; 12]),
            false,
            "bad_command",
        ),
        (
            "v1 port with a leading zero",
            b"PROXY TCP4 192.0.2.1 10.0.0.1 01 2\r\n".to_vec(),
            false,
            "malformed",
        ),
        ("nothing at all", Vec::new(), false, "timeout"),
    ];
    let mut expected = std::collections::BTreeMap::<&str, u64>::new();
    for (what, bytes, half_close, reason) in &cases {
        let mut c = connect(lb.addr());
        // A request behind the bad header: it must never reach the backend.
        if !bytes.is_empty() {
            c.write_all(&with(bytes, if *half_close { b"" } else { GET_HEADERS }))
                .unwrap();
        }
        if *half_close {
            c.shutdown(std::net::Shutdown::Write).unwrap();
        }
        assert!(closed_silently(&mut c), "{what}: not closed");
        *expected.entry(reason).or_default() += 1;
        for (r, n) in &expected {
            assert!(
                wait_until(TIMEOUT, || error_count(&lb, r) == *n),
                "{what}: reason {r} counted {} times, want {n}",
                error_count(&lb, r)
            );
        }
    }
    assert_eq!(rec.count(), 0, "a backend connection was opened");

    // Nothing else was affected: the next good header is served.
    let body = exchange(
        lb.addr(),
        &with(b"PROXY TCP4 192.0.2.9 10.0.0.1 5 80\r\n", GET_HEADERS),
    );
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(
        rec.all_text()
            .to_ascii_lowercase()
            .contains("x-forwarded-for: 192.0.2.9"),
        "{}",
        rec.all_text()
    );
}

/// A connection to `addr` from `source` (any 127/8 address is local on Linux).
fn connect_from(source: IpAddr, addr: SocketAddr) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::new(source, 0).into()).unwrap();
    s.connect(&addr.into()).unwrap();
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s
}

#[test]
fn untrusted_peers_are_refused_even_with_a_valid_header() {
    let rec = Recorder::start(Mode::Ok);
    let url = rec.url();
    let lb = Balancer::start(
        &[
            "--proxy-protocol",
            "--trusted-proxy",
            "127.0.0.2",
            "--control",
            "127.0.0.1:0",
            "-B",
            &url,
        ],
        &[],
    );
    let good = with(b"PROXY TCP4 192.0.2.3 10.0.0.1 5 80\r\n", GET_HEADERS);
    let mut c = connect_from(LO, lb.addr());
    c.write_all(&good).unwrap();
    assert!(closed_silently(&mut c), "untrusted peer not closed");
    assert_eq!(error_count(&lb, "untrusted"), 1);
    // A --trusted-proxy that misses the L4 tier refuses everyone: it must show in the log.
    assert!(
        lb.wait_log("PROXY protocol: connections refused: 1 ", TIMEOUT),
        "{:#?}",
        lb.stderr_lines()
    );
    assert_eq!(rec.count(), 0);
    let mut c = connect_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), lb.addr());
    c.write_all(&good).unwrap();
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(rec.count(), 1);
}

#[test]
fn bad_proxy_protocol_flags_exit_2_with_one_line() {
    let cases: [(&[&str], &str); 3] = [
        (
            &["--proxy-protocol", "-B", "ws://127.0.0.1:9"],
            "--trusted-proxy",
        ),
        (
            &["-B", "ws://127.0.0.1:9,proxy=v3"],
            "proxy must be v1 or v2",
        ),
        (
            &[
                "agent",
                "-b",
                "ws://127.0.0.1:9/register",
                "--binding",
                "ws://127.0.0.1:8",
                "--proxy-protocol",
                "v9",
            ],
            "--proxy-protocol",
        ),
    ];
    for (args, needle) in cases {
        let (status, _, err) = run_wslb(args);
        assert_eq!(status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

/// Self-signed certificate and key for `localhost`, in a temp dir removed on drop.
struct TempCert(std::path::PathBuf);

impl TempCert {
    fn new() -> TempCert {
        let dir = std::env::temp_dir().join(format!("wslb-pp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        std::fs::write(dir.join("c.pem"), c.cert.pem()).unwrap();
        std::fs::write(dir.join("k.pem"), c.signing_key.serialize_pem()).unwrap();
        TempCert(dir)
    }

    fn args(&self) -> Vec<String> {
        let p = |f: &str| self.0.join(f).to_string_lossy().into_owned();
        ["--tls-listen", "127.0.0.1:0", "--cert"]
            .iter()
            .map(|s| s.to_string())
            .chain([p("c.pem"), "--key".into(), p("k.pem")])
            .collect()
    }
}

impl Drop for TempCert {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// curl -k [--haproxy-protocol] URL: (exit ok, body).
fn curl(url: &str, extra: &[&str]) -> (bool, String) {
    let out = Command::new("curl")
        .args(["-sS", "-k", "--max-time", "10"])
        .args(extra)
        .arg(url)
        .output()
        .expect("run curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn tls_listener_reads_the_header_before_the_client_hello() {
    let a = Backend::start("tls-pp");
    let cert = TempCert::new();
    let args = cert.args();
    let mut extra: Vec<&str> = args.iter().map(String::as_str).collect();
    extra.extend(["--trusted-proxy", "127.0.0.0/8"]);
    let lb = pp_balancer(&extra, &[&a]);
    let url = format!("https://localhost:{}/headers", lb.tls_addr().port());
    let resolve = format!("localhost:{}:127.0.0.1", lb.tls_addr().port());
    // curl writes `PROXY TCP4 <its address> ...` on the raw socket, then its ClientHello.
    let (ok, body) = curl(
        &url,
        &[
            "--haproxy-protocol",
            "--resolve",
            &resolve,
            "--interface",
            "127.0.0.3",
        ],
    );
    assert!(ok, "{body}");
    assert_eq!(xff(&body), ["127.0.0.3"], "{body}");
    // Without the header the ClientHello is not a PROXY header: refused and counted.
    let (ok, body) = curl(&url, &["--resolve", &resolve]);
    assert!(!ok, "{body}");
    assert_eq!(error_count(&lb, "unknown_version"), 1);
    assert_eq!(metric(&lb, "wslb_proxy_protocol_headers_total"), 1);
}

/// A listening socket made here and handed to HAProxy (`bind fd@N`): no port is picked
/// and released first, so nothing else can take it before HAProxy binds.
struct Front(std::net::TcpListener);

impl Front {
    fn new() -> Front {
        Front(std::net::TcpListener::bind("127.0.0.1:0").expect("bind a front"))
    }

    fn port(&self) -> u16 {
        self.0.local_addr().unwrap().port()
    }

    /// HAProxy's name for it.
    fn bind(&self) -> String {
        use std::os::fd::AsRawFd;
        format!("fd@{}", self.0.as_raw_fd())
    }
}

/// HAProxy, killed on drop.
struct Haproxy {
    child: Child,
    dir: std::path::PathBuf,
}

impl Haproxy {
    /// HAProxy with `body` after a common `global`/`defaults` section (`mode`), listening
    /// on `fronts` (which `body` names with [`Front::bind`]).
    fn start(mode: &str, body: &str, fronts: &[&Front]) -> Option<Haproxy> {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        if Command::new("haproxy").arg("-v").output().is_err() {
            println!("SKIPPED: haproxy is not installed (make test-deps installs it)");
            return None;
        }
        let cfg = format!(
            "global\n  maxconn 200\ndefaults\n  mode {mode}\n  timeout connect 2s\n  \
             timeout client 20s\n  timeout server 20s\n{body}"
        );
        let port = fronts.first().map_or(0, |f| f.port());
        let dir = std::env::temp_dir().join(format!("wslb-pp-haproxy-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("haproxy.cfg");
        std::fs::write(&file, cfg).unwrap();
        let fds: Vec<i32> = fronts.iter().map(|f| f.0.as_raw_fd()).collect();
        let mut cmd = Command::new("haproxy");
        cmd.args(["-db", "-f"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        // SAFETY: fcntl is async-signal-safe; it only clears close-on-exec on descriptors
        // this process owns, in the child, so HAProxy inherits exactly these.
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &fds {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn haproxy");
        Some(Haproxy { child, dir })
    }

    /// TCP routes: (front, server address, server options).
    fn tcp(routes: &[(&Front, SocketAddr, &str)]) -> Option<Haproxy> {
        let mut body = String::new();
        for (i, (front, server, opts)) in routes.iter().enumerate() {
            body += &format!(
                "frontend f{i}\n  bind {}\n  default_backend b{i}\n\
                 backend b{i}\n  server s{i} {server} {opts}\n",
                front.bind()
            );
        }
        let fronts: Vec<&Front> = routes.iter().map(|r| r.0).collect();
        Haproxy::start("tcp", &body, &fronts)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn haproxy_send_proxy_v1_and_v2_witness() {
    let a = Backend::start("behind-haproxy");
    let cert = TempCert::new();
    let args = cert.args();
    let extra: Vec<&str> = args.iter().map(String::as_str).collect();
    let lb = pp_balancer(&extra, &[&a]);
    let (f1, f2, f3) = (Front::new(), Front::new(), Front::new());
    let (p1, p2, p3) = (f1.port(), f2.port(), f3.port());
    let Some(_h) = Haproxy::tcp(&[
        (&f1, lb.addr(), "send-proxy"),
        (&f2, lb.addr(), "send-proxy-v2"),
        (&f3, lb.tls_addr(), "send-proxy-v2"),
    ]) else {
        return;
    };
    // The client's source (127.0.0.77) reaches wslb only inside HAProxy's header: HAProxy
    // itself connects from 127.0.0.1.
    let client = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 77));
    for port in [p1, p2] {
        let mut c = connect_from(client, SocketAddr::new(LO, port));
        c.write_all(GET_HEADERS).unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        assert_eq!(xff(&out), ["127.0.0.77"], "port {port}: {out}");
    }
    // v2 in front of the TLS listener, with curl as the TLS client.
    let (ok, body) = curl(
        &format!("https://localhost:{p3}/headers"),
        &[
            "--resolve",
            &format!("localhost:{p3}:127.0.0.1"),
            "--interface",
            "127.0.0.78",
        ],
    );
    assert!(ok, "{body}");
    assert_eq!(xff(&body), ["127.0.0.78"], "{body}");
    assert_eq!(metric(&lb, "wslb_proxy_protocol_headers_total"), 3);
}

/// An HAProxy HTTP frontend's answer: the client address it took from the PROXY header.
const HAPROXY_SAYS_SRC: &str = "  http-request return status 200 content-type text/plain \
                                lf-string \"src=%[src] port=%[src_port]\\n\"\n";

/// A request from 127.0.0.`last` through `lb` (after `prefix`, e.g. a PROXY header) is
/// answered by an HAProxy frontend behind it that names that address and port as the client.
fn backend_heard_of(lb: &Balancer, last: u8, prefix: &[u8], what: &str) {
    let client = IpAddr::V4(Ipv4Addr::new(127, 0, 0, last));
    let mut c = connect_from(client, lb.addr());
    c.write_all(&with(
        prefix,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ))
    .unwrap();
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    let port = c.local_addr().unwrap().port();
    assert!(
        out.contains(&format!("src=127.0.0.{last} port={port}\n")),
        "{what}: {out}"
    );
}

#[test]
fn backends_with_proxy_option_get_a_header_haproxy_accepts() {
    // HAProxy as the receiver: `accept-proxy` takes the client's address from the header,
    // and the answer says which address that was.
    let (f1, f2) = (Front::new(), Front::new());
    let answer = HAPROXY_SAYS_SRC;
    let body = format!(
        "frontend v1\n  bind {} accept-proxy\n{answer}\
         frontend v2\n  bind {} accept-proxy\n{answer}",
        f1.bind(),
        f2.bind()
    );
    let Some(_h) = Haproxy::start("http", &body, &[&f1, &f2]) else {
        return;
    };
    for (port, version) in [(f1.port(), "v1"), (f2.port(), "v2")] {
        let backend = format!("http://127.0.0.1:{port},proxy={version}");
        let lb = pp_balancer(&["-B", &backend, "--trusted-proxy", "127.0.0.0/8"], &[]);
        // Directly from 127.0.0.9, then 127.0.0.10 on the same backend: each connection
        // names its own client (no pooled connection carries someone else's header).
        for last in [9u8, 10] {
            backend_heard_of(&lb, last, b"PROXY UNKNOWN\r\n", version);
        }
        // Through a PROXY header of our own: the backend hears of the header's source.
        let body = exchange(
            lb.addr(),
            b"PROXY TCP6 2001:db8::77 2001:db8::1 4321 80\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(
            body.contains("src=2001:db8::77 port=4321\n"),
            "{version}: {body}"
        );
    }
}

/// The L4 tier's health check (docs/SCALING.md): 503 until a backend is ready, 200 then,
/// and failing (refused) as soon as a drain begins.
#[test]
fn ready_follows_backends_and_drain() {
    let mut lb = Balancer::start(&["--control", "127.0.0.1:0"], &[]);
    let ctl = lb.control_addr();
    // 0 = refused or reset: a drain closes the control listener too, which fails the
    // check as well (a connect may still land in the closing listener's backlog).
    let ready = || -> u16 {
        let Ok(mut c) = TcpStream::connect(ctl) else {
            return 0;
        };
        let _ = c.set_read_timeout(Some(TIMEOUT));
        let mut out = String::new();
        let sent = c.write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        if sent.is_err() || c.read_to_string(&mut out).is_err() {
            return 0;
        }
        out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0)
    };
    assert_eq!(ready(), 503);
    let _agent = Agent::start(&["-b", &format!("ws://{ctl}/register")], "ready-1", "r1");
    assert!(
        wait_until(TIMEOUT, || ready() == 200),
        "agent never made it ready"
    );
    // Keep a client open so the drain lasts; /ready must say 503 during it. (The agent
    // registers as soon as it starts its backend, which may not listen yet.)
    assert!(wait_until(TIMEOUT, || get(lb.addr(), "/").status == 200));
    let mut ws = ws_connect(lb.addr(), "/");
    assert_eq!(whoami(&mut ws), "r1");
    lb.sigterm();
    assert!(
        wait_until(TIMEOUT, || ready() != 200),
        "still ready while draining"
    );
    drop(ws);
    assert!(lb.wait_exit(TIMEOUT).is_some());
}

/// The registration field (`wslb agent --proxy-protocol v2`) and a TLS backend: the header
/// must come before the ClientHello, or HAProxy's `accept-proxy ssl` frontend refuses it.
#[test]
fn registered_and_tls_backends_get_the_header_before_anything_else() {
    let cert = TempCert::new();
    let pem = cert.0.join("both.pem");
    let both = [
        std::fs::read_to_string(cert.0.join("c.pem")).unwrap(),
        std::fs::read_to_string(cert.0.join("k.pem")).unwrap(),
    ]
    .concat();
    std::fs::write(&pem, both).unwrap();
    let (plain, tls) = (Front::new(), Front::new());
    let answer = HAPROXY_SAYS_SRC;
    let body = format!(
        "frontend plain\n  bind {} accept-proxy\n{answer}\
         frontend tls\n  bind {} accept-proxy ssl crt {}\n{answer}",
        plain.bind(),
        tls.bind(),
        pem.display()
    );
    let Some(_h) = Haproxy::start("http", &body, &[&plain, &tls]) else {
        return;
    };
    let check = |lb: &Balancer, what: &str| backend_heard_of(lb, 21, b"", what);

    let tls_backend = format!("https://127.0.0.1:{},proxy=v1", tls.port());
    let lb = Balancer::start(&["-B", &tls_backend, "--backend-insecure"], &[]);
    check(&lb, "TLS backend, proxy=v1");

    let lb = Balancer::start(&["--control", "127.0.0.1:0"], &[]);
    let control = format!("ws://{}/register", lb.control_addr());
    let binding = format!("http://127.0.0.1:{}", plain.port());
    let mut agent = Command::new(wslb_bin().unwrap())
        .args(["agent", "-b", &control, "--binding", &binding])
        .args(["--guid", "pp-reg", "--proxy-protocol", "v2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let registered = wait_until(TIMEOUT, || get(lb.control_addr(), "/ready").status == 200);
    if registered {
        check(&lb, "registered backend, proxy_protocol v2");
    }
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(registered, "the agent did not register");
}
