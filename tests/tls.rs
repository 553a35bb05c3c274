//! TLS front end (rustls in the mio loop), SNI, SIGHUP reload, and TLS to backends.
mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tungstenite::Message;

/// A throwaway CA and the leaf certificates it signed, as PEM files in a temp dir.
struct Pki {
    dir: PathBuf,
    ca: PathBuf,
    ca_params: CertificateParams,
    ca_key: KeyPair,
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

impl Pki {
    fn new() -> Pki {
        let dir = std::env::temp_dir().join(format!(
            "wslb-tls-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        fs::create_dir_all(&dir).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Distinct subject names: OpenSSL-based clients take a leaf whose issuer name equals
        // its own subject for self-signed.
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "wslb test CA");
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let ca = dir.join("ca.pem");
        fs::write(&ca, cert.pem()).unwrap();
        Pki {
            dir,
            ca,
            ca_params: params,
            ca_key: key,
        }
    }

    /// A leaf for `names`, written as `<stem>.pem` / `<stem>.key`.
    fn leaf(&self, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let issuer = Issuer::new(self.ca_params.clone(), &self.ca_key);
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let (c, k) = (
            self.dir.join(format!("{stem}.pem")),
            self.dir.join(format!("{stem}.key")),
        );
        fs::write(&c, cert.pem()).unwrap();
        fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(&self.ca).unwrap())
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn tls_connect(
    cfg: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    sni: &str,
) -> std::io::Result<TlsStream> {
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(TIMEOUT))?;
    let name = ServerName::try_from(sni.to_string()).unwrap();
    let conn = rustls::ClientConnection::new(cfg.clone(), name).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    // Drive the handshake now so certificate errors surface here.
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

/// One `GET path` over TLS with `Connection: close`; returns the whole response text.
fn https_get(
    cfg: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    sni: &str,
    path: &str,
) -> std::io::Result<String> {
    let mut s = tls_connect(cfg, addr, sni)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => {}
        // Servers may close without close_notify after a Connection: close response.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => return Err(e),
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn tls_args<'a>(cert: &'a Path, key: &'a Path) -> Vec<&'a str> {
    vec![
        "--tls-listen",
        "127.0.0.1:0",
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]
}

#[test]
fn https_and_wss_through_the_balancer() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf("localhost", &["localhost"]);
    let (a, b) = (Backend::start("ta"), Backend::start("tb"));
    let lb = Balancer::start(&tls_args(&cert, &key), &[&a, &b]);
    let cfg = pki.client_config();
    let resp = https_get(&cfg, lb.tls_addr(), "localhost", "/headers").unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.to_ascii_lowercase()
            .contains("x-forwarded-proto: https"),
        "{resp}"
    );
    // WebSocket over TLS; held open, so `fewest` must use both backends.
    let mut names = std::collections::BTreeSet::new();
    let mut held = Vec::new();
    for _ in 0..6 {
        let stream = tls_connect(&cfg, lb.tls_addr(), "localhost").unwrap();
        let (mut ws, resp) = tungstenite::client::client(
            format!("wss://localhost:{}/", lb.tls_addr().port()),
            stream,
        )
        .unwrap();
        assert_eq!(resp.status(), 101);
        ws.send(Message::text("whoami")).unwrap();
        names.insert(ws.read().unwrap().into_text().unwrap().to_string());
        ws.send(Message::binary(vec![7u8; 100_000])).unwrap();
        assert_eq!(ws.read().unwrap(), Message::binary(vec![7u8; 100_000]));
        held.push(ws);
    }
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn real_clients_curl_and_python() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf("localhost", &["localhost"]);
    let a = Backend::start("real");
    let lb = Balancer::start(&tls_args(&cert, &key), &[&a]);
    let port = lb.tls_addr().port();
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(&pki.ca)
        .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
        .arg(format!("https://localhost:{port}/"))
        .output()
        .expect("curl");
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && body.contains("backend real"),
        "{body} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script = format!(
        r#"
import asyncio, ssl, websockets
async def main():
    ctx = ssl.create_default_context(cafile={ca:?})
    async with websockets.connect("wss://localhost:{port}/", ssl=ctx, open_timeout=10) as ws:
        await ws.send("whoami")
        print(await asyncio.wait_for(ws.recv(), 10))
asyncio.run(main())
"#,
        ca = pki.ca.to_str().unwrap()
    );
    let out = Command::new(common::python())
        .args(["-c", &script])
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim() == "real",
        "python websockets over TLS: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn openssl_clients_resume_sessions_and_move_large_messages() {
    // Python's ssl module is OpenSSL: a client we did not write, checking that sessions
    // resume (stateless tickets, TLS 1.2 and 1.3) and that messages larger than a record
    // cross the balancer's own TLS buffers intact both ways.
    let pki = Pki::new();
    let (cert, key) = pki.leaf("localhost", &["localhost"]);
    let a = Backend::start("resume");
    let lb = Balancer::start(&tls_args(&cert, &key), &[&a]);
    let script = format!(
        r#"
import asyncio, socket, ssl, websockets
ca, port = {ca:?}, {port}
def get(ctx, session=None):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            body = b""
            while True:
                d = s.recv(65536)
                if not d:
                    break
                body += d
            assert body.startswith(b"HTTP/1.1 200"), body[:80]
            return s.session, s.session_reused, s.version()
for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ctx.maximum_version = version
    session, reused, v = get(ctx)
    assert not reused
    _, reused, v2 = get(ctx, session)
    print(v, v2, "resumed" if reused else "full")
async def big():
    ctx = ssl.create_default_context(cafile=ca)
    async with websockets.connect(f"wss://localhost:{{port}}/", ssl=ctx, max_size=None, open_timeout=10) as ws:
        for size in (16383, 16384, 16385, 70000, 1000000):
            data = bytes(i % 251 for i in range(size))
            await ws.send(data)
            assert await asyncio.wait_for(ws.recv(), 10) == data, size
    print("large ok")
asyncio.run(big())
"#,
        ca = pki.ca.to_str().unwrap(),
        port = lb.tls_addr().port()
    );
    let out = Command::new(common::python())
        .args(["-c", &script])
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "TLSv1.2 TLSv1.2 resumed",
            "TLSv1.3 TLSv1.3 resumed",
            "large ok"
        ],
        "{stdout}"
    );
}

#[test]
fn sni_selects_the_matching_certificate() {
    let pki = Pki::new();
    let (c1, k1) = pki.leaf("one", &["localhost"]);
    let (c2, k2) = pki.leaf("two", &["other.test"]);
    let a = Backend::start("sni");
    let lb = Balancer::start(
        &[
            "--tls-listen",
            "127.0.0.1:0",
            "--cert",
            c1.to_str().unwrap(),
            "--key",
            k1.to_str().unwrap(),
            "--cert",
            c2.to_str().unwrap(),
            "--key",
            k2.to_str().unwrap(),
        ],
        &[&a],
    );
    let cfg = pki.client_config();
    // The client verifies the name, so success proves which certificate was served.
    assert!(https_get(&cfg, lb.tls_addr(), "other.test", "/")
        .unwrap()
        .contains("backend sni"));
    assert!(https_get(&cfg, lb.tls_addr(), "localhost", "/")
        .unwrap()
        .contains("backend sni"));
    // An unknown name gets the default (first) certificate, which does not cover it.
    assert!(tls_connect(&cfg, lb.tls_addr(), "nobody.test").is_err());
}

#[test]
fn sighup_reloads_certificates_and_keeps_old_connections() {
    let old_pki = Pki::new();
    let (cert, key) = old_pki.leaf("live", &["localhost"]);
    let a = Backend::start("reload");
    let lb = Balancer::start(&tls_args(&cert, &key), &[&a]);
    let old_cfg = old_pki.client_config();
    let stream = tls_connect(&old_cfg, lb.tls_addr(), "localhost").unwrap();
    let (mut old_ws, _) =
        tungstenite::client::client(format!("wss://localhost:{}/", lb.tls_addr().port()), stream)
            .unwrap();
    // New certificate from a new CA, written over the same files.
    let new_pki = Pki::new();
    let (nc, nk) = new_pki.leaf("next", &["localhost"]);
    fs::copy(&nc, &cert).unwrap();
    fs::copy(&nk, &key).unwrap();
    let kill = Command::new("kill")
        .args(["-HUP", &lb.pid().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    assert!(lb.wait_log("certificates reloaded", TIMEOUT));
    let new_cfg = new_pki.client_config();
    assert!(https_get(&new_cfg, lb.tls_addr(), "localhost", "/")
        .unwrap()
        .contains("backend reload"));
    assert!(
        tls_connect(&old_cfg, lb.tls_addr(), "localhost").is_err(),
        "old CA no longer matches"
    );
    // The connection opened before the reload keeps working.
    old_ws.send(Message::text("still up")).unwrap();
    assert_eq!(old_ws.read().unwrap(), Message::text("still up"));
    // A broken reload keeps the current certificates.
    fs::write(&key, "not a key").unwrap();
    Command::new("kill")
        .args(["-HUP", &lb.pid().to_string()])
        .status()
        .unwrap();
    assert!(lb.wait_log("reload failed", TIMEOUT));
    assert!(https_get(&new_cfg, lb.tls_addr(), "localhost", "/")
        .unwrap()
        .contains("backend reload"));
}

#[test]
fn stalled_and_plaintext_handshakes_are_closed_without_harm() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf("h", &["localhost"]);
    let a = Backend::start("hs");
    let mut args = tls_args(&cert, &key);
    args.extend(["--header-timeout", "1s"]);
    let lb = Balancer::start(&args, &[&a]);
    // Plaintext HTTP on the TLS port: an alert or a close, quickly.
    let mut plain = TcpStream::connect(lb.tls_addr()).unwrap();
    plain.set_read_timeout(Some(TIMEOUT)).unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 1024];
    let started = Instant::now();
    loop {
        match plain.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => assert!(started.elapsed() < TIMEOUT, "kept reading"),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    // A client that stalls mid-handshake is closed at the deadline.
    let mut stalled = TcpStream::connect(lb.tls_addr()).unwrap();
    stalled.set_read_timeout(Some(TIMEOUT)).unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01, 0x00]).unwrap(); // a record header, then nothing
    let started = Instant::now();
    let n = stalled.read(&mut buf).unwrap_or(0);
    let took = started.elapsed();
    assert_eq!(n, 0, "closed, not answered");
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(4),
        "{took:?}"
    );
    // Others were not affected.
    assert!(
        https_get(&pki.client_config(), lb.tls_addr(), "localhost", "/")
            .unwrap()
            .contains("backend hs")
    );
}

#[test]
fn tls_to_backends_with_a_private_ca() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf("inner", &["localhost"]);
    let a = Backend::start("deep");
    // The inner balancer terminates TLS in front of the echo backend: a wss:// backend.
    let inner = Balancer::start(&tls_args(&cert, &key), &[&a]);
    let url = format!("wss://localhost:{}", inner.tls_addr().port());
    let ca = pki.ca.to_str().unwrap().to_string();
    // `localhost` resolves at startup; the name is sent as SNI and verified.
    let outer = Balancer::start(&["-B", &url, "--backend-ca", &ca], &[]);
    let r = get(outer.addr(), "/headers");
    assert_eq!(r.status, 200);
    assert!(
        r.text()
            .to_ascii_lowercase()
            .contains("x-forwarded-proto: https"),
        "{}",
        r.text()
    );
    let mut ws = ws_connect(outer.addr(), "/");
    assert_eq!(whoami(&mut ws), "deep");
    // Without the CA the backend's certificate is refused: 502, not a silent pass.
    let strict = Balancer::start(&["-B", &url], &[]);
    assert_eq!(get(strict.addr(), "/").status, 502);
}

#[test]
fn bad_certificate_files_exit_2_naming_the_file() {
    let pki = Pki::new();
    let (cert, _key) = pki.leaf("x", &["localhost"]);
    let missing = pki.dir.join("missing.key");
    let (status, _out, err) = run_wslb(&[
        "--tls-listen",
        "127.0.0.1:0",
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("missing.key"), "{err}");
    let garbage = pki.dir.join("garbage.pem");
    fs::write(&garbage, "hello").unwrap();
    let (status, _out, err) = run_wslb(&[
        "--tls-listen",
        "127.0.0.1:0",
        "--cert",
        garbage.to_str().unwrap(),
        "--key",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("garbage.pem"), "{err}");
}

#[test]
fn control_listener_over_tls_and_secure_sticky_cookie() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf("ctl", &["localhost"]);
    let a = Backend::start("ctl-backend");
    let mut args = tls_args(&cert, &key);
    args.extend([
        "--control",
        "127.0.0.1:0",
        "--control-tls",
        "--sticky",
        "cookie",
    ]);
    args.extend(["--sticky-secret", "0123456789abcdef0123"]);
    let lb = Balancer::start(&args, &[]);
    let cfg = pki.client_config();
    // Plain WebSocket to the TLS control port fails; wss registers.
    let control = lb.control_addr();
    let stream = tls_connect(&cfg, control, "localhost").unwrap();
    let (mut ws, _) = tungstenite::client::client(
        format!("wss://localhost:{}/register", control.port()),
        stream,
    )
    .unwrap();
    ws.send(Message::text(format!(
        r#"{{"type":"register","version":1,"guid":"tls-reg","bindings":["{}"]}}"#,
        a.url()
    )))
    .unwrap();
    let answer = loop {
        match ws.read().unwrap() {
            Message::Text(t) => break t.to_string(),
            _ => continue, // the balancer's heartbeat pings
        }
    };
    assert!(answer.contains("registered"), "{answer}");
    // The status page is served over TLS too.
    let page = https_get(&cfg, control, "localhost", "/api/backends").unwrap();
    assert!(page.contains("tls-reg"), "{page}");
    // A sticky cookie set on a TLS listener is Secure.
    let resp = https_get(&cfg, lb.tls_addr(), "localhost", "/").unwrap();
    let set_cookie = resp
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_else(|| panic!("no cookie: {resp}"));
    assert!(set_cookie.contains("Secure"), "{set_cookie}");
    assert!(resp.contains("backend ctl-backend"), "{resp}");
}

#[test]
fn agent_registers_over_wss() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf("agentctl", &["localhost"]);
    let mut args = tls_args(&cert, &key);
    args.extend(["--control", "127.0.0.1:0", "--control-tls"]);
    let lb = Balancer::start(&args, &[]);
    let control_port = lb.control_addr().port();
    let balancer = format!("wss://localhost:{control_port}/register");
    let agent = Agent::start(
        &[
            "--balancer",
            &balancer,
            "--balancer-ca",
            pki.ca.to_str().unwrap(),
        ],
        "wss-agent",
        "over-wss",
    );
    let registered = wait_until(TIMEOUT, || get(lb.addr(), "/").text().contains("over-wss"));
    drop(agent);
    assert!(
        registered,
        "the agent registered over wss:// and its backend answers"
    );
}

/// Issue 15: with `--control-client-ca`, a verified client certificate is a per-backend
/// credential: its first DNS name is the one guid its holder may register, no token needed.
#[test]
fn control_client_certificate_names_the_only_guid_it_may_register() {
    let pki = Pki::new();
    let (cert, key) = pki.leaf("ctl", &["localhost"]);
    let (client_cert, client_key) = pki.leaf("client", &["api-cert"]);
    let a = Backend::start("cert-backend");
    let mut args = tls_args(&cert, &key);
    let ca = pki.ca.to_str().unwrap().to_string();
    args.extend([
        "--control",
        "127.0.0.1:0",
        "--control-tls",
        "--control-client-ca",
        &ca,
        "--token",
        "s3cret",
    ]);
    let lb = Balancer::start(&args, &[]);
    let control = lb.control_addr();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(&pki.ca).unwrap())
        .unwrap();
    let with_cert = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_file(&client_cert).unwrap()],
            rustls::pki_types::PrivateKeyDer::from_pem_file(&client_key).unwrap(),
        )
        .unwrap(),
    );
    let register = |cfg: &Arc<rustls::ClientConfig>, guid: &str| -> Result<String, String> {
        let stream = tls_connect(cfg, control, "localhost").map_err(|e| e.to_string())?;
        let (mut ws, _) = tungstenite::client::client(
            format!("wss://localhost:{}/register", control.port()),
            stream,
        )
        .map_err(|e| e.to_string())?;
        ws.send(Message::text(format!(
            r#"{{"type":"register","version":1,"guid":"{guid}","bindings":["{}"]}}"#,
            a.url()
        )))
        .unwrap();
        loop {
            match ws.read() {
                Ok(Message::Text(t)) => return Ok(t.to_string()),
                Ok(_) => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    let other = register(&with_cert, "someone-else").unwrap();
    assert!(other.contains(r#""code":"guid_not_allowed""#), "{other}");
    let mine = register(&with_cert, "api-cert").unwrap();
    assert!(mine.contains(r#""type":"registered""#), "{mine}");
    // No certificate and no token: refused.
    let refused = register(&pki.client_config(), "api-cert").unwrap_err();
    assert!(refused.contains("401"), "{refused}");
    // A certificate does not open the admin API.
    let page = https_get(&with_cert, control, "localhost", "/api/backends").unwrap();
    assert!(page.starts_with("HTTP/1.1 403"), "{page}");
}
