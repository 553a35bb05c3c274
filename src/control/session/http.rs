//! The HTTP side of a control connection: the upgrade request (or an admin request and its
//! body), refusals and admin answers, and the live page's event stream.

use super::*;

impl ControlConn {
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
        // The status page runs only its own script (`/status.js`): a name a backend chose
        // that slipped past escaping still could not run.
        let csp = if content_type.starts_with("text/html") {
            "Content-Security-Policy: default-src 'self'; style-src 'self' 'unsafe-inline'\r\n"
        } else {
            ""
        };
        head.extend_from_slice(
            format!(
                "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n{csp}Connection: close\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        head.extend_from_slice(body);
        self.ready.writable = true;
        self.state = State::Refusing { out, since: now };
    }

    /// Turns an admin request into an event stream starting with `first` (after the head).
    pub fn start_stream(&mut self, now: Instant, first: &[u8]) {
        let mut out = live::StreamOut::default();
        // The head and a hello fit an empty queue unless the backends are in the hundreds:
        // then the page gets the stream without history rather than nothing.
        if !out.push(live::stream_head()) || !out.push(first) {
            out = live::StreamOut::default();
            out.push(live::stream_head());
        }
        if let Some(sock) = self.stream.as_mut().map(Transport::socket_mut) {
            // A fixed send buffer turns off the kernel's autotuning (up to 4 MB here): a
            // page that stops reading then holds `live::STREAM_SNDBUF` of kernel memory plus
            // its bounded queue, and is found out and dropped that much sooner.
            let _ = socket2::SockRef::from(&*sock).set_send_buffer_size(live::STREAM_SNDBUF);
        }
        self.last_heard = now;
        self.ready.writable = true;
        self.state = State::Streaming(out);
    }

    /// Queues a frame on an event stream; `false` if this reader is too far behind (or the
    /// connection is no stream): the caller drops it.
    pub fn push_stream(&mut self, now: Instant, frame: &[u8]) -> bool {
        let State::Streaming(out) = &mut self.state else {
            return false;
        };
        let queued = out.push(frame);
        if queued {
            self.last_heard = now;
        }
        queued
    }

    /// Bytes an event stream has queued (0 for other connections).
    pub fn stream_queued(&self) -> usize {
        match &self.state {
            State::Streaming(out) => out.len(),
            _ => 0,
        }
    }

    /// Reads the upgrade (or admin) request; `handshake` decides once it is whole.
    pub(super) fn read_upgrade(
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
    pub(super) fn read_admin_body(
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

    /// Writes a refusal or an admin answer, then FIN (close_notify on TLS) and waits for
    /// the peer's close, so the answer is not destroyed by a reset.
    pub(super) fn send_refusal(
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

    /// Writes what the event stream has queued; reads and drops whatever the page sends,
    /// to see it hang up.
    pub(super) fn pump_stream(&mut self, mut out: live::StreamOut) -> Result<(State, bool), ()> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(());
        };
        let mut progress = false;
        while self.ready.writable && !out.is_empty() {
            let (a, b) = out.slices();
            match stream.write_pair(&mut self.ready, a, b) {
                Io::Progress(n) => {
                    out.consume(n);
                    progress = true;
                }
                Io::WouldBlock => break,
                Io::Eof | Io::Failed => return Err(()),
            }
        }
        let mut sink = [0u8; 1024];
        match crate::net::endpoint::read_some(stream, &mut self.ready, &mut sink) {
            Io::Progress(_) => progress = true,
            Io::WouldBlock => {}
            Io::Eof | Io::Failed => return Err(()),
        }
        Ok((State::Streaming(out), progress))
    }

    pub(super) fn handshake(
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
        if path == live::STATUS_JS_PATH && req.method == "GET" {
            // The page's script holds no data and a browser loads it without the token.
            let rest = inbuf.data().get(req.head_len..).unwrap_or_default();
            return admin_request(&req, path, query, rest, events).or_else(refuse);
        }
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
}

/// An admin API request (any path but `/register`; `rest`: what came after its head):
/// whole, or waiting for its body. `Err(status)` for a body the API does not take.
pub(super) fn admin_request(
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
