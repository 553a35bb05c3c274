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
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR2};
use signal_hook_mio::v1_0::Signals;

use crate::backends::registry::{BackendState, Registry, Source};
use crate::config::{Config, OnBackendLost};
use crate::control::admin::{AdminApi, BackendChange, ChangeError};
use crate::control::status::{self as admin, BackendRow};
use handle::Command;
pub use handle::{Outgoing, ServerHandle, Target};

use crate::control::auth::{ControlAuth, Identity};
use crate::control::protocol::{self as control_protocol, ControlError};
use crate::control::session::{ControlConn, ControlDrive, ControlEvent};
use crate::hooks::Hooks;
use crate::net::fdlimit;
use crate::net::transport::Transport;
use crate::observe::events::{Event, EventSink};
use crate::observe::log;
use crate::observe::metrics::{self, BackendSample, Stats};
use crate::proxy::{
    key_of, token_for, Conn, Ctx, Drive, OpenTunnel, RepeatedLogs, Side, CLOSE_GOING_AWAY,
};
use crate::slots::{Slots, CLIENT_TOKENS, CONTROL_TOKENS, RESERVED_TOKENS};
use crate::timer::{TimerKey, TimerKind, Timers};
use serde_json::json;

const WAKER: Token = Token(0);
const SIGNALS: Token = Token(1);
const FIRST_LISTENER: usize = 2;
const CONTROL_LISTENER: Token = Token(RESERVED_TOKENS - 1);
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
            tickets: $s.tickets.as_ref(),
            logs: &mut $s.repeated_logs,
        }
    };
}

mod accept;
mod control_plane;
mod drain;
mod handle;
mod live;
mod messaging;
mod proxy_header;
mod routes;
mod startup;
mod upgrade;

use startup::load_token_file;
mod turn;

/// The balancer: bound listeners and everything the loop owns.
pub struct Server {
    poll: Poll,
    stats: Stats,
    events: EventSink,
    hooks: Option<Box<dyn Hooks>>,
    signer: Option<crate::backends::sticky::CookieSigner>,
    /// `--dispatch-secret`: signs dispatch tickets (issue 18).
    tickets: Option<crate::net::ticket::TicketSigner>,
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
    conns: Slots<Conn>,
    /// `--proxy-protocol`: accepted sockets whose PROXY header has not arrived yet.
    awaiting_header: proxy_header::AwaitingHeaders,
    /// Open client connections per address, for `--max-connections-per-ip`.
    per_ip: HashMap<IpAddr, u32>,
    control_listener: Option<TcpListener>,
    control_addr: Option<SocketAddr>,
    controls: Slots<ControlConn>,
    control_auth: ControlAuth,
    control_events: Vec<ControlEvent>,
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
    /// Client connections the descriptor limit allows (two descriptors each).
    fd_clients: usize,
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
    /// Binary upgrade, either side (SIGUSR2, `--upgrade-socket`, `--takeover`).
    upgrade: upgrade::Upgrade,
    /// Spread closes of drains and rebalancing (`drain.rs`).
    closes: drain::Closes,
    /// Drained backends waiting for their last client to go.
    drain_watches: Vec<drain::DrainWatch>,
    /// Rebalancing is under way (between its start and settle thresholds).
    rebalancing: bool,
    /// The live status page: history rings, last events, subscribers.
    live: crate::control::live::Live,
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

fn is_fd_exhaustion(e: &io::Error) -> bool {
    fdlimit::is_exhaustion(e)
}

impl Server {
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
        if self.upgrade.takeover.is_some() {
            self.begin_takeover();
        } else if let Err(e) = crate::net::fdpass::sd_notify("READY=1") {
            log::warn("cannot notify systemd", &[("error", &e)]);
        }
        self.timers.add(
            Instant::now() + SWEEP_EVERY,
            TimerKey {
                key: 0,
                gen: 0,
                kind: TimerKind::Sweep,
            },
        );
        self.start_live();
        if self.cfg.rebalance > 0 {
            self.timers.add(
                Instant::now() + drain::REBALANCE_EVERY,
                TimerKey {
                    key: 0,
                    gen: 0,
                    kind: TimerKind::Rebalance,
                },
            );
        }
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
            self.check_drains();
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

    /// One readiness event, by the token block it falls in.
    fn dispatch(&mut self, ev: &mio::event::Event) {
        match ev.token() {
            WAKER => self.run_commands(),
            SIGNALS => self.on_signals(),
            CONTROL_LISTENER => self.accept_controls(),
            upgrade::UPGRADE_LISTENER => self.accept_upgrade(),
            upgrade::UPGRADE_STREAM => self.hear_upgrade(),
            Token(t) if (FIRST_LISTENER..RESERVED_TOKENS).contains(&t) => {
                self.accept(t - FIRST_LISTENER);
            }
            token => {
                if let Some((key, _)) = self.awaiting_header.slots.tokens.key_of(token) {
                    self.read_proxy_header(key, ev.is_read_closed());
                } else if let Some((key, _)) = self.controls.tokens.key_of(token) {
                    if let Some(c) = self.controls.live(key) {
                        c.absorb(ev);
                        self.drive_control(key);
                    }
                } else if let Some((key, side)) = key_of(token) {
                    self.client_event(key, side, ev);
                }
            }
        }
    }

    /// Work handed over by `ServerHandle`s on other threads.
    fn run_commands(&mut self) {
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

    /// SIGTERM/SIGINT drain (a second one exits), SIGHUP reloads, SIGUSR2 upgrades.
    fn on_signals(&mut self) {
        let (mut stop, mut reload, mut upgrade) = (false, false, false);
        if let Some(s) = &mut self.signals {
            for sig in s.pending() {
                stop |= sig == SIGTERM || sig == SIGINT;
                reload |= sig == SIGHUP;
                upgrade |= sig == SIGUSR2;
            }
        }
        if upgrade {
            self.start_upgrade();
        }
        if reload {
            self.reload_tls();
            self.reload_token_file();
            self.reload_backends_file();
        }
        if stop {
            if self.draining {
                log::info("second signal: exiting now", &[]);
                self.finished = true;
            }
            self.begin_drain();
        }
    }

    /// Readiness on a client connection's client or backend socket.
    fn client_event(&mut self, key: usize, side: Side, ev: &mio::event::Event) {
        let conn = self.conns.live(key);
        // Idle pooled backend connections stay registered under their last owner's token,
        // so an event there may be a backend closing one of them: without a leg it cannot
        // be anything else, and with one a hang-up may still be theirs.
        if side == Side::Backend
            && (conn.as_ref().is_none_or(|c| c.backend_id().is_none())
                || ev.is_read_closed()
                || ev.is_error())
        {
            let evicted = self.backends.evict_closed_pooled(token_for(key, side));
            self.stats.pool_evicted += evicted as u64;
        }
        // Sporadic events for connections that just went away are normal.
        let Some(conn) = self.conns.live(key) else {
            return;
        };
        conn.absorb(side, ev);
        if !conn.marks.flush_queued && self.to_flush.len() < MAX_DEFERRED {
            conn.marks.flush_queued = true;
            self.to_flush.push(key);
        }
        self.with_conn(key, |c, ctx| c.drive(ctx));
    }

    /// Lends a connection the loop's shared state, then acts on its answer.
    fn with_conn(&mut self, key: usize, f: impl FnOnce(&mut Conn, &mut Ctx<'_>) -> Drive) {
        let Some(conn) = self.conns.live(key) else {
            return;
        };
        let mut ctx = ctx!(self);
        match f(conn, &mut ctx) {
            Drive::Continue => {}
            Drive::Yield => self.yielded.push((key, conn.gen)),
            Drive::Done => {
                self.conns.finish(key);
                return;
            }
        }
        if let Some(at) = conn.deadline(&self.cfg) {
            self.conns.arm(&mut self.timers, key, at);
        }
    }
}
