//! Starting the balancer: flags and files validated (`wslb --check` stops there), listeners
//! bound, the descriptor budget sized, the loop's state built.

use super::*;

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
    backends_file: Vec<crate::config::BackendSpec>,
}

/// Static `-B` backends may point anywhere the operator likes, except back at wslb: one
/// request to such a backend would dial again, and again.
fn static_backends_avoid(
    specs: &[crate::config::BackendSpec],
    own: &[SocketAddr],
) -> Result<(), Error> {
    match specs.iter().find(|b| is_own_listener(b.addr, own)) {
        Some(b) => Err(Error::Config(format!(
            "invalid value {:?} for --backend: that is wslb's own listener; requests would loop",
            b.url
        ))),
        None => Ok(()),
    }
}

/// Reads and parses `--token-file`; the error is the one line printed.
/// Would dialling `addr` reach one of wslb's own listeners (`own`, port 0 = not bound yet)?
pub(super) fn is_own_listener(addr: SocketAddr, own: &[SocketAddr]) -> bool {
    let own: Vec<SocketAddr> = own.iter().copied().filter(|a| a.port() != 0).collect();
    crate::netpolicy::hits_own_listener(addr, &own, &crate::netpolicy::is_local_ip)
}

/// Reads and parses `--backends-file`.
pub(super) fn load_backends_file(
    path: &std::path::Path,
) -> Result<Vec<crate::config::BackendSpec>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read --backends-file {}: {e}", path.display()))?;
    crate::config::parse_backends_file(&text)
        .map_err(|e| format!("--backends-file {}: {e}", path.display()))
}

pub(super) fn load_token_file(path: &std::path::Path) -> Result<Vec<(String, String)>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read --token-file {}: {e}", path.display()))?;
    crate::control::auth::parse_token_file(&text)
        .map_err(|e| format!("--token-file {}: {e}", path.display()))
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
        static_backends_avoid(&cfg.backends, &configured)?;
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
        let backends_file = match &cfg.backends_file {
            Some(path) => load_backends_file(path).map_err(Error::Config)?,
            None => Vec::new(),
        };
        Ok(Validated {
            server_tls,
            control_tls,
            backend_tls,
            token_file,
            backends_file,
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
            backends_file,
        } = Server::validate(&cfg)?;
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let mut inherited = match &cfg.takeover {
            Some(path) => Some(upgrade::take_over(path)?),
            None => None,
        };
        let (listeners, local_addrs) = bind_listeners(&cfg, &poll, inherited.as_mut())?;
        let (control_listener, control_addr) = match cfg.control {
            Some(addr) => {
                let (l, local) = bind_control(&cfg, addr, &poll, inherited.as_mut())?;
                (Some(l), Some(local))
            }
            None => (None, None),
        };
        let mut upgrade = upgrade::Upgrade::prepare(&cfg, &poll)?;
        upgrade.takeover = inherited.and_then(upgrade::Inherited::into_takeover);
        let own_addrs: Vec<SocketAddr> = local_addrs.iter().copied().chain(control_addr).collect();
        // Again with the bound addresses: a port-0 listener may have drawn a -B port.
        static_backends_avoid(&cfg.backends, &own_addrs)?;
        static_backends_avoid(&backends_file, &own_addrs)?;
        let control_auth = ControlAuth::new(cfg.token.as_deref(), token_file.as_deref())
            .map_err(|_| io::Error::other("no system randomness for the token MAC key"))?;
        let events = open_events(&cfg)?;
        let signer = cookie_signer(&cfg)?;
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR2])?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        let mut backends = static_backends(&cfg, &backends_file);
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
            tickets: cfg
                .dispatch_secret
                .as_deref()
                .map(|s| crate::net::ticket::TicketSigner::new(s.as_bytes())),
            started: Instant::now(),
            commands: mpsc::channel(),
            listeners,
            server_tls,
            control_tls,
            backend_tls,
            local_addrs,
            own_addrs,
            conns: Slots::new(CLIENT_TOKENS, TimerKind::Conn, 1024),
            per_ip: HashMap::new(),
            awaiting_header: proxy_header::AwaitingHeaders::default(),
            control_listener,
            control_addr,
            controls: Slots::new(CONTROL_TOKENS, TimerKind::Control, 16),
            control_auth,
            control_events: Vec::new(),
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
            fd_clients: fds.clients,
            control_max: fds.control,
            control_accept_blocked: false,
            accept_paused: log::Repeated::every(REPEATED_LOG_INTERVAL),
            repeated_logs: RepeatedLogs::every(REPEATED_LOG_INTERVAL),
            draining: false,
            finished: false,
            yielded: Vec::new(),
            to_flush: Vec::new(),
            upgrade,
            closes: Default::default(),
            drain_watches: Vec::new(),
            rebalancing: false,
            live: Default::default(),
        })
    }
}

/// `--events FILE` (or `-`), opened before anything else can fail halfway.
fn open_events(cfg: &Config) -> Result<EventSink, Error> {
    EventSink::open(cfg.events.as_deref()).map_err(|e| {
        Error::Tls(crate::net::tls::TlsError::File {
            path: cfg.events.clone().unwrap_or_default().into(),
            why: format!("cannot open --events file: {e}"),
        })
    })
}

/// The `-B` backends, then those of `--backends-file` (a URL in both keeps the flag's).
fn static_backends(cfg: &Config, from_file: &[crate::config::BackendSpec]) -> Registry {
    let mut backends = Registry::from_specs(&cfg.backends);
    for spec in from_file {
        if backends.add_static(spec, Source::File).is_none() {
            log::warn(
                "--backends-file lists a -B backend again; the flag's wins",
                &[("backend", &spec.url)],
            );
        }
    }
    if backends.len() == 0 {
        say_where_backends_come_from(cfg);
    }
    backends
}

/// Binds the proxy listeners (plain, then TLS) with consecutive tokens, or takes them
/// from the old process of an upgrade (then they accept only once it is complete).
#[allow(clippy::type_complexity)]
fn bind_listeners(
    cfg: &Config,
    poll: &Poll,
    mut inherited: Option<&mut upgrade::Inherited>,
) -> io::Result<(Vec<(TcpListener, bool)>, Vec<SocketAddr>)> {
    let mut listeners = Vec::new();
    let mut local_addrs = Vec::new();
    let all = cfg
        .listen
        .iter()
        .map(|a| (a, false))
        .chain(cfg.tls_listen.iter().map(|a| (a, true)));
    for (i, (addr, tls)) in all.enumerate() {
        let taken = inherited.as_mut().and_then(|h| h.take_listener(addr, tls));
        let mut l = match taken {
            Some(l) => l,
            None => listen(*addr, cfg.backlog)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?,
        };
        if inherited.is_none() {
            poll.registry()
                .register(&mut l, Token(FIRST_LISTENER + i), Interest::READABLE)?;
        }
        let local = l.local_addr()?;
        if tls {
            log::info(&format!("tls listening on {local}"), &[]);
        } else {
            log::info(&format!("listening on {local}"), &[]);
        }
        local_addrs.push(local);
        listeners.push((l, tls));
    }
    if FIRST_LISTENER + listeners.len() >= upgrade::UPGRADE_STREAM.0 {
        return Err(io::Error::other("too many listeners"));
    }
    Ok((listeners, local_addrs))
}

/// Binds `--control`, saying who may use it when no token protects it.
fn bind_control(
    cfg: &Config,
    addr: SocketAddr,
    poll: &Poll,
    inherited: Option<&mut upgrade::Inherited>,
) -> io::Result<(TcpListener, SocketAddr)> {
    let mut l = match inherited.and_then(|h| h.take_control(&addr)) {
        Some(l) => l,
        None => listen(addr, cfg.backlog).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on {addr} (--control): {e}"),
            )
        })?,
    };
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
    Ok((l, local))
}

/// The sticky cookie signer (cookie mode only): the shared secret, or a random one with a
/// warning, since several balancers then disagree.
fn cookie_signer(cfg: &Config) -> io::Result<Option<crate::backends::sticky::CookieSigner>> {
    use crate::backends::sticky::{CookieSigner, StickyMode};
    match (&cfg.sticky, &cfg.sticky_secret) {
        (Some(StickyMode::Cookie { .. }), Some(secret)) => {
            Ok(Some(CookieSigner::new(secret.as_bytes())))
        }
        (Some(StickyMode::Cookie { .. }), None) => {
            log::warn(
                "--sticky cookie without --sticky-secret: using a random secret; several balancers need one shared secret",
                &[],
            );
            CookieSigner::random()
                .map(Some)
                .map_err(|e| io::Error::other(e.to_string()))
        }
        _ => Ok(None),
    }
}

/// With no static backend, says what is true: backends may still register, or nothing
/// can ever answer.
fn say_where_backends_come_from(cfg: &Config) {
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
