//! The event loop: listeners, accept, readiness dispatch, timers, signals, reaping.
#![deny(clippy::indexing_slicing)]

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use crate::config::{Config, OnBackendLost};
use crate::conn::{key_of, token_for, Conn, Ctx, Drive, Side, CLOSE_GOING_AWAY, RESERVED_TOKENS};
use crate::control::protocol::{self as control_protocol, ControlError};
use crate::control::session::{ControlAuth, ControlConn, ControlDrive, ControlEvent};
use crate::log;
use crate::registry::{BackendState, Registry};
use crate::timer::{TimerKey, TimerKind, Timers};
use crate::transport::{TlsStream, Transport};

const WAKER: Token = Token(0);
const SIGNALS: Token = Token(1);
const FIRST_LISTENER: usize = 2;
const CONTROL_LISTENER: Token = Token(RESERVED_TOKENS - 1);
/// Control connections use tokens from here up; proxy tokens never reach this far.
const CONTROL_BASE: usize = usize::MAX / 2;
/// Readiness events taken per poll.
const EVENTS_CAPACITY: usize = 1024;
/// Pause after EMFILE/ENFILE before accepting again: long enough not to spin, short enough
/// that clients barely notice.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Housekeeping period.
const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// After the drain timeout, how long closing tunnels get before the process exits anyway.
const HARD_STOP_GRACE: Duration = Duration::from_secs(3);

/// Asks a running [`Server`] to drain and stop, from any thread.
#[derive(Debug, Clone)]
pub struct ServerHandle {
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
}

impl ServerHandle {
    /// Same as SIGTERM: stop accepting, finish exchanges, close tunnels after the drain timeout.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }
}

/// The balancer: bound listeners and everything the loop owns.
pub struct Server {
    poll: Poll,
    /// Proxy listeners; `true` = TLS.
    listeners: Vec<(TcpListener, bool)>,
    server_tls: Option<Arc<rustls::ServerConfig>>,
    backend_tls: Option<Arc<rustls::ClientConfig>>,
    local_addrs: Vec<SocketAddr>,
    conns: Slab<Conn>,
    /// Open client connections per address, for `--max-connections-per-ip`.
    per_ip: HashMap<IpAddr, u32>,
    control_listener: Option<TcpListener>,
    control_addr: Option<SocketAddr>,
    controls: Slab<ControlConn>,
    control_auth: ControlAuth,
    control_events: Vec<ControlEvent>,
    controls_to_reap: Vec<usize>,
    timers: Timers,
    backends: Registry,
    cfg: Config,
    rng: SmallRng,
    next_gen: u64,
    next_id: u64,
    signals: Option<Signals>,
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    accept_blocked: bool,
    draining: bool,
    finished: bool,
    yielded: Vec<(usize, u64)>,
    to_reap: Vec<usize>,
}

/// Why the balancer could not start or stopped with an error.
#[derive(Debug)]
pub enum Error {
    /// A configuration file (certificate, key, CA) is unusable: a usage error (exit 2).
    Tls(crate::tls::TlsError),
    /// Binding, polling or another system call failed (exit 1).
    Io(io::Error),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Tls(e) => e.fmt(f),
            Error::Io(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

/// Binds and runs until drained.
pub fn run(cfg: Config) -> Result<(), Error> {
    Server::bind(cfg)?.run().map_err(Error::Io)
}

fn is_fd_exhaustion(e: &io::Error) -> bool {
    // EMFILE, ENFILE, ENOBUFS, ENOMEM: retrying at once would spin.
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

impl Server {
    /// Binds every listener and prepares the loop; nothing is accepted until [`Server::run`].
    pub fn bind(cfg: Config) -> Result<Server, Error> {
        crate::log::init(cfg.verbosity, cfg.log_format);
        let server_tls = if cfg.certs.is_empty() {
            None
        } else {
            Some(crate::tls::server_config(&cfg.certs).map_err(Error::Tls)?)
        };
        let tls_backends =
            cfg.backends.iter().any(|b| b.tls) || cfg.control.is_some() || cfg.backend_ca.is_some();
        let backend_tls = if tls_backends {
            if cfg.backend_insecure {
                log::error(
                    "--backend-insecure: backend certificates are NOT verified; never use this in production",
                    &[],
                );
            }
            Some(
                crate::tls::client_config(cfg.backend_ca.as_deref(), cfg.backend_insecure)
                    .map_err(Error::Tls)?,
            )
        } else {
            None
        };
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let mut listeners = Vec::new();
        let mut local_addrs = Vec::new();
        let all = cfg
            .listen
            .iter()
            .map(|a| (a, false))
            .chain(cfg.tls_listen.iter().map(|a| (a, true)));
        for (i, (addr, tls)) in all.enumerate() {
            let mut l = TcpListener::bind(*addr)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
            poll.registry()
                .register(&mut l, Token(FIRST_LISTENER + i), Interest::READABLE)?;
            let local = l.local_addr()?;
            if tls {
                log::info(&format!("tls listening on {local}"), &[]);
            } else {
                log::info(&format!("listening on {local}"), &[]);
            }
            local_addrs.push(local);
            listeners.push((l, tls));
        }
        if FIRST_LISTENER + listeners.len() >= CONTROL_LISTENER.0 {
            return Err(io::Error::other("too many listeners").into());
        }
        let mut control_listener = None;
        let mut control_addr = None;
        if let Some(addr) = cfg.control {
            let mut l = TcpListener::bind(addr).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot listen on {addr} (--control): {e}"),
                )
            })?;
            poll.registry()
                .register(&mut l, CONTROL_LISTENER, Interest::READABLE)?;
            let local = l.local_addr()?;
            log::info(&format!("control listening on {local}"), &[]);
            if cfg.token.is_none() {
                log::info(
                    "no --token: control connections accepted from loopback addresses only",
                    &[],
                );
            }
            control_addr = Some(local);
            control_listener = Some(l);
        }
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        let backends = Registry::from_specs(&cfg.backends);
        if backends.len() == 0 {
            log::info(
                "no backend configured: requests get 503 until one is added",
                &[],
            );
        }
        Ok(Server {
            poll,
            listeners,
            server_tls,
            backend_tls,
            local_addrs,
            conns: Slab::with_capacity(1024),
            per_ip: HashMap::new(),
            control_listener,
            control_addr,
            controls: Slab::new(),
            control_auth: ControlAuth {
                token: cfg.token.clone(),
            },
            control_events: Vec::new(),
            controls_to_reap: Vec::new(),
            timers: Timers::default(),
            backends,
            cfg,
            rng: SmallRng::from_os_rng(),
            next_gen: 0,
            next_id: 0,
            signals: Some(signals),
            waker,
            stop: Arc::new(AtomicBool::new(false)),
            accept_blocked: false,
            draining: false,
            finished: false,
            yielded: Vec::new(),
            to_reap: Vec::new(),
        })
    }

    /// Addresses actually bound (port 0 resolved).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// Address of the control listener, if enabled.
    pub fn control_addr(&self) -> Option<SocketAddr> {
        self.control_addr
    }

    /// A handle that stops this server from another thread.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            waker: self.waker.clone(),
            stop: self.stop.clone(),
        }
    }

    /// Runs the loop until a drain completes.
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        self.timers.add(
            Instant::now() + SWEEP_EVERY,
            TimerKey {
                key: 0,
                gen: 0,
                kind: TimerKind::Sweep,
            },
        );
        while !self.finished {
            let now = Instant::now();
            let timeout = if self.yielded.is_empty() {
                self.timers.next_timeout(now)
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for ev in events.iter() {
                self.dispatch(ev);
            }
            self.fire_timers();
            self.run_yielded();
            self.send_unreachable_notices();
            self.reap();
            self.reap_controls();
            if self.accept_blocked && !self.draining {
                self.accept_all();
            }
            if self.draining && self.conns.is_empty() {
                self.finished = true;
            }
        }
        log::info("stopped", &[]);
        Ok(())
    }

    fn dispatch(&mut self, ev: &mio::event::Event) {
        match ev.token() {
            WAKER => {
                if self.stop.load(Ordering::SeqCst) {
                    self.begin_drain();
                }
            }
            SIGNALS => {
                let mut stop = false;
                let mut reload = false;
                if let Some(s) = &mut self.signals {
                    for sig in s.pending() {
                        stop |= sig == SIGTERM || sig == SIGINT;
                        reload |= sig == SIGHUP;
                    }
                }
                if reload {
                    self.reload_tls();
                }
                if stop {
                    if self.draining {
                        log::info("second signal: exiting now", &[]);
                        self.finished = true;
                    }
                    self.begin_drain();
                }
            }
            CONTROL_LISTENER => self.accept_controls(),
            Token(t) if (FIRST_LISTENER..RESERVED_TOKENS).contains(&t) => {
                self.accept(t - FIRST_LISTENER);
            }
            Token(t) if t >= CONTROL_BASE => {
                let key = t - CONTROL_BASE;
                let Some(c) = self.controls.get_mut(key) else {
                    return;
                };
                if c.done {
                    return;
                }
                c.absorb(ev);
                self.drive_control(key);
            }
            token => {
                let Some((key, side)) = key_of(token) else {
                    return;
                };
                // Sporadic events for connections that just went away are normal.
                let Some(conn) = self.conns.get_mut(key) else {
                    return;
                };
                if conn.done {
                    return;
                }
                conn.absorb(side, ev);
                self.with_conn(key, |c, ctx| c.drive(ctx));
            }
        }
    }

    /// Lends a connection the loop's shared state, then acts on its answer.
    fn with_conn(&mut self, key: usize, f: impl FnOnce(&mut Conn, &mut Ctx<'_>) -> Drive) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.done {
            return;
        }
        let mut ctx = Ctx {
            cfg: &self.cfg,
            backend_tls: self.backend_tls.as_ref(),
            backends: &mut self.backends,
            poll: self.poll.registry(),
            rng: &mut self.rng,
            now: Instant::now(),
            draining: self.draining,
        };
        match f(conn, &mut ctx) {
            Drive::Continue => {}
            Drive::Yield => self.yielded.push((key, conn.gen)),
            Drive::Done => {
                conn.done = true;
                self.to_reap.push(key);
                return;
            }
        }
        if let Some(at) = conn.deadline(&self.cfg) {
            if conn.armed.is_none_or(|armed| at < armed) {
                conn.armed = Some(at);
                self.timers.add(
                    at,
                    TimerKey {
                        key,
                        gen: conn.gen,
                        kind: TimerKind::Conn,
                    },
                );
            }
        }
    }

    fn accept_all(&mut self) {
        self.accept_blocked = false;
        for i in 0..self.listeners.len() {
            self.accept(i);
        }
    }

    fn accept(&mut self, idx: usize) {
        loop {
            if self.draining {
                return;
            }
            if self.conns.len() >= self.cfg.max_connections {
                // Leave the rest in the kernel backlog; reaping resumes accepting.
                self.accept_blocked = true;
                return;
            }
            let Some((listener, tls)) = self.listeners.get(idx) else {
                return;
            };
            let tls = *tls;
            let (stream, peer) = match listener.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_fd_exhaustion(&e) => {
                    if !self.accept_blocked {
                        log::error("accept paused: out of file descriptors", &[("error", &e)]);
                    }
                    self.accept_blocked = true;
                    self.timers.add(
                        Instant::now() + ACCEPT_BACKOFF,
                        TimerKey {
                            key: 0,
                            gen: 0,
                            kind: TimerKind::AcceptResume,
                        },
                    );
                    return;
                }
                Err(e) => {
                    // ECONNABORTED and friends concern one connection only.
                    log::debug("accept failed", &[("error", &e)]);
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let Some(mut stream) = self.wrap(stream, tls) else {
                continue;
            };
            self.next_gen += 1;
            self.next_id += 1;
            let entry = self.conns.vacant_entry();
            let key = entry.key();
            if let Err(e) = self.poll.registry().register(
                stream.socket_mut(),
                token_for(key, Side::Client),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                log::error("register failed", &[("error", &e)]);
                continue;
            }
            let now = Instant::now();
            let over_ip_limit = self.cfg.max_connections_per_ip > 0 && {
                let n = self.per_ip.entry(peer.ip()).or_insert(0);
                *n >= self.cfg.max_connections_per_ip || {
                    *n += 1;
                    false
                }
            };
            let conn = entry.insert(Conn::new(
                self.cfg.throttle,
                key,
                self.next_gen,
                self.next_id,
                stream,
                peer,
                now,
            ));
            if over_ip_limit {
                log::debug("too many connections from one address", &[("peer", &peer)]);
                conn.refuse(now, 429);
            } else {
                conn.counts_for_ip = self.cfg.max_connections_per_ip > 0;
            }
            if log::enabled(log::Level::Debug) {
                log::debug("client connected", &[("client", &conn.id), ("peer", &peer)]);
            }
            if let Some(at) = conn.deadline(&self.cfg) {
                conn.armed = Some(at);
                self.timers.add(
                    at,
                    TimerKey {
                        key,
                        gen: conn.gen,
                        kind: TimerKind::Conn,
                    },
                );
            }
        }
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(t) = self.timers.pop_expired(now) {
            match t.kind {
                TimerKind::Conn => {
                    let Some(conn) = self.conns.get_mut(t.key) else {
                        continue;
                    };
                    if conn.gen != t.gen || conn.done {
                        continue;
                    }
                    conn.armed = None;
                    self.with_conn(t.key, |c, ctx| c.expire(ctx));
                }
                TimerKind::AcceptResume => {
                    if !self.draining {
                        self.accept_all();
                    }
                }
                TimerKind::Drain => {
                    log::info("drain timeout: closing websocket clients", &[]);
                    let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
                    for key in keys {
                        self.with_conn(key, |c, ctx| c.going_away(ctx, CLOSE_GOING_AWAY));
                    }
                }
                TimerKind::HardStop => {
                    log::info("drain grace over: exiting", &[("left", &self.conns.len())]);
                    self.finished = true;
                }
                TimerKind::Control => {
                    let Some(c) = self.controls.get_mut(t.key) else {
                        continue;
                    };
                    if c.gen != t.gen || c.done {
                        continue;
                    }
                    c.armed = None;
                    let (hdr, hb) = (self.cfg.header_timeout, self.cfg.heartbeat);
                    if c.expire(now, hdr, hb) == ControlDrive::Done {
                        if c.guid.is_some() {
                            log::error(
                                "backend lost: heartbeats missed",
                                &[("guid", &c.guid.as_deref().unwrap_or("-"))],
                            );
                        }
                        c.done = true;
                        self.controls_to_reap.push(t.key);
                    } else {
                        self.drive_control(t.key);
                    }
                }
                TimerKind::Sweep => {
                    self.backends.sweep_idle(now);
                    self.timers.add(now + SWEEP_EVERY, t);
                }
            }
        }
    }

    fn run_yielded(&mut self) {
        let batch = std::mem::take(&mut self.yielded);
        for (key, gen) in batch {
            if self.conns.get(key).is_some_and(|c| c.gen == gen) {
                self.with_conn(key, |c, ctx| c.drive(ctx));
            }
        }
    }

    fn reap(&mut self) {
        let keys = std::mem::take(&mut self.to_reap);
        for key in keys {
            let Some(mut conn) = self.conns.try_remove(key) else {
                continue;
            };
            let mut ctx = Ctx {
                cfg: &self.cfg,
                backend_tls: self.backend_tls.as_ref(),
                backends: &mut self.backends,
                poll: self.poll.registry(),
                rng: &mut self.rng,
                now: Instant::now(),
                draining: self.draining,
            };
            conn.teardown(&mut ctx);
            if conn.counts_for_ip {
                let ip = conn.peer().ip();
                if let Some(n) = self.per_ip.get_mut(&ip) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.per_ip.remove(&ip);
                    }
                }
            }
            let _ = self.poll.registry().deregister(conn.client_mut());
            if log::enabled(log::Level::Debug) {
                log::debug("client closed", &[("client", &conn.id)]);
            }
        }
        if self.accept_blocked && self.conns.len() < self.cfg.max_connections {
            self.accept_all();
        }
    }

    fn begin_drain(&mut self) {
        if self.draining {
            return;
        }
        self.draining = true;
        log::info(
            "draining: no new connections",
            &[
                ("connections", &self.conns.len()),
                ("drain_timeout_ms", &self.cfg.drain_timeout.as_millis()),
            ],
        );
        for (mut l, _) in self.listeners.drain(..) {
            let _ = self.poll.registry().deregister(&mut l);
        }
        if let Some(mut l) = self.control_listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        let now = Instant::now();
        self.timers.add(
            now + self.cfg.drain_timeout,
            TimerKey {
                key: 0,
                gen: 0,
                kind: TimerKind::Drain,
            },
        );
        self.timers.add(
            now + self.cfg.drain_timeout + HARD_STOP_GRACE,
            TimerKey {
                key: 0,
                gen: 0,
                kind: TimerKind::HardStop,
            },
        );
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.with_conn(key, |c, ctx| c.begin_drain(ctx));
        }
    }

    /// Wraps an accepted socket in TLS when it came from a TLS listener.
    fn wrap(&self, sock: mio::net::TcpStream, tls: bool) -> Option<Transport> {
        if !tls {
            return Some(Transport::Plain(sock));
        }
        let cfg = self.server_tls.as_ref()?;
        match crate::tls::accept(cfg) {
            Ok(conn) => Some(Transport::Tls(Box::new(TlsStream::new(sock, conn)))),
            Err(e) => {
                log::error("tls setup failed", &[("error", &e)]);
                None
            }
        }
    }

    /// SIGHUP: new certificates for new connections; existing ones keep theirs. A reload
    /// that fails keeps the old set.
    fn reload_tls(&mut self) {
        if self.cfg.certs.is_empty() {
            log::info("SIGHUP: no certificates to reload", &[]);
            return;
        }
        match crate::tls::server_config(&self.cfg.certs) {
            Ok(cfg) => {
                self.server_tls = Some(cfg);
                log::info(
                    "SIGHUP: certificates reloaded",
                    &[("pairs", &self.cfg.certs.len())],
                );
            }
            Err(e) => log::error(
                "SIGHUP: reload failed, keeping the old certificates",
                &[("error", &e)],
            ),
        }
    }

    fn accept_controls(&mut self) {
        loop {
            let Some(listener) = &self.control_listener else {
                return;
            };
            let (stream, peer) = match listener.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_fd_exhaustion(&e) => {
                    // Control connections are few; the next readiness edge retries.
                    log::error("control accept failed", &[("error", &e)]);
                    return;
                }
                Err(_) => continue,
            };
            let Some(mut stream) = self.wrap(stream, self.cfg.control_tls) else {
                continue;
            };
            self.next_gen += 1;
            let now = Instant::now();
            let entry = self.controls.vacant_entry();
            let key = entry.key();
            if let Err(e) = self.poll.registry().register(
                stream.socket_mut(),
                Token(CONTROL_BASE + key),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                log::error("register failed", &[("error", &e)]);
                continue;
            }
            let c = entry.insert(ControlConn::new(self.next_gen, stream, peer, now));
            let at = c.deadline(self.cfg.header_timeout, self.cfg.heartbeat);
            c.armed = Some(at);
            self.timers.add(
                at,
                TimerKey {
                    key,
                    gen: c.gen,
                    kind: TimerKind::Control,
                },
            );
        }
    }

    fn drive_control(&mut self, key: usize) {
        let Some(c) = self.controls.get_mut(key) else {
            return;
        };
        let now = Instant::now();
        let mut events = std::mem::take(&mut self.control_events);
        let outcome = c.drive(now, &self.control_auth, &mut events);
        let gen = c.gen;
        for ev in events.drain(..) {
            self.apply_control_event(key, gen, ev);
        }
        self.control_events = events;
        let Some(c) = self.controls.get_mut(key) else {
            return;
        };
        if outcome == ControlDrive::Done {
            if !c.done {
                c.done = true;
                self.controls_to_reap.push(key);
            }
            return;
        }
        let at = c.deadline(self.cfg.header_timeout, self.cfg.heartbeat);
        if c.armed.is_none_or(|armed| at < armed) {
            c.armed = Some(at);
            self.timers.add(
                at,
                TimerKey {
                    key,
                    gen,
                    kind: TimerKind::Control,
                },
            );
        }
    }

    /// The backend registered by control connection `(key, gen)`, if any.
    fn owned_backend(&self, key: usize, gen: u64) -> Option<usize> {
        self.backends
            .iter()
            .find(|(_, b)| b.owner == Some((key, gen)))
            .map(|(id, _)| id)
    }

    fn apply_control_event(&mut self, key: usize, gen: u64, ev: ControlEvent) {
        let owned = self.owned_backend(key, gen);
        let Some(c) = self.controls.get_mut(key) else {
            return;
        };
        let peer = c.peer;
        match ev {
            ControlEvent::Connected => log::info("server connected", &[("peer", &peer)]),
            ControlEvent::Register(reg) => {
                if c.guid.as_deref().is_some_and(|g| g != reg.guid) {
                    // Same connection, new identity: the old entry is gone.
                    if let Some(id) = owned {
                        self.backends.set_state(id, BackendState::Gone);
                    }
                }
                let (id, fresh, previous) = self.backends.register(&reg, (key, gen));
                let hb = u64::try_from(self.cfg.heartbeat.as_millis()).unwrap_or(u64::MAX);
                if let Some(c) = self.controls.get_mut(key) {
                    c.guid = Some(reg.guid.clone());
                    c.send_text(control_protocol::registered(&reg.guid, hb));
                }
                let bindings = reg.bindings.join(",");
                log::info(
                    if fresh {
                        "server ready"
                    } else {
                        "server ready (updated)"
                    },
                    &[
                        ("guid", &reg.guid),
                        ("bindings", &bindings),
                        ("weight", &reg.weight),
                        ("backend", &id),
                    ],
                );
                if let Some((old_key, old_gen)) = previous {
                    if let Some(old) = self
                        .controls
                        .get_mut(old_key)
                        .filter(|o| o.gen == old_gen && !o.done)
                    {
                        old.refuse(&ControlError::Replaced);
                        old.done = true;
                        self.controls_to_reap.push(old_key);
                    }
                }
            }
            ControlEvent::Drain => match owned {
                Some(id) => {
                    self.backends.set_state(id, BackendState::Draining);
                    c.send_text(control_protocol::ack("drained"));
                    log::info(
                        "server draining",
                        &[
                            ("guid", &c.guid.as_deref().unwrap_or("-")),
                            ("state", &BackendState::Draining.as_str()),
                        ],
                    );
                }
                None => c.refuse(&ControlError::NotRegistered),
            },
            ControlEvent::Deregister => match owned {
                Some(id) => {
                    c.close_with(control_protocol::ack("deregistered"));
                    log::info(
                        "server disconnected",
                        &[
                            ("guid", &c.guid.as_deref().unwrap_or("-")),
                            ("reason", &"deregister"),
                        ],
                    );
                    self.backend_lost(id);
                }
                None => c.refuse(&ControlError::NotRegistered),
            },
        }
    }

    /// A registered backend left: out of selection at once; its clients stay or go per flag.
    fn backend_lost(&mut self, id: usize) {
        if self.cfg.on_backend_lost == OnBackendLost::Close {
            let keys: Vec<usize> = self
                .conns
                .iter()
                .filter(|(_, c)| c.backend_id() == Some(id))
                .map(|(k, _)| k)
                .collect();
            for key in keys {
                self.with_conn(key, |c, ctx| c.going_away(ctx, CLOSE_GOING_AWAY));
            }
        }
        self.backends.set_state(id, BackendState::Gone);
    }

    fn send_unreachable_notices(&mut self) {
        for n in std::mem::take(&mut self.backends.unreachable) {
            let (key, gen) = n.owner;
            if let Some(c) = self
                .controls
                .get_mut(key)
                .filter(|c| c.gen == gen && !c.done)
            {
                c.send_text(control_protocol::unreachable(&n.binding, &n.reason));
            }
        }
    }

    fn reap_controls(&mut self) {
        for key in std::mem::take(&mut self.controls_to_reap) {
            let Some(mut c) = self.controls.try_remove(key) else {
                continue;
            };
            if let Some(id) = self.owned_backend(key, c.gen) {
                log::info(
                    "server disconnected",
                    &[
                        ("guid", &c.guid.as_deref().unwrap_or("-")),
                        ("reason", &"control connection lost"),
                    ],
                );
                self.backend_lost(id);
            }
            if let Some(s) = c.stream_mut() {
                let _ = self.poll.registry().deregister(s);
            }
        }
    }
}
