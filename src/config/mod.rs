//! Command-line flags into a [`Config`]. Pure: parsing never touches the network.
//! The types are here; `flags` reads the command line, `values` parses single values
//! (durations, sizes, addresses, backend URLs, the backends file).
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
    /// `public=URL` (repeatable): what dispatched clients connect to (issue 18).
    pub public: Vec<String>,
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
    /// Issue 18: `--dispatch-path`: the proxy listener answers there with a backend's
    /// public binding instead of proxying (off when `None`).
    pub dispatch_path: Option<String>,
    /// `--dispatch-secret` / env `WSLB_DISPATCH_SECRET`: dispatched URLs carry a signed ticket.
    pub dispatch_secret: Option<String>,
    /// `--dispatch-ttl`: how long a dispatch answer (and its ticket) stays valid.
    pub dispatch_ttl: Duration,
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
            dispatch_path: None,
            dispatch_secret: None,
            dispatch_ttl: Duration::from_secs(60),
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

mod dispatch;
mod flags;
mod values;

pub use dispatch::*;
pub use flags::parse_args;
pub use values::*;

#[cfg(test)]
mod tests;
