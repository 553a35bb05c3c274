//! Command-line flags into a [`Config`]. Pure: parsing never touches the network.
//!
//! Every bad flag becomes one [`ConfigError`] that names the flag, so `main` can print one
//! line and exit 2.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use std::str::FromStr;

/// How a backend is chosen for each new WebSocket connection or HTTP request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// Fewest active connections per unit of weight; ties broken at random.
    Fewest,
    /// Uniform over weight.
    Random,
    /// Smooth weighted round-robin.
    RoundRobin,
    /// Power of two random choices: draw two, keep the less loaded.
    PowerOfTwo,
}

impl FromStr for Algorithm {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "fewest" | "least-conn" | "leastconn" => Ok(Algorithm::Fewest),
            "random" => Ok(Algorithm::Random),
            "round-robin" | "roundrobin" | "rr" => Ok(Algorithm::RoundRobin),
            "p2c" => Ok(Algorithm::PowerOfTwo),
            _ => Err(()),
        }
    }
}

/// Cookie name of `--sticky cookie` without a name.
pub const DEFAULT_COOKIE_NAME: &str = "wslb";
/// Longest cookie name / header name accepted by [`parse_mode`].
pub const MAX_STICKY_NAME_LEN: usize = 64;

/// What `--sticky` keys on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StickyMode {
    /// A signed cookie naming the backend.
    Cookie { name: String },
    /// Rendezvous hashing of the client IP.
    Ip,
    /// Rendezvous hashing of a request header's value. `name` is kept as given; header names
    /// are case-insensitive, so compare with `eq_ignore_ascii_case`.
    Header { name: String },
}

/// RFC 9110 `tchar` (the same set as RFC 6265's `token` for cookie names).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn valid_name(n: &str) -> bool {
    (1..=MAX_STICKY_NAME_LEN).contains(&n.len()) && n.bytes().all(is_tchar)
}

/// Parses the `--sticky` value: `cookie`, `cookie:NAME`, `ip`, `header:NAME`.
pub fn parse_mode(v: &str) -> Result<StickyMode, &'static str> {
    const BAD_NAME: &str = "sticky cookie/header name must be 1-64 token characters";
    match v.split_once(':') {
        None if v == "cookie" => Ok(StickyMode::Cookie {
            name: DEFAULT_COOKIE_NAME.to_string(),
        }),
        None if v == "ip" => Ok(StickyMode::Ip),
        Some(("cookie", name)) if valid_name(name) => Ok(StickyMode::Cookie {
            name: name.to_string(),
        }),
        Some(("header", name)) if valid_name(name) => Ok(StickyMode::Header {
            name: name.to_string(),
        }),
        Some(("cookie" | "header", _)) => Err(BAD_NAME),
        _ => Err("expected cookie, cookie:NAME, ip or header:NAME"),
    }
}

pub use crate::observe::log::LogFormat;

/// What happens to a registered backend's client connections when its control connection
/// is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnBackendLost {
    /// They stay up; only new clients avoid the backend.
    Keep,
    /// They are closed (WebSocket clients get 1001... via a TCP close of the pair).
    Close,
}

/// A static backend given with `-B`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// The URL as given (without options), used as the backend's stable id.
    pub url: String,
    /// `host:port` part of the URL, kept for logs and the Host of health messages.
    pub authority: String,
    /// Resolved once at startup: a small host should not resolve DNS on the hot path.
    pub addr: SocketAddr,
    /// Relative share of new connections.
    pub weight: u32,
    /// `wss://`/`https://`: speak TLS to it.
    pub tls: bool,
    /// Most connections at once (`max_connections=N`); 0 = no limit.
    pub max_connections: u32,
    /// `proxy=v1|v2`: a PROXY header naming the client opens every connection to it.
    pub proxy: Option<crate::net::proxy_protocol::Version>,
}

/// Everything the balancer needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Proxy listeners.
    pub listen: Vec<SocketAddr>,
    /// Static backend pool.
    pub backends: Vec<BackendSpec>,
    /// Selection algorithm.
    pub algorithm: Algorithm,
    /// Accept WebSocket upgrades.
    pub websocket: bool,
    /// Accept plain HTTP requests.
    pub http: bool,
    /// Whole request head must arrive within this.
    pub header_timeout: Duration,
    /// Backend TCP connect deadline.
    pub connect_timeout: Duration,
    /// Keep-alive / no-progress deadline for HTTP connections.
    pub idle_timeout: Duration,
    /// Grace period for WebSocket clients after SIGTERM; their 1001 closes are spread over it.
    pub drain_timeout: Duration,
    /// A drained backend's WebSocket clients get 1012 spread over this; `None` (`off`) =
    /// they stay until they leave.
    pub backend_drain_window: Option<Duration>,
    /// `--rebalance RATE`: most connections closed per second to even out the backends;
    /// 0 = off.
    pub rebalance: u32,
    /// Largest number of client connections held at once; 0 = as many as the descriptor
    /// limit allows (the server works it out at start, and lowers a larger value to it).
    pub max_connections: usize,
    /// Largest WebSocket frame payload relayed (close 1009 beyond); `u64::MAX` = no limit.
    /// A policy only: frames are streamed, never held whole, so no limit is needed for memory.
    pub max_frame_size: u64,
    /// Client connections held at once from one IP address; 0 = no limit.
    pub max_connections_per_ip: u32,
    /// Origins allowed to open WebSockets (exact `Origin` values); empty = any.
    pub allowed_origins: Vec<String>,
    /// Bytes per second relayed per connection and direction; 0 = unlimited.
    pub throttle: u64,
    /// A WebSocket silent this long in both directions is closed (1001); `None` = never.
    pub ws_idle_timeout: Option<Duration>,
    /// Balancer pings to WebSocket clients at this interval; 3 unanswered = dead peer.
    pub ws_ping: Option<Duration>,
    /// `--events FILE|-`: JSON lines of connection and backend events.
    pub events: Option<String>,
    /// Listen backlog of every listener.
    pub backlog: i32,
    /// Request bodies must arrive at least this fast (bytes/s over 10 s windows); 0 = off.
    pub min_body_rate: u64,
    /// Reassemble client WebSocket messages for hooks and events (`client_message`).
    pub inspect: bool,
    /// Sticky sessions mode (`None` = off).
    pub sticky: Option<StickyMode>,
    /// HMAC secret for sticky cookies (`--sticky-secret` or env `WSLB_STICKY_SECRET`).
    pub sticky_secret: Option<String>,
    /// Lifetime of sticky cookies.
    pub sticky_max_age: Duration,
    /// TLS proxy listeners.
    pub tls_listen: Vec<SocketAddr>,
    /// Certificate/key pairs, selected by SNI; the first is the default.
    pub certs: Vec<crate::net::tls::CertPair>,
    /// CA file for verifying TLS backends; `None` = platform roots.
    pub backend_ca: Option<std::path::PathBuf>,
    /// Skip backend certificate verification (development only).
    pub backend_insecure: bool,
    /// Serve the control listener over TLS with the same certificates.
    pub control_tls: bool,
    /// Control listener for backend registration (off when `None`).
    pub control: Option<SocketAddr>,
    /// Bearer token required on control connections; `None` = loopback peers only.
    pub token: Option<String>,
    /// Control-connection ping interval; 3 missed = backend lost.
    pub heartbeat: Duration,
    /// Fate of client connections when their backend's control connection is lost.
    pub on_backend_lost: OnBackendLost,
    /// Security (issue 15): who may be dialled and whose forwarding headers are believed.
    /// `--backend-allow`: registered bindings may point into these blocks besides the
    /// control connection's own address.
    pub backend_allow: Vec<crate::netpolicy::Cidr>,
    /// `--trusted-proxy`: peers whose X-Forwarded-For / Forwarded values are kept.
    pub trusted_proxies: Vec<crate::netpolicy::Cidr>,
    /// `--proxy-protocol`: every proxy listener (plain and TLS) expects a PROXY v1/v2
    /// header first, from `--trusted-proxy` peers only; its source address is the client.
    pub proxy_protocol: bool,
    /// `--forwarded`: emit RFC 7239 `Forwarded` instead of `X-Forwarded-For`.
    pub forwarded: bool,
    /// `--token-file`: per-backend tokens, lines `guid token`, re-read on SIGHUP.
    pub token_file: Option<std::path::PathBuf>,
    /// `--control-client-ca`: client certificates on `--control-tls` verified against this
    /// CA; the first DNS name on one is the only guid its holder may register.
    pub control_client_ca: Option<std::path::PathBuf>,
    /// Log line shape.
    pub log_format: LogFormat,
    /// 0 = errors only, 1 = normal, 2 = verbose.
    pub verbosity: u8,
    /// `--check`: validate and exit without listening.
    pub check: bool,
    /// `--upgrade-socket`: a Unix socket where a new wslb (`--takeover`) takes the
    /// listening sockets over; SIGUSR2 makes a temporary one by itself.
    pub upgrade_socket: Option<std::path::PathBuf>,
    /// `--takeover`: start by taking the listeners of the wslb serving that socket.
    pub takeover: Option<std::path::PathBuf>,
    /// `--backends-file`: static backends, one `-B` value per line, re-read on SIGHUP.
    pub backends_file: Option<std::path::PathBuf>,
    /// Issue 17: backends messaging clients over the control channel.
    pub messaging: Messaging,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 8080))],
            backends: Vec::new(),
            algorithm: Algorithm::Fewest,
            websocket: true,
            http: true,
            header_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(10),
            backend_drain_window: Some(Duration::from_secs(60)),
            rebalance: 0,
            max_connections: 0,
            max_frame_size: u64::MAX,
            max_connections_per_ip: 0,
            allowed_origins: Vec::new(),
            throttle: 0,
            ws_idle_timeout: None,
            ws_ping: None,
            events: None,
            inspect: false,
            min_body_rate: 256,
            backlog: 1024,
            sticky: None,
            sticky_secret: None,
            sticky_max_age: Duration::from_secs(24 * 3600),
            tls_listen: Vec::new(),
            certs: Vec::new(),
            backend_ca: None,
            backend_insecure: false,
            control_tls: false,
            control: None,
            token: None,
            heartbeat: Duration::from_secs(5),
            on_backend_lost: OnBackendLost::Keep,
            backend_allow: Vec::new(),
            trusted_proxies: Vec::new(),
            proxy_protocol: false,
            forwarded: false,
            token_file: None,
            control_client_ca: None,
            upgrade_socket: None,
            takeover: None,
            backends_file: None,
            log_format: LogFormat::Text,
            verbosity: 1,
            check: false,
            messaging: Messaging::default(),
        }
    }
}

/// A flag that could not be accepted. `Display` is the one line printed before exit 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// getopts rejected the command line (unknown flag, missing value, ...).
    Usage(String),
    /// `flag` had a value that does not parse; `why` says what was expected.
    Value {
        /// The long flag name with dashes, e.g. `--header-timeout`.
        flag: &'static str,
        /// The offending value.
        value: String,
        /// What was expected instead.
        why: &'static str,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Usage(msg) => write!(f, "wslb: {msg} (see --help)"),
            ConfigError::Value { flag, value, why } => {
                write!(f, "wslb: invalid value {value:?} for {flag}: {why}")
            }
        }
    }
}

impl std::error::Error for ConfigError {}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    /// Run the balancer.
    Run(Box<Config>),
    /// Print this text and exit 0.
    Help(String),
    /// Print the version and exit 0.
    Version,
}

fn options() -> getopts::Options {
    let mut o = getopts::Options::new();
    o.optmulti(
        "l",
        "listen",
        "proxy listener address (repeatable) [default: 127.0.0.1:8080]",
        "ADDR",
    );
    o.optmulti(
        "B",
        "backend",
        "static backend ws://host:port or http://host:port, optional ,weight=N (repeatable)",
        "URL",
    );
    o.optopt(
        "a",
        "algorithm",
        "fewest | random | round-robin | p2c [default: fewest]",
        "ALG",
    );
    o.optopt(
        "",
        "protocols",
        "which client protocols to serve: ws,http [default: ws,http]",
        "LIST",
    );
    o.optopt(
        "",
        "header-timeout",
        "whole request head must arrive within this [default: 10s]",
        "DUR",
    );
    o.optopt(
        "",
        "connect-timeout",
        "backend connect deadline [default: 3s]",
        "DUR",
    );
    o.optopt(
        "",
        "idle-timeout",
        "idle keep-alive / stalled HTTP exchange deadline [default: 60s]",
        "DUR",
    );
    o.optopt(
        "",
        "drain-timeout",
        "after SIGTERM, WebSocket clients get close 1001 spread over this [default: 10s]",
        "DUR",
    );
    o.optopt(
        "",
        "backend-drain-window",
        "a drained backend's WebSocket clients get close 1012 spread over this; off = they stay until they leave [default: 60s]",
        "DUR|off",
    );
    o.optopt(
        "",
        "rebalance",
        "close up to RATE WebSockets per second (1012) from the most loaded backends while loads per weight are over 20% apart [default: off]",
        "RATE",
    );
    o.optopt(
        "",
        "max-connections",
        "client connections held at once; 0 = as many as the descriptor limit allows [default: 0]",
        "N",
    );
    o.optopt(
        "",
        "max-frame-size",
        "largest WebSocket frame payload relayed (close 1009 beyond), e.g. 16MiB; frames are streamed, so this is a policy, not a memory bound [default: off]",
        "SIZE",
    );
    o.optopt(
        "",
        "max-connections-per-ip",
        "client connections from one IP address; more get 429 [default: unlimited]",
        "N",
    );
    o.optopt(
        "",
        "max-memory",
        "memory budget for relay buffers; lowers --max-connections to fit, e.g. 256MiB [default: none]",
        "SIZE",
    );
    o.optmulti(
        "",
        "allowed-origin",
        "Origin allowed to open WebSockets, e.g. https://app.example (repeatable; others get 403) [default: any]",
        "ORIGIN",
    );
    o.optopt(
        "",
        "throttle",
        "bytes per second relayed per connection and direction, e.g. 64KiB [default: unlimited]",
        "SIZE",
    );
    o.optopt(
        "",
        "backlog",
        "listen backlog: connections the kernel queues before accept [default: 1024]",
        "N",
    );
    o.optopt(
        "",
        "min-body-rate",
        "request bodies slower than this over 10 s get 408, e.g. 1KiB; 0 = off [default: 256]",
        "SIZE",
    );
    o.optflag(
        "",
        "inspect",
        "reassemble client WebSocket messages for hooks and client_message events (costs a copy)",
    );
    o.optopt(
        "",
        "sticky",
        "sticky sessions: cookie[:NAME] | ip | header:NAME [default: off]",
        "MODE",
    );
    o.optopt(
        "",
        "sticky-secret",
        "HMAC secret for sticky cookies, shared by all balancers (or env WSLB_STICKY_SECRET) [default: random per process]",
        "SECRET",
    );
    o.optopt(
        "",
        "sticky-max-age",
        "lifetime of sticky cookies [default: 24h]",
        "DUR",
    );
    o.optopt(
        "",
        "ws-ping",
        "ping WebSocket clients at this interval; 3 unanswered = closed [default: off]",
        "DUR",
    );
    o.optopt(
        "",
        "events",
        "write one JSON event per line (connect, pair, disconnect, server ready, ...) to FILE or - for stdout [default: off]",
        "FILE",
    );
    o.optopt(
        "",
        "ws-idle-timeout",
        "close WebSockets silent this long both ways (close 1001) [default: never]",
        "DUR",
    );
    o.optmulti(
        "",
        "tls-listen",
        "TLS proxy listener address (repeatable; needs --cert/--key) [default: none]",
        "ADDR",
    );
    o.optmulti(
        "",
        "cert",
        "PEM certificate chain; pairs with the --key at the same position; several pairs are chosen by SNI, the first is the default (repeatable)",
        "FILE",
    );
    o.optmulti(
        "",
        "key",
        "PEM private key for the --cert at the same position (repeatable)",
        "FILE",
    );
    o.optopt(
        "",
        "backend-ca",
        "CA certificates (PEM) to verify wss:// and https:// backends [default: platform roots]",
        "FILE",
    );
    o.optflag(
        "",
        "backend-insecure",
        "do not verify backend certificates (development only)",
    );
    o.optflag(
        "",
        "control-tls",
        "serve the control listener over TLS with the --cert/--key pairs",
    );
    o.optopt(
        "",
        "control",
        "listener for backend self-registration at /register [default: off]",
        "ADDR",
    );
    o.optopt(
        "",
        "token",
        "bearer token backends must present (or env WSLB_TOKEN) [default: none = loopback only]",
        "TOKEN",
    );
    o.optopt(
        "",
        "heartbeat",
        "control ping interval; 3 missed = backend lost [default: 5s]",
        "DUR",
    );
    o.optopt(
        "",
        "on-backend-lost",
        "keep | close: client connections of a backend whose control connection is lost [default: keep]",
        "WHAT",
    );
    security_options(&mut o);
    upgrade_options(&mut o);
    messaging_options(&mut o);
    o.optopt("", "log-format", "text | json [default: text]", "FMT");
    o.optflag("q", "quiet", "log errors only");
    o.optflag("v", "verbose", "log every connection");
    o.optflag("h", "help", "print this help and exit");
    o.optflag("V", "version", "print the version and exit");
    o.optflag(
        "",
        "check",
        "validate flags, certificates and files, then exit without listening (for ExecStartPre)",
    );
    o
}

/// Parses `args` (without the program name).
pub fn parse_args<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Result<Command, ConfigError> {
    let opts = options();
    let m = opts
        .parse(args)
        .map_err(|e| ConfigError::Usage(e.to_string()))?;
    if m.opt_present("help") {
        return Ok(Command::Help(opts.usage(
            "Usage: wslb [OPTIONS]\n\nA WebSocket + HTTP/1.1 load balancer.",
        )));
    }
    if m.opt_present("version") {
        return Ok(Command::Version);
    }
    if let Some(extra) = m.free.first() {
        return Err(ConfigError::Usage(format!("unexpected argument {extra:?}")));
    }
    let mut cfg = Config::default();
    let listen = m.opt_strs("listen");
    if listen.is_empty() && m.opt_present("tls-listen") {
        // A TLS-only balancer should not also open the default plain port.
        cfg.listen.clear();
    }
    if !listen.is_empty() {
        cfg.listen = listen
            .iter()
            .map(|v| parse_addr(v).map_err(|why| bad("--listen", v, why)))
            .collect::<Result<_, _>>()?;
    }
    for v in m.opt_strs("backend") {
        cfg.backends
            .push(parse_backend(&v).map_err(|why| bad("--backend", &v, why))?);
    }
    if let Some(v) = m.opt_str("algorithm") {
        cfg.algorithm = v.parse().map_err(|_| {
            bad(
                "--algorithm",
                &v,
                "expected fewest, random, round-robin or p2c",
            )
        })?;
    }
    if let Some(v) = m.opt_str("protocols") {
        let (ws, http) = parse_protocols(&v).map_err(|why| bad("--protocols", &v, why))?;
        cfg.websocket = ws;
        cfg.http = http;
    }
    for v in m.opt_strs("tls-listen") {
        cfg.tls_listen
            .push(parse_addr(&v).map_err(|why| bad("--tls-listen", &v, why))?);
    }
    let (certs, keys) = (m.opt_strs("cert"), m.opt_strs("key"));
    if certs.len() != keys.len() {
        return Err(ConfigError::Usage(format!(
            "--cert and --key must come in pairs ({} --cert, {} --key)",
            certs.len(),
            keys.len()
        )));
    }
    cfg.certs = certs
        .into_iter()
        .zip(keys)
        .map(|(cert, key)| crate::net::tls::CertPair {
            cert: cert.into(),
            key: key.into(),
        })
        .collect();
    cfg.backend_ca = m.opt_str("backend-ca").map(Into::into);
    cfg.backend_insecure = m.opt_present("backend-insecure");
    cfg.control_tls = m.opt_present("control-tls");
    if cfg.certs.is_empty() && (!cfg.tls_listen.is_empty() || cfg.control_tls) {
        return Err(ConfigError::Usage(
            "--tls-listen and --control-tls need at least one --cert/--key pair".into(),
        ));
    }
    if let Some(v) = m.opt_str("control") {
        cfg.control = Some(parse_addr(&v).map_err(|why| bad("--control", &v, why))?);
    }
    if let Some(v) = m.opt_str("token") {
        if v.is_empty() || v.len() > 4096 {
            return Err(bad("--token", "", "expected 1-4096 characters"));
        }
        cfg.token = Some(v);
    }
    if let Some(v) = m.opt_str("on-backend-lost") {
        cfg.on_backend_lost = match v.as_str() {
            "keep" => OnBackendLost::Keep,
            "close" => OnBackendLost::Close,
            _ => return Err(bad("--on-backend-lost", &v, "expected keep or close")),
        };
    }
    let durations: [(&'static str, &mut Duration); 5] = [
        ("header-timeout", &mut cfg.header_timeout),
        ("connect-timeout", &mut cfg.connect_timeout),
        ("idle-timeout", &mut cfg.idle_timeout),
        ("drain-timeout", &mut cfg.drain_timeout),
        ("heartbeat", &mut cfg.heartbeat),
    ];
    for (name, slot) in durations {
        if let Some(v) = m.opt_str(name) {
            *slot = parse_duration(&v).map_err(|why| bad(flag_name(name), &v, why))?;
        }
    }
    if let Some(v) = m.opt_str("backend-drain-window") {
        cfg.backend_drain_window = if v.trim().eq_ignore_ascii_case("off") {
            None
        } else {
            Some(parse_duration(&v).map_err(|why| bad("--backend-drain-window", &v, why))?)
        };
    }
    if let Some(v) = m.opt_str("rebalance") {
        cfg.rebalance = if v.trim().eq_ignore_ascii_case("off") {
            0
        } else {
            v.trim()
                .parse::<u32>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    bad(
                        "--rebalance",
                        &v,
                        "expected connections per second (a positive integer) or off",
                    )
                })?
        };
    }
    if let Some(v) = m.opt_str("max-connections") {
        // 0 = as many as the descriptor limit allows (the default).
        cfg.max_connections = v.parse::<usize>().map_err(|_| {
            bad(
                "--max-connections",
                &v,
                "expected a number (0 = from the descriptor limit)",
            )
        })?;
    }
    if let Some(v) = m.opt_str("max-frame-size") {
        cfg.max_frame_size = if v.trim().eq_ignore_ascii_case("off") {
            u64::MAX
        } else {
            parse_size(&v).map_err(|why| bad("--max-frame-size", &v, why))?
        };
    }
    if let Some(v) = m.opt_str("max-connections-per-ip") {
        cfg.max_connections_per_ip = v.parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(|| {
            bad(
                "--max-connections-per-ip",
                &v,
                "expected a positive integer",
            )
        })?;
    }
    if let Some(v) = m.opt_str("max-memory") {
        let budget = parse_size(&v).map_err(|why| bad("--max-memory", &v, why))?;
        // Worst case per connection: a buffer per direction plus state and kernel-side
        // bookkeeping we do not control; the pool is small and counted in.
        let per_conn = 2 * crate::net::buffer::BUF_SIZE as u64 + 2048;
        let fits = budget / per_conn;
        if fits < 1 {
            return Err(bad("--max-memory", &v, "too small for even one connection"));
        }
        let fits = usize::try_from(fits).unwrap_or(usize::MAX);
        cfg.max_connections = match cfg.max_connections {
            0 => fits,
            n => n.min(fits),
        };
    }
    for v in m.opt_strs("allowed-origin") {
        let ok = (v.starts_with("http://") || v.starts_with("https://") || v == "null")
            && v.len() <= 256
            && v.bytes().all(|b| b.is_ascii_graphic());
        if !ok {
            return Err(bad(
                "--allowed-origin",
                &v,
                "expected an origin like https://app.example",
            ));
        }
        cfg.allowed_origins
            .push(v.trim_end_matches('/').to_string());
    }
    if let Some(v) = m.opt_str("throttle") {
        let s = v.strip_suffix("/s").unwrap_or(&v);
        cfg.throttle = parse_size(s).map_err(|why| bad("--throttle", &v, why))?;
    }
    if let Some(v) = m.opt_str("ws-ping") {
        cfg.ws_ping = Some(parse_duration(&v).map_err(|why| bad("--ws-ping", &v, why))?);
    }
    cfg.events = m.opt_str("events");
    cfg.inspect = m.opt_present("inspect");
    if let Some(v) = m.opt_str("backlog") {
        cfg.backlog = v
            .parse::<i32>()
            .ok()
            .filter(|n| (1..=65535).contains(n))
            .ok_or_else(|| bad("--backlog", &v, "expected an integer from 1 to 65535"))?;
    }
    if let Some(v) = m.opt_str("min-body-rate") {
        cfg.min_body_rate = if v == "0" {
            0
        } else {
            parse_size(v.strip_suffix("/s").unwrap_or(&v))
                .map_err(|why| bad("--min-body-rate", &v, why))?
        };
    }
    if let Some(v) = m.opt_str("sticky") {
        cfg.sticky = Some(parse_mode(&v).map_err(|why| bad("--sticky", &v, why))?);
    }
    if let Some(v) = m.opt_str("sticky-secret") {
        if v.len() < 16 {
            return Err(bad("--sticky-secret", "", "use at least 16 characters"));
        }
        cfg.sticky_secret = Some(v);
    }
    if let Some(v) = m.opt_str("sticky-max-age") {
        cfg.sticky_max_age = parse_duration(&v).map_err(|why| bad("--sticky-max-age", &v, why))?;
    }
    if let Some(v) = m.opt_str("ws-idle-timeout") {
        cfg.ws_idle_timeout =
            Some(parse_duration(&v).map_err(|why| bad("--ws-idle-timeout", &v, why))?);
    }
    security_flags(&m, &mut cfg)?;
    cfg.upgrade_socket = m.opt_str("upgrade-socket").map(Into::into);
    cfg.takeover = m.opt_str("takeover").map(Into::into);
    cfg.backends_file = m.opt_str("backends-file").map(Into::into);
    messaging_flags(&m, &mut cfg.messaging)?;
    if let Some(v) = m.opt_str("log-format") {
        cfg.log_format = match v.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            _ => return Err(bad("--log-format", &v, "expected text or json")),
        };
    }
    cfg.check = m.opt_present("check");
    cfg.verbosity = match (m.opt_present("quiet"), m.opt_present("verbose")) {
        (true, true) => return Err(ConfigError::Usage("-q and -v exclude each other".into())),
        (true, false) => 0,
        (false, true) => 2,
        (false, false) => 1,
    };
    Ok(Command::Run(Box::new(cfg)))
}

/// Binary upgrade without a refused connection (README, "Upgrading").
fn upgrade_options(o: &mut getopts::Options) {
    o.optopt(
        "",
        "upgrade-socket",
        "listen on this Unix socket for a new wslb started with --takeover; SIGUSR2 starts one itself (same binary path and flags) through a temporary socket [default: SIGUSR2 only]",
        "PATH",
    );
    o.optopt(
        "",
        "backends-file",
        "static backends, one -B value per line (URL[,weight=N,max_connections=M], # comments), added to the -B ones and re-read on SIGHUP; run-time changes made through the admin API do not survive a restart, this file does [default: none]",
        "FILE",
    );
    o.optopt(
        "",
        "takeover",
        "take the listening sockets of the wslb at this --upgrade-socket; it stops accepting and drains once this one serves",
        "PATH",
    );
}

/// Issue 15's flags, in one block: each relaxes a default, none tightens another flag.
fn security_options(o: &mut getopts::Options) {
    o.optmulti(
        "",
        "backend-allow",
        "registered bindings may also point into this block, e.g. 10.0.0.0/8 (repeatable) [default: only the registering peer's own address]",
        "CIDR",
    );
    o.optmulti(
        "",
        "trusted-proxy",
        "keep X-Forwarded-For/Forwarded from peers in this block, e.g. 10.0.0.0/8; with --proxy-protocol, the peers allowed to send the PROXY header (repeatable) [default: none, they are replaced]",
        "CIDR",
    );
    o.optflag(
        "",
        "proxy-protocol",
        "listeners expect a PROXY protocol v1/v2 header (from an L4 balancer) before anything else, from --trusted-proxy peers only; its source address is the client's",
    );
    o.optflag(
        "",
        "forwarded",
        "send RFC 7239 Forwarded: for=... instead of X-Forwarded-For",
    );
    o.optopt(
        "",
        "token-file",
        "per-backend tokens, one `guid token` per line; a token registers only its guid; re-read on SIGHUP",
        "FILE",
    );
    o.optopt(
        "",
        "control-client-ca",
        "with --control-tls: verify client certificates against this CA (PEM); a certificate's first DNS name is the only guid it may register",
        "FILE",
    );
}

fn security_flags(m: &getopts::Matches, cfg: &mut Config) -> Result<(), ConfigError> {
    for v in m.opt_strs("backend-allow") {
        cfg.backend_allow
            .push(crate::netpolicy::parse_cidr(&v).map_err(|why| bad("--backend-allow", &v, why))?);
    }
    for v in m.opt_strs("trusted-proxy") {
        cfg.trusted_proxies
            .push(crate::netpolicy::parse_cidr(&v).map_err(|why| bad("--trusted-proxy", &v, why))?);
    }
    cfg.forwarded = m.opt_present("forwarded");
    cfg.proxy_protocol = m.opt_present("proxy-protocol");
    if cfg.proxy_protocol && cfg.trusted_proxies.is_empty() {
        // Without a trusted peer every connection would be refused.
        return Err(ConfigError::Usage(
            "--proxy-protocol needs --trusted-proxy CIDR (the L4 balancers allowed to send the header)".into(),
        ));
    }
    cfg.token_file = m.opt_str("token-file").map(Into::into);
    cfg.control_client_ca = m.opt_str("control-client-ca").map(Into::into);
    if cfg.control_client_ca.is_some() && !cfg.control_tls {
        return Err(ConfigError::Usage(
            "--control-client-ca needs --control-tls".into(),
        ));
    }
    Ok(())
}

/// Which clients a registered backend may message (`--backend-messages`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageScope {
    /// Every WebSocket client of this balancer (a chat room spread over backends).
    All,
    /// Only the clients paired with the sending backend.
    Own,
    /// No backend messaging: every request is answered `not_allowed`.
    Off,
}

/// Issue 17's flags: the client-id header and backend → client messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Messaging {
    /// Header carrying the client's id to backends (`--client-id-header`); `None` = off.
    pub client_id_header: Option<String>,
    /// This balancer's part of every client id (`--instance-id`); empty = a random one is
    /// drawn at bind, so ids from two balancers never collide.
    pub instance_id: String,
    /// Largest payload of one backend message (`--message-max`).
    pub max_payload: usize,
    /// Requests per second per backend, bursts as large (`--message-rate`); 0 = unlimited.
    pub rate: u32,
    /// Bytes of injected frames queued for one client before it is closed with 1013
    /// (`--client-queue-max`): a client that does not read cannot hold a broadcast back.
    pub client_queue_max: usize,
    /// Which clients a backend may reach.
    pub scope: MessageScope,
}

/// Highest `--message-max` and `--client-queue-max`.
pub const MESSAGE_MAX_CEILING: usize = 1 << 20;

/// An instance id: 1-32 characters of `A-Z a-z 0-9 - _` (no dot: in a client id
/// `INSTANCE.N` the last dot separates the number).
pub fn valid_instance(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
}

/// Default `--client-id-header`.
pub const CLIENT_ID_HEADER: &str = crate::http::rewrite::DEFAULT_CLIENT_ID_HEADER;

impl Default for Messaging {
    fn default() -> Self {
        Messaging {
            client_id_header: Some(CLIENT_ID_HEADER.to_string()),
            instance_id: String::new(),
            max_payload: 64 * 1024,
            rate: 1000,
            client_queue_max: 1 << 20,
            scope: MessageScope::All,
        }
    }
}

fn messaging_options(o: &mut getopts::Options) {
    o.optopt(
        "",
        "client-id-header",
        "header carrying the client's id (INSTANCE.N) to backends; the same header from clients is removed; `off` disables [default: X-Wslb-Client]",
        "NAME",
    );
    o.optopt(
        "",
        "instance-id",
        "this balancer's prefix of client ids, 1-32 of A-Z a-z 0-9 - _ [default: random]",
        "ID",
    );
    o.optopt(
        "",
        "message-max",
        "largest payload a backend may broadcast or send, at most 1MiB [default: 64KiB]",
        "SIZE",
    );
    o.optopt(
        "",
        "message-rate",
        "messaging requests per second per backend (bursts as large); 0 = unlimited [default: 1000]",
        "N",
    );
    o.optopt(
        "",
        "client-queue-max",
        "bytes of balancer frames queued for one client before it is closed with 1013, at most 1MiB [default: 1MiB]",
        "SIZE",
    );
    o.optopt(
        "",
        "backend-messages",
        "all | own | off: which clients a registered backend may message [default: all]",
        "WHO",
    );
}

fn messaging_flags(m: &getopts::Matches, msg: &mut Messaging) -> Result<(), ConfigError> {
    const CEILING: u64 = MESSAGE_MAX_CEILING as u64;
    if let Some(v) = m.opt_str("client-id-header") {
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        msg.client_id_header = match v.as_str() {
            "off" => None,
            name if !name.is_empty() && name.len() <= 64 && name.bytes().all(token) => {
                Some(name.to_string())
            }
            _ => {
                return Err(bad(
                    "--client-id-header",
                    &v,
                    "expected a header name (1-64 token characters) or off",
                ))
            }
        };
    }
    if let Some(v) = m.opt_str("instance-id") {
        if !valid_instance(&v) {
            return Err(bad(
                "--instance-id",
                &v,
                "expected 1-32 characters of A-Z a-z 0-9 - _",
            ));
        }
        msg.instance_id = v;
    }
    let sizes: [(&'static str, &mut usize); 2] = [
        ("--message-max", &mut msg.max_payload),
        ("--client-queue-max", &mut msg.client_queue_max),
    ];
    for (flag, slot) in sizes {
        if let Some(v) = m.opt_str(flag.trim_start_matches('-')) {
            let n = parse_size(&v).map_err(|why| bad(flag, &v, why))?;
            if n == 0 || n > CEILING {
                return Err(bad(flag, &v, "expected a size from 1 byte to 1MiB"));
            }
            *slot = n as usize;
        }
    }
    if let Some(v) = m.opt_str("message-rate") {
        msg.rate = v
            .parse()
            .map_err(|_| bad("--message-rate", &v, "expected a number (0 = unlimited)"))?;
    }
    if let Some(v) = m.opt_str("backend-messages") {
        msg.scope = match v.as_str() {
            "all" => MessageScope::All,
            "own" => MessageScope::Own,
            "off" => MessageScope::Off,
            _ => return Err(bad("--backend-messages", &v, "expected all, own or off")),
        };
    }
    Ok(())
}

fn bad(flag: &'static str, value: &str, why: &'static str) -> ConfigError {
    ConfigError::Value {
        flag,
        value: value.to_string(),
        why,
    }
}

/// Maps a getopts long name to its `--flag` spelling for error lines.
fn flag_name(name: &str) -> &'static str {
    match name {
        "header-timeout" => "--header-timeout",
        "connect-timeout" => "--connect-timeout",
        "idle-timeout" => "--idle-timeout",
        "heartbeat" => "--heartbeat",
        _ => "--drain-timeout",
    }
}

/// `10s`, `500ms`, `2m`, `1h`, or a bare number of seconds. Zero is refused: every deadline
/// here protects something.
pub fn parse_duration(v: &str) -> Result<Duration, &'static str> {
    const WHY: &str = "expected a duration like 500ms, 10s, 2m or 1h";
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    if num.is_empty() || num.len() > 12 {
        return Err(WHY);
    }
    let n: u64 = num.parse().map_err(|_| WHY)?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(WHY),
    };
    if d.is_zero() {
        return Err("duration must be greater than zero");
    }
    Ok(d)
}

/// `65536`, `64KiB`, `16MiB`, `1GiB` (also `k`/`m`/`g`, `KB`/`MB`/`GB` as binary multiples).
pub fn parse_size(v: &str) -> Result<u64, &'static str> {
    const WHY: &str = "expected a size like 65536, 64KiB or 16MiB";
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    if num.is_empty() || num.len() > 15 {
        return Err(WHY);
    }
    let n: u64 = num.parse().map_err(|_| WHY)?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(WHY),
    };
    match n.checked_mul(mult) {
        Some(0) => Err("size must be greater than zero"),
        Some(s) => Ok(s),
        None => Err(WHY),
    }
}

pub fn parse_addr(v: &str) -> Result<SocketAddr, &'static str> {
    const WHY: &str = "expected host:port, e.g. 127.0.0.1:8080";
    if let Ok(a) = v.parse::<SocketAddr>() {
        return Ok(a);
    }
    // Names (localhost:8080) resolve once here, at startup.
    v.to_socket_addrs().map_err(|_| WHY)?.next().ok_or(WHY)
}

/// `ws://host:port[/path]` or `http://host:port[/path]` then optional `,weight=N`.
pub fn parse_backend(v: &str) -> Result<BackendSpec, &'static str> {
    let mut parts = v.split(',');
    let url = parts.next().unwrap_or_default().trim();
    let mut weight = 1u32;
    let mut max_connections = 0u32;
    let mut proxy = None;
    for opt in parts {
        match opt.trim().split_once('=') {
            Some(("weight", w)) => {
                weight = match w.parse::<u32>() {
                    Ok(n) if (1..=1000).contains(&n) => n,
                    _ => return Err("weight must be an integer from 1 to 1000"),
                }
            }
            Some(("max_connections", m)) => {
                max_connections = m
                    .parse::<u32>()
                    .map_err(|_| "max_connections must be a non-negative integer")?;
            }
            Some(("proxy", v)) => {
                proxy = Some(
                    crate::net::proxy_protocol::Version::parse(v)
                        .ok_or("proxy must be v1 or v2")?,
                )
            }
            _ => {
                return Err(
                    "unknown backend option; expected weight=N, max_connections=N or proxy=v1|v2",
                )
            }
        }
    }
    let authority = parse_backend_url(url)?;
    let addr = parse_addr(authority).map_err(|_| "backend host:port does not resolve")?;
    Ok(BackendSpec {
        url: url.to_string(),
        authority: authority.to_string(),
        addr,
        weight,
        tls: is_tls_url(url),
        max_connections,
        proxy,
    })
}

/// `--backends-file`: one `-B` value per line; blank lines and `#` comments are skipped.
/// The first bad line fails the whole file (a reload then keeps the backends it had).
pub fn parse_backends_file(text: &str) -> Result<Vec<BackendSpec>, String> {
    let mut specs: Vec<BackendSpec> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let spec = parse_backend(line).map_err(|why| format!("line {}: {why}", i + 1))?;
        if specs.iter().any(|s| s.url == spec.url) {
            return Err(format!("line {}: {} is listed twice", i + 1, spec.url));
        }
        specs.push(spec);
    }
    Ok(specs)
}

/// Is this a `wss://` or `https://` URL (TLS to the backend)?
pub fn is_tls_url(url: &str) -> bool {
    url.starts_with("wss://") || url.starts_with("https://")
}

/// Host part of a `host:port` authority, without IPv6 brackets (the TLS server name).
pub fn authority_host(authority: &str) -> &str {
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Returns the `host:port` of a backend URL. A pure function so the fuzzer can call it.
pub fn parse_backend_url(url: &str) -> Result<&str, &'static str> {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("http://"))
        .or_else(|| url.strip_prefix("wss://"))
        .or_else(|| url.strip_prefix("https://"))
        .ok_or("expected a ws://, wss://, http:// or https:// URL")?;
    let authority = rest.split('/').next().unwrap_or_default();
    let port = authority
        .rsplit_once(':')
        .map(|(_, p)| p)
        .ok_or("backend URL needs an explicit port")?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(authority),
        _ => Err("backend port must be 1-65535"),
    }
}

fn parse_protocols(v: &str) -> Result<(bool, bool), &'static str> {
    let (mut ws, mut http) = (false, false);
    for p in v.split(',') {
        match p.trim() {
            "ws" | "websocket" => ws = true,
            "http" => http = true,
            _ => return Err("expected a comma list of ws and http"),
        }
    }
    Ok((ws, http))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Config, ConfigError> {
        match parse_args(args)? {
            Command::Run(c) => Ok(*c),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "s", "10x", "-1s", "1.5s", "0s", "99999999999999s", " "] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("16m"), Ok(16 << 20));
        assert_eq!(parse_size("100"), Ok(100));
        for bad in ["", "0", "1TB", "KiB", "999999999999999g"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn backends() {
        let b = parse_backend("ws://127.0.0.1:9001,weight=3").unwrap();
        assert_eq!(b.weight, 3);
        assert_eq!(b.authority, "127.0.0.1:9001");
        assert_eq!(b.addr, "127.0.0.1:9001".parse().unwrap());
        assert!(parse_backend("http://127.0.0.1:9001/x").is_ok());
        assert_eq!(b.proxy, None);
        let p = parse_backend("ws://127.0.0.1:9001,proxy=v2,weight=2").unwrap();
        assert_eq!(
            (p.proxy, p.weight),
            (Some(crate::net::proxy_protocol::Version::V2), 2)
        );
        for bad in [
            "ws://127.0.0.1:1,proxy=v3",
            "ws://127.0.0.1:1,proxy=",
            "ftp://x:1",
            "ws://127.0.0.1",
            "ws://127.0.0.1:0",
            "ws://127.0.0.1:70000",
            "ws://127.0.0.1:1,weight=0",
            "ws://127.0.0.1:1,color=red",
        ] {
            assert!(parse_backend(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn flags_name_themselves() {
        let e = run(&["--algorithm", "nope"]).unwrap_err();
        assert!(e.to_string().contains("--algorithm"));
        let e = run(&["--header-timeout", "10x"]).unwrap_err();
        assert!(e.to_string().contains("--header-timeout"));
        let e = run(&["--drain-timeout", "0"]).unwrap_err();
        assert!(e.to_string().contains("--drain-timeout"));
        assert!(matches!(run(&["--bogus"]), Err(ConfigError::Usage(_))));
        assert!(matches!(run(&["stray"]), Err(ConfigError::Usage(_))));
        for (flag, value) in [
            ("--max-connections-per-ip", "0"),
            ("--max-memory", "10"),
            ("--allowed-origin", "example.com"),
            ("--throttle", "fast"),
            ("--ws-idle-timeout", "never"),
        ] {
            let e = run(&[flag, value]).unwrap_err();
            assert!(e.to_string().contains(flag), "{e}");
        }
        let c = run(&[
            "--max-memory",
            "1MiB",
            "--throttle",
            "64KiB/s",
            "--allowed-origin",
            "https://a.example/",
        ])
        .unwrap();
        assert_eq!(
            c.max_connections,
            (1 << 20) / (2 * crate::net::buffer::BUF_SIZE + 2048)
        );
        assert_eq!(c.throttle, 64 << 10);
        assert_eq!(c.allowed_origins, ["https://a.example"]);
    }

    #[test]
    fn full_command_line() {
        let c = run(&[
            "-l",
            "127.0.0.1:0",
            "-B",
            "ws://127.0.0.1:9001",
            "-B",
            "http://127.0.0.1:9002,weight=2",
            "-a",
            "p2c",
            "--protocols",
            "ws",
            "--idle-timeout",
            "5s",
            "-q",
        ])
        .unwrap();
        assert_eq!(c.backends.len(), 2);
        assert_eq!(c.algorithm, Algorithm::PowerOfTwo);
        assert!(c.websocket && !c.http);
        assert_eq!(c.idle_timeout, Duration::from_secs(5));
        assert_eq!(c.verbosity, 0);
    }

    #[test]
    fn security_flags_parse() {
        let c = run(&[
            "--backend-allow",
            "10.0.0.0/8",
            "--backend-allow",
            "fd00::/8",
            "--trusted-proxy",
            "127.0.0.1",
            "--forwarded",
            "--token-file",
            "/tmp/t",
        ])
        .unwrap();
        assert_eq!(c.backend_allow.len(), 2);
        assert_eq!(c.trusted_proxies.len(), 1);
        assert!(c.forwarded);
        assert_eq!(
            c.token_file.as_deref(),
            Some(std::path::Path::new("/tmp/t"))
        );
        assert!(matches!(
            run(&["--control-client-ca", "/tmp/ca.pem"]),
            Err(ConfigError::Usage(_))
        ));
        let d = run(&[]).unwrap();
        assert!(d.backend_allow.is_empty() && d.trusted_proxies.is_empty() && !d.forwarded);
        for flag in ["--backend-allow", "--trusted-proxy"] {
            let e = run(&[flag, "10.0.0.1/8"]).unwrap_err();
            assert!(e.to_string().contains(flag), "{e}");
        }
    }

    #[test]
    fn backends_file_lines() {
        let specs = parse_backends_file(
            "# pool A\nws://127.0.0.1:9001\n\n  http://127.0.0.1:9002,weight=3,max_connections=50  # big\n",
        )
        .unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!((specs[1].weight, specs[1].max_connections), (3, 50));
        let e = parse_backends_file("ws://127.0.0.1:9001\nws://nohost\n").unwrap_err();
        assert!(e.starts_with("line 2: "), "{e}");
        let e = parse_backends_file("ws://127.0.0.1:1\nws://127.0.0.1:1,weight=2\n").unwrap_err();
        assert!(e.contains("twice"), "{e}");
        assert!(parse_backends_file("ws://127.0.0.1:1,weight=0").is_err());
        assert!(parse_backends_file("").unwrap().is_empty());
    }

    #[test]
    fn spread_close_flags() {
        let c = run(&[]).unwrap();
        assert_eq!(
            (c.backend_drain_window, c.rebalance),
            (Some(Duration::from_secs(60)), 0)
        );
        let c = run(&["--backend-drain-window", "off", "--rebalance", "50"]).unwrap();
        assert_eq!((c.backend_drain_window, c.rebalance), (None, 50));
        let c = run(&["--backend-drain-window", "5s", "--rebalance", "off"]).unwrap();
        assert_eq!(
            (c.backend_drain_window, c.rebalance),
            (Some(Duration::from_secs(5)), 0)
        );
        for (flag, value) in [
            ("--backend-drain-window", "0"),
            ("--backend-drain-window", "soon"),
            ("--rebalance", "0"),
            ("--rebalance", "-3"),
            ("--rebalance", "1.5"),
        ] {
            let e = run(&[flag, value]).unwrap_err();
            assert!(e.to_string().contains(flag), "{e}");
        }
    }

    #[test]
    fn messaging_flags_parse() {
        let d = run(&[]).unwrap().messaging;
        assert_eq!(d, Messaging::default());
        let c = run(&[
            "--client-id-header",
            "X-Client",
            "--instance-id",
            "lb-1",
            "--message-max",
            "1KiB",
            "--message-rate",
            "0",
            "--client-queue-max",
            "4096",
            "--backend-messages",
            "own",
        ])
        .unwrap()
        .messaging;
        assert_eq!(c.client_id_header.as_deref(), Some("X-Client"));
        assert_eq!(
            (c.instance_id.as_str(), c.max_payload, c.rate),
            ("lb-1", 1024, 0)
        );
        assert_eq!((c.client_queue_max, c.scope), (4096, MessageScope::Own));
        let off = run(&["--client-id-header", "off"]).unwrap().messaging;
        assert_eq!(off.client_id_header, None);
        for (flag, v) in [
            ("--client-id-header", "X Client"),
            ("--instance-id", "a.b"),
            ("--message-max", "2MiB"),
            ("--client-queue-max", "0"),
            ("--message-rate", "-1"),
            ("--backend-messages", "some"),
        ] {
            let e = run(&[flag, v]).unwrap_err();
            assert!(e.to_string().contains(flag), "{e}");
        }
    }
}
