//! The backend side of registration (docs/PROTOCOL.md): hold one control WebSocket open to
//! each balancer, announce this backend on it, and reconnect forever.
//!
//! One blocking thread per balancer URL: a registration link is one socket that is idle
//! almost all the time, so a thread with a short read timeout is the simplest correct shape
//! (no event loop to embed in the backend's own runtime). Each thread:
//!
//! connect → `register` → wait for `registered` → read with a short timeout, pinging every
//! heartbeat and treating 3 silent heartbeats as a lost link → on any loss, back off
//! (exponential, jittered) and start again, until [`Agent::stop`].
//!
//! ```no_run
//! use wslb::agent::{spawn, AgentConfig};
//! let agent = spawn(AgentConfig::new("ws://127.0.0.1:9090/register", "ws://127.0.0.1:9001"))?;
//! // ... serve clients ...
//! agent.stop();
//! # Ok::<(), wslb::agent::AgentError>(())
//! ```

pub mod cli;
pub mod local;
mod messages;

pub use crate::control::messaging::{ClientRef, Filter, Payload};
pub use messages::{MessageError, Messenger, ANSWER_TIMEOUT};

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rand::rngs::{SmallRng, StdRng};
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::HandshakeError;
use tungstenite::http::header::{HeaderValue, AUTHORIZATION};
use tungstenite::http::Uri;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tungstenite::{Bytes, Message, WebSocket};

use crate::control::protocol::{self, BackendMsg, Registration, MAX_BINDINGS, MAX_TAGS};

/// TCP connect deadline per balancer address.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The WebSocket upgrade must complete within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A write that cannot progress for this long means the balancer is gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest read timeout: how quickly a link thread notices `drain`/`stop` requests and
/// writes queued messages (a message call waits about this long at most for its turn).
const MAX_TICK: Duration = Duration::from_millis(10);
/// On stop: time for the `deregistered` answer and the closing handshake.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);
/// [`Agent::stop`] waits this long for the link threads, then leaves them to finish alone.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);
/// Liveness window, in heartbeats (docs/PROTOCOL.md: 3 silent intervals = lost).
const MISSED_HEARTBEATS: u32 = 3;

/// What the agent announces and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// Control URLs `ws://HOST:PORT/register`, one link (and thread) each.
    pub balancers: Vec<String>,
    /// Where clients are sent: `ws://IP:PORT` or `http://IP:PORT` (1-16).
    pub bindings: Vec<String>,
    /// Stable id; re-registering under it replaces the older entry on the balancer.
    pub guid: String,
    /// Sent as `Authorization: Bearer TOKEN` when set.
    pub token: Option<String>,
    /// Relative weight, 1-1000.
    pub weight: u32,
    /// Most client connections at once, 0 = no limit.
    pub max_connections: u32,
    /// Free-form labels (up to 32).
    pub tags: BTreeMap<String, String>,
    /// PROXY header the balancers put before each connection to this backend.
    pub proxy_protocol: Option<crate::net::proxy_protocol::Version>,
    /// Ping interval; 3 silent intervals mean the link is lost.
    pub heartbeat: Duration,
    /// First reconnect delay (and the floor of every jittered delay).
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// CA certificates (PEM) for `wss://` balancers; `None` = the platform's roots.
    pub balancer_ca: Option<std::path::PathBuf>,
}

impl AgentConfig {
    /// One balancer, one binding, a random guid, protocol defaults.
    pub fn new(balancer: &str, binding: &str) -> Self {
        AgentConfig {
            balancers: vec![balancer.to_string()],
            bindings: vec![binding.to_string()],
            guid: random_guid(),
            token: None,
            weight: 1,
            max_connections: 0,
            proxy_protocol: None,
            tags: BTreeMap::new(),
            heartbeat: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            balancer_ca: None,
        }
    }
}

/// A random 16-hex-digit guid: unique per process, so a restarted backend without a
/// configured guid simply registers as a new one (its old entry left with its connection).
pub fn random_guid() -> String {
    format!("{:016x}", StdRng::from_os_rng().random::<u64>())
}

/// The state of one balancer link, as reported by [`Agent::status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Connecting, or connected and waiting for `registered`.
    Connecting,
    /// `registered` received: the balancer may send clients here.
    Registered,
    /// Lost or refused; waiting before the next attempt.
    Backoff,
    /// The link thread has ended (after [`Agent::stop`]).
    Stopped,
}

/// A configuration [`spawn`] refuses. Each variant names the field at fault so a command
/// line can name its flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentError {
    /// No balancer URL.
    NoBalancer,
    /// A balancer URL that is not `ws://HOST[:PORT]/PATH`.
    Balancer {
        /// The URL as given.
        url: String,
        /// What was expected.
        why: &'static str,
    },
    /// No binding, or more than [`MAX_BINDINGS`].
    BindingCount,
    /// A binding that is not `ws://IP:PORT` / `http://IP:PORT`.
    Binding {
        /// The URL as given.
        url: String,
        /// What was expected.
        why: &'static str,
    },
    /// The guid is not 1-128 characters of `A-Z a-z 0-9 - _ . :`.
    Guid,
    /// The weight is outside 1-1000.
    Weight,
    /// More than [`MAX_TAGS`] tags.
    Tags,
    /// The token cannot be sent in an HTTP header (visible ASCII only).
    Token,
    /// The TLS setup for `wss://` balancers failed (unreadable CA file...).
    Tls(String),
    /// A zero heartbeat or back-off, or `backoff_min > backoff_max`.
    Timing(&'static str),
    /// The balancer would refuse this registration (the codec's own check).
    Registration(&'static str),
    /// A link thread could not be started.
    Spawn(String),
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentError::NoBalancer => f.write_str("at least one balancer URL is needed"),
            AgentError::Tls(e) => write!(f, "balancer TLS: {e}"),
            AgentError::Balancer { url, why } => write!(f, "balancer {url:?}: {why}"),
            AgentError::BindingCount => {
                write!(f, "between 1 and {MAX_BINDINGS} bindings are needed")
            }
            AgentError::Binding { url, why } => write!(f, "binding {url:?}: {why}"),
            AgentError::Guid => f.write_str("guid must be 1-128 characters of A-Z a-z 0-9 - _ . :"),
            AgentError::Weight => f.write_str("weight must be an integer from 1 to 1000"),
            AgentError::Tags => write!(f, "at most {MAX_TAGS} tags"),
            AgentError::Token => f.write_str("token must be visible ASCII"),
            AgentError::Timing(why) | AgentError::Registration(why) => f.write_str(why),
            AgentError::Spawn(e) => write!(f, "cannot start agent thread: {e}"),
        }
    }
}

impl std::error::Error for AgentError {}

/// A balancer URL, checked once in [`spawn`] so link threads never fail on it.
#[derive(Debug, Clone)]
struct Target {
    /// Normalised URL (path defaults to `/register`), used in logs and the request.
    url: String,
    /// Host without IPv6 brackets, resolved by the link thread on each attempt (a balancer
    /// that moves to a new address is found again).
    host: String,
    port: u16,
    /// `wss://`: TLS to the balancer's control listener.
    tls: bool,
}

fn parse_balancer(url: &str) -> Result<Target, AgentError> {
    let bad = |why| AgentError::Balancer {
        url: url.to_string(),
        why,
    };
    let uri: Uri = url
        .parse()
        .map_err(|_| bad("expected ws://HOST:PORT/register"))?;
    match uri.scheme_str() {
        Some("ws") => {}
        Some("wss") => {}
        _ => return Err(bad("expected a ws:// or wss:// URL")),
    }
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| bad("missing host"))?;
    let tls = uri.scheme_str() == Some("wss");
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    if port == 0 {
        return Err(bad("port must be 1-65535"));
    }
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or(host);
    if authority.contains('@') {
        return Err(bad(
            "credentials in the URL are not supported; use the token",
        ));
    }
    // The balancer answers 404 on any other path; a bare `ws://host:port` means the default.
    let path = match uri.path_and_query().map(|p| p.as_str()) {
        None | Some("") | Some("/") => "/register",
        Some(p) => p,
    };
    Ok(Target {
        url: format!("{}://{authority}{path}", if tls { "wss" } else { "ws" }),
        tls,
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port,
    })
}

fn valid_guid(g: &str) -> bool {
    (1..=128).contains(&g.len())
        && g.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// Everything a link thread needs, prepared once.
struct Prepared {
    targets: Vec<Target>,
    /// Client TLS configuration, when a balancer is `wss://`.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The encoded `register` message, identical on every link and every attempt.
    register: String,
    auth: Option<HeaderValue>,
}

/// Checks `cfg` as [`spawn`] would, without starting anything.
pub fn validate(cfg: &AgentConfig) -> Result<(), AgentError> {
    prepare(cfg).map(|_| ())
}

fn prepare(cfg: &AgentConfig) -> Result<Prepared, AgentError> {
    if cfg.balancers.is_empty() {
        return Err(AgentError::NoBalancer);
    }
    let targets = cfg
        .balancers
        .iter()
        .map(|b| parse_balancer(b))
        .collect::<Result<Vec<_>, _>>()?;
    if cfg.bindings.is_empty() || cfg.bindings.len() > MAX_BINDINGS {
        return Err(AgentError::BindingCount);
    }
    let addrs = cfg
        .bindings
        .iter()
        .map(|b| {
            protocol::binding_addr(b).map_err(|why| AgentError::Binding {
                url: b.clone(),
                why,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if !valid_guid(&cfg.guid) {
        return Err(AgentError::Guid);
    }
    if !(1..=1000).contains(&cfg.weight) {
        return Err(AgentError::Weight);
    }
    if cfg.tags.len() > MAX_TAGS {
        return Err(AgentError::Tags);
    }
    if cfg.heartbeat.is_zero() {
        return Err(AgentError::Timing("heartbeat must be greater than zero"));
    }
    if cfg.backoff_min.is_zero() || cfg.backoff_min > cfg.backoff_max {
        return Err(AgentError::Timing(
            "back-off must satisfy 0 < backoff_min <= backoff_max",
        ));
    }
    let auth = match &cfg.token {
        None => None,
        Some(t) => {
            let mut v =
                HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| AgentError::Token)?;
            // Keeps the token out of any Debug output of the request.
            v.set_sensitive(true);
            Some(v)
        }
    };
    let msg = BackendMsg::Register(Registration {
        guid: cfg.guid.clone(),
        bindings: cfg.bindings.clone(),
        addrs,
        weight: cfg.weight,
        max_connections: cfg.max_connections,
        tags: cfg.tags.clone(),
        proxy_protocol: cfg.proxy_protocol,
    });
    let register = protocol::encode(&msg);
    // The balancer's own decoder is the final word: never send what it would refuse.
    match protocol::decode(&register) {
        Ok(BackendMsg::Register(_)) => {}
        Ok(_) => {
            return Err(AgentError::Registration(
                "register encodes as another message",
            ))
        }
        Err(protocol::ControlError::BadField(why)) => return Err(AgentError::Registration(why)),
        Err(protocol::ControlError::TooLarge) => {
            return Err(AgentError::Registration("registration larger than 64 KiB"))
        }
        Err(_) => {
            return Err(AgentError::Registration(
                "registration refused by the codec",
            ))
        }
    }
    let tls = if targets.iter().any(|t| t.tls) {
        let cfg = crate::net::tls::client_config(cfg.balancer_ca.as_deref(), false)
            .map_err(|e| AgentError::Tls(e.to_string()))?;
        Some(cfg)
    } else {
        None
    };
    Ok(Prepared {
        targets,
        tls,
        register,
        auth,
    })
}

/// What the link threads and the [`Agent`] handle share, behind one lock.
#[derive(Debug)]
struct Board {
    stop: bool,
    drain: bool,
    links: Vec<LinkState>,
    /// Per link: `drain_complete` heard on its current connection (the balancer has no
    /// client of ours left).
    drained: Vec<bool>,
    /// Link threads not yet finished: [`Agent::stop`] waits for 0.
    running: usize,
    /// Messages to clients and their answers.
    mail: messages::Mailboxes,
}

#[derive(Debug)]
struct Shared {
    board: Mutex<Board>,
    /// Signalled on every change of `board`.
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Board> {
        // A panicking link thread must not take the others down: the board stays usable.
        self.board.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, f: impl FnOnce(&mut Board)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }
}

/// Running registration links; see the module docs. Dropping it stops them like [`Agent::stop`].
#[derive(Debug)]
pub struct Agent {
    urls: Vec<String>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// Validates `cfg` and starts one link thread per balancer.
pub fn spawn(cfg: AgentConfig) -> Result<Agent, AgentError> {
    let prepared = prepare(&cfg)?;
    let n = prepared.targets.len();
    let shared = Arc::new(Shared {
        board: Mutex::new(Board {
            stop: false,
            drain: false,
            links: vec![LinkState::Connecting; n],
            drained: vec![false; n],
            running: 0,
            mail: messages::Mailboxes::new(n),
        }),
        changed: Condvar::new(),
    });
    let mut agent = Agent {
        urls: prepared.targets.iter().map(|t| t.url.clone()).collect(),
        shared: Arc::clone(&shared),
        threads: Vec::with_capacity(n),
    };
    for (index, target) in prepared.targets.into_iter().enumerate() {
        let link = Link {
            index,
            target,
            register: prepared.register.clone(),
            auth: prepared.auth.clone(),
            guid: cfg.guid.clone(),
            tls: prepared.tls.clone(),
            heartbeat: cfg.heartbeat,
            backoff_min: cfg.backoff_min,
            backoff_max: cfg.backoff_max,
            shared: Arc::clone(&shared),
        };
        shared.update(|b| b.running += 1);
        let spawned = thread::Builder::new()
            .name(format!("wslb-agent-{index}"))
            .spawn(move || link.run());
        match spawned {
            Ok(h) => agent.threads.push(h),
            Err(e) => {
                shared.update(|b| b.running -= 1);
                // Dropping `agent` stops the links already started.
                return Err(AgentError::Spawn(e.to_string()));
            }
        }
    }
    Ok(agent)
}

impl Agent {
    /// Each balancer URL (normalised) with its link's state.
    pub fn status(&self) -> Vec<(String, LinkState)> {
        let board = self.shared.lock();
        self.urls
            .iter()
            .cloned()
            .zip(board.links.iter().copied())
            .collect()
    }

    /// Waits until every link is registered; `false` if `timeout` passed first.
    pub fn wait_registered(&self, timeout: Duration) -> bool {
        let board = self.shared.lock();
        let (board, _) = self
            .shared
            .changed
            .wait_timeout_while(board, timeout, |b| {
                !b.links.iter().all(|s| *s == LinkState::Registered)
            })
            .unwrap_or_else(PoisonError::into_inner);
        board.links.iter().all(|s| *s == LinkState::Registered)
    }

    /// Asks every balancer to send no new clients. Sticky: a link that reconnects later
    /// registers and then drains again, so a draining backend never becomes eligible anew.
    pub fn drain(&self) {
        self.shared.update(|b| b.drain = true);
    }

    /// After [`Agent::drain`]: waits until every registered link has heard `drain_complete`
    /// (the balancer closed or saw off all our clients), at most `timeout`; `false` if it
    /// passed first. Links not registered now are not waited for: no balancer counts
    /// clients of ours there.
    pub fn wait_drained(&self, timeout: Duration) -> bool {
        let done = |b: &Board| {
            b.links
                .iter()
                .zip(&b.drained)
                .all(|(s, d)| *s != LinkState::Registered || *d)
        };
        let board = self.shared.lock();
        let (board, _) = self
            .shared
            .changed
            .wait_timeout_while(board, timeout, |b| !done(b))
            .unwrap_or_else(PoisonError::into_inner);
        done(&board)
    }

    /// Sends `deregister` and a close 1000 on every registered link, then waits (at most a
    /// few seconds) for the link threads to end.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.update(|b| b.stop = true);
        let board = self.shared.lock();
        let (board, _) = self
            .shared
            .changed
            .wait_timeout_while(board, STOP_TIMEOUT, |b| b.running > 0)
            .unwrap_or_else(PoisonError::into_inner);
        let finished = board.running == 0;
        drop(board);
        // A thread still stuck in a connect or handshake is left to notice `stop` alone.
        for h in self.threads.drain(..) {
            if finished || h.is_finished() {
                let _ = h.join();
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shutdown();
        }
    }
}

/// A message from the balancer (docs/PROTOCOL.md, "Balancer → backend").
#[derive(Debug, Clone, PartialEq, Eq)]
enum BalancerMsg {
    /// Its `heartbeat_ms` is not needed: the balancer's pings are answered within a tick
    /// whatever its interval, and ours draw pongs at our own.
    Registered,
    /// `clients` present: the balancer will send `drain_complete` (older ones do not).
    Drained {
        clients: Option<u64>,
    },
    /// The last client of ours is gone from that balancer.
    DrainComplete,
    Deregistered,
    Unreachable {
        binding: String,
        reason: String,
    },
    Error {
        code: String,
        message: String,
    },
    /// Unknown types are ignored: a newer balancer may say more than this agent knows.
    Other,
}

fn parse_balancer_msg(text: &str) -> Option<BalancerMsg> {
    let v: Value = serde_json::from_str(text).ok()?;
    let field = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    Some(match v.get("type")?.as_str()? {
        "registered" => BalancerMsg::Registered,
        "drained" => BalancerMsg::Drained {
            clients: v.get("clients").and_then(Value::as_u64),
        },
        "drain_complete" => BalancerMsg::DrainComplete,
        "deregistered" => BalancerMsg::Deregistered,
        "unreachable" => BalancerMsg::Unreachable {
            binding: field("binding"),
            reason: field("reason"),
        },
        "error" => BalancerMsg::Error {
            code: field("code"),
            message: field("message"),
        },
        _ => BalancerMsg::Other,
    })
}

/// The next ceiling of the exponential back-off.
fn next_ceiling(cur: Duration, max: Duration) -> Duration {
    cur.saturating_mul(2).min(max)
}

/// A delay drawn uniformly from `[min, ceiling]`: jitter spreads reconnect storms after a
/// balancer restart, the floor keeps a refused agent from spinning.
fn jittered(rng: &mut impl Rng, min: Duration, ceiling: Duration) -> Duration {
    let lo = u64::try_from(min.as_micros()).unwrap_or(u64::MAX);
    let hi = u64::try_from(ceiling.as_micros())
        .unwrap_or(u64::MAX)
        .max(lo);
    Duration::from_micros(rng.random_range(lo..=hi))
}

fn log(msg: fmt::Arguments<'_>) {
    eprintln!("wslb agent: {msg}");
}

fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Why a connection ended, when it was not a requested stop.
struct Lost {
    reason: String,
    /// Reached `registered` on this connection (only then is it "lost" in the log).
    registered: bool,
    /// Reached `registered` and stayed up a full heartbeat: the back-off starts over.
    stable: bool,
    /// Refused with `replaced` or `guid_in_use`: another process holds this guid; retry
    /// slowly rather than evicting it every 100 ms.
    slow: bool,
}

impl Lost {
    fn new(reason: impl Into<String>) -> Self {
        Lost {
            reason: reason.into(),
            registered: false,
            stable: false,
            slow: false,
        }
    }
}

/// `Ok(())` for a write that went out or is queued behind a full socket buffer (the next
/// flush retries it); anything else loses the link.
fn sent(r: tungstenite::Result<()>) -> Result<(), Lost> {
    match r {
        Ok(()) => Ok(()),
        Err(tungstenite::Error::Io(e)) if would_block(&e) => Ok(()),
        Err(e) => Err(Lost::new(format!("write failed: {e}"))),
    }
}

/// One balancer link, owned by its thread.
struct Link {
    index: usize,
    target: Target,
    register: String,
    auth: Option<HeaderValue>,
    guid: String,
    tls: Option<Arc<rustls::ClientConfig>>,
    heartbeat: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
    shared: Arc<Shared>,
}

/// Decrements `running` however the thread ends.
struct Running(Arc<Shared>, usize);

impl Drop for Running {
    fn drop(&mut self) {
        let i = self.1;
        self.0.update(|b| {
            if let Some(s) = b.links.get_mut(i) {
                *s = LinkState::Stopped;
            }
            b.running = b.running.saturating_sub(1);
        });
    }
}

type Ws = WebSocket<LinkStream>;

/// The control connection: plain TCP or TLS (rustls, blocking with timeouts).
enum LinkStream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl LinkStream {
    fn tcp(&self) -> &TcpStream {
        match self {
            LinkStream::Plain(s) => s,
            LinkStream::Tls(t) => &t.sock,
        }
    }
}

impl io::Read for LinkStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            LinkStream::Plain(s) => s.read(buf),
            LinkStream::Tls(t) => t.read(buf),
        }
    }
}

impl io::Write for LinkStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            LinkStream::Plain(s) => s.write(buf),
            LinkStream::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            LinkStream::Plain(s) => s.flush(),
            LinkStream::Tls(t) => t.flush(),
        }
    }
}

impl Link {
    fn run(self) {
        let _running = Running(Arc::clone(&self.shared), self.index);
        let mut rng = SmallRng::from_os_rng();
        let mut ceiling = self.backoff_min;
        let url = &self.target.url;
        while !self.stopping() {
            self.set_state(LinkState::Connecting);
            let lost = match self.connect() {
                Err(reason) => Lost::new(reason),
                Ok(ws) => match self.session(ws) {
                    Ok(()) => break,
                    Err(lost) => lost,
                },
            };
            if lost.stable {
                ceiling = self.backoff_min;
            }
            if lost.slow {
                ceiling = self.backoff_max;
            }
            let delay = jittered(&mut rng, self.backoff_min, ceiling);
            self.set_state(LinkState::Backoff);
            log(format_args!(
                "{url}{} {}; retrying in {:.1}s",
                if lost.registered { " lost:" } else { ":" },
                lost.reason,
                delay.as_secs_f64()
            ));
            ceiling = next_ceiling(ceiling, self.backoff_max);
            if self.sleep_unless_stopped(delay) {
                break;
            }
        }
    }

    fn stopping(&self) -> bool {
        self.shared.lock().stop
    }

    fn drain_wanted(&self) -> bool {
        self.shared.lock().drain
    }

    fn set_state(&self, s: LinkState) {
        self.shared.update(|b| {
            if let Some(slot) = b.links.get_mut(self.index) {
                *slot = s;
            }
        });
    }

    fn set_drained(&self, drained: bool) {
        self.shared.update(|b| {
            if let Some(slot) = b.drained.get_mut(self.index) {
                *slot = drained;
            }
        });
    }

    /// Waits `d`; `true` if a stop was requested meanwhile (the wait ends at once).
    fn sleep_unless_stopped(&self, d: Duration) -> bool {
        let board = self.shared.lock();
        let (board, _) = self
            .shared
            .changed
            .wait_timeout_while(board, d, |b| !b.stop)
            .unwrap_or_else(PoisonError::into_inner);
        board.stop
    }

    /// TCP connect (each resolved address in turn) and the WebSocket upgrade.
    fn connect(&self) -> Result<Ws, String> {
        let t = &self.target;
        let addrs = (t.host.as_str(), t.port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {}: {e}", t.host))?;
        let mut last = format!("{} resolves to no address", t.host);
        let mut stream = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = format!("connect to {a}: {e}"),
            }
        }
        let stream = stream.ok_or(last)?;
        let setup = |s: &TcpStream| -> io::Result<()> {
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
            s.set_write_timeout(Some(WRITE_TIMEOUT))
        };
        setup(&stream).map_err(|e| format!("socket setup: {e}"))?;
        let stream = match (&self.tls, t.tls) {
            (Some(cfg), true) => {
                let name = rustls::pki_types::ServerName::try_from(t.host.clone())
                    .map_err(|e| format!("bad TLS name {}: {e}", t.host))?;
                let conn = rustls::ClientConnection::new(cfg.clone(), name)
                    .map_err(|e| format!("tls setup: {e}"))?;
                LinkStream::Tls(Box::new(rustls::StreamOwned::new(conn, stream)))
            }
            (None, true) => return Err("no TLS configuration for a wss:// balancer".into()),
            (_, false) => LinkStream::Plain(stream),
        };
        let mut req = t
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| format!("bad request: {e}"))?;
        if let Some(auth) = &self.auth {
            req.headers_mut().insert(AUTHORIZATION, auth.clone());
        }
        let config = WebSocketConfig::default()
            .max_message_size(Some(protocol::MAX_MESSAGE))
            .max_frame_size(Some(protocol::MAX_MESSAGE));
        let ws = match tungstenite::client::client_with_config(req, stream, Some(config)) {
            Ok((ws, _)) => ws,
            Err(HandshakeError::Interrupted(_)) => return Err("handshake timed out".into()),
            Err(HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
                return Err(match resp.status().as_u16() {
                    401 => {
                        "unauthorized: the balancer refused the token (set --token or WSLB_TOKEN)"
                            .to_string()
                    }
                    403 => "forbidden: a balancer without a token accepts loopback only".into(),
                    404 => "not found: wrong control path (expected /register)".into(),
                    s => format!("upgrade refused with HTTP {s}"),
                })
            }
            Err(HandshakeError::Failure(e)) => return Err(format!("handshake failed: {e}")),
        };
        let tick = (self.heartbeat / 2).min(MAX_TICK);
        ws.get_ref()
            .tcp()
            .set_read_timeout(Some(tick))
            .map_err(|e| format!("socket setup: {e}"))?;
        Ok(ws)
    }

    /// Registers and keeps the link alive. `Ok(())` = stopped on request.
    fn session(&self, ws: Ws) -> Result<(), Lost> {
        let mut inflight = Vec::new();
        let result = self.session_loop(ws, &mut inflight);
        self.fail_pending(&mut inflight);
        result
    }

    fn session_loop(&self, mut ws: Ws, inflight: &mut Vec<u64>) -> Result<(), Lost> {
        sent(ws.send(Message::text(self.register.as_str())))?;
        let opened = Instant::now();
        let mut last_rx = opened;
        let mut next_ping = opened + self.heartbeat;
        let mut registered_at: Option<Instant> = None;
        let mut drain_sent = false;
        let mut close_reason: Option<String> = None;
        let window = self.heartbeat * MISSED_HEARTBEATS;
        let result = loop {
            match ws.read() {
                Ok(msg) => {
                    last_rx = Instant::now();
                    match msg {
                        Message::Text(t) => {
                            if let Some(a) = crate::control::messaging::parse_answer(&t) {
                                self.on_answer(a, inflight);
                            } else if let Err(lost) = self.on_message(&t, &mut registered_at) {
                                break Err(lost);
                            }
                        }
                        Message::Close(frame) => {
                            // tungstenite answers the close; the next read ends the loop.
                            close_reason = Some(match frame {
                                Some(f) => {
                                    format!("closed by the balancer ({} {})", f.code, f.reason)
                                }
                                None => "closed by the balancer".into(),
                            });
                        }
                        _ => {}
                    }
                }
                Err(tungstenite::Error::Io(e)) if would_block(&e) => {}
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    break Err(Lost::new(
                        close_reason
                            .take()
                            .unwrap_or_else(|| "closed by the balancer".into()),
                    ));
                }
                Err(e) => break Err(Lost::new(e.to_string())),
            }
            let now = Instant::now();
            if registered_at.is_some() && !drain_sent && self.drain_wanted() {
                drain_sent = true;
                if let Err(lost) =
                    sent(ws.send(Message::text(protocol::encode(&BackendMsg::Drain))))
                {
                    break Err(lost);
                }
            }
            if self.stopping() {
                self.goodbye(&mut ws, registered_at.is_some());
                return Ok(());
            }
            if registered_at.is_some() {
                if let Err(lost) = self.write_outbox(&mut ws, inflight) {
                    break Err(lost);
                }
            }
            if now.duration_since(last_rx) >= window {
                break Err(Lost::new(format!(
                    "no frame from the balancer for {:.1}s",
                    window.as_secs_f64()
                )));
            }
            if registered_at.is_none() && now.duration_since(opened) >= window {
                break Err(Lost::new("no answer to register"));
            }
            if now >= next_ping {
                next_ping = now + self.heartbeat;
                if let Err(lost) = sent(ws.send(Message::Ping(Bytes::new()))) {
                    break Err(lost);
                }
            } else if let Err(lost) = sent(ws.flush()) {
                // Pushes out what a full socket buffer held back, and automatic pongs.
                break Err(lost);
            }
        };
        result.map_err(|mut lost| {
            lost.registered = registered_at.is_some();
            lost.stable = registered_at.is_some_and(|t| t.elapsed() >= self.heartbeat);
            lost
        })
    }

    fn on_message(&self, text: &str, registered_at: &mut Option<Instant>) -> Result<(), Lost> {
        let url = &self.target.url;
        match parse_balancer_msg(text) {
            Some(BalancerMsg::Registered) => {
                // Only the first `registered` of a connection is a state change.
                if registered_at.is_none() {
                    *registered_at = Some(Instant::now());
                    self.set_drained(false);
                    self.set_state(LinkState::Registered);
                    log(format_args!("registered with {url} as {}", self.guid));
                }
                Ok(())
            }
            Some(BalancerMsg::Drained { clients }) => {
                match clients {
                    Some(n) => log(format_args!("draining on {url}: {n} clients to move")),
                    None => {
                        // A balancer that will not say when our clients are gone: nothing
                        // to wait for.
                        log(format_args!("draining on {url}"));
                        self.set_drained(true);
                    }
                }
                Ok(())
            }
            Some(BalancerMsg::DrainComplete) => {
                log(format_args!("drained on {url}: no client left"));
                self.set_drained(true);
                Ok(())
            }
            Some(BalancerMsg::Deregistered) | Some(BalancerMsg::Other) => Ok(()),
            Some(BalancerMsg::Unreachable { binding, reason }) => {
                log(format_args!("{url} cannot reach {binding}: {reason}"));
                Ok(())
            }
            Some(BalancerMsg::Error { code, message }) => Err(Lost {
                // Neither clears up at once: the other holder of the guid must go first.
                slow: code == "replaced" || code == "guid_in_use",
                ..Lost::new(format!("refused: {code}: {message}"))
            }),
            None => {
                log(format_args!("{url} sent an unreadable message; ignored"));
                Ok(())
            }
        }
    }

    /// Best effort: `deregister` (after an owed `drain`), wait for its answer, close 1000.
    fn goodbye(&self, ws: &mut Ws, registered: bool) {
        let deadline = Instant::now() + GOODBYE_TIMEOUT;
        let url = &self.target.url;
        if registered {
            if sent(ws.send(Message::text(protocol::encode(&BackendMsg::Deregister)))).is_err() {
                return;
            }
            while Instant::now() < deadline {
                match ws.read() {
                    Ok(Message::Text(t)) => {
                        if parse_balancer_msg(&t) == Some(BalancerMsg::Deregistered) {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e)) if would_block(&e) => {}
                    // The balancer closes after `deregistered`; nothing more to do.
                    Err(_) => {
                        log(format_args!("deregistered from {url}"));
                        return;
                    }
                }
            }
        }
        let close = CloseFrame {
            code: CloseCode::Normal,
            reason: "stopping".into(),
        };
        if ws.close(Some(close)).is_ok() {
            while Instant::now() < deadline {
                match ws.read() {
                    Err(tungstenite::Error::Io(e)) if would_block(&e) => {}
                    Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
        if registered {
            log(format_args!("deregistered from {url}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balancer_urls() {
        let t = parse_balancer("ws://127.0.0.1:9090/register").unwrap();
        assert_eq!(
            (t.url.as_str(), t.host.as_str(), t.port),
            ("ws://127.0.0.1:9090/register", "127.0.0.1", 9090)
        );
        let t = parse_balancer("ws://lb.example:9090").unwrap();
        assert_eq!(t.url, "ws://lb.example:9090/register");
        let t = parse_balancer("ws://[::1]:9/x").unwrap();
        assert_eq!((t.host.as_str(), t.url.as_str()), ("::1", "ws://[::1]:9/x"));
        assert_eq!(parse_balancer("ws://h/register").unwrap().port, 80);
        let t = parse_balancer("wss://h/register").unwrap();
        assert!(
            t.tls && t.port == 443 && t.url == "wss://h:443/register"
                || t.url == "wss://h/register"
        );
        for bad in [
            "http://h:1/",
            "h:1",
            "ws://:1/",
            "ws://u:p@h:1/",
            "ws://h:0/",
            "",
        ] {
            assert!(parse_balancer(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn config_checks_name_the_field() {
        let ok = AgentConfig::new("ws://127.0.0.1:1/register", "ws://127.0.0.1:2");
        assert_eq!(validate(&ok), Ok(()));
        assert_eq!(ok.guid.len(), 16);
        type Check = fn(&AgentError) -> bool;
        let cases: Vec<(AgentConfig, Check)> = vec![
            (
                AgentConfig {
                    balancers: vec![],
                    ..ok.clone()
                },
                |e| *e == AgentError::NoBalancer,
            ),
            (
                AgentConfig {
                    bindings: vec![],
                    ..ok.clone()
                },
                |e| *e == AgentError::BindingCount,
            ),
            (
                AgentConfig {
                    bindings: vec!["ws://example.com:1".into()],
                    ..ok.clone()
                },
                |e| matches!(e, AgentError::Binding { .. }),
            ),
            (
                AgentConfig {
                    guid: "a b".into(),
                    ..ok.clone()
                },
                |e| *e == AgentError::Guid,
            ),
            (
                AgentConfig {
                    weight: 0,
                    ..ok.clone()
                },
                |e| *e == AgentError::Weight,
            ),
            (
                AgentConfig {
                    token: Some("x\ny".into()),
                    ..ok.clone()
                },
                |e| *e == AgentError::Token,
            ),
            (
                AgentConfig {
                    heartbeat: Duration::ZERO,
                    ..ok.clone()
                },
                |e| matches!(e, AgentError::Timing(_)),
            ),
            (
                AgentConfig {
                    backoff_min: Duration::from_secs(20),
                    ..ok.clone()
                },
                |e| matches!(e, AgentError::Timing(_)),
            ),
        ];
        for (cfg, check) in cases {
            let e = validate(&cfg).unwrap_err();
            assert!(check(&e), "{e:?}");
        }
    }

    #[test]
    fn balancer_messages() {
        assert_eq!(
            parse_balancer_msg(&protocol::registered("g", 5000)),
            Some(BalancerMsg::Registered)
        );
        assert_eq!(
            parse_balancer_msg(&protocol::ack("drained")),
            Some(BalancerMsg::Drained { clients: None })
        );
        assert_eq!(
            parse_balancer_msg(&protocol::drained(3)),
            Some(BalancerMsg::Drained { clients: Some(3) })
        );
        assert_eq!(
            parse_balancer_msg(&protocol::drain_complete(7)),
            Some(BalancerMsg::DrainComplete)
        );
        assert_eq!(
            parse_balancer_msg(&protocol::error(&protocol::ControlError::Replaced)),
            Some(BalancerMsg::Error {
                code: "replaced".into(),
                message: protocol::ControlError::Replaced.to_string()
            })
        );
        assert_eq!(
            parse_balancer_msg(&protocol::unreachable("ws://127.0.0.1:1")),
            Some(BalancerMsg::Unreachable {
                binding: "ws://127.0.0.1:1".into(),
                reason: "unreachable".into()
            })
        );
        assert_eq!(
            parse_balancer_msg(r#"{"type":"future"}"#),
            Some(BalancerMsg::Other)
        );
        assert_eq!(parse_balancer_msg("nope"), None);
        assert_eq!(parse_balancer_msg("[]"), None);
    }

    #[test]
    fn backoff_doubles_to_max_with_a_floor() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(10));
        let mut c = min;
        let mut seen = vec![];
        for _ in 0..10 {
            seen.push(c.as_millis());
            c = next_ceiling(c, max);
        }
        assert_eq!(
            seen,
            [100, 200, 400, 800, 1600, 3200, 6400, 10000, 10000, 10000]
        );
        let mut rng = SmallRng::seed_from_u64(7);
        for _ in 0..1000 {
            let d = jittered(&mut rng, min, Duration::from_millis(800));
            assert!((min..=Duration::from_millis(800)).contains(&d), "{d:?}");
        }
        assert_eq!(jittered(&mut rng, min, min), min);
    }
}
