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
pub mod load;
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
    /// Issue 18: URLs dispatched clients connect to directly (`--public-binding`).
    pub public_bindings: Vec<String>,
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
            public_bindings: Vec::new(),
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

mod config;
mod link;

use config::*;
use link::*;

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
    /// Issue 18: the client count to report with each heartbeat (`load`).
    load: Option<u32>,
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
            load: None,
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

#[cfg(test)]
mod tests;
