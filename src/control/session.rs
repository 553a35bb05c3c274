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
            State::Lingering { .. } | State::Refusing { .. } => ControlDrive::Continue,
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

    /// Answers an admin request and closes after writing it.
    pub fn respond(&mut self, now: Instant, status: u16, content_type: &str, body: &[u8]) {
        let mut out = Outbox::default();
        let head = out.head_vec();
        let reason = match status {
            200 => "OK",
            400 => "Bad Request",
            403 => "Forbidden",
            404 => "Not Found",
            405 => "Method Not Allowed",
            409 => "Conflict",
            503 => "Service Unavailable",
            _ => "Error",
        };
        head.extend_from_slice(
            format!(
                "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        head.extend_from_slice(body);
        self.ready.writable = true;
        self.state = State::Refusing { out, since: now };
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

    /// Reads the upgrade (or admin) request; `handshake` decides once it is whole.
    fn read_upgrade(
        &mut self,
        now: Instant,
        mut inbuf: Buffer,
        auth: &ControlAuth,
        events: &mut Vec<ControlEvent>,
    ) -> Result<(State, bool), ()> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(());
        };
        if !self.ready.readable {
            return Ok((State::Handshake { inbuf }, false));
        }
        match read_into(stream, &mut self.ready, &mut inbuf, usize::MAX) {
            Io::Progress(_) => {}
            Io::WouldBlock => {
                // A TLS handshake message may now be owed: one more round sends it.
                let owed = stream.wants_write() && self.ready.writable;
                return Ok((State::Handshake { inbuf }, owed));
            }
            Io::Eof | Io::Failed => return Err(()),
        }
        Ok((self.handshake(now, inbuf, auth, events)?, true))
    }

    /// Reads an admin request's body; the server answers it once whole.
    fn read_admin_body(
        &mut self,
        mut req: Box<AdminRequest>,
        need: usize,
        events: &mut Vec<ControlEvent>,
    ) -> Result<(State, bool), ()> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(());
        };
        let mut chunk = [0u8; 16 * 1024];
        let want = (need - req.body.len()).min(chunk.len());
        match crate::net::endpoint::read_some(
            stream,
            &mut self.ready,
            chunk.get_mut(..want).unwrap_or_default(),
        ) {
            Io::Progress(n) => req
                .body
                .extend_from_slice(chunk.get(..n).unwrap_or_default()),
            Io::WouldBlock => return Ok((State::AdminBody { req, need }, false)),
            Io::Eof | Io::Failed => return Err(()),
        }
        if req.body.len() >= need {
            events.push(ControlEvent::Admin(req));
            Ok((State::AwaitingAnswer, true))
        } else {
            Ok((State::AdminBody { req, need }, true))
        }
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

    /// Writes a refusal or an admin answer, then FIN (close_notify on TLS) and waits for
    /// the peer's close, so the answer is not destroyed by a reset.
    fn send_refusal(
        &mut self,
        now: Instant,
        mut out: Outbox,
        since: Instant,
    ) -> Result<(State, bool), ()> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(());
        };
        match out.flush(stream, &mut self.ready) {
            Io::Failed => Err(()),
            _ if out.is_empty() && !stream.wants_write() => {
                stream.shutdown_write(&mut self.ready);
                self.ready.readable = true;
                Ok((State::Lingering { since: now }, true))
            }
            _ => Ok((State::Refusing { out, since }, false)),
        }
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

    fn handshake(
        &mut self,
        now: Instant,
        mut inbuf: Buffer,
        auth: &ControlAuth,
        events: &mut Vec<ControlEvent>,
    ) -> Result<State, ()> {
        let mut storage = head::header_storage();
        let parsed = head::parse_request(inbuf.data(), &mut storage);
        let refuse = |status: u16| {
            let mut out = Outbox::default();
            rewrite::write_error(status, true, out.head_vec());
            Ok(State::Refusing { out, since: now })
        };
        let req = match parsed {
            Ok(Some(r)) => r,
            Ok(None) if inbuf.is_full() => return refuse(431),
            Ok(None) => return Ok(State::Handshake { inbuf }),
            Err(e) => return refuse(e.status()),
        };
        let (path, query) = req.path.split_once('?').unwrap_or((req.path, ""));
        // Browsers cannot send a bearer header to the status page: `?token=` works too.
        let query_token = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("token="))
            .map(|t| format!("Bearer {t}"));
        let authorization =
            header(req.headers, "authorization").or(query_token.as_deref().map(str::as_bytes));
        let cert_name = self.stream.as_ref().and_then(Transport::client_cert_name);
        let identity = match auth.check(
            self.peer,
            self.via_proxy,
            authorization,
            cert_name.as_deref(),
        ) {
            Ok(id) => id,
            Err(status) => {
                crate::observe::log::error(
                    "control connection refused",
                    &[
                        ("peer", &self.peer),
                        ("status", &status),
                        ("via_proxy", &self.via_proxy),
                    ],
                );
                return refuse(status);
            }
        };
        let admin = identity.is_admin();
        self.identity = Some(identity);
        if path != "/register" {
            if !admin {
                // A per-backend token registers its backend; it does not run the balancer.
                return refuse(403);
            }
            let rest = inbuf.data().get(req.head_len..).unwrap_or_default();
            return admin_request(&req, path, query, rest, events).or_else(refuse);
        }
        if !req.wants_websocket {
            return refuse(400);
        }
        let key = match handshake::validate_request(&req) {
            Ok(k) => k,
            Err(e) => return refuse(e.status()),
        };
        let accept = tungstenite::handshake::derive_accept_key(&key.0);
        let mut out = Outbox::default();
        let head = out.head_vec();
        head.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ");
        head.extend_from_slice(accept.as_bytes());
        head.extend_from_slice(b"\r\n\r\n");
        let n = req.head_len;
        let leftover = inbuf.data().get(n..).unwrap_or_default().to_vec();
        inbuf.release();
        Ok(State::Accepting { out, leftover })
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

/// An admin API request (any path but `/register`; `rest`: what came after its head):
/// whole, or waiting for its body. `Err(status)` for a body the API does not take.
fn admin_request(
    req: &head::Request<'_, '_>,
    path: &str,
    query: &str,
    rest: &[u8],
    events: &mut Vec<ControlEvent>,
) -> Result<State, u16> {
    let need = match req.body {
        crate::http::body::BodyKind::Empty => 0,
        crate::http::body::BodyKind::Length(n) if n <= MAX_ADMIN_BODY as u64 => n as usize,
        crate::http::body::BodyKind::Length(_) => return Err(413),
        _ => return Err(411),
    };
    let mut admin = Box::new(AdminRequest {
        method: req.method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        content_type: header(req.headers, "content-type")
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default(),
        body: Vec::with_capacity(need),
    });
    admin
        .body
        .extend_from_slice(rest.get(..need.min(rest.len())).unwrap_or_default());
    if admin.body.len() >= need {
        events.push(ControlEvent::Admin(admin));
        return Ok(State::AwaitingAnswer);
    }
    Ok(State::AdminBody { req: admin, need })
}

impl crate::slots::Slotted for ControlConn {
    fn generation(&self) -> u64 {
        self.gen
    }
    fn marks(&self) -> &crate::slots::Marks {
        &self.marks
    }
    fn marks_mut(&mut self) -> &mut crate::slots::Marks {
        &mut self.marks
    }
}
