//! One client connection and its backend leg: the HTTP/1.1 exchange and WebSocket tunnel
//! state machine. The server owns the slab, the timers and the event loop; a `Conn` only
//! moves bytes and asks for backends through [`Ctx`].
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
use crate::observe::events::EventSink;
use crate::observe::log;
use crate::observe::metrics::Stats;
use crate::ws::frames::{encode_close_reason, Direction, FrameError, FrameTracker};
use crate::ws::handshake::{self, WsKey};
use serde_json::json;
use std::collections::VecDeque;

/// Tokens below this are the server's own (listeners, signals, waker).
pub const RESERVED_TOKENS: usize = 1024;
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

/// Slab key and side to token: two tokens per slab entry, above the reserved range.
pub fn token_for(key: usize, side: Side) -> Token {
    Token(RESERVED_TOKENS + key * 2 + usize::from(side == Side::Backend))
}

/// Token back to slab key and side; `None` for the server's own tokens.
pub fn key_of(token: Token) -> Option<(usize, Side)> {
    let n = token.0.checked_sub(RESERVED_TOKENS)?;
    Some((
        n / 2,
        if n % 2 == 0 {
            Side::Client
        } else {
            Side::Backend
        },
    ))
}

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

/// The backend half of a connection.
#[derive(Debug)]
struct Leg {
    stream: Transport,
    ready: Ready,
    backend: usize,
    /// Address dialled (for reporting which binding failed).
    addr: SocketAddr,
    connecting_since: Option<Instant>,
    /// Came from the keep-alive pool: a failure before any answer may be retried.
    reused: bool,
    from_backend: Buffer,
    to_backend: Outbox,
    /// Backend closed its sending side.
    eof: bool,
    /// Backend reset the connection (an abortive close).
    aborted: bool,
    /// Our FIN was sent to the backend.
    fin_sent: bool,
}

#[derive(Debug)]
enum Resp {
    AwaitHead,
    Body(BodyReader),
}

/// One HTTP request/response in flight.
#[derive(Debug)]
struct Exchange {
    req_body: BodyReader,
    resp: Resp,
    head_request: bool,
    ws_key: Option<WsKey>,
    /// Close the client connection once the response is delivered.
    close_after: bool,
    backend_keep_alive: bool,
    /// Some byte of the answer reached the client's outbox: no retry any more.
    answered: bool,
    /// Backends that failed for this request, not to be tried again.
    failed: Vec<usize>,
    started: Instant,
    status: u16,
    /// `METHOD path`, kept only when events are on.
    request_line: Option<String>,
    /// Sticky: the backend a valid cookie named, or a key to hash (ip / header modes).
    sticky: Sticky,
    /// `Expect: 100-continue`: the client waits for an answer before sending its body.
    expect_continue: bool,
    /// Start of the current `--min-body-rate` window and body bytes received in it.
    body_window: (Instant, u64),
    /// Every request body byte sent so far on a reused backend connection, so the request
    /// can be sent again if that connection turns out to be closed (the backend may close
    /// an idle connection just as we reuse it). `None` once more than [`REPLAY_MAX`] went
    /// out: such a request is not retried.
    replay: Option<Vec<u8>>,
}

/// Most request body bytes held for a retry on a new connection: one relay buffer, so a
/// replay always fits in a fresh outbox.
const REPLAY_MAX: usize = crate::net::buffer::BUF_SIZE;

/// Period over which `--min-body-rate` is measured.
const BODY_RATE_WINDOW: Duration = Duration::from_secs(10);

use crate::backends::route::{self, Sticky};

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What sticky sessions need from a request head.
fn sticky_of(req: &head::Request<'_, '_>, peer: SocketAddr, ctx: &Ctx<'_>) -> Sticky {
    route::sticky_ask(
        ctx.cfg.sticky.as_ref(),
        req.headers,
        peer,
        ctx.signer,
        ctx.cfg.sticky_max_age.as_secs(),
        unix_now(),
    )
}

/// Adds `Set-Cookie` to the head just written (which ends with the blank line) when the
/// client's cookie does not already name the backend that answered.
fn add_sticky_cookie(
    head: &mut Vec<u8>,
    sticky: &Sticky,
    backend: Option<usize>,
    tls: bool,
    ctx: &Ctx<'_>,
) {
    let (
        Sticky::Cookie(had),
        Some(crate::backends::sticky::StickyMode::Cookie { name }),
        Some(signer),
        Some(id),
    ) = (
        sticky,
        &ctx.cfg.sticky,
        ctx.signer,
        backend.and_then(|b| ctx.backends.sticky_id(b)),
    )
    else {
        return;
    };
    if had.as_deref() == Some(id) || !head.ends_with(b"\r\n\r\n") {
        return;
    }
    let Some(value) = signer.issue(id, unix_now()) else {
        return;
    };
    let line = crate::backends::sticky::set_cookie_value(
        name,
        &value,
        tls,
        ctx.cfg.sticky_max_age.as_secs(),
    );
    head.truncate(head.len() - 2);
    head.extend_from_slice(b"Set-Cookie: ");
    head.extend_from_slice(line.as_bytes());
    head.extend_from_slice(b"\r\n\r\n");
}

/// After 101: frames relayed both ways, tracked header by header.
#[derive(Debug)]
struct Tunnel {
    up: FrameTracker,
    down: FrameTracker,
    /// Close code the balancer sends the client at the next frame boundary of the backend's
    /// stream. Set only by the balancer's own decisions (limits, unparseable frames, drain,
    /// idle, admin) and by a backend vanishing without any close frame.
    pending_close: Option<u16>,
    /// Close code the balancer sends the backend, with `pending_close`, at the next frame
    /// boundary of the client's stream; `None` when the backend is gone.
    backend_close: Option<u16>,
    close_reason: &'static str,
    /// The close owed to the client went out, or is no longer owed.
    client_closed: bool,
    /// The close owed to the backend went out, or is no longer owed.
    backend_closed: bool,
    /// When `pending_close` was set: the frames in progress get [`LINGER`] from then to
    /// reach their ends (a peer trickling a huge frame does not hold the close back).
    closing_since: Option<Instant>,
    /// Frames the balancer wants to send the client, at the next message boundary.
    inject: VecDeque<Vec<u8>>,
    inject_bytes: usize,
    /// Pings we sent whose pongs have not come back; their pongs are not relayed.
    pings_out: u32,
    /// A client frame being read exactly, to see whether it is a pong answering our ping.
    up_hold: Vec<u8>,
    next_ping: Option<Instant>,
    /// `--inspect` reassembly of client messages.
    inspect: Option<Inspect>,
}

/// Adds body bytes sent on a reused connection to the replay copy, or gives the replay up
/// once it would exceed [`REPLAY_MAX`].
fn hold_for_replay(replay: &mut Option<Vec<u8>>, part: &[u8]) {
    if let Some(held) = replay {
        if held.len() + part.len() <= REPLAY_MAX {
            held.extend_from_slice(part);
        } else {
            *replay = None;
        }
    }
}

impl Tunnel {
    /// The balancer closes the tunnel itself: `client` for the client, `backend` (if it is
    /// still there to be told) for the backend. The first cause wins.
    fn fail(&mut self, now: Instant, client: u16, backend: Option<u16>, reason: &'static str) {
        if self.pending_close.is_none() {
            self.pending_close = Some(client);
            self.backend_close = backend;
            self.close_reason = reason;
            self.closing_since = Some(now);
        }
    }
}

/// Payload prefix of the balancer's own pings, so their pongs can be told from others.
const PING_MAGIC: &[u8] = b"wslb";
/// Most bytes of injected frames queued per client (a client that never reads cannot
/// make the balancer hold more).
const MAX_INJECT_BYTES: usize = 1 << 20;
/// Unanswered balancer pings after which the client is considered dead.
const MAX_PINGS_OUT: u32 = 3;
/// Longest control frame: 2 header bytes + 4 mask bytes + 125 payload bytes.
const MAX_CONTROL_FRAME: usize = 131;

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

#[derive(Debug)]
enum Phase {
    /// Waiting for (the rest of) a request head.
    Head,
    Exchange(Box<Exchange>),
    Tunnel(Box<Tunnel>),
    /// Flushing what the client is owed, then FIN, then waiting for its FIN.
    Closing {
        since: Instant,
    },
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
    c_eof: bool,
    c_fin_sent: bool,
    leg: Option<Leg>,
    phase: Phase,
    last_activity: Instant,
    /// When the current request head started (first byte, or accept for the first one).
    head_started: Option<Instant>,
    /// Earliest deadline armed in the timer heap for this connection.
    pub armed: Option<Instant>,
    /// Finished and waiting to be reaped after this batch of events.
    pub done: bool,
    /// On the server's list for this turn's flush pass: until then it reads and parses but
    /// leaves writing to that pass.
    pub flush_queued: bool,
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
            c_fin_sent: false,
            leg: None,
            phase: Phase::Head,
            last_activity: now,
            head_started: Some(now),
            armed: None,
            done: false,
            flush_queued: false,
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
        self.send_frame(0x9, &payload)?;
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
    pub fn disconnect_event(&self, now: Instant) -> Vec<(&'static str, serde_json::Value)> {
        let close = match &self.phase {
            Phase::Tunnel(t) => t.down.close_code().or(t.up.close_code()),
            _ => None,
        }
        .or(self.close_code);
        vec![
            ("client", json!(self.id)),
            ("peer", json!(self.peer.to_string())),
            ("backend", json!(self.paired_name)),
            ("close_code", json!(close)),
            ("bytes_up", json!(self.bytes_up)),
            ("bytes_down", json!(self.bytes_down)),
            (
                "duration_ms",
                json!(now.duration_since(self.opened).as_millis() as u64),
            ),
        ]
    }

    /// An open WebSocket tunnel.
    pub fn is_websocket(&self) -> bool {
        matches!(self.phase, Phase::Tunnel(_))
    }

    /// Counts and logs a client that goes away while its TLS handshake is unfinished.
    fn count_handshake_failure(&self, ctx: &mut Ctx<'_>, what: &str) {
        if self.client.handshaking() {
            ctx.stats.tls_handshake_failures += 1;
            log::debug(what, &[("client", &self.id), ("peer", &self.peer)]);
        }
    }

    /// Moves to `Closing`, keeping the WebSocket close code (either direction's, or the
    /// one the balancer sends) for the disconnect event.
    fn enter_closing(&mut self, now: Instant) {
        if let Phase::Tunnel(t) = &self.phase {
            self.close_code = self
                .close_code
                .or(t.down.close_code())
                .or(t.up.close_code())
                .or(t.pending_close);
        }
        self.phase = Phase::Closing { since: now };
    }

    /// Client address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Answers `status` at once and closes (limits hit before any request was read).
    pub fn refuse(&mut self, now: Instant, status: u16) {
        rewrite::write_error(status, true, self.to_client.head_vec());
        self.c_ready.writable = true;
        self.phase = Phase::Closing { since: now };
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

    /// The next instant at which [`Conn::expire`] has something to do.
    pub fn deadline(&self, cfg: &Config) -> Option<Instant> {
        let phase = self.phase_deadline(cfg);
        match self.throttle.as_ref().and_then(Throttle::resume_at) {
            Some(t) => Some(phase.map_or(t, |p| p.min(t))),
            None => phase,
        }
    }

    fn phase_deadline(&self, cfg: &Config) -> Option<Instant> {
        match &self.phase {
            Phase::Head => Some(match self.head_started {
                Some(t) => t + cfg.header_timeout,
                None => self.last_activity + cfg.idle_timeout,
            }),
            Phase::Exchange(ex) => {
                let connect = self
                    .leg
                    .as_ref()
                    .and_then(|l| l.connecting_since)
                    .map(|t| t + cfg.connect_timeout);
                let idle = self.last_activity + cfg.idle_timeout;
                let mut at = connect.map_or(idle, |c| c.min(idle));
                if cfg.min_body_rate > 0 && !ex.req_body.is_done() {
                    at = at.min(ex.body_window.0 + BODY_RATE_WINDOW);
                }
                Some(at)
            }
            Phase::Tunnel(t)
                if t.pending_close.is_some()
                    || self.c_eof
                    || self.leg.as_ref().is_none_or(|l| l.eof) =>
            {
                let quiet = self.last_activity + LINGER;
                Some(t.closing_since.map_or(quiet, |at| quiet.min(at + LINGER)))
            }
            Phase::Tunnel(t) => {
                let idle = cfg.ws_idle_timeout.map(|d| self.last_activity + d);
                match (idle, t.next_ping) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
            Phase::Closing { since } => Some(*since + LINGER),
        }
    }

    /// A deadline passed: act if it is still due.
    pub fn expire(&mut self, ctx: &mut Ctx<'_>) -> Drive {
        match self.phase_deadline(ctx.cfg) {
            Some(d) if d <= ctx.now => {}
            // A throttle window may have ended: reads resume.
            _ => return self.drive(ctx),
        }
        match &mut self.phase {
            Phase::Head => {
                if self.from_client.is_empty() {
                    self.count_handshake_failure(ctx, "tls handshake timed out");
                    // An idle keep-alive connection (or one that never spoke) just closes.
                    return Drive::Done;
                }
                log::debug("request head timeout", &[("client", &self.id)]);
                self.fail(ctx, 408);
            }
            Phase::Exchange(ex) => {
                let connecting = self
                    .leg
                    .as_ref()
                    .is_some_and(|l| l.connecting_since.is_some());
                let window_over = ctx.cfg.min_body_rate > 0
                    && !ex.req_body.is_done()
                    && ex.body_window.0 + BODY_RATE_WINDOW <= ctx.now;
                if window_over && self.last_activity + ctx.cfg.idle_timeout > ctx.now {
                    // Only the client's own slowness counts: not while the backend is
                    // connecting, not reading (full outbox), or owes a 100 Continue.
                    let blocked = connecting
                        || self
                            .leg
                            .as_ref()
                            .is_some_and(|l| l.to_backend.buf.is_full())
                        || (ex.expect_continue && !ex.answered);
                    let needed = ctx.cfg.min_body_rate * BODY_RATE_WINDOW.as_secs();
                    if blocked || ex.body_window.1 >= needed {
                        ex.body_window = (ctx.now, 0);
                        return self.drive(ctx);
                    }
                    log::debug("request body too slow", &[("client", &self.id)]);
                    self.fail(ctx, 408);
                    return self.drive(ctx);
                }
                if connecting {
                    self.backend_failed(ctx, "connect timeout");
                } else {
                    log::error("backend timed out", &[("client", &self.id)]);
                    self.fail(ctx, 504);
                }
            }
            Phase::Tunnel(t) => {
                let live = t.pending_close.is_none()
                    && !self.c_eof
                    && self.leg.as_ref().is_some_and(|l| !l.eof);
                if !live {
                    return Drive::Done;
                }
                if let (Some(at), Some(every)) = (t.next_ping, ctx.cfg.ws_ping) {
                    if at <= ctx.now {
                        if t.pings_out >= MAX_PINGS_OUT {
                            log::debug(
                                "websocket peer dead: pings unanswered",
                                &[("client", &self.id)],
                            );
                            return Drive::Done;
                        }
                        t.next_ping = Some(ctx.now + every);
                        let _ = self.ping();
                        return self.drive(ctx);
                    }
                }
                let idle_due = ctx
                    .cfg
                    .ws_idle_timeout
                    .is_some_and(|d| self.last_activity + d <= ctx.now);
                if !idle_due {
                    return self.drive(ctx);
                }
                log::debug("websocket idle timeout", &[("client", &self.id)]);
                t.fail(
                    ctx.now,
                    CLOSE_GOING_AWAY,
                    Some(CLOSE_GOING_AWAY),
                    "idle timeout",
                );
                self.last_activity = ctx.now;
            }
            Phase::Closing { .. } => return Drive::Done,
        }
        self.drive(ctx)
    }

    /// SIGTERM: stop keeping this connection alive; idle ones close now.
    pub fn begin_drain(&mut self, ctx: &mut Ctx<'_>) -> Drive {
        match &mut self.phase {
            Phase::Head if self.from_client.is_empty() => return Drive::Done,
            Phase::Exchange(ex) => ex.close_after = true,
            _ => {}
        }
        self.drive(ctx)
    }

    /// Drain timeout: WebSocket clients get a close frame with `code`, others just close.
    pub fn going_away(&mut self, ctx: &mut Ctx<'_>, code: u16) -> Drive {
        match &mut self.phase {
            Phase::Tunnel(t) => {
                t.fail(ctx.now, code, Some(code), "");
                self.last_activity = ctx.now;
                self.drive(ctx)
            }
            Phase::Closing { .. } => Drive::Continue,
            _ => Drive::Done,
        }
    }

    fn step(&mut self, ctx: &mut Ctx<'_>) -> Step {
        let mut progress = false;
        let (up_max, down_max) = match &mut self.throttle {
            Some(t) => {
                t.refill(ctx.now);
                (t.up_left, t.down_left)
            }
            None => (usize::MAX, usize::MAX),
        };
        let mut up_read = 0;
        let mut down_read = 0;
        // Client → balancer.
        if self.c_ready.readable && !self.c_eof && up_max > 0 {
            match &mut self.phase {
                Phase::Tunnel(t) => {
                    if let Some(leg) = &mut self.leg {
                        let messages = t.up.messages();
                        // While our ping is out, client frames are read one at a time so
                        // the pong answering it can be taken out of the stream.
                        let exact = t.pings_out > 0
                            && !t.up.close_seen()
                            && (t.up.at_frame_boundary() || !t.up_hold.is_empty());
                        // While the balancer closes, the client's frame in progress is still
                        // relayed to its end, where the backend's close frame goes; then
                        // nothing more.
                        let limit = match t.pending_close {
                            None => Some(up_max),
                            Some(_) if t.backend_closed || t.up.relayed_to_frame_boundary() => None,
                            Some(_) => Some(up_max.min(
                                usize::try_from(t.up.bytes_to_frame_end()).unwrap_or(usize::MAX),
                            )),
                        };
                        let io = match limit {
                            None => Ok(Io::WouldBlock),
                            Some(_) if exact && t.pending_close.is_none() => {
                                if leg.to_backend.buf.has_room(MAX_CONTROL_FRAME) {
                                    read_exact_frame(
                                        &mut self.client,
                                        &mut self.c_ready,
                                        t,
                                        &mut leg.to_backend.buf,
                                    )
                                } else {
                                    Ok(Io::WouldBlock)
                                }
                            }
                            Some(_) if leg.to_backend.buf.is_full() => Ok(Io::WouldBlock),
                            Some(max) => read_tracked(
                                &mut self.client,
                                &mut self.c_ready,
                                &mut leg.to_backend.buf,
                                &mut t.up,
                                max,
                                t.inspect.as_mut(),
                            ),
                        };
                        ctx.stats.ws_messages_up += t.up.messages() - messages;
                        if let Some(ins) = t.inspect.as_mut().filter(|i| !i.done.is_empty()) {
                            for (opcode, msg) in ins.done.drain(..) {
                                if let Some(h) = ctx.hooks.as_deref_mut() {
                                    h.on_client_message(self.id, opcode == 1, &msg);
                                }
                                ctx.events.emit(
                                    "client_message",
                                    &[
                                        ("client", json!(self.id)),
                                        ("text", json!(opcode == 1)),
                                        ("bytes", json!(msg.len())),
                                    ],
                                );
                            }
                        }
                        {
                            match io {
                                Ok(Io::Progress(n)) => {
                                    up_read = n;
                                    progress = true;
                                }
                                Ok(Io::WouldBlock) => {}
                                Ok(Io::Eof) | Ok(Io::Failed) => {
                                    self.c_eof = true;
                                    progress = true;
                                }
                                Err(e) => {
                                    log::debug(
                                        "bad frame from client",
                                        &[("client", &self.id), ("error", &e)],
                                    );
                                    // The client is told why; the backend, which did nothing
                                    // wrong, that its peer is going away. Reading goes on (into
                                    // the lingering close) so the client gets to read ours.
                                    t.fail(
                                        ctx.now,
                                        e.close_code(),
                                        Some(CLOSE_GOING_AWAY),
                                        e.as_str(),
                                    );
                                    progress = true;
                                }
                            }
                        }
                    }
                }
                Phase::Closing { .. } => {
                    // Read and discard so our close does not turn into a reset that destroys
                    // the answer still in flight to the client.
                    match discard(&mut self.client, &mut self.c_ready) {
                        Io::Progress(n) => {
                            self.lingered += n as u64;
                            if self.lingered > LINGER_MAX_BYTES {
                                return Step::Done;
                            }
                            progress = true;
                        }
                        Io::WouldBlock => {}
                        Io::Eof | Io::Failed => {
                            self.c_eof = true;
                            progress = true;
                        }
                    }
                }
                _ => {
                    if !self.from_client.is_full() {
                        match read_into(
                            &mut self.client,
                            &mut self.c_ready,
                            &mut self.from_client,
                            up_max,
                        ) {
                            Io::Progress(n) => {
                                up_read = n;
                                if self.head_started.is_none() && matches!(self.phase, Phase::Head)
                                {
                                    self.head_started = Some(ctx.now);
                                }
                                progress = true;
                            }
                            Io::WouldBlock => {}
                            Io::Eof => {
                                self.c_eof = true;
                                progress = true;
                            }
                            Io::Failed => {
                                self.count_handshake_failure(ctx, "tls handshake failed");
                                return Step::Done;
                            }
                        }
                    }
                }
            }
        }

        // Protocol work.
        match self.process(ctx) {
            Step::Progress => progress = true,
            Step::Done => return Step::Done,
            Step::Idle => {}
        }

        // Balancer → backend, and backend connect completion.
        if let Some(leg) = &mut self.leg {
            if leg.connecting_since.is_some() && leg.ready.writable {
                match connect_result(leg.stream.socket()) {
                    Ok(true) => {
                        leg.connecting_since = None;
                        ctx.backends.connect_ok(leg.backend);
                        progress = true;
                    }
                    Ok(false) => leg.ready.writable = false,
                    Err(e) => {
                        let why = e.to_string();
                        self.backend_failed(ctx, &why);
                        return Step::Progress;
                    }
                }
            }
            if let Some(leg) = &mut self.leg {
                if leg.connecting_since.is_none() && !self.flush_queued {
                    match leg.to_backend.flush(&mut leg.stream, &mut leg.ready) {
                        Io::Progress(_) => progress = true,
                        Io::Failed
                            if matches!(self.phase, Phase::Tunnel(_) | Phase::Closing { .. }) =>
                        {
                            leg.eof = true;
                            leg.aborted = true;
                            leg.fin_sent = true;
                            leg.to_backend.buf.release();
                            progress = true;
                        }
                        Io::Failed => {
                            self.backend_lost(ctx);
                            return Step::Progress;
                        }
                        _ => {}
                    }
                }
            }
        }

        // Backend → balancer.
        if let Some(leg) = &mut self.leg {
            if matches!(self.phase, Phase::Closing { .. })
                && leg.ready.readable
                && !leg.eof
                && leg.connecting_since.is_none()
            {
                // The backend's answer to our close and its FIN are awaited, not relayed.
                match discard(&mut leg.stream, &mut leg.ready) {
                    Io::Progress(n) => {
                        self.lingered += n as u64;
                        if self.lingered > LINGER_MAX_BYTES {
                            return Step::Done;
                        }
                        progress = true;
                    }
                    Io::WouldBlock => {}
                    Io::Eof | Io::Failed => {
                        leg.eof = true;
                        progress = true;
                    }
                }
            }
        }
        if let Some(leg) = &mut self.leg {
            if leg.connecting_since.is_none() && leg.ready.readable && !leg.eof && down_max > 0 {
                let io = match &mut self.phase {
                    Phase::Tunnel(t)
                        if t.pending_close.is_none()
                            || !(t.client_closed || t.down.relayed_to_frame_boundary()) =>
                    {
                        let messages = t.down.messages();
                        // Frames of our own wait for a message boundary: stop exactly there.
                        // While the balancer closes, only the frame in progress is finished.
                        let limit = if t.pending_close.is_some() {
                            Some(down_max.min(
                                usize::try_from(t.down.bytes_to_frame_end()).unwrap_or(usize::MAX),
                            ))
                        } else if t.inject.is_empty() {
                            Some(down_max)
                        } else {
                            t.down
                                .read_limit_for_injection()
                                .map(|n| down_max.min(usize::try_from(n).unwrap_or(usize::MAX)))
                        };
                        let r = if self.to_client.buf.is_full() {
                            Ok(Io::WouldBlock)
                        } else if let Some(max) = limit {
                            read_tracked(
                                &mut leg.stream,
                                &mut leg.ready,
                                &mut self.to_client.buf,
                                &mut t.down,
                                max,
                                None,
                            )
                        } else {
                            Ok(Io::WouldBlock)
                        };
                        ctx.stats.ws_messages_down += t.down.messages() - messages;
                        r
                    }
                    Phase::Tunnel(_) | Phase::Closing { .. } => Ok(Io::WouldBlock),
                    _ => {
                        if leg.from_backend.is_full() {
                            Ok(Io::WouldBlock)
                        } else {
                            Ok(read_into(
                                &mut leg.stream,
                                &mut leg.ready,
                                &mut leg.from_backend,
                                down_max,
                            ))
                        }
                    }
                };
                match io {
                    Ok(Io::Progress(n)) => {
                        down_read = n;
                        progress = true;
                    }
                    Ok(Io::WouldBlock) => {}
                    Ok(Io::Eof) => {
                        leg.eof = true;
                        progress = true;
                    }
                    Ok(Io::Failed) => {
                        leg.eof = true;
                        leg.aborted = true;
                        progress = true;
                    }
                    Err(e) => {
                        log::error(
                            "bad frame from backend",
                            &[("client", &self.id), ("error", &e)],
                        );
                        if let Phase::Tunnel(t) = &mut self.phase {
                            t.fail(ctx.now, CLOSE_GOING_AWAY, Some(e.close_code()), e.as_str());
                        }
                        progress = true;
                    }
                }
            }
        }

        self.bytes_up += up_read as u64;
        self.bytes_down += down_read as u64;
        if matches!(self.phase, Phase::Tunnel(_)) {
            ctx.stats.ws_bytes_up += up_read as u64;
            ctx.stats.ws_bytes_down += down_read as u64;
        }
        if let Some(t) = &mut self.throttle {
            t.up_left = t.up_left.saturating_sub(up_read);
            t.down_left = t.down_left.saturating_sub(down_read);
        }

        // Balancer → client.
        if !self.flush_queued {
            match self.to_client.flush(&mut self.client, &mut self.c_ready) {
                Io::Progress(_) => progress = true,
                Io::Failed => return Step::Done,
                _ => {}
            }
        }
        if self.to_client.is_empty()
            && !self.c_fin_sent
            && matches!(self.phase, Phase::Closing { .. })
        {
            self.client.shutdown_write(&mut self.c_ready);
            self.c_fin_sent = true;
            progress = true;
        }
        // A backend kept through closing gets its FIN once our close frame has left.
        if let Some(leg) = &mut self.leg {
            if matches!(self.phase, Phase::Closing { .. })
                && leg.connecting_since.is_none()
                && leg.to_backend.is_empty()
                && !leg.fin_sent
                && !self.flush_queued
            {
                leg.stream.shutdown_write(&mut leg.ready);
                leg.fin_sent = true;
                progress = true;
            }
        }
        if progress {
            Step::Progress
        } else {
            Step::Idle
        }
    }

    fn process(&mut self, ctx: &mut Ctx<'_>) -> Step {
        match &self.phase {
            Phase::Head => self.process_head(ctx),
            Phase::Exchange(_) => self.process_exchange(ctx),
            Phase::Tunnel(_) => self.process_tunnel(ctx),
            Phase::Closing { .. } => {
                let leg_done = self.leg.as_ref().is_none_or(|l| l.eof && l.fin_sent);
                if leg_done && self.leg.is_some() {
                    self.drop_leg(ctx, false);
                }
                if self.c_fin_sent && self.c_eof && leg_done {
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
            ctx.events.emit(
                if status >= 500 {
                    "error"
                } else {
                    "http_request"
                },
                &[
                    ("client", json!(self.id)),
                    ("peer", json!(self.peer.to_string())),
                    ("status", json!(status)),
                    ("backend", json!(self.paired_name)),
                    ("by", json!("balancer")),
                ],
            );
        }
        self.from_client.release();
        self.enter_closing(ctx.now);
    }

    // Kept out of line: its 100-field parse storage would otherwise enlarge the stack frame
    // of every `drive`, tunnels included.
    #[inline(never)]
    fn process_head(&mut self, ctx: &mut Ctx<'_>) -> Step {
        if !self.to_client.can_queue_head() {
            // A pipelined request waits until the previous response has left the relay
            // buffer, so every head we queue for the client is in order.
            return Step::Idle;
        }
        if self.from_client.is_empty() {
            if self.c_eof {
                self.enter_closing(ctx.now);
                return Step::Progress;
            }
            return Step::Idle;
        }
        let mut storage = head::header_storage();
        let parsed = head::parse_request(self.from_client.data(), &mut storage);
        let req = match parsed {
            Ok(Some(req)) => req,
            Ok(None) => {
                if self.c_eof {
                    self.enter_closing(ctx.now);
                    return Step::Progress;
                }
                if self.from_client.is_full() && self.from_client.len() < MAX_HEAD {
                    // A head may legitimately exceed one buffer, up to the head limit.
                    self.from_client.grow(MAX_HEAD);
                    return Step::Progress;
                }
                return Step::Idle;
            }
            Err(head::HeadError::Malformed(httparse::Error::Version)) => {
                // HTTP/1.2..1.9 is answered as HTTP/1.1 (RFC 9110 §2.5): parse again.
                if head::downgrade_minor_version(self.from_client.data_mut()) {
                    return Step::Progress;
                }
                let e = head::HeadError::Malformed(httparse::Error::Version);
                log::debug("bad request head", &[("client", &self.id), ("error", &e)]);
                self.fail(ctx, e.status());
                return Step::Progress;
            }
            Err(e) => {
                log::debug("bad request head", &[("client", &self.id), ("error", &e)]);
                let status = e.status();
                self.fail(ctx, status);
                return Step::Progress;
            }
        };
        let ws_key = if req.wants_websocket {
            match handshake::validate_request(&req) {
                Ok(_) if !ctx.cfg.websocket => Err(400),
                Ok(k) => Ok(Some(k)),
                Err(e) => {
                    log::debug(
                        "bad websocket upgrade",
                        &[("client", &self.id), ("error", &e)],
                    );
                    Err(e.status())
                }
            }
        } else if !ctx.cfg.http {
            Err(426)
        } else {
            Ok(None)
        };
        let ws_key = ws_key.and_then(|k| match k {
            Some(_)
                if !origin_allowed(
                    &ctx.cfg.allowed_origins,
                    head::header(req.headers, "origin"),
                ) =>
            {
                log::debug("websocket origin refused", &[("client", &self.id)]);
                Err(403)
            }
            k => Ok(k),
        });
        let ws_key = match ws_key {
            Ok(k) => k,
            Err(status) => {
                self.fail(ctx, status);
                return Step::Progress;
            }
        };
        let client = ClientInfo {
            peer: self.peer.ip(),
            tls: self.client.is_tls(),
            trusted: crate::netpolicy::any_contains(&ctx.cfg.trusted_proxies, self.peer.ip()),
            rfc7239: ctx.cfg.forwarded,
        };
        let mut to_backend = Outbox::default();
        rewrite::write_request(&req, client, ws_key.is_some(), to_backend.head_vec());
        if let Some(h) = ctx.hooks.as_deref_mut() {
            h.on_request_head(to_backend.head_vec());
        }
        let request_line = ctx
            .events
            .enabled()
            .then(|| format!("{} {}", req.method, req.path));
        let ex = Exchange {
            req_body: BodyReader::new(req.body),
            resp: Resp::AwaitHead,
            head_request: req.method.eq_ignore_ascii_case("HEAD"),
            ws_key,
            close_after: !req.keep_alive || ctx.draining,
            backend_keep_alive: false,
            answered: false,
            failed: Vec::new(),
            started: ctx.now,
            status: 0,
            request_line,
            sticky: sticky_of(&req, self.peer, ctx),
            expect_continue: req.expect_continue,
            body_window: (ctx.now, 0),
            replay: Some(Vec::new()),
        };
        let head_len = req.head_len;
        let req_keep_alive = req.keep_alive && !ctx.draining;
        let has_body = req.body != BodyKind::Empty;
        self.from_client.consume(head_len);
        self.head_started = None;
        self.phase = Phase::Exchange(Box::new(ex));
        if !ctx.backends.any_eligible() {
            log::debug("no backend", &[("client", &self.id)]);
            if has_body {
                // The unread body would be taken for the next request: close instead.
                self.fail(ctx, 503);
            } else {
                let close = !req_keep_alive;
                rewrite::write_error(503, close, self.to_client.head_vec());
                self.phase = if close {
                    Phase::Closing { since: ctx.now }
                } else {
                    Phase::Head
                };
            }
            return Step::Progress;
        }
        self.connect_backend(ctx, to_backend, false);
        Step::Progress
    }

    /// Picks a backend (not among those that failed) and opens or reuses a connection;
    /// answers 502 when none is left. `same_backend_fresh` retries the last failed backend
    /// on a new connection (its pooled connection was stale, the backend is fine).
    fn connect_backend(
        &mut self,
        ctx: &mut Ctx<'_>,
        mut to_backend: Outbox,
        same_backend_fresh: bool,
    ) {
        let Phase::Exchange(ex) = &mut self.phase else {
            return;
        };
        let token = token_for(self.key, Side::Backend);
        // Our own descriptors ran out: not the backend's fault, and a retry later may work.
        let mut out_of_fds = false;
        let opened = loop {
            let picked = if same_backend_fresh && ex.failed.len() == 1 {
                ex.failed.last().copied()
            } else {
                let ask = route::Ask {
                    client: self.id,
                    sticky: &ex.sticky,
                    exclude: &ex.failed,
                    algorithm: ctx.cfg.algorithm,
                    now: ctx.now,
                };
                route::choose(ctx.backends, ctx.hooks.as_deref_mut(), ctx.rng, &ask)
            };
            let Some(id) = picked else {
                break None;
            };
            let Some(dial) = ctx.backends.next_dial(id) else {
                ex.failed.push(id);
                continue;
            };
            let addr = dial.addr;
            let pooled = if same_backend_fresh {
                None
            } else {
                ctx.backends.checkout(id, ctx.now, token)
            };
            let reused = pooled.is_some();
            let registered_here = matches!(pooled, Some((_, true)));
            let stream = match pooled {
                Some((s, _)) => Ok(s),
                None => open_backend(addr, dial.tls, ctx.backend_tls)
                    .inspect(|s| ctx.backends.note_dialled(s, addr, ctx.now)),
            };
            let mut stream = match stream {
                Ok(s) => s,
                Err(e) if crate::net::fdlimit::is_exhaustion(&e) => {
                    out_of_fds = true;
                    break None;
                }
                Err(e) => {
                    ctx.backends.connect_failed(id, Some(addr), ctx.now, &e);
                    ex.failed.push(id);
                    continue;
                }
            };
            // A pooled socket is still registered under the token of its last owner: one
            // MOD moves it here, unless that owner was this connection. A new one is added.
            let interest = Interest::READABLE | Interest::WRITABLE;
            let registered = if registered_here {
                Ok(())
            } else if reused {
                ctx.poll
                    .reregister(stream.socket_mut(), token, interest)
                    .or_else(|_| ctx.poll.register(stream.socket_mut(), token, interest))
            } else {
                ctx.poll.register(stream.socket_mut(), token, interest)
            };
            if let Err(e) = registered {
                log::error("register failed", &[("error", &e)]);
                break None;
            }
            break Some((id, addr, stream, reused));
        };
        let Some((id, addr, stream, reused)) = opened else {
            let (status, what, repeated) = if out_of_fds {
                ctx.stats.fd_exhausted += 1;
                (
                    503,
                    "backend connect: out of file descriptors, answered 503",
                    &mut ctx.logs.connect_no_fd,
                )
            } else {
                (502, "no backend could be reached", &mut ctx.logs.no_backend)
            };
            if let Some(times) = repeated.hit(ctx.now) {
                let secs = repeated.interval_secs();
                log::error(
                    &format!("{what} ({times} times in the last {secs} s)"),
                    &[("client", &self.id)],
                );
            }
            self.fail(ctx, status);
            return;
        };
        ctx.backends.acquire(id);
        self.paired_backend = Some(id);
        if ctx.events.enabled() || ctx.hooks.is_some() {
            let name = ctx.backends.name(id).unwrap_or_default().to_string();
            self.paired_name = Some(name.clone());
            ctx.events.emit(
                "paired",
                &[
                    ("client", json!(self.id)),
                    ("peer", json!(self.peer.to_string())),
                    ("backend", json!(name)),
                    ("reused", json!(reused)),
                ],
            );
            if let Some(h) = ctx.hooks.as_deref_mut() {
                h.on_client_paired(self.id, &name);
            }
        }
        if log::enabled(log::Level::Debug) {
            log::debug(
                "paired",
                &[("client", &self.id), ("backend", &id), ("reused", &reused)],
            );
        }
        to_backend.rewind_head();
        self.leg = Some(Leg {
            stream,
            // A pooled connection is usable now; a new one waits for its connect event.
            ready: Ready {
                readable: reused,
                writable: reused,
                read_closed: false,
            },
            backend: id,
            addr,
            connecting_since: if reused { None } else { Some(ctx.now) },
            reused,
            from_backend: Buffer::default(),
            to_backend,
            eof: false,
            aborted: false,
            fin_sent: false,
        });
    }

    /// Drops the backend leg; `reusable` returns its socket to the keep-alive pool.
    fn drop_leg(&mut self, ctx: &mut Ctx<'_>, reusable: bool) -> Option<Outbox> {
        let leg = self.leg.take()?;
        ctx.backends.release(leg.backend);
        // Not deregistered: a pooled socket is moved by `reregister` at checkout, and closing
        // a socket removes it from epoll. Stray events for it are ignored like any other.
        if reusable {
            let token = token_for(self.key, Side::Backend);
            ctx.backends
                .checkin(leg.backend, leg.stream, ctx.now, token);
        }
        Some(leg.to_backend)
    }

    /// Connecting failed: try another backend while the client has seen nothing.
    fn backend_failed(&mut self, ctx: &mut Ctx<'_>, why: &str) {
        let Some((id, addr)) = self.leg.as_ref().map(|l| (l.backend, Some(l.addr))) else {
            return;
        };
        ctx.backends.connect_failed(id, addr, ctx.now, &why);
        let to_backend = self.drop_leg(ctx, false).unwrap_or_default();
        if let Phase::Exchange(ex) = &mut self.phase {
            ex.failed.push(id);
        }
        self.connect_backend(ctx, to_backend, false);
    }

    /// The backend closed or reset during an exchange before the response was complete.
    fn backend_lost(&mut self, ctx: &mut Ctx<'_>) {
        let Some(leg) = &self.leg else { return };
        let retry = match &self.phase {
            // A pooled connection the backend had closed (or closed as we reused it): it
            // answered nothing, and we still hold every byte sent on it, so the request goes
            // again on a fresh connection, whatever its method (as nginx and HAProxy's
            // `retry-on conn-failure empty-response` do).
            Phase::Exchange(ex) => {
                leg.reused
                    && !ex.answered
                    && leg.from_backend.is_empty()
                    && matches!(ex.resp, Resp::AwaitHead)
                    && ex.replay.is_some()
            }
            _ => false,
        };
        let id = leg.backend;
        if retry {
            let mut to_backend = self.drop_leg(ctx, false).unwrap_or_default();
            if let Phase::Exchange(ex) = &mut self.phase {
                ex.failed.push(id);
                // What was queued but not yet written is part of the replay too.
                to_backend.buf.release();
                let held = ex.replay.take().unwrap_or_default();
                let pushed = to_backend.buf.push(&held);
                // REPLAY_MAX is one buffer: a replay always fits an empty one.
                debug_assert_eq!(pushed, held.len());
            }
            ctx.stats.pool_retries += 1;
            log::debug(
                "reused backend connection closed unanswered; retrying",
                &[("client", &self.id), ("backend", &id)],
            );
            self.connect_backend(ctx, to_backend, true);
            return;
        }
        let answered = matches!(&self.phase, Phase::Exchange(ex) if ex.answered);
        if !answered {
            log::error(
                "backend closed before answering",
                &[("client", &self.id), ("backend", &id)],
            );
        }
        self.fail(ctx, 502);
    }

    #[inline(never)]
    fn process_exchange(&mut self, ctx: &mut Ctx<'_>) -> Step {
        let Phase::Exchange(ex) = &mut self.phase else {
            return Step::Idle;
        };
        let mut progress = false;
        let Some(leg) = &mut self.leg else {
            return Step::Idle;
        };
        // Request body: client → backend, bounded by the backend outbox.
        if !ex.req_body.is_done() && !self.from_client.is_empty() && leg.connecting_since.is_none()
        {
            let room = BUF_ROOM.saturating_sub(leg.to_backend.buf.len());
            let avail = self.from_client.data();
            let chunk = avail.get(..room.min(avail.len())).unwrap_or_default();
            match ex.req_body.feed(chunk) {
                Ok(p) if p.consumed > 0 => {
                    let part = chunk.get(..p.consumed).unwrap_or_default();
                    let pushed = leg.to_backend.buf.push(part);
                    // `room` was measured from this buffer: everything fits.
                    debug_assert_eq!(pushed, part.len());
                    if leg.reused {
                        hold_for_replay(&mut ex.replay, part);
                    }
                    self.from_client.consume(p.consumed);
                    ex.body_window.1 += p.consumed as u64;
                    progress = true;
                }
                Ok(_) => {}
                Err(e) => {
                    log::debug("bad request body", &[("client", &self.id), ("error", &e)]);
                    self.fail(ctx, 400);
                    return Step::Progress;
                }
            }
        }
        if self.c_eof && !ex.req_body.is_done() {
            // The client gave up mid-body: nothing useful can follow.
            self.drop_leg(ctx, false);
            self.enter_closing(ctx.now);
            return Step::Progress;
        }
        if self.c_eof {
            ex.close_after = true;
        }

        // Response: backend → client.
        loop {
            let Phase::Exchange(ex) = &mut self.phase else {
                return Step::Progress;
            };
            let Some(leg) = &mut self.leg else {
                return Step::Progress;
            };
            match &mut ex.resp {
                Resp::AwaitHead => {
                    if leg.from_backend.is_empty() {
                        if leg.eof {
                            self.backend_lost(ctx);
                            return Step::Progress;
                        }
                        break;
                    }
                    if !self.to_client.can_queue_head() {
                        break;
                    }
                    let mut storage = head::header_storage();
                    let resp = match head::parse_response(
                        leg.from_backend.data(),
                        &mut storage,
                        ex.head_request,
                    ) {
                        Ok(Some(r)) => r,
                        Ok(None) if leg.eof => {
                            self.fail(ctx, 502);
                            return Step::Progress;
                        }
                        Ok(None) => {
                            if leg.from_backend.is_full() && leg.from_backend.len() < MAX_HEAD {
                                leg.from_backend.grow(MAX_HEAD);
                                progress = true;
                            }
                            break;
                        }
                        Err(e) => {
                            log::error("bad response head", &[("client", &self.id), ("error", &e)]);
                            self.fail(ctx, 502);
                            return Step::Progress;
                        }
                    };
                    leg.to_backend.drop_head();
                    ex.replay = None;
                    if resp.status == 101 {
                        let verdict = match &ex.ws_key {
                            Some(key) => handshake::validate_response(&resp, key),
                            None => Err(handshake::HandshakeError::BadUpgradeResponse),
                        };
                        if let Err(e) = verdict {
                            log::error(
                                "bad upgrade response",
                                &[("client", &self.id), ("error", &e)],
                            );
                            self.fail(ctx, 502);
                            return Step::Progress;
                        }
                        rewrite::write_response(&resp, false, true, self.to_client.head_vec());
                        add_sticky_cookie(
                            self.to_client.head_vec(),
                            &ex.sticky,
                            Some(leg.backend),
                            self.client.is_tls(),
                            ctx,
                        );
                        let n = resp.head_len;
                        leg.from_backend.consume(n);
                        return self.open_tunnel(ctx);
                    }
                    if resp.status < 200 {
                        // Interim answers (100 Continue, 103) go straight through.
                        rewrite::write_response(&resp, false, false, self.to_client.head_vec());
                        let n = resp.head_len;
                        leg.from_backend.consume(n);
                        ex.answered = true;
                        progress = true;
                        continue;
                    }
                    if !ex.req_body.is_done() || resp.body == BodyKind::UntilClose {
                        ex.close_after = true;
                    }
                    ex.backend_keep_alive = resp.keep_alive;
                    ex.status = resp.status;
                    match ctx.hooks.as_deref_mut() {
                        Some(h) => {
                            let mut head = Vec::with_capacity(resp.head_len + 64);
                            rewrite::write_response(&resp, ex.close_after, false, &mut head);
                            h.on_response_head(&mut head);
                            self.to_client.head_vec().extend_from_slice(&head);
                        }
                        None => rewrite::write_response(
                            &resp,
                            ex.close_after,
                            false,
                            self.to_client.head_vec(),
                        ),
                    }
                    add_sticky_cookie(
                        self.to_client.head_vec(),
                        &ex.sticky,
                        Some(leg.backend),
                        self.client.is_tls(),
                        ctx,
                    );
                    let n = resp.head_len;
                    ex.resp = Resp::Body(BodyReader::new(resp.body));
                    leg.from_backend.consume(n);
                    ex.answered = true;
                    progress = true;
                }
                Resp::Body(body) => {
                    // The reader holds back an incomplete chunk-size line at the end of what
                    // the backend sent: after its EOF that is a truncated response too.
                    let mut held_back = false;
                    if !body.is_done() && !leg.from_backend.is_empty() {
                        let room = BUF_ROOM.saturating_sub(self.to_client.buf.len());
                        let avail = leg.from_backend.data();
                        let whole = room >= avail.len();
                        let chunk = avail.get(..room.min(avail.len())).unwrap_or_default();
                        match body.feed(chunk) {
                            Ok(p) => {
                                held_back = whole && !p.done && p.consumed < chunk.len();
                                if p.consumed > 0 {
                                    let part = chunk.get(..p.consumed).unwrap_or_default();
                                    let pushed = self.to_client.buf.push(part);
                                    // `room` was measured from this buffer: everything fits.
                                    debug_assert_eq!(pushed, part.len());
                                    leg.from_backend.consume(p.consumed);
                                    progress = true;
                                }
                            }
                            Err(e) => {
                                log::error(
                                    "bad response body",
                                    &[("client", &self.id), ("error", &e)],
                                );
                                self.fail(ctx, 502);
                                return Step::Progress;
                            }
                        }
                    }
                    let ended = body.is_done()
                        || (leg.eof && leg.from_backend.is_empty() && body.is_until_close());
                    if ended && (ex.req_body.is_done() || ex.close_after) {
                        return self.finish_exchange(ctx);
                    }
                    if leg.eof && (leg.from_backend.is_empty() || held_back) && !body.is_done() {
                        // Truncated response: the client must not mistake it for complete.
                        self.fail(ctx, 502);
                        return Step::Progress;
                    }
                    break;
                }
            }
        }
        if progress {
            Step::Progress
        } else {
            Step::Idle
        }
    }

    fn finish_exchange(&mut self, ctx: &mut Ctx<'_>) -> Step {
        let Phase::Exchange(ex) = &self.phase else {
            return Step::Idle;
        };
        let reusable = ex.backend_keep_alive
            && ex.req_body.is_done()
            && matches!(&ex.resp, Resp::Body(b) if !b.is_until_close())
            && self
                .leg
                .as_ref()
                .is_some_and(|l| !l.eof && l.from_backend.is_empty() && l.to_backend.is_empty());
        if log::enabled(log::Level::Debug) {
            let ms = ctx.now.duration_since(ex.started).as_millis();
            log::debug(
                "request done",
                &[("client", &self.id), ("status", &ex.status), ("ms", &ms)],
            );
        }
        ctx.stats.response(ex.status);
        if ctx.events.enabled() {
            let ms = ctx.now.duration_since(ex.started).as_millis() as u64;
            ctx.events.emit(
                "http_request",
                &[
                    ("client", json!(self.id)),
                    ("peer", json!(self.peer.to_string())),
                    ("backend", json!(self.paired_name)),
                    ("request", json!(ex.request_line)),
                    ("status", json!(ex.status)),
                    ("ms", json!(ms)),
                ],
            );
        }
        let close = ex.close_after;
        self.drop_leg(ctx, reusable);
        if close {
            self.enter_closing(ctx.now);
        } else {
            self.phase = Phase::Head;
            self.head_started = if self.from_client.is_empty() {
                None
            } else {
                Some(ctx.now)
            };
        }
        Step::Progress
    }

    fn open_tunnel(&mut self, ctx: &mut Ctx<'_>) -> Step {
        let max = ctx.cfg.max_frame_size;
        let mut t = Tunnel {
            up: FrameTracker::new(Direction::ClientToServer, max),
            down: FrameTracker::new(Direction::ServerToClient, max),
            pending_close: None,
            backend_close: None,
            close_reason: "",
            client_closed: false,
            backend_closed: false,
            closing_since: None,
            inject: VecDeque::new(),
            inject_bytes: 0,
            pings_out: 0,
            up_hold: Vec::new(),
            next_ping: ctx.cfg.ws_ping.map(|i| ctx.now + i),
            inspect: ctx.cfg.inspect.then(Inspect::default),
        };
        ctx.stats.ws_opened += 1;
        ctx.stats.response(101);
        ctx.events.emit(
            "handshake",
            &[
                ("client", json!(self.id)),
                ("peer", json!(self.peer.to_string())),
                ("backend", json!(self.paired_name)),
            ],
        );
        let Some(leg) = &mut self.leg else {
            self.enter_closing(ctx.now);
            return Step::Progress;
        };
        // Bytes that arrived with the handshake belong to the frame streams. What the
        // trackers release is relayed; a partial header stays held for the next read.
        let early_up = self.from_client.data();
        if let Err(e) = feed(&mut t.up, early_up, t.inspect.as_mut()) {
            t.fail(ctx.now, e.close_code(), Some(CLOSE_GOING_AWAY), e.as_str());
        }
        let released = usize::try_from(t.up.released()).unwrap_or(usize::MAX);
        push_whole(
            &mut leg.to_backend.buf,
            early_up.get(..released).unwrap_or(early_up),
        );
        self.from_client.release();
        let early_down = leg.from_backend.data();
        if let Err(e) = t.down.feed(early_down) {
            t.fail(ctx.now, CLOSE_GOING_AWAY, Some(e.close_code()), e.as_str());
        }
        let released = usize::try_from(t.down.released()).unwrap_or(usize::MAX);
        push_whole(
            &mut self.to_client.buf,
            early_down.get(..released).unwrap_or(early_down),
        );
        leg.from_backend.release();
        log::debug(
            "websocket open",
            &[("client", &self.id), ("backend", &leg.backend)],
        );
        self.phase = Phase::Tunnel(Box::new(t));
        Step::Progress
    }

    fn process_tunnel(&mut self, ctx: &mut Ctx<'_>) -> Step {
        let Phase::Tunnel(t) = &mut self.phase else {
            return Step::Idle;
        };
        let Some(leg) = &mut self.leg else {
            return Step::Done;
        };
        if leg.eof && self.c_eof && leg.fin_sent {
            // Both hung up; what the client is still owed (the backend's close, say) is
            // flushed by `Closing` before the sockets close.
            self.enter_closing(ctx.now);
            return Step::Progress;
        }
        if !t.inject.is_empty() {
            if t.down.close_seen()
                || t.pending_close.is_some()
                || t.down.error().is_some()
                || t.down.violation().is_some()
            {
                // Nothing may follow a close, nor be spliced into a broken stream.
                t.inject.clear();
                t.inject_bytes = 0;
            } else if t.down.at_message_boundary() && self.to_client.buf.is_empty() {
                let head = self.to_client.head_vec();
                for frame in t.inject.drain(..) {
                    head.extend_from_slice(&frame);
                    ctx.stats.ws_injected += 1;
                }
                t.inject_bytes = 0;
                return Step::Progress;
            }
        }
        // Client hung up: pass its FIN on once its last bytes reached the backend.
        if self.c_eof && leg.to_backend.is_empty() && !leg.fin_sent {
            leg.stream.shutdown_write(&mut leg.ready);
            leg.fin_sent = true;
            return Step::Progress;
        }
        if leg.eof && t.pending_close.is_none() && !t.down.close_seen() {
            if t.up.close_seen() || leg.aborted {
                // The client's close is being answered (a backend may fail a close it
                // rejects by dropping TCP), or the backend aborted the connection: either way
                // the backend decided, and the client sees what it would see directly,
                // everything the backend sent and then the TCP close. No close frame of ours.
                self.enter_closing(ctx.now);
                return Step::Progress;
            }
            // The backend vanished with no close in either direction: tell the client why.
            t.fail(ctx.now, CLOSE_BACKEND_GONE, None, REASON_BACKEND_GONE);
        }
        if let Some(code) = t.pending_close {
            let mut progress = false;
            if !t.client_closed {
                if t.down.close_seen() {
                    // The backend's close already went to the client: one close per direction.
                    t.client_closed = true;
                } else if t.down.relayed_to_frame_boundary()
                    && self.to_client.buf.has_room(MAX_CONTROL_FRAME)
                {
                    let mut frame = Vec::with_capacity(MAX_CONTROL_FRAME);
                    encode_close_reason(code, t.close_reason, None, &mut frame);
                    push_whole(&mut self.to_client.buf, &frame);
                    t.client_closed = true;
                    progress = true;
                } else if leg.eof {
                    // Mid-frame with no more bytes coming: a TCP close is all that is left.
                    t.client_closed = true;
                }
            }
            if !t.backend_closed {
                match t.backend_close {
                    // Gone, already has the client's close, or hung up: nothing to tell it.
                    _ if t.up.close_seen() || leg.eof || leg.fin_sent => t.backend_closed = true,
                    None => t.backend_closed = true,
                    Some(bc)
                        if t.up.relayed_to_frame_boundary()
                            && leg.to_backend.buf.has_room(MAX_CONTROL_FRAME) =>
                    {
                        // Masked, as a client's frames must be.
                        let mut frame = Vec::with_capacity(MAX_CONTROL_FRAME);
                        let mask = ctx.rng.random::<[u8; 4]>();
                        encode_close_reason(bc, t.close_reason, Some(mask), &mut frame);
                        push_whole(&mut leg.to_backend.buf, &frame);
                        t.backend_closed = true;
                        progress = true;
                    }
                    // The client's frame in progress will not be finished.
                    Some(_) if self.c_eof => t.backend_closed = true,
                    Some(_) => {}
                }
            }
            if t.client_closed && t.backend_closed {
                self.enter_closing(ctx.now);
                return Step::Progress;
            }
            if progress {
                return Step::Progress;
            }
        }
        if leg.eof && t.down.close_seen() && self.to_client.is_empty() {
            // Clean close handshake from the backend side: forward the FIN.
            self.enter_closing(ctx.now);
            return Step::Progress;
        }
        Step::Idle
    }
}

/// `--allowed-origin`: an empty list allows any origin; otherwise the `Origin` header must
/// be present and equal (ASCII case-insensitively, trailing slash ignored) to one entry.
fn origin_allowed(allowed: &[String], origin: Option<&[u8]>) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Some(origin) = origin.map(|o| o.trim_ascii()) else {
        return false;
    };
    let origin = origin.strip_suffix(b"/").unwrap_or(origin);
    allowed
        .iter()
        .any(|a| a.as_bytes().eq_ignore_ascii_case(origin))
}

/// Throttle accounting period: short, so a throttled stream flows smoothly.
const THROTTLE_WINDOW: Duration = Duration::from_millis(100);

/// `--throttle`: each direction may relay a fixed number of bytes per window; a direction
/// that used its share stops reading until the window ends.
#[derive(Debug)]
struct Throttle {
    per_window: usize,
    window_start: Instant,
    up_left: usize,
    down_left: usize,
}

impl Throttle {
    fn new(bytes_per_sec: u64, now: Instant) -> Self {
        let per_window = usize::try_from(bytes_per_sec / 10)
            .unwrap_or(usize::MAX)
            .max(1);
        Throttle {
            per_window,
            window_start: now,
            up_left: per_window,
            down_left: per_window,
        }
    }

    fn refill(&mut self, now: Instant) {
        if now >= self.window_start + THROTTLE_WINDOW {
            self.window_start = now;
            self.up_left = self.per_window;
            self.down_left = self.per_window;
        }
    }

    /// When a stopped direction may read again.
    fn resume_at(&self) -> Option<Instant> {
        (self.up_left == 0 || self.down_left == 0).then_some(self.window_start + THROTTLE_WINDOW)
    }
}

/// Room an outbox buffer offers for relayed bytes.
const BUF_ROOM: usize = crate::net::buffer::BUF_SIZE;

/// Reads into `buf` and runs the new bytes through `tracker`, committing what it releases:
/// a partial header is held back (and put in front of the next read), so the relayed stream
/// never ends inside a header, nothing of a header that failed is relayed, and bytes after a
/// close frame are dropped.
fn read_tracked(
    stream: &mut Transport,
    ready: &mut Ready,
    buf: &mut Buffer,
    tracker: &mut FrameTracker,
    max: usize,
    inspect: Option<&mut Inspect>,
) -> Result<Io, FrameError> {
    let held = tracker.held_header().len();
    let space = buf.space();
    if space.len() <= held {
        return Ok(Io::WouldBlock);
    }
    let (front, rest) = space.split_at_mut(held);
    front.copy_from_slice(tracker.held_header());
    let len = rest.len().min(max);
    let io = stream.read(ready, rest.get_mut(..len).unwrap_or_default());
    let mut fed = Ok(0);
    if let Io::Progress(n) = io {
        let before = tracker.released();
        fed = feed(tracker, rest.get(..n).unwrap_or_default(), inspect);
        let released = usize::try_from(tracker.released() - before).unwrap_or(0);
        buf.commit(released);
    }
    if buf.is_empty() {
        // An idle tunnel keeps no buffer.
        buf.release();
    }
    fed.map(|_| io)
}

/// Reads and drops input. Out of line so its scratch space does not enlarge the stack frame
/// of every `drive` (a frame over a page is probed on each call).
#[inline(never)]
fn discard(stream: &mut Transport, ready: &mut Ready) -> Io {
    let mut sink = [0u8; 4096];
    read_some(stream, ready, &mut sink)
}

/// `--inspect`: client messages reassembled (unmasked) for the hooks and events.
#[derive(Debug, Default)]
struct Inspect {
    partial: Vec<u8>,
    done: Vec<(u8, Vec<u8>)>,
}

/// Most bytes of one message shown to `on_client_message` (the relay itself is unbounded
/// by this; only the copy for inspection is cut).
const MAX_INSPECT: usize = 1 << 20;

/// Runs client bytes through the tracker, collecting messages when inspecting.
fn feed(
    tracker: &mut FrameTracker,
    bytes: &[u8],
    inspect: Option<&mut Inspect>,
) -> Result<usize, FrameError> {
    match inspect {
        None => tracker.feed(bytes),
        Some(ins) => tracker.feed_inspect(bytes, |piece| {
            if ins.partial.len() < MAX_INSPECT {
                piece.unmask_into(&mut ins.partial);
                ins.partial.truncate(MAX_INSPECT);
            }
            if piece.message_end {
                ins.done
                    .push((piece.opcode, std::mem::take(&mut ins.partial)));
            }
        }),
    }
}

/// Starts a non-blocking connect, wrapped in TLS for `wss://`/`https://` bindings.
fn open_backend(
    addr: SocketAddr,
    tls: Option<rustls_pki_types::ServerName<'static>>,
    cfg: Option<&std::sync::Arc<rustls::ClientConfig>>,
) -> io::Result<Transport> {
    let sock = TcpStream::connect(addr)?;
    let _ = sock.set_nodelay(true);
    match (tls, cfg) {
        (None, _) => Ok(Transport::Plain(sock)),
        (Some(name), Some(cfg)) => {
            let conn = crate::net::tls::connect(cfg, name).map_err(io::Error::other)?;
            Ok(Transport::Tls(Box::new(TlsStream::new(sock, conn))))
        }
        (Some(_), None) => Err(io::Error::other("no TLS client configuration")),
    }
}

/// Reads at most to the end of the current client frame into the tunnel's hold buffer.
/// A frame that is not a pong is released into `buf` as soon as its header is whole and its
/// first byte shows that; a pong is held whole, then dropped if it answers one of our pings,
/// else released. A "pong" longer than a control frame may be (the backend's to judge) is
/// released once the hold is full, so the hold stays bounded.
fn read_exact_frame(
    stream: &mut Transport,
    ready: &mut Ready,
    t: &mut Tunnel,
    buf: &mut Buffer,
) -> Result<Io, FrameError> {
    let to_end = usize::try_from(t.up.bytes_to_frame_end()).unwrap_or(usize::MAX);
    let want = to_end
        .min(MAX_CONTROL_FRAME.saturating_sub(t.up_hold.len()))
        .max(1);
    let mut tmp = [0u8; MAX_CONTROL_FRAME];
    let Some(dst) = tmp.get_mut(..want) else {
        return Ok(Io::WouldBlock);
    };
    let io = stream.read(ready, dst);
    let Io::Progress(n) = io else {
        return Ok(io);
    };
    let fresh = tmp.get(..n).unwrap_or_default();
    let fed = feed(&mut t.up, fresh, t.inspect.as_mut());
    t.up_hold.extend_from_slice(fresh);
    if let Err(e) = fed {
        // The failed header is not relayed.
        t.up_hold.clear();
        return Err(e);
    }
    if !t.up.held_header().is_empty() {
        return Ok(io);
    }
    let is_pong = t.up_hold.first().is_some_and(|b| b & 0x0f == 0xA);
    let whole = t.up.at_frame_boundary();
    if is_pong && !whole && t.up_hold.len() < MAX_CONTROL_FRAME {
        return Ok(io);
    }
    if is_pong && whole && t.pings_out > 0 && pong_payload(&t.up_hold).starts_with(PING_MAGIC) {
        t.pings_out -= 1;
        t.up_hold.clear();
        return Ok(io);
    }
    buf.push(&t.up_hold);
    t.up_hold.clear();
    Ok(io)
}

/// Appends all of `bytes` (at most a head buffer's worth, which may exceed a relay buffer
/// after a large handshake head), growing `buf` for it.
fn push_whole(buf: &mut Buffer, bytes: &[u8]) {
    if !buf.has_room(bytes.len()) {
        buf.grow(buf.len() + bytes.len());
    }
    let pushed = buf.push(bytes);
    debug_assert_eq!(pushed, bytes.len());
}

/// The unmasked payload of one whole client control frame (at most 125 bytes).
fn pong_payload(frame: &[u8]) -> Vec<u8> {
    let (Some(&b1), Some(mask)) = (frame.get(1), frame.get(2..6)) else {
        return Vec::new();
    };
    let len = usize::from(b1 & 0x7f);
    frame
        .get(6..6 + len)
        .unwrap_or_default()
        .iter()
        .zip(mask.iter().cycle())
        .map(|(b, m)| b ^ m)
        .collect()
}

/// Non-blocking connect outcome: `Ok(true)` connected, `Ok(false)` not yet.
fn connect_result(stream: &TcpStream) -> io::Result<bool> {
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    match stream.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(e) => Err(e),
    }
}

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
