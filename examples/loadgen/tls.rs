//! The TLS client side of `examples/loadgen.rs` (a module of that example, not an example of
//! its own): the rustls configuration (certificates not verified unless `--ca FILE`), two
//! non-blocking helpers that drive a `ClientConnection` over a mio socket inside the
//! existing loops (`--tls` for ws-echo, ws-hold, http), and the `tls-hs` scenario.
//!
//! `tls-hs`: `--conns N` slots (8 by default) each loop TCP connect → full TLS handshake →
//! `close_notify` → close; one op is that whole cycle. With `--resume` each slot keeps its own
//! session cache, so every handshake after its first offers resumption; whether it resumed
//! is read from `handshake_kind()` and counted (`resumed`, `resumed_frac`). A TLS 1.3 server
//! sends its session tickets only after it has the client's Finished, so with `--resume` a
//! slot reads on after its handshake until a ticket arrived, or for at most [`TICKET_WAIT`]
//! (then `tickets_missing` counts it; the op still counts).

use std::io::{ErrorKind, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use rustls::client::{
    ClientSessionMemoryCache, ClientSessionStore, Resumption, Tls12ClientSessionValue,
    Tls13ClientSessionValue,
};
use rustls::version::{TLS12, TLS13};
use rustls::{
    ClientConfig, ClientConnection, HandshakeKind, NamedGroup, ProtocolVersion, RootCertStore,
    SupportedProtocolVersion,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

use super::{connect_result, Cfg, Stats, OP_TIMEOUT, STALL};

/// `tls-hs --resume` over TLS 1.3: how long a slot waits after its handshake for the
/// server's first NewSessionTicket before closing anyway.
pub const TICKET_WAIT: Duration = Duration::from_millis(100);

/// The TLS flags: `--tls-version 1.2|1.3` (both offered when absent), `--ca FILE`,
/// `--sni NAME` (`localhost`; an IP address sends no SNI), `--resume` (tls-hs).
#[derive(Clone, Debug)]
pub struct Opts {
    pub versions: &'static [&'static SupportedProtocolVersion],
    pub ca: Option<String>,
    pub sni: ServerName<'static>,
    pub resume: bool,
}

impl Opts {
    /// `None` when `version` is not `1.2`, `1.3` or absent, or `sni` is not a name or IP.
    pub fn new(version: Option<&str>, ca: Option<String>, sni: &str, resume: bool) -> Option<Opts> {
        static BOTH: [&SupportedProtocolVersion; 2] = [&TLS13, &TLS12];
        static ONLY12: [&SupportedProtocolVersion; 1] = [&TLS12];
        static ONLY13: [&SupportedProtocolVersion; 1] = [&TLS13];
        let versions: &'static [&'static SupportedProtocolVersion] = match version {
            None => &BOTH,
            Some("1.2") => &ONLY12,
            Some("1.3") => &ONLY13,
            Some(_) => return None,
        };
        let sni = ServerName::try_from(sni.to_string()).ok()?;
        Some(Opts {
            versions,
            ca,
            sni,
            resume,
        })
    }

    /// A client configuration offering ALPN `http/1.1`, with `resumption`.
    pub fn config(&self, resumption: Resumption) -> Arc<ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(self.versions)
            .expect("ring supports TLS 1.2 and 1.3");
        let mut cfg = match &self.ca {
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(path)
                    .unwrap_or_else(|e| super::usage(&format!("--ca {path}: {e}")))
                {
                    let cert = cert.unwrap_or_else(|e| super::usage(&format!("--ca {path}: {e}")));
                    roots
                        .add(cert)
                        .unwrap_or_else(|e| super::usage(&format!("--ca {path}: {e}")));
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            None => builder
                .dangerous()
                .with_custom_certificate_verifier(wslb::tls::AcceptAnything::new())
                .with_no_client_auth(),
        };
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        cfg.resumption = resumption;
        Arc::new(cfg)
    }

    /// A configuration that never resumes (ws-echo, ws-hold, http: every connection does a
    /// full handshake, the same for every target).
    pub fn fresh_config(&self) -> Arc<ClientConfig> {
        self.config(Resumption::disabled())
    }

    pub fn connection(&self, cfg: &Arc<ClientConfig>) -> Result<ClientConnection, &'static str> {
        ClientConnection::new(cfg.clone(), self.sni.clone()).map_err(|_| "tls_new")
    }
}

/// A session cache that counts the TLS 1.3 tickets it was given: `tls-hs --resume` waits on
/// the count to know the server's ticket arrived.
#[derive(Debug)]
struct CountingStore {
    inner: ClientSessionMemoryCache,
    tickets: AtomicU64,
}

impl ClientSessionStore for CountingStore {
    fn set_kx_hint(&self, name: ServerName<'static>, group: NamedGroup) {
        self.inner.set_kx_hint(name, group)
    }

    fn kx_hint(&self, name: &ServerName<'_>) -> Option<NamedGroup> {
        self.inner.kx_hint(name)
    }

    fn set_tls12_session(&self, name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.inner.set_tls12_session(name, value)
    }

    fn tls12_session(&self, name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.inner.tls12_session(name)
    }

    fn remove_tls12_session(&self, name: &ServerName<'static>) {
        self.inner.remove_tls12_session(name)
    }

    fn insert_tls13_ticket(&self, name: ServerName<'static>, value: Tls13ClientSessionValue) {
        self.tickets.fetch_add(1, Ordering::Relaxed);
        self.inner.insert_tls13_ticket(name, value)
    }

    fn take_tls13_ticket(&self, name: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        self.inner.take_tls13_ticket(name)
    }
}

/// Version, cipher suite and key exchange group of an established connection, e.g.
/// `TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519`.
pub fn describe(conn: &ClientConnection) -> String {
    let v = conn
        .protocol_version()
        .map_or("?".into(), |v| format!("{v:?}"));
    let s = conn
        .negotiated_cipher_suite()
        .map_or("?".into(), |s| format!("{:?}", s.suite()));
    let g = conn
        .negotiated_key_exchange_group()
        .map_or("?".into(), |g| format!("{:?}", g.name()));
    format!("{v} {s} {g}")
}

fn error_kind(e: &rustls::Error) -> &'static str {
    // The first one, in full, on stderr: the JSON only has the kind.
    static SHOWN: AtomicBool = AtomicBool::new(false);
    if !SHOWN.swap(true, Ordering::Relaxed) {
        eprintln!("loadgen: first TLS error: {e}");
    }
    match e {
        rustls::Error::AlertReceived(_) => "tls_alert",
        rustls::Error::InvalidCertificate(_) => "tls_certificate",
        rustls::Error::PeerIncompatible(_) => "tls_incompatible",
        _ => "tls_error",
    }
}

/// Reads TLS records until the socket would block, processing them and appending the
/// plaintext to `plain`. `Ok(true)`: the peer closed (close_notify or EOF).
pub fn read(
    conn: &mut ClientConnection,
    sock: &mut TcpStream,
    plain: &mut Vec<u8>,
) -> Result<bool, &'static str> {
    loop {
        let eof = match conn.read_tls(sock) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Err("reset"),
            Err(_) => return Err("read"),
        };
        if let Err(e) = conn.process_new_packets() {
            let _ = conn.write_tls(sock); // last gasp: our alert to the peer
            return Err(error_kind(&e));
        }
        let closed = match conn.reader().read_to_end(plain) {
            Ok(_) => true, // close_notify received
            Err(e) if e.kind() == ErrorKind::WouldBlock => false,
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => true,
            Err(_) => return Err("tls_read"),
        };
        if eof || closed {
            return Ok(true);
        }
    }
}

/// Writes what rustls has queued. `Ok(true)`: the socket would block with more to send
/// (WRITABLE will fire again); `Ok(false)`: nothing left.
pub fn write(conn: &mut ClientConnection, sock: &mut TcpStream) -> Result<bool, &'static str> {
    while conn.wants_write() {
        match conn.write_tls(sock) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() == ErrorKind::NotConnected => return Ok(true),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Err("write"),
        }
    }
    Ok(false)
}

/// Hands `data[*pos..]` to rustls and writes the records out, advancing `pos`.
pub fn send(
    conn: &mut ClientConnection,
    sock: &mut TcpStream,
    data: &[u8],
    pos: &mut usize,
) -> Result<(), &'static str> {
    loop {
        if *pos < data.len() {
            *pos += conn
                .writer()
                .write(&data[*pos..])
                .map_err(|_| "tls_write")?;
        }
        let blocked = write(conn, sock)?;
        if *pos >= data.len() || blocked {
            return Ok(());
        }
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Phase {
    Off,
    Connecting,
    Handshaking,
    /// `--resume`, TLS 1.3: handshake done, reading until the server's ticket arrives.
    AwaitTicket,
}

struct Slot {
    sock: Option<TcpStream>,
    conn: Option<ClientConnection>,
    /// Per slot when resuming (its own session cache), else shared.
    config: Arc<ClientConfig>,
    store: Option<Arc<CountingStore>>,
    phase: Phase,
    started: Instant,
    handshake_done: Instant,
    tickets_at_start: u64,
    resumed: bool,
}

impl Slot {
    fn tickets(&self) -> u64 {
        self.store
            .as_ref()
            .map_or(0, |s| s.tickets.load(Ordering::Relaxed))
    }
}

/// One `tls-hs` thread: its `n` slots in one mio loop.
pub struct HsWorker {
    cfg: Cfg,
    opts: Opts,
    poll: Poll,
    slots: Vec<Slot>,
    stats: Stats,
    sink: Vec<u8>,
    measure_from: Instant,
    measure_to: Instant,
}

impl HsWorker {
    pub fn new(cfg: Cfg, n: usize) -> HsWorker {
        let opts = cfg.tls.clone().expect("tls-hs has TLS options");
        let shared = opts.fresh_config();
        let now = Instant::now();
        let slots = (0..n)
            .map(|_| {
                let (config, store) = if opts.resume {
                    let store = Arc::new(CountingStore {
                        inner: ClientSessionMemoryCache::new(16),
                        tickets: AtomicU64::new(0),
                    });
                    (opts.config(Resumption::store(store.clone())), Some(store))
                } else {
                    (shared.clone(), None)
                };
                Slot {
                    sock: None,
                    conn: None,
                    config,
                    store,
                    phase: Phase::Off,
                    started: now,
                    handshake_done: now,
                    tickets_at_start: 0,
                    resumed: false,
                }
            })
            .collect();
        let est = ((cfg.secs * 50_000.0) as usize).min(10_000_000);
        HsWorker {
            poll: Poll::new().expect("mio Poll"),
            slots,
            stats: Stats {
                lat_us: Vec::with_capacity(est),
                ..Stats::default()
            },
            sink: Vec::with_capacity(4096),
            measure_from: now,
            measure_to: now,
            cfg,
            opts,
        }
    }

    pub fn run(mut self, barrier: &Barrier) -> Stats {
        let mut events = Events::with_capacity(1024);
        barrier.wait();
        let now = Instant::now();
        self.measure_from = now + Duration::from_secs_f64(self.cfg.warmup);
        self.measure_to = self.measure_from + Duration::from_secs_f64(self.cfg.secs);
        for i in 0..self.slots.len() {
            self.connect(i);
        }
        loop {
            let now = Instant::now();
            if now >= self.measure_to {
                break;
            }
            // short: ticket waits end on time without a timer heap
            let wait = (self.measure_to - now).min(Duration::from_millis(10));
            if let Err(e) = self.poll.poll(&mut events, Some(wait)) {
                if e.kind() != ErrorKind::Interrupted {
                    eprintln!("loadgen: poll: {e}");
                    std::process::exit(1);
                }
                continue;
            }
            for ev in events.iter() {
                let i = ev.token().0;
                if i < self.slots.len() {
                    self.on_event(i);
                }
            }
            self.check_timeouts();
        }
        let end = self.measure_to;
        for s in &self.slots {
            if s.phase != Phase::Off && end - s.started.min(end) > STALL {
                self.stats.error("stalled");
            }
        }
        self.stats
    }

    fn close(&mut self, i: usize) {
        let s = &mut self.slots[i];
        if let Some(mut sock) = s.sock.take() {
            let _ = self.poll.registry().deregister(&mut sock);
        }
        s.conn = None;
        s.phase = Phase::Off;
    }

    fn connect(&mut self, i: usize) {
        self.close(i);
        let now = Instant::now();
        let s = &mut self.slots[i];
        s.started = now;
        s.tickets_at_start = s.tickets();
        s.resumed = false;
        let conn = match self.opts.connection(&s.config) {
            Ok(c) => c,
            Err(kind) => return self.stats.error(kind),
        };
        let mut sock = match TcpStream::connect(self.cfg.target) {
            Ok(sock) => sock,
            Err(_) => return self.stats.error("connect"),
        };
        let interest = Interest::READABLE | Interest::WRITABLE;
        if self
            .poll
            .registry()
            .register(&mut sock, Token(i), interest)
            .is_err()
        {
            return self.stats.error("register");
        }
        s.sock = Some(sock);
        s.conn = Some(conn);
        s.phase = Phase::Connecting;
    }

    fn fail(&mut self, i: usize, kind: &'static str) {
        self.stats.error(kind);
        self.close(i);
        if Instant::now() < self.measure_to {
            self.stats.reconnects += 1;
            self.connect(i);
        }
    }

    fn on_event(&mut self, i: usize) {
        let s = &mut self.slots[i];
        let (Some(sock), Some(conn)) = (s.sock.as_mut(), s.conn.as_mut()) else {
            return;
        };
        if s.phase == Phase::Connecting {
            match connect_result(sock) {
                Ok(true) => {}
                Ok(false) => return,
                Err(kind) => return self.fail(i, kind),
            }
            let _ = sock.set_nodelay(true);
            s.phase = Phase::Handshaking;
        }
        self.sink.clear();
        let step = write(conn, sock)
            .and_then(|_| read(conn, sock, &mut self.sink))
            .and_then(|closed| write(conn, sock).map(|_| closed));
        let closed = match step {
            Ok(closed) => closed,
            Err(kind) => return self.fail(i, kind),
        };
        if s.phase == Phase::Handshaking && !conn.is_handshaking() {
            s.handshake_done = Instant::now();
            s.resumed = conn.handshake_kind() == Some(HandshakeKind::Resumed);
            if self.stats.tls.is_none() {
                self.stats.tls = Some(describe(conn));
            }
            let tls13 = conn.protocol_version() == Some(ProtocolVersion::TLSv1_3);
            if self.opts.resume && tls13 {
                s.phase = Phase::AwaitTicket;
            } else {
                return self.finish(i, false);
            }
        }
        if s.phase == Phase::AwaitTicket && s.tickets() > s.tickets_at_start {
            return self.finish(i, false);
        }
        if closed {
            match s.phase {
                Phase::AwaitTicket => self.finish(i, true),
                _ => self.fail(i, "eof_handshake"),
            }
        }
    }

    /// Handshake (and ticket wait) over: close_notify, close, count the op, start the next.
    fn finish(&mut self, i: usize, ticket_missing: bool) {
        let s = &mut self.slots[i];
        if let (Some(sock), Some(conn)) = (s.sock.as_mut(), s.conn.as_mut()) {
            conn.send_close_notify();
            let _ = write(conn, sock);
        }
        let (started, resumed) = (s.started, s.resumed);
        self.close(i);
        let now = Instant::now();
        if now >= self.measure_from && now < self.measure_to {
            self.stats.ops += 1;
            let us = (now - started).as_micros().min(u32::MAX as u128) as u32;
            self.stats.lat_us.push(us);
            self.stats.resumed += u64::from(resumed);
            self.stats.tickets_missing += u64::from(ticket_missing);
        }
        if now < self.measure_to {
            self.connect(i);
        }
    }

    fn check_timeouts(&mut self) {
        let now = Instant::now();
        for i in 0..self.slots.len() {
            let s = &self.slots[i];
            match s.phase {
                Phase::Off => {}
                Phase::AwaitTicket if now - s.handshake_done > TICKET_WAIT => self.finish(i, true),
                Phase::AwaitTicket => {}
                _ if now - s.started > OP_TIMEOUT => self.fail(i, "timeout_handshake"),
                _ => {}
            }
        }
    }
}
