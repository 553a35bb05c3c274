//! One control connection from a backend: the HTTP upgrade (with authentication), then the
//! registration protocol over tungstenite on the non-blocking socket. Control traffic is a few
//! small messages per backend, so this side favours tungstenite's completeness over the
//! zero-copy relay of the data path.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tungstenite::{Message, WebSocket};

use super::auth::{ControlAuth, Identity};
use super::live;
use super::messaging::{self, Incoming, MsgError, RateBucket, Refusal, Request};
use super::protocol::{self, BackendMsg, ControlError, Registration};
use crate::http::head::{self, header};
use crate::http::rewrite;
use crate::net::buffer::Buffer;
use crate::net::endpoint::{read_into, Io, Outbox, Ready};
use crate::net::transport::Transport;
use crate::ws::handshake;

/// Missed heartbeats after which a backend is considered lost.
pub const MISSED_HEARTBEATS: u32 = 3;

/// What the session asks the server to do with the registry.
#[derive(Debug, PartialEq, Eq)]
pub enum ControlEvent {
    /// The WebSocket is open ("server connected").
    Connected,
    /// Register or update ("server ready").
    Register(Box<Registration>),
    /// Stop sending new clients.
    Drain,
    /// Leave the pool.
    Deregister,
    /// Issue 18: the backend's live client count.
    Load(u32),
    /// An admin API request to answer with [`ControlConn::respond`].
    Admin(Box<AdminRequest>),
    /// A messaging request (or why it could not be read), to answer with `sent`/`failed`.
    Message(Box<Result<Request, (Option<u64>, MsgError)>>),
}

/// Largest admin request body (a broadcast message).
pub const MAX_ADMIN_BODY: usize = 1 << 20;

/// An HTTP request to the admin API (status page, metrics, messaging).
#[derive(Debug, PartialEq, Eq)]
pub struct AdminRequest {
    /// Method, e.g. `POST`.
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// Query string without `?`.
    pub query: String,
    /// `Content-Type` value.
    pub content_type: String,
    /// Body (Content-Length only).
    pub body: Vec<u8>,
}

enum State {
    /// Reading the upgrade request.
    Handshake {
        inbuf: Buffer,
    },
    /// Writing the 101; `leftover` = bytes the backend sent right after its request.
    Accepting {
        out: Outbox,
        leftover: Vec<u8>,
    },
    /// Writing a refusal or an admin answer, then closing.
    Refusing {
        out: Outbox,
        since: Instant,
    },
    /// Reading an admin request's body.
    AdminBody {
        req: Box<AdminRequest>,
        need: usize,
    },
    /// The server is computing the answer to an admin request.
    AwaitingAnswer,
    Open(Box<WebSocket<Transport>>),
    /// Our close went out: FIN sent, reading and discarding until the peer hangs up, so the
    /// error message is not destroyed by a reset while the peer is still sending.
    Lingering {
        since: Instant,
    },
    /// `GET /api/live`: an open event stream the server pushes to (`control::live`).
    Streaming(live::StreamOut),
    /// Placeholder while moving the stream between states.
    Gone,
}

/// A backend's control connection.
pub struct ControlConn {
    /// Generation for timers and registry ownership.
    pub gen: u64,
    /// Peer address, for logs.
    pub peer: SocketAddr,
    stream: Option<Transport>,
    state: State,
    ready: Ready,
    /// Guid once registered.
    pub guid: Option<String>,
    /// What the upgrade request proved (set once authenticated).
    pub identity: Option<Identity>,
    /// Opened by wslb's own proxy: never a local peer, whatever its address.
    pub via_proxy: bool,
    last_heard: Instant,
    next_ping: Instant,
    opened: Instant,
    /// The loop's bookkeeping about this connection (timer, reaping).
    pub marks: crate::slots::Marks,
    /// We sent a close: stop processing messages, flush, then linger.
    closing: bool,
    /// `--message-max`, for decoding messaging requests.
    pub max_payload: usize,
    /// `--message-rate` budget of this backend, made on its first request.
    pub bucket: Option<RateBucket>,
}

/// How long a closing control connection waits for the peer to hang up.
const LINGER: Duration = Duration::from_secs(2);
/// An event stream nothing was pushed to for this long is closed (the server pushes every
/// second, so this only ends streams a stopped loop part forgot).
const STREAM_IDLE: Duration = Duration::from_secs(30);

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(256 * 1024)
        // Registration messages keep their 64 KiB limit in the decoder; frames may be as
        // large as the largest messaging request.
        .max_message_size(Some(messaging::MAX_FRAME))
        .max_frame_size(Some(messaging::MAX_FRAME))
}

/// Outcome of driving a control connection.
#[derive(Debug, PartialEq, Eq)]
pub enum ControlDrive {
    /// Still open; these things happened.
    Continue,
    /// Finished: reap it (and remove its backend).
    Done,
}

impl ControlConn {
    /// A freshly accepted control connection.
    pub fn new(gen: u64, stream: Transport, peer: SocketAddr, now: Instant) -> Self {
        ControlConn {
            gen,
            peer,
            stream: Some(stream),
            state: State::Handshake {
                inbuf: Buffer::default(),
            },
            ready: Ready::default(),
            guid: None,
            identity: None,
            via_proxy: false,
            last_heard: now,
            next_ping: now,
            opened: now,
            marks: crate::slots::Marks::default(),
            closing: false,
            max_payload: crate::config::Messaging::default().max_payload,
            bucket: None,
        }
    }

    /// The socket, for (de)registration.
    pub fn stream_mut(&mut self) -> Option<&mut TcpStream> {
        match &mut self.state {
            State::Open(ws) => Some(ws.get_mut().socket_mut()),
            _ => self.stream.as_mut().map(Transport::socket_mut),
        }
    }

    /// Folds a readiness event in.
    pub fn absorb(&mut self, ev: &mio::event::Event) {
        self.ready.absorb(ev);
    }

    /// Next instant at which [`ControlConn::expire`] has work.
    pub fn deadline(&self, header_timeout: Duration, heartbeat: Duration) -> Instant {
        match self.state {
            State::Open(_) if self.closing => self.last_heard + LINGER,
            State::Open(_) => self
                .next_ping
                .min(self.last_heard + heartbeat * MISSED_HEARTBEATS),
            State::Lingering { since } => since + LINGER,
            State::Streaming(_) => self.last_heard + STREAM_IDLE,
            // An answer gets the rest of the request's time to go out, and at least LINGER
            // (the 408 for a stalled body is written when that time is already up).
            State::Refusing { since, .. } => (since + LINGER).max(self.opened + header_timeout),
            _ => self.opened + header_timeout,
        }
    }

    /// Heartbeat or deadline work. Returns `Done` when the peer is considered lost.
    pub fn expire(
        &mut self,
        now: Instant,
        header_timeout: Duration,
        heartbeat: Duration,
    ) -> ControlDrive {
        match &mut self.state {
            State::Open(_) if self.closing && now >= self.last_heard + LINGER => ControlDrive::Done,
            State::Lingering { since } if now >= *since + LINGER => ControlDrive::Done,
            State::Refusing { since, .. }
                if now >= (*since + LINGER).max(self.opened + header_timeout) =>
            {
                ControlDrive::Done
            }
            State::Streaming(_) if now >= self.last_heard + STREAM_IDLE => ControlDrive::Done,
            State::Lingering { .. } | State::Refusing { .. } | State::Streaming(_) => {
                ControlDrive::Continue
            }
            State::AdminBody { .. } if now >= self.opened + header_timeout => {
                // The body stalled: say so (RFC 9110 §15.5.9) instead of a bare close.
                let mut out = Outbox::default();
                rewrite::write_error(408, true, out.head_vec());
                self.ready.writable = true;
                self.state = State::Refusing { out, since: now };
                ControlDrive::Continue
            }
            State::Open(ws) => {
                if now >= self.last_heard + heartbeat * MISSED_HEARTBEATS {
                    return ControlDrive::Done;
                }
                if now >= self.next_ping {
                    self.next_ping = now + heartbeat;
                    if ws
                        .send(Message::Ping(Vec::new().into()))
                        .is_err_and(|e| !would_block(&e))
                    {
                        return ControlDrive::Done;
                    }
                }
                ControlDrive::Continue
            }
            State::AwaitingAnswer => ControlDrive::Continue,
            _ if now >= self.opened + header_timeout => ControlDrive::Done,
            _ => ControlDrive::Continue,
        }
    }

    /// When the backend behind this connection was last heard from.
    pub fn last_heard(&self) -> Instant {
        self.last_heard
    }

    /// Sends a text message (an answer or a notice); failure closes the connection later.
    pub fn send_text(&mut self, text: String) {
        if let State::Open(ws) = &mut self.state {
            let _ = ws.send(Message::text(text));
        }
    }

    /// Sends `error` then closes with its code.
    pub fn refuse(&mut self, e: &ControlError) {
        if let State::Open(ws) = &mut self.state {
            let _ = ws.send(Message::text(protocol::error(e)));
            let _ = ws.close(Some(CloseFrame {
                code: CloseCode::from(e.close_code()),
                reason: e.code().into(),
            }));
            let _ = ws.flush();
            self.closing = true;
        }
    }

    /// Closes with 1012 (service restart): a binary upgrade moves this backend's agent to
    /// the new process, which it reaches by reconnecting.
    pub fn close_for_restart(&mut self) {
        if let State::Open(ws) = &mut self.state {
            let _ = ws.close(Some(CloseFrame {
                code: CloseCode::Restart,
                reason: "balancer upgrade".into(),
            }));
            let _ = ws.flush();
            self.closing = true;
        }
    }

    /// Sends an acknowledgement then a normal close.
    pub fn close_with(&mut self, text: String) {
        if let State::Open(ws) = &mut self.state {
            let _ = ws.send(Message::text(text));
            let _ = ws.close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            }));
            let _ = ws.flush();
            self.closing = true;
        }
    }

    /// Runs until nothing moves; pushes protocol events for the server into `events`.
    pub fn drive(
        &mut self,
        now: Instant,
        auth: &ControlAuth,
        events: &mut Vec<ControlEvent>,
    ) -> ControlDrive {
        for _ in 0..64 {
            match self.step(now, auth, events) {
                Ok(true) => continue,
                Ok(false) => return ControlDrive::Continue,
                Err(()) => return ControlDrive::Done,
            }
        }
        // Bounded work per turn; the socket is still readable, the next event resumes it.
        ControlDrive::Continue
    }

    /// `Ok(true)` = progress, `Ok(false)` = idle, `Err` = finished.
    fn step(
        &mut self,
        now: Instant,
        auth: &ControlAuth,
        events: &mut Vec<ControlEvent>,
    ) -> Result<bool, ()> {
        // TLS records rustls wants out (handshake, alerts) go first, whatever the state:
        // before the WebSocket takes the stream, nothing else would write them.
        if let Some(stream) = self.stream.as_mut() {
            if stream.wants_write() && self.ready.writable {
                match stream.flush_tls(&mut self.ready) {
                    Io::Failed => return Err(()),
                    Io::Progress(_) => return Ok(true),
                    _ => {}
                }
            }
        }
        let state = std::mem::replace(&mut self.state, State::Gone);
        let (next, progress) = match state {
            State::Handshake { inbuf } => self.read_upgrade(now, inbuf, auth, events)?,
            State::AdminBody { req, need } => self.read_admin_body(req, need, events)?,
            State::AwaitingAnswer => (State::AwaitingAnswer, false),
            State::Accepting { out, leftover } => {
                self.accept_upgrade(now, out, leftover, events)?
            }
            State::Refusing { out, since } => self.send_refusal(now, out, since)?,
            State::Open(ws) if self.closing => self.finish_close(now, ws),
            State::Open(mut ws) => {
                let r = self.pump(&mut ws, now, events);
                self.state = State::Open(ws);
                return r;
            }
            State::Lingering { since } => self.linger(since)?,
            State::Streaming(out) => self.pump_stream(out)?,
            State::Gone => return Err(()),
        };
        self.state = next;
        // Reading may have produced TLS records to send (the handshake): another round.
        let tls_owed = self
            .stream
            .as_ref()
            .is_some_and(|s| s.wants_write() && self.ready.writable);
        Ok(progress || tls_owed)
    }

    /// Writes the 101; then the WebSocket takes the stream.
    fn accept_upgrade(
        &mut self,
        now: Instant,
        mut out: Outbox,
        leftover: Vec<u8>,
        events: &mut Vec<ControlEvent>,
    ) -> Result<(State, bool), ()> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(());
        };
        if let Io::Failed = out.flush(stream, &mut self.ready) {
            return Err(());
        }
        if !out.is_empty() {
            return Ok((State::Accepting { out, leftover }, false));
        }
        let Some(stream) = self.stream.take() else {
            return Err(());
        };
        let ws = WebSocket::from_partially_read(stream, leftover, Role::Server, Some(ws_config()));
        self.last_heard = now;
        self.next_ping = now;
        events.push(ControlEvent::Connected);
        // The peer may have readable bytes already buffered with the handshake.
        self.ready.readable = true;
        Ok((State::Open(Box::new(ws)), true))
    }

    /// Our close frame is queued: flush it, FIN, linger.
    fn finish_close(&mut self, now: Instant, mut ws: Box<WebSocket<Transport>>) -> (State, bool) {
        match ws.flush() {
            Err(e) if would_block(&e) => (State::Open(ws), false),
            _ => {
                let mut stream = ws.into_inner();
                stream.shutdown_write(&mut self.ready);
                self.stream = Some(stream);
                self.ready.readable = true;
                (State::Lingering { since: now }, true)
            }
        }
    }

    /// Reads and drops until the peer hangs up.
    fn linger(&mut self, since: Instant) -> Result<(State, bool), ()> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(());
        };
        let mut sink = [0u8; 4096];
        match crate::net::endpoint::read_some(stream, &mut self.ready, &mut sink) {
            Io::Progress(_) => Ok((State::Lingering { since }, true)),
            Io::WouldBlock => Ok((State::Lingering { since }, false)),
            Io::Eof | Io::Failed => Err(()),
        }
    }

    fn pump(
        &mut self,
        ws: &mut WebSocket<Transport>,
        now: Instant,
        events: &mut Vec<ControlEvent>,
    ) -> Result<bool, ()> {
        // Answers the backend has not taken yet hold back its next requests: every request
        // gets its answer, and a backend that pipelines without reading cannot grow our
        // write buffer (or make answers be dropped when it is full). It is not heard from
        // meanwhile, so one that never reads is lost after 3 heartbeats like a hung one.
        match ws.flush() {
            Ok(()) => {}
            Err(e) if would_block(&e) => return Ok(false),
            Err(_) => return Err(()),
        }
        match ws.read() {
            Ok(msg) => {
                self.last_heard = now;
                let decoded = match &msg {
                    Message::Text(t) => messaging::decode_text(t.as_str(), self.max_payload),
                    Message::Binary(b) => {
                        messaging::decode_binary(b, self.max_payload).map(Incoming::Request)
                    }
                    // Pings are answered by tungstenite; any frame proves the peer alive.
                    _ => return Ok(true),
                };
                match decoded {
                    Ok(Incoming::Control(BackendMsg::Register(r))) => {
                        events.push(ControlEvent::Register(Box::new(r)))
                    }
                    Ok(Incoming::Control(BackendMsg::Drain)) => events.push(ControlEvent::Drain),
                    Ok(Incoming::Control(BackendMsg::Deregister)) => {
                        events.push(ControlEvent::Deregister)
                    }
                    Ok(Incoming::Control(BackendMsg::Load(n))) => {
                        events.push(ControlEvent::Load(n))
                    }
                    Ok(Incoming::Request(r)) => events.push(ControlEvent::Message(Box::new(Ok(r)))),
                    Err(Refusal::Failed(id, e)) => {
                        events.push(ControlEvent::Message(Box::new(Err((id, e)))))
                    }
                    Err(Refusal::Fatal(e)) => self.refuse_on(ws, &e),
                }
                Ok(true)
            }
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                // Flush queued answers (pongs, replies) when the socket allows.
                match ws.flush() {
                    Ok(()) => Ok(false),
                    Err(e) if would_block(&e) => Ok(false),
                    Err(_) => Err(()),
                }
            }
            Err(tungstenite::Error::Capacity(_)) => {
                self.refuse_on(ws, &ControlError::TooLarge);
                Ok(true)
            }
            Err(tungstenite::Error::Utf8(_)) => {
                self.refuse_on(ws, &ControlError::BadJson);
                Ok(true)
            }
            Err(_) => Err(()),
        }
    }

    fn refuse_on(&mut self, ws: &mut WebSocket<Transport>, e: &ControlError) {
        crate::observe::log::error(
            "bad control message",
            &[
                ("peer", &self.peer),
                ("guid", &self.guid.as_deref().unwrap_or("-")),
                ("error", e),
            ],
        );
        let _ = ws.send(Message::text(protocol::error(e)));
        let _ = ws.close(Some(CloseFrame {
            code: CloseCode::from(e.close_code()),
            reason: e.code().into(),
        }));
        let _ = ws.flush();
        self.closing = true;
    }
}

fn would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if io.kind() == io::ErrorKind::WouldBlock)
}

crate::slots::slotted!(ControlConn);

mod http;
