//! The event loop: listeners, accept, readiness dispatch, timers, signals, reaping.
#![deny(clippy::indexing_slicing)]

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use crate::backends::registry::{BackendState, Registry};
use crate::config::{Config, OnBackendLost};
use crate::control::status::{self as admin, BackendRow};
use handle::Command;
pub use handle::{Outgoing, ServerHandle, Target};

use crate::control::auth::{ControlAuth, Identity};
use crate::control::protocol::{self as control_protocol, ControlError};
use crate::control::session::AdminRequest;
use crate::control::session::{ControlConn, ControlDrive, ControlEvent};
use crate::hooks::Hooks;
use crate::net::fdlimit;
use crate::net::transport::{TlsStream, Transport};
use crate::observe::events::{Event, EventSink};
use crate::observe::log;
use crate::observe::metrics::{self, BackendSample, Stats};
use crate::proxy::{
    key_of, token_for, Conn, Ctx, Drive, RepeatedLogs, Side, CLOSE_GOING_AWAY, RESERVED_TOKENS,
};
use crate::timer::{TimerKey, TimerKind, Timers};
use serde_json::json;

const WAKER: Token = Token(0);
const SIGNALS: Token = Token(1);
const FIRST_LISTENER: usize = 2;
const CONTROL_LISTENER: Token = Token(RESERVED_TOKENS - 1);
/// Control connections use tokens from here up; proxy tokens never reach this far.
const CONTROL_BASE: usize = usize::MAX / 2;
/// Readiness events taken per poll.
const EVENTS_CAPACITY: usize = 1024;
/// Most connections whose writes one turn defers to its flush pass. Each may hold a relay
/// buffer until then; beyond this, connections write at once, so a busy turn holds at most
/// this many extra buffers (measured: uncapped, 64 busy connections left the heap ~1 MB
/// larger after the load; at 8 the HTTP gain was gone).
const MAX_DEFERRED: usize = 64;
/// At most this many client connections when the descriptor limit is unlimited.
const MAX_AUTO_CONNECTIONS: usize = 1 << 20;
/// Conditions that repeat per connection are logged at most once per this interval.
const REPEATED_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Pause after EMFILE/ENFILE before accepting again: long enough not to spin, short enough
/// that clients barely notice.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Housekeeping period.
const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// After the drain timeout, how long closing tunnels get before the process exits anyway.
const HARD_STOP_GRACE: Duration = Duration::from_secs(3);

/// What the loop lends a connection: every field but the slab, borrowed disjointly (a
/// method could not, while the connection itself is borrowed from the slab).
macro_rules! ctx {
    ($s:ident) => {
        Ctx {
            cfg: &$s.cfg,
            backend_tls: $s.backend_tls.as_ref(),
            backends: &mut $s.backends,
            poll: $s.poll.registry(),
            rng: &mut $s.rng,
            now: Instant::now(),
            draining: $s.draining,
            stats: &mut $s.stats,
            events: &mut $s.events,
            hooks: $s.hooks.as_deref_mut(),
            signer: $s.signer.as_ref(),
            logs: &mut $s.repeated_logs,
        }
    };
}

mod accept;
mod control_plane;
mod handle;
mod messaging;
mod routes;
mod turn;

/// The balancer: bound listeners and everything the loop owns.
pub struct Server {
    poll: Poll,
    stats: Stats,
    events: EventSink,
    hooks: Option<Box<dyn Hooks>>,
    signer: Option<crate::backends::sticky::CookieSigner>,
    started: Instant,
    commands: (mpsc::Sender<Command>, mpsc::Receiver<Command>),
    /// Proxy listeners; `true` = TLS.
    listeners: Vec<(TcpListener, bool)>,
    server_tls: Option<Arc<rustls::ServerConfig>>,
    /// The control listener's TLS: `server_tls` plus optional client certificates.
    control_tls: Option<Arc<rustls::ServerConfig>>,
    backend_tls: Option<Arc<rustls::ClientConfig>>,
    local_addrs: Vec<SocketAddr>,
    /// Every address wslb listens on (proxy, TLS, control): never a backend.
    own_addrs: Vec<SocketAddr>,
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
    /// The descriptor limit in force (soft `RLIMIT_NOFILE`).
    fd_limit: u64,
    /// Most control connections at once; beyond, they wait in the backlog.
    control_max: usize,
    /// The control listener has connections waiting for a free control slot.
    control_accept_blocked: bool,
    /// "accept paused: out of file descriptors", counted and logged once per interval.
    accept_paused: log::Repeated,
    /// Per-connection conditions, logged once per interval.
    repeated_logs: RepeatedLogs,
    draining: bool,
    finished: bool,
    yielded: Vec<(usize, u64)>,
    /// Connections driven in this turn's reading pass, for its flush pass.
    to_flush: Vec<usize>,
    to_reap: Vec<usize>,
}

/// Why the balancer could not start or stopped with an error.
#[derive(Debug)]
pub enum Error {
    /// A configuration file (certificate, key, CA) is unusable: a usage error (exit 2).
    Tls(crate::net::tls::TlsError),
    /// Binding, polling or another system call failed (exit 1).
    Io(io::Error),
    /// The flags are consistent one by one but not together, or a file they name is
    /// unusable (exit 2), e.g. a `-B` backend that is wslb's own listener.
    Config(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Tls(e) => e.fmt(f),
            Error::Io(e) => e.fmt(f),
            Error::Config(e) => f.write_str(e),
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

/// A non-blocking listener with `SO_REUSEADDR` (restarts do not wait for TIME_WAIT) and the
/// configured backlog.
fn listen(addr: SocketAddr, backlog: i32) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// Raises the descriptor limit to the hard one and caps `--max-connections` at what it
/// allows (0 = that many), saying so once.
fn size_connections(cfg: &mut Config) -> fdlimit::Budget {
    let limit = fdlimit::raise_nofile().unwrap_or_else(|e| {
        log::warn("cannot read the descriptor limit", &[("error", &e)]);
        u64::MAX
    });
    let open = fdlimit::open_fds().unwrap_or(16);
    let fds = fdlimit::budget(limit, open, cfg.control.is_some());
    let fits = fds.clients.clamp(1, MAX_AUTO_CONNECTIONS);
    match cfg.max_connections {
        0 => {
            cfg.max_connections = fits;
            log::info(
                "client connections limited by the descriptor limit",
                &[("max_connections", &fits), ("fd_limit", &limit)],
            );
        }
        asked if asked > fits => {
            cfg.max_connections = fits;
            log::warn(
                &format!(
                    "--max-connections {asked} lowered to {fits}: the descriptor limit is {limit} \
                     and each client connection needs 2 (its own and its backend's); raise it with \
                     `ulimit -n` or systemd LimitNOFILE="
                ),
                &[],
            );
        }
        _ => {}
    }
    fds
}

/// What validation produced, for `bind` to use.
struct Validated {
    server_tls: Option<Arc<rustls::ServerConfig>>,
    control_tls: Option<Arc<rustls::ServerConfig>>,
    backend_tls: Option<Arc<rustls::ClientConfig>>,
    token_file: Option<Vec<(String, String)>>,
}

/// Static `-B` backends may point anywhere the operator likes, except back at wslb: one
/// request to such a backend would dial again, and again.
fn static_backends_avoid(cfg: &Config, own: &[SocketAddr]) -> Result<(), Error> {
    let own: Vec<SocketAddr> = own.iter().copied().filter(|a| a.port() != 0).collect();
    match cfg
        .backends
        .iter()
        .find(|b| crate::netpolicy::hits_own_listener(b.addr, &own, &crate::netpolicy::is_local_ip))
    {
        Some(b) => Err(Error::Config(format!(
            "invalid value {:?} for --backend: that is wslb's own listener; requests would loop",
            b.url
        ))),
        None => Ok(()),
    }
}

/// Reads and parses `--token-file`; the error is the one line printed.
fn load_token_file(path: &std::path::Path) -> Result<Vec<(String, String)>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read --token-file {}: {e}", path.display()))?;
    crate::control::auth::parse_token_file(&text)
        .map_err(|e| format!("--token-file {}: {e}", path.display()))
}

fn is_fd_exhaustion(e: &io::Error) -> bool {
    fdlimit::is_exhaustion(e)
}

impl Server {
    /// Binds every listener and prepares the loop; nothing is accepted until [`Server::run`].
    /// Everything `--check` verifies, without listening: the flags' own consistency, that
    /// static backends are not wslb itself, certificates and keys, CA files, the token file.
    fn validate(cfg: &Config) -> Result<Validated, Error> {
        let configured: Vec<SocketAddr> = (cfg.listen.iter())
            .chain(&cfg.tls_listen)
            .chain(&cfg.control)
            .copied()
            .collect();
        static_backends_avoid(cfg, &configured)?;
        let server_tls = if cfg.certs.is_empty() {
            None
        } else {
            Some(crate::net::tls::server_config(&cfg.certs).map_err(Error::Tls)?)
        };
        let control_tls = if cfg.control_tls {
            Some(
                crate::net::tls::control_server_config(
                    &cfg.certs,
                    cfg.control_client_ca.as_deref(),
                )
                .map_err(Error::Tls)?,
            )
        } else {
            None
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
                crate::net::tls::client_config(cfg.backend_ca.as_deref(), cfg.backend_insecure)
                    .map_err(Error::Tls)?,
            )
        } else {
            None
        };
        let token_file = match &cfg.token_file {
            Some(path) => Some(load_token_file(path).map_err(Error::Config)?),
            None => None,
        };
        Ok(Validated {
            server_tls,
            control_tls,
            backend_tls,
            token_file,
        })
    }

    /// `wslb --check`: validates flags, certificates and files and returns, binding nothing.
    pub fn check(cfg: &Config) -> Result<(), Error> {
        Server::validate(cfg).map(|_| ())
    }

    pub fn bind(mut cfg: Config) -> Result<Server, Error> {
        crate::observe::log::init(cfg.verbosity, cfg.log_format);
        let Validated {
            server_tls,
            control_tls,
            backend_tls,
            token_file,
        } = Server::validate(&cfg)?;
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
            let mut l = listen(*addr, cfg.backlog)
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
            let mut l = listen(addr, cfg.backlog).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot listen on {addr} (--control): {e}"),
                )
            })?;
            poll.registry()
                .register(&mut l, CONTROL_LISTENER, Interest::READABLE)?;
            let local = l.local_addr()?;
            log::info(&format!("control listening on {local}"), &[]);
            if cfg.token.is_none() && cfg.token_file.is_none() {
                if local.ip().is_loopback() {
                    log::info(
                        "no --token: control connections accepted from loopback addresses only",
                        &[],
                    );
                } else {
                    log::warn(
                        &format!("no --token on control listener {local}: it is reachable from the network and refuses remote peers, but every local process can register backends and use the admin API (client list, metrics, broadcast, drain); set --token or --token-file"),
                        &[],
                    );
                }
            }
            control_addr = Some(local);
            control_listener = Some(l);
        }
        let own_addrs: Vec<SocketAddr> = local_addrs.iter().copied().chain(control_addr).collect();
        // Again with the bound addresses: a port-0 listener may have drawn a -B port.
        static_backends_avoid(&cfg, &own_addrs)?;
        let control_auth = ControlAuth::new(cfg.token.as_deref(), token_file.as_deref())
            .map_err(|_| io::Error::other("no system randomness for the token MAC key"))?;
        let events = EventSink::open(cfg.events.as_deref()).map_err(|e| {
            Error::Tls(crate::net::tls::TlsError::File {
                path: cfg.events.clone().unwrap_or_default().into(),
                why: format!("cannot open --events file: {e}"),
            })
        })?;
        let signer = match (&cfg.sticky, &cfg.sticky_secret) {
            (Some(crate::backends::sticky::StickyMode::Cookie { .. }), Some(secret)) => Some(
                crate::backends::sticky::CookieSigner::new(secret.as_bytes()),
            ),
            (Some(crate::backends::sticky::StickyMode::Cookie { .. }), None) => {
                log::warn(
                    "--sticky cookie without --sticky-secret: using a random secret; several balancers need one shared secret",
                    &[],
                );
                Some(
                    crate::backends::sticky::CookieSigner::random()
                        .map_err(|e| io::Error::other(e.to_string()))?,
                )
            }
            _ => None,
        };
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        let mut backends = Registry::from_specs(&cfg.backends);
        if backends.len() == 0 {
            if cfg.control.is_some() {
                log::info(
                    "no static backend: requests get 503 until a backend registers on the control listener",
                    &[],
                );
            } else {
                log::warn(
                    "no backend (-B) and no control listener (--control) for backends to register on: every request gets 503",
                    &[],
                );
            }
        }
        // Every descriptor of the process's own is open by now: what is left is for clients.
        let fds = size_connections(&mut cfg);
        let mut rng = SmallRng::from_os_rng();
        messaging::ensure_instance_id(&mut cfg, &mut rng);
        backends.set_pool_max(fds.pool);
        Ok(Server {
            poll,
            stats: Stats::default(),
            events,
            hooks: None,
            signer,
            started: Instant::now(),
            commands: mpsc::channel(),
            listeners,
            server_tls,
            control_tls,
            backend_tls,
            local_addrs,
            own_addrs,
            conns: Slab::with_capacity(1024),
            per_ip: HashMap::new(),
            control_listener,
            control_addr,
            controls: Slab::new(),
            control_auth,
            control_events: Vec::new(),
            controls_to_reap: Vec::new(),
            timers: Timers::default(),
            backends,
            cfg,
            rng,
            next_gen: 0,
            next_id: 0,
            signals: Some(signals),
            waker,
            stop: Arc::new(AtomicBool::new(false)),
            accept_blocked: false,
            fd_limit: fds.limit,
            control_max: fds.control,
            control_accept_blocked: false,
            accept_paused: log::Repeated::every(REPEATED_LOG_INTERVAL),
            repeated_logs: RepeatedLogs::every(REPEATED_LOG_INTERVAL),
            draining: false,
            finished: false,
            yielded: Vec::new(),
            to_flush: Vec::new(),
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
            commands: self.commands.0.clone(),
        }
    }

    /// Installs library hooks (before [`Server::run`]).
    pub fn set_hooks(&mut self, hooks: Box<dyn Hooks>) {
        self.hooks = Some(hooks);
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
            self.flush_pass();
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
                while let Ok(cmd) = self.commands.1.try_recv() {
                    match cmd {
                        Command::Send(to, msg, reply) => {
                            let _ = reply.send(Ok(self.send_to(&to, &msg)));
                        }
                        Command::Drain(name, reply) => {
                            let _ = reply.send(self.drain_named(&name));
                        }
                    }
                }
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
                    self.reload_token_file();
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
                let conn = self.conns.get_mut(key).filter(|c| !c.done);
                // Idle pooled backend connections stay registered under their last owner's
                // token, so an event there may be a backend closing one of them: without a
                // leg it cannot be anything else, and with one a hang-up may still be theirs.
                if side == Side::Backend
                    && (conn.as_ref().is_none_or(|c| c.backend_id().is_none())
                        || ev.is_read_closed()
                        || ev.is_error())
                {
                    let evicted = self.backends.evict_closed_pooled(token);
                    self.stats.pool_evicted += evicted as u64;
                }
                // Sporadic events for connections that just went away are normal.
                let Some(conn) = self.conns.get_mut(key).filter(|c| !c.done) else {
                    return;
                };
                conn.absorb(side, ev);
                if !conn.flush_queued && self.to_flush.len() < MAX_DEFERRED {
                    conn.flush_queued = true;
                    self.to_flush.push(key);
                }
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
        let mut ctx = ctx!(self);
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
            let timer = TimerKey {
                key,
                gen: conn.gen,
                kind: TimerKind::Conn,
            };
            self.timers.arm(&mut conn.armed, at, timer);
        }
    }
}
