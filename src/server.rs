//! The event loop: listeners, accept, readiness dispatch, timers, signals, reaping.
#![deny(clippy::indexing_slicing)]

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use crate::config::Config;
use crate::conn::{key_of, token_for, Conn, Ctx, Drive, Side, CLOSE_GOING_AWAY, RESERVED_TOKENS};
use crate::log;
use crate::registry::Registry;
use crate::timer::{TimerKey, TimerKind, Timers};

const WAKER: Token = Token(0);
const SIGNALS: Token = Token(1);
const FIRST_LISTENER: usize = 2;
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
    listeners: Vec<TcpListener>,
    local_addrs: Vec<SocketAddr>,
    conns: Slab<Conn>,
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

/// Binds and runs until drained.
pub fn run(cfg: Config) -> io::Result<()> {
    Server::bind(cfg)?.run()
}

fn is_fd_exhaustion(e: &io::Error) -> bool {
    // EMFILE, ENFILE, ENOBUFS, ENOMEM: retrying at once would spin.
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

impl Server {
    /// Binds every listener and prepares the loop; nothing is accepted until [`Server::run`].
    pub fn bind(cfg: Config) -> io::Result<Server> {
        crate::log::init(cfg.verbosity, cfg.log_format);
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let mut listeners = Vec::new();
        let mut local_addrs = Vec::new();
        for (i, addr) in cfg.listen.iter().enumerate() {
            let mut l = TcpListener::bind(*addr)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
            poll.registry()
                .register(&mut l, Token(FIRST_LISTENER + i), Interest::READABLE)?;
            let local = l.local_addr()?;
            log::info(&format!("listening on {local}"), &[]);
            local_addrs.push(local);
            listeners.push(l);
        }
        if FIRST_LISTENER + listeners.len() > RESERVED_TOKENS {
            return Err(io::Error::other("too many listeners"));
        }
        let mut signals = Signals::new([SIGTERM, SIGINT])?;
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
            local_addrs,
            conns: Slab::with_capacity(1024),
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
            self.reap();
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
                if let Some(s) = &mut self.signals {
                    for sig in s.pending() {
                        stop |= sig == SIGTERM || sig == SIGINT;
                    }
                }
                if stop {
                    if self.draining {
                        log::info("second signal: exiting now", &[]);
                        self.finished = true;
                    }
                    self.begin_drain();
                }
            }
            Token(t) if (FIRST_LISTENER..RESERVED_TOKENS).contains(&t) => {
                self.accept(t - FIRST_LISTENER);
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
            let Some(listener) = self.listeners.get(idx) else {
                return;
            };
            let (mut stream, peer) = match listener.accept() {
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
            self.next_gen += 1;
            self.next_id += 1;
            let entry = self.conns.vacant_entry();
            let key = entry.key();
            if let Err(e) = self.poll.registry().register(
                &mut stream,
                token_for(key, Side::Client),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                log::error("register failed", &[("error", &e)]);
                continue;
            }
            let now = Instant::now();
            let conn = entry.insert(Conn::new(
                key,
                self.next_gen,
                self.next_id,
                stream,
                peer,
                now,
            ));
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
                backends: &mut self.backends,
                poll: self.poll.registry(),
                rng: &mut self.rng,
                now: Instant::now(),
                draining: self.draining,
            };
            conn.teardown(&mut ctx);
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
        for mut l in self.listeners.drain(..) {
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
}
