//! One client connection and its backend leg: the state machine (`Conn`, its `Phase`, the
//! read/write rounds of `step`, deadlines), with the HTTP exchange (`exchange`), the backend
//! leg (`leg`), the WebSocket tunnel (`tunnel`) and `--throttle` (`throttle`) beside it.
//! The server owns the slab, the timers and the event loop; a `Conn` only moves bytes and
//! asks for backends through [`Ctx`].
#![deny(clippy::indexing_slicing)]

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Token};
use rand::rngs::SmallRng;
use rand::Rng;

use crate::backends::registry::Registry;
use crate::config::Config;
use crate::hooks::Hooks;
use crate::http::body::{BodyKind, BodyReader};
use crate::http::head::{self, MAX_HEAD};
use crate::http::rewrite::{self, ClientInfo};
use crate::net::buffer::Buffer;
use crate::net::endpoint::{read_into, read_some, Io, Outbox, Ready};
use crate::net::transport::{TlsStream, Transport};
use crate::observe::events::{Event, EventSink};
use crate::observe::log;
use crate::observe::metrics::Stats;
use crate::slots::CLIENT_TOKENS;
use crate::ws::frames::{encode_close_reason, Direction, FrameError, FrameTracker};
use crate::ws::handshake::{self, WsKey};
use std::collections::VecDeque;

mod dispatch;
mod exchange;
mod leg;
mod messaging;
mod phase;
mod relay;
mod rounds;
mod throttle;
mod timeouts;
mod tunnel;

use exchange::*;
use leg::*;
pub use messaging::Injected;
pub(crate) use phase::Marks;
use phase::Phase;
use relay::*;
use throttle::*;
use tunnel::*;

/// Most progress rounds per readiness turn before yielding to other connections.
const MAX_ROUNDS: usize = 32;
/// How long a closing connection waits for the peer to read what it is owed and hang up.
const LINGER: Duration = Duration::from_secs(2);
/// Most bytes read and dropped from the peers of a closing connection (like nginx's
/// lingering close): enough for a client that is still pushing a large message when it is
/// told 1009, so closing does not reset the connection before the client read the close
/// frame; a peer that sends more is cut off.
const LINGER_MAX_BYTES: u64 = 128 << 20;
/// Close code sent to the client when the backend's TCP connection ends while neither side
/// has sent a close frame. 1001 "going away" is RFC 6455's code for a server endpoint that
/// goes down, which is what happened; 1011 would claim the server hit an unexpected
/// condition, and 1014 (bad gateway, registered after RFC 6455) is refused as an invalid
/// code by older clients. The reason tells it apart from a drain.
const CLOSE_BACKEND_GONE: u16 = 1001;
/// Reason sent with [`CLOSE_BACKEND_GONE`].
const REASON_BACKEND_GONE: &str = "backend went away";
/// Close code sent to clients when the balancer shuts down.
pub const CLOSE_GOING_AWAY: u16 = 1001;

/// Which socket of a connection an event is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The accepted client socket.
    Client,
    /// The socket to the chosen backend.
    Backend,
}

/// Slab key and side to token, in the client connections' block.
pub fn token_for(key: usize, side: Side) -> Token {
    CLIENT_TOKENS.token(key, usize::from(side == Side::Backend))
}

/// Token back to slab key and side; `None` outside the client connections' block.
pub fn key_of(token: Token) -> Option<(usize, Side)> {
    let (key, index) = CLIENT_TOKENS.key_of(token)?;
    Some((
        key,
        if index == 0 {
            Side::Client
        } else {
            Side::Backend
        },
    ))
}

crate::slots::slotted!(Conn);

/// What the loop lends a connection while it runs.
pub struct Ctx<'a> {
    /// Flags.
    pub cfg: &'a Config,
    /// Backend pool.
    pub backends: &'a mut Registry,
    /// For registering backend sockets.
    pub poll: &'a mio::Registry,
    /// Randomness for selection.
    pub rng: &'a mut SmallRng,
    /// Client TLS configuration for `wss://`/`https://` backends.
    pub backend_tls: Option<&'a std::sync::Arc<rustls::ClientConfig>>,
    /// Time of this loop turn.
    pub now: Instant,
    /// SIGTERM received: finish exchanges, keep no connection alive.
    pub draining: bool,
    /// Counters.
    pub stats: &'a mut Stats,
    /// `--events` output.
    pub events: &'a mut EventSink,
    /// Library hooks, if any.
    pub hooks: Option<&'a mut (dyn Hooks + 'static)>,
    /// Signs and checks sticky cookies (cookie mode only).
    pub signer: Option<&'a crate::backends::sticky::CookieSigner>,
    /// Signs dispatch tickets (`--dispatch-secret`).
    pub tickets: Option<&'a crate::net::ticket::TicketSigner>,
    /// Conditions logged once per interval with a count.
    pub logs: &'a mut RepeatedLogs,
}

/// The per-connection conditions that can repeat thousands of times a second.
#[derive(Debug)]
pub struct RepeatedLogs {
    /// Every backend failed or none was eligible (502).
    pub no_backend: log::Repeated,
    /// A backend connect failed for want of a descriptor (503).
    pub connect_no_fd: log::Repeated,
}

impl RepeatedLogs {
    /// Each condition at most once per `interval`.
    pub fn every(interval: Duration) -> RepeatedLogs {
        RepeatedLogs {
            no_backend: log::Repeated::every(interval),
            connect_no_fd: log::Repeated::every(interval),
        }
    }
}

/// Outcome of driving a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drive {
    /// Keep it.
    Continue,
    /// Ran out of rounds with work left: drive again next turn.
    Yield,
    /// Finished: deregister and remove.
    Done,
}

/// What the admin API shows of a client.
#[derive(Debug, Clone)]
pub struct ClientSummary {
    /// Client id.
    pub id: u64,
    /// Address.
    pub peer: SocketAddr,
    /// Backend id when paired.
    pub backend: Option<usize>,
    /// An open WebSocket tunnel.
    pub websocket: bool,
    /// Seconds since accept.
    pub age_secs: u64,
    /// Bytes client → backend and backend → client.
    pub bytes: (u64, u64),
}

/// An open WebSocket tunnel that nobody has started closing, as the spread closes of a
/// drain and rebalancing see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenTunnel {
    /// Its backend.
    pub backend: usize,
    /// When the 101 went out.
    pub opened: Instant,
    /// The backend was chosen by a sticky session.
    pub pinned: bool,
}

/// A client connection.
#[derive(Debug)]
pub struct Conn {
    /// Generation: timers and other references hold `(key, gen)` and ignore a mismatch.
    pub gen: u64,
    /// Client id for logs.
    pub id: u64,
    key: usize,
    client: Transport,
    c_ready: Ready,
    peer: SocketAddr,
    from_client: Buffer,
    to_client: Outbox,
    /// The client's FIN came (or its socket failed): nothing more will be read from it.
    /// Socket state, not a phase: a tunnel half-closes, an exchange may still answer.
    c_eof: bool,
    leg: Option<Leg>,
    phase: Phase,
    last_activity: Instant,
    /// The loop's bookkeeping about this connection (timer, reaping, flush pass).
    pub marks: Marks,
    throttle: Option<Throttle>,
    /// Counted in the server's per-address tally (released at reap).
    pub counts_for_ip: bool,
    opened: Instant,
    bytes_up: u64,
    bytes_down: u64,
    /// Bytes read and dropped while closing, against [`LINGER_MAX_BYTES`].
    lingered: u64,
    /// Close code seen in either direction, for the disconnect event.
    close_code: Option<u16>,
    /// The backend of the latest pairing, for events after the leg is gone.
    paired_backend: Option<usize>,
    /// Its name, kept only when events are on.
    paired_name: Option<String>,
}

enum Step {
    Progress,
    Idle,
    Done,
}

impl Conn {
    /// A freshly accepted client.
    pub fn new(
        throttle: u64,
        key: usize,
        gen: u64,
        id: u64,
        client: Transport,
        peer: SocketAddr,
        now: Instant,
    ) -> Self {
        Conn {
            gen,
            id,
            key,
            client,
            c_ready: Ready::default(),
            peer,
            from_client: Buffer::default(),
            to_client: Outbox::default(),
            c_eof: false,
            leg: None,
            phase: Phase::Head { started: Some(now) },
            last_activity: now,
            marks: Marks::default(),
            throttle: (throttle > 0).then(|| Throttle::new(throttle, now)),
            counts_for_ip: false,
            opened: now,
            bytes_up: 0,
            bytes_down: 0,
            lingered: 0,
            close_code: None,
            paired_backend: None,
            paired_name: None,
        }
    }

    /// The client socket, for registration.
    pub fn client_mut(&mut self) -> &mut TcpStream {
        self.client.socket_mut()
    }

    /// Queues a frame for the client, sent at the next message boundary of the backend's
    /// stream (Broadcast / WriteData). Call [`Conn::drive`] after.
    pub fn send_frame(&mut self, opcode: u8, payload: &[u8]) -> Result<(), &'static str> {
        let Phase::Tunnel(t) = &mut self.phase else {
            return Err("not a websocket client");
        };
        if t.pending_close.is_some() || t.down.close_seen() {
            return Err("closing");
        }
        let mut header = [0u8; 14];
        let n = crate::ws::frames::encode_header(opcode, payload.len() as u64, &mut header);
        let size = n + payload.len();
        if t.inject_bytes + size > MAX_INJECT_BYTES {
            return Err("send queue full");
        }
        let mut frame = Vec::with_capacity(size);
        frame.extend_from_slice(header.get(..n).unwrap_or_default());
        frame.extend_from_slice(payload);
        t.inject.push_back(frame);
        t.inject_bytes += size;
        Ok(())
    }

    /// Queues a ping whose pong will be consumed, not relayed (Ping).
    pub fn ping(&mut self) -> Result<(), &'static str> {
        let seq = match &self.phase {
            Phase::Tunnel(t) => t.pings_out,
            _ => return Err("not a websocket client"),
        };
        let mut payload = PING_MAGIC.to_vec();
        payload.extend_from_slice(&seq.to_be_bytes());
        self.send_frame(crate::ws::frames::OPCODE_PING, &payload)?;
        if let Phase::Tunnel(t) = &mut self.phase {
            t.pings_out += 1;
        }
        Ok(())
    }

    /// What the admin API lists.
    pub fn summary(&self, now: Instant) -> ClientSummary {
        ClientSummary {
            id: self.id,
            peer: self.peer,
            backend: self.backend_id(),
            websocket: matches!(self.phase, Phase::Tunnel(_)),
            age_secs: now.duration_since(self.opened).as_secs(),
            bytes: (self.bytes_up, self.bytes_down),
        }
    }

    /// The disconnect event's fields (called at reap).
    pub fn disconnect_event(&self, now: Instant) -> Event<'_> {
        let close = match &self.phase {
            Phase::Tunnel(t) => t.down.close_code().or(t.up.close_code()),
            _ => None,
        }
        .or(self.close_code);
        Event::ClientDisconnect {
            client: self.id,
            peer: self.peer,
            backend: self.paired_name.as_deref(),
            close_code: close,
            bytes_up: self.bytes_up,
            bytes_down: self.bytes_down,
            duration_ms: u64::try_from(now.duration_since(self.opened).as_millis())
                .unwrap_or(u64::MAX),
        }
    }

    /// An open WebSocket tunnel.
    pub fn is_websocket(&self) -> bool {
        matches!(self.phase, Phase::Tunnel(_))
    }

    /// The tunnel, unless it is closing (the balancer owes a close, or either side sent
    /// one): closing it again would add nothing, and counting it would count it twice.
    pub fn live_tunnel(&self) -> Option<OpenTunnel> {
        let (Phase::Tunnel(t), Some(leg)) = (&self.phase, &self.leg) else {
            return None;
        };
        if t.pending_close.is_some() || t.up.close_seen() || t.down.close_seen() {
            return None;
        }
        Some(OpenTunnel {
            backend: leg.backend,
            opened: t.opened,
            pinned: t.pinned,
        })
    }

    /// Counts and logs a client that goes away while its TLS handshake is unfinished.
    fn count_handshake_failure(&self, ctx: &mut Ctx<'_>, what: &str) {
        if self.client.handshaking() {
            ctx.stats.tls_handshake_failures += 1;
            log::debug(what, &[("client", &self.id), ("peer", &self.peer)]);
        }
    }

    /// Client address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Answers `status` at once and closes (limits hit before any request was read).
    pub fn refuse(&mut self, now: Instant, status: u16) {
        rewrite::write_error(status, true, self.to_client.head_vec());
        self.c_ready.writable = true;
        self.enter_closing(now);
    }

    /// The backend this connection is paired with, if any.
    pub fn backend_id(&self) -> Option<usize> {
        self.leg.as_ref().map(|l| l.backend)
    }

    /// Folds a readiness event into the right side.
    pub fn absorb(&mut self, side: Side, ev: &mio::event::Event) {
        match side {
            Side::Client => self.c_ready.absorb(ev),
            Side::Backend => {
                if let Some(leg) = &mut self.leg {
                    leg.ready.absorb(ev);
                }
            }
        }
    }

    /// Runs the state machine until nothing moves (or the round budget is spent).
    pub fn drive(&mut self, ctx: &mut Ctx<'_>) -> Drive {
        for _ in 0..MAX_ROUNDS {
            match self.step(ctx) {
                Step::Progress => self.last_activity = ctx.now,
                Step::Idle => return Drive::Continue,
                Step::Done => {
                    self.drop_leg(ctx, false);
                    return Drive::Done;
                }
            }
        }
        Drive::Yield
    }

    /// Releases everything the connection holds in the registry (called at reap).
    pub fn teardown(&mut self, ctx: &mut Ctx<'_>) {
        self.drop_leg(ctx, false);
    }

    /// The phase acts on what the round read.
    fn process(&mut self, ctx: &mut Ctx<'_>) -> Step {
        match &self.phase {
            Phase::Head { .. } => self.process_head(ctx),
            Phase::Exchange(_) => self.process_exchange(ctx),
            Phase::Tunnel(_) => self.process_tunnel(ctx),
            Phase::Closing { fin_sent, .. } => {
                let fin_sent = *fin_sent;
                let leg_done = self.leg.as_ref().is_none_or(|l| l.eof && l.fin_sent);
                if leg_done && self.leg.is_some() {
                    self.drop_leg(ctx, false);
                }
                if fin_sent && self.c_eof && leg_done {
                    Step::Done
                } else {
                    Step::Idle
                }
            }
        }
    }

    /// Answers `status` itself and closes the connection after it.
    fn fail(&mut self, ctx: &mut Ctx<'_>, status: u16) {
        self.drop_leg(ctx, false);
        if let Phase::Exchange(ex) = &self.phase {
            if ex.answered {
                // Part of a response already went out: the only honest signal left is a close.
                self.to_client.buf.release();
                self.enter_closing(ctx.now);
                return;
            }
        }
        // Whatever relayed bytes are queued belong to a completed earlier response.
        if self.to_client.can_queue_head() {
            rewrite::write_error(status, true, self.to_client.head_vec());
            ctx.stats.response(status);
            ctx.events.emit(Event::BalancerAnswer {
                client: self.id,
                peer: self.peer,
                status,
                backend: self.paired_name.as_deref(),
            });
        }
        self.from_client.release();
        self.enter_closing(ctx.now);
    }
}

/// Room an outbox buffer offers for relayed bytes.
const BUF_ROOM: usize = crate::net::buffer::BUF_SIZE;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        for key in [0usize, 1, 7, 100_000] {
            for side in [Side::Client, Side::Backend] {
                assert_eq!(key_of(token_for(key, side)), Some((key, side)));
            }
        }
        assert_eq!(key_of(Token(3)), None);
    }
}
