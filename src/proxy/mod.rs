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
use crate::ws::frames::{encode_close_reason, Direction, FrameError, FrameTracker};
use crate::ws::handshake::{self, WsKey};
use std::collections::VecDeque;

mod exchange;
mod leg;
mod messaging;
mod throttle;
mod tunnel;

use exchange::*;
use leg::*;
pub use messaging::Injected;
use throttle::*;
use tunnel::*;

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
                                ctx.events.emit(Event::ClientMessage {
                                    client: self.id,
                                    text: opcode == 1,
                                    bytes: msg.len(),
                                });
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
                    match linger_read(&mut self.client, &mut self.c_ready, &mut self.lingered) {
                        Linger::Read => progress = true,
                        Linger::Idle => {}
                        Linger::Ended => {
                            self.c_eof = true;
                            progress = true;
                        }
                        Linger::OverBudget => return Step::Done,
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
                match linger_read(&mut leg.stream, &mut leg.ready, &mut self.lingered) {
                    Linger::Read => progress = true,
                    Linger::Idle => {}
                    Linger::Ended => {
                        leg.eof = true;
                        progress = true;
                    }
                    Linger::OverBudget => return Step::Done,
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

    // Kept out of line: its 100-field parse storage would otherwise enlarge the stack frame
    // of every `drive`, tunnels included.
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
