//! The HTTP exchange: a request head parsed and forwarded, its body streamed to the
//! backend, the response streamed back (with a retry on a reused connection that closed
//! unanswered), sticky cookies, and the hand-over to a tunnel on 101.

use super::*;
use crate::backends::route::{self, Sticky};

#[derive(Debug)]
pub(super) enum Resp {
    AwaitHead,
    Body(BodyReader),
}

/// What the response loop does after one piece of it.
pub(super) enum Next {
    /// Something moved and the next piece may be ready: go on.
    Again,
    /// Waiting for bytes or room; `moved`: something moved before that.
    Wait { moved: bool },
    /// The exchange changed phase or failed: the step's outcome.
    Return(Step),
}

/// One HTTP request/response in flight.
#[derive(Debug)]
pub(super) struct Exchange {
    pub(super) req_body: BodyReader,
    pub(super) resp: Resp,
    pub(super) head_request: bool,
    pub(super) ws_key: Option<WsKey>,
    /// Close the client connection once the response is delivered.
    pub(super) close_after: bool,
    pub(super) backend_keep_alive: bool,
    /// Some byte of the answer reached the client's outbox: no retry any more.
    pub(super) answered: bool,
    /// Backends that failed for this request, not to be tried again.
    pub(super) failed: Vec<usize>,
    pub(super) started: Instant,
    pub(super) status: u16,
    /// `METHOD path`, kept only when events are on.
    pub(super) request_line: Option<String>,
    /// Sticky: the backend a valid cookie named, or a key to hash (ip / header modes).
    pub(super) sticky: Sticky,
    /// `Expect: 100-continue`: the client waits for an answer before sending its body.
    pub(super) expect_continue: bool,
    /// Start of the current `--min-body-rate` window and body bytes received in it.
    pub(super) body_window: (Instant, u64),
    /// Every request body byte sent so far on a reused backend connection, so the request
    /// can be sent again if that connection turns out to be closed (the backend may close
    /// an idle connection just as we reuse it). `None` once more than [`REPLAY_MAX`] went
    /// out: such a request is not retried.
    pub(super) replay: Option<Vec<u8>>,
}

impl Exchange {
    fn new(
        req: &head::Request<'_, '_>,
        ws_key: Option<WsKey>,
        sticky: Sticky,
        ctx: &Ctx<'_>,
    ) -> Self {
        Exchange {
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
            request_line: ctx
                .events
                .enabled()
                .then(|| format!("{} {}", req.method, req.path)),
            sticky,
            expect_continue: req.expect_continue,
            body_window: (ctx.now, 0),
            replay: Some(Vec::new()),
        }
    }
}

/// Most request body bytes held for a retry on a new connection: one relay buffer, so a
/// replay always fits in a fresh outbox.
pub(super) const REPLAY_MAX: usize = crate::net::buffer::BUF_SIZE;

/// Period over which `--min-body-rate` is measured.
pub(super) const BODY_RATE_WINDOW: Duration = Duration::from_secs(10);

pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What sticky sessions need from a request head.
pub(super) fn sticky_of(req: &head::Request<'_, '_>, peer: SocketAddr, ctx: &Ctx<'_>) -> Sticky {
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
pub(super) fn add_sticky_cookie(
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

/// Adds body bytes sent on a reused connection to the replay copy, or gives the replay up
/// once it would exceed [`REPLAY_MAX`].
pub(super) fn hold_for_replay(replay: &mut Option<Vec<u8>>, part: &[u8]) {
    if let Some(held) = replay {
        if held.len() + part.len() <= REPLAY_MAX {
            held.extend_from_slice(part);
        } else {
            *replay = None;
        }
    }
}

/// `--allowed-origin`: an empty list allows any origin; otherwise the `Origin` header must
/// be present and equal (ASCII case-insensitively, trailing slash ignored) to one entry.
pub(super) fn origin_allowed(allowed: &[String], origin: Option<&[u8]>) -> bool {
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

/// Why a parsed request is not forwarded: the status the balancer answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Refusal {
    pub(super) status: u16,
    pub(super) why: &'static str,
}

/// What becomes of a parsed request head, decided from the request, the flags and the
/// backend set alone (no sockets).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Admission {
    /// Forwarded; `Some` key for a WebSocket upgrade.
    Forward(Option<WsKey>),
    /// Answered by the balancer (bad upgrade, origin, protocol not served).
    Refuse(Refusal),
    /// No backend is eligible: 503. `close`: the connection cannot carry another request
    /// (the client asked to close, or an unread body would be taken for the next request).
    Unavailable { close: bool },
    /// A request to `--dispatch-path`: answered with a backend's public binding.
    Dispatch(super::dispatch::DispatchAs),
}

/// Decides what becomes of a request head (see [`Admission`]).
pub(super) fn admit(
    req: &head::Request<'_, '_>,
    cfg: &Config,
    backends: &Registry,
    draining: bool,
) -> Admission {
    if let Some(dispatch) = super::dispatch::classify(req, cfg) {
        return dispatch;
    }
    let refuse = |status, why| Admission::Refuse(Refusal { status, why });
    let ws_key = if req.wants_websocket {
        match handshake::validate_request(req) {
            Ok(_) if !cfg.websocket => return refuse(400, "websocket disabled"),
            Ok(k) => Some(k),
            Err(e) => return refuse(e.status(), e.as_str()),
        }
    } else if !cfg.http {
        return refuse(426, "plain http disabled");
    } else {
        None
    };
    if ws_key.is_some()
        && !origin_allowed(&cfg.allowed_origins, head::header(req.headers, "origin"))
    {
        return refuse(403, "websocket origin refused");
    }
    if !backends.any_eligible() {
        let close = !req.keep_alive || draining || req.body != BodyKind::Empty;
        return Admission::Unavailable { close };
    }
    Admission::Forward(ws_key)
}

impl Conn {
    /// Parses the next request head; forwards it, or answers it, or waits for more.
    #[inline(never)]
    pub(super) fn process_head(&mut self, ctx: &mut Ctx<'_>) -> Step {
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
        // Kept out of line (`inline(never)`): its 100-field parse storage would otherwise
        // enlarge the stack frame of every `drive`, tunnels included.
        let mut storage = head::header_storage();
        let req = match head::parse_request(self.from_client.data(), &mut storage) {
            Ok(Some(req)) => req,
            Ok(None) => return self.await_head(ctx),
            Err(e) => return self.bad_head(ctx, e),
        };
        let ws_key = match admit(&req, ctx.cfg, ctx.backends, ctx.draining) {
            Admission::Forward(k) => k,
            Admission::Refuse(r) => {
                log::debug(
                    "request refused",
                    &[("client", &self.id), ("status", &r.status), ("why", &r.why)],
                );
                self.fail(ctx, r.status);
                return Step::Progress;
            }
            Admission::Dispatch(how) => {
                let asked = super::dispatch::Asked::of(&req, self.peer, ctx);
                return self.answer_dispatch(ctx, asked, how);
            }
            Admission::Unavailable { close } => {
                log::debug("no backend", &[("client", &self.id)]);
                let head_len = req.head_len;
                let has_body = req.body != BodyKind::Empty;
                self.from_client.consume(head_len);
                if has_body {
                    // The unread body would be taken for the next request.
                    self.fail(ctx, 503);
                    return Step::Progress;
                }
                rewrite::write_error(503, close, self.to_client.head_vec());
                ctx.stats.response(503);
                if close {
                    self.enter_closing(ctx.now);
                } else {
                    self.answered_in_head(ctx.now);
                }
                return Step::Progress;
            }
        };
        let client = ClientInfo {
            peer: self.peer.ip(),
            tls: self.client.is_tls(),
            trusted: crate::netpolicy::any_contains(&ctx.cfg.trusted_proxies, self.peer.ip()),
            rfc7239: ctx.cfg.forwarded,
            client_id: self.client_id_field(ctx.cfg),
        };
        let mut to_backend = Outbox::default();
        rewrite::write_request(&req, client, ws_key.is_some(), to_backend.head_vec());
        if let Some(h) = ctx.hooks.as_deref_mut() {
            h.on_request_head(to_backend.head_vec());
        }
        let ex = Exchange::new(&req, ws_key, sticky_of(&req, self.peer, ctx), ctx);
        let head_len = req.head_len;
        self.from_client.consume(head_len);
        self.enter(Phase::Exchange(Box::new(ex)));
        self.connect_backend(ctx, to_backend, false);
        Step::Progress
    }

    /// A head that does not parse: 400 (or 505, 431 …) and close. HTTP/1.2..1.9 is
    /// answered as HTTP/1.1 instead (RFC 9110 §2.5): rewritten and parsed again.
    fn bad_head(&mut self, ctx: &mut Ctx<'_>, e: head::HeadError) -> Step {
        let version = matches!(e, head::HeadError::Malformed(httparse::Error::Version));
        if version && head::downgrade_minor_version(self.from_client.data_mut()) {
            return Step::Progress;
        }
        log::debug("bad request head", &[("client", &self.id), ("error", &e)]);
        self.fail(ctx, e.status());
        Step::Progress
    }

    /// An incomplete head: wait, grow the buffer up to the head limit, or close on EOF.
    fn await_head(&mut self, ctx: &mut Ctx<'_>) -> Step {
        if self.c_eof {
            self.enter_closing(ctx.now);
            return Step::Progress;
        }
        if self.from_client.is_full() && self.from_client.len() < MAX_HEAD {
            // A head may legitimately exceed one buffer, up to the head limit.
            self.from_client.grow(MAX_HEAD);
            return Step::Progress;
        }
        Step::Idle
    }

    /// Streams the request body to the backend and the response back to the client.
    #[inline(never)]
    pub(super) fn process_exchange(&mut self, ctx: &mut Ctx<'_>) -> Step {
        let mut progress = match self.forward_request_body(ctx) {
            Ok(p) => p,
            Err(step) => return step,
        };
        loop {
            let (Phase::Exchange(ex), Some(_)) = (&self.phase, &self.leg) else {
                return Step::Progress;
            };
            let next = match ex.resp {
                Resp::AwaitHead => self.response_head(ctx),
                Resp::Body(_) => self.response_body(ctx),
            };
            match next {
                Next::Again => progress = true,
                Next::Wait { moved } => {
                    progress |= moved;
                    break;
                }
                Next::Return(step) => return step,
            }
        }
        if progress {
            Step::Progress
        } else {
            Step::Idle
        }
    }

    /// Request body: client → backend, bounded by the backend outbox. `Ok(progress)`, or
    /// `Err` with the step to return when the exchange ended here.
    fn forward_request_body(&mut self, ctx: &mut Ctx<'_>) -> Result<bool, Step> {
        let (Phase::Exchange(ex), Some(leg)) = (&mut self.phase, &mut self.leg) else {
            return Err(Step::Idle);
        };
        let mut progress = false;
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
                    return Err(Step::Progress);
                }
            }
        }
        if self.c_eof && !ex.req_body.is_done() {
            // The client gave up mid-body: nothing useful can follow.
            self.drop_leg(ctx, false);
            self.enter_closing(ctx.now);
            return Err(Step::Progress);
        }
        if self.c_eof {
            ex.close_after = true;
        }
        Ok(progress)
    }

    /// The backend's response head: relayed (with the sticky cookie), an interim answer
    /// passed on, or a 101 that opens the tunnel.
    fn response_head(&mut self, ctx: &mut Ctx<'_>) -> Next {
        let (Phase::Exchange(ex), Some(leg)) = (&mut self.phase, &mut self.leg) else {
            return Next::Return(Step::Progress);
        };
        if leg.from_backend.is_empty() {
            if leg.eof {
                self.backend_lost(ctx);
                return Next::Return(Step::Progress);
            }
            return Next::Wait { moved: false };
        }
        if !self.to_client.can_queue_head() {
            return Next::Wait { moved: false };
        }
        let mut storage = head::header_storage();
        let resp =
            match head::parse_response(leg.from_backend.data(), &mut storage, ex.head_request) {
                Ok(Some(r)) => r,
                Ok(None) if leg.eof => {
                    self.fail(ctx, 502);
                    return Next::Return(Step::Progress);
                }
                Ok(None) => {
                    let grow = leg.from_backend.is_full() && leg.from_backend.len() < MAX_HEAD;
                    if grow {
                        leg.from_backend.grow(MAX_HEAD);
                    }
                    return Next::Wait { moved: grow };
                }
                Err(e) => {
                    log::error("bad response head", &[("client", &self.id), ("error", &e)]);
                    self.fail(ctx, 502);
                    return Next::Return(Step::Progress);
                }
            };
        leg.to_backend.drop_head();
        ex.replay = None;
        let tls = self.client.is_tls();
        if resp.status == 101 {
            let verdict = match &ex.ws_key {
                Some(key) => handshake::validate_response(&resp, key),
                None => Err(handshake::HandshakeError::BadUpgradeResponse),
            };
            if verdict.is_ok() {
                let head = self.to_client.head_vec();
                rewrite::write_response(&resp, false, true, head);
                add_sticky_cookie(head, &ex.sticky, Some(leg.backend), tls, ctx);
                leg.from_backend.consume(resp.head_len);
            }
            return Next::Return(self.upgraded(ctx, verdict.err()));
        }
        if resp.status < 200 {
            // Interim answers (100 Continue, 103) go straight through.
            rewrite::write_response(&resp, false, false, self.to_client.head_vec());
            leg.from_backend.consume(resp.head_len);
            ex.answered = true;
            return Next::Again;
        }
        if !ex.req_body.is_done() || resp.body == BodyKind::UntilClose {
            ex.close_after = true;
        }
        ex.backend_keep_alive = resp.keep_alive;
        ex.status = resp.status;
        let head = self.to_client.head_vec();
        match ctx.hooks.as_deref_mut() {
            Some(h) => {
                let mut own = Vec::with_capacity(resp.head_len + 64);
                rewrite::write_response(&resp, ex.close_after, false, &mut own);
                h.on_response_head(&mut own);
                head.extend_from_slice(&own);
            }
            None => rewrite::write_response(&resp, ex.close_after, false, head),
        }
        add_sticky_cookie(head, &ex.sticky, Some(leg.backend), tls, ctx);
        ex.resp = Resp::Body(BodyReader::new(resp.body));
        leg.from_backend.consume(resp.head_len);
        ex.answered = true;
        Next::Again
    }

    /// The backend's 101 was relayed (or, with `refused`, failed its checks: 502).
    fn upgraded(&mut self, ctx: &mut Ctx<'_>, refused: Option<handshake::HandshakeError>) -> Step {
        match refused {
            None => self.open_tunnel(ctx),
            Some(e) => {
                log::error(
                    "bad upgrade response",
                    &[("client", &self.id), ("error", &e)],
                );
                self.fail(ctx, 502);
                Step::Progress
            }
        }
    }

    /// The response body: backend → client, bounded by the client's outbox; the end of
    /// the exchange, or a truncated response turned into a close.
    fn response_body(&mut self, ctx: &mut Ctx<'_>) -> Next {
        let (Phase::Exchange(ex), Some(leg)) = (&mut self.phase, &mut self.leg) else {
            return Next::Return(Step::Progress);
        };
        let Resp::Body(body) = &mut ex.resp else {
            return Next::Wait { moved: false };
        };
        // The reader holds back an incomplete chunk-size line at the end of what the
        // backend sent: after its EOF that is a truncated response too.
        let mut held_back = false;
        let mut moved = false;
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
                        moved = true;
                    }
                }
                Err(e) => {
                    log::error("bad response body", &[("client", &self.id), ("error", &e)]);
                    self.fail(ctx, 502);
                    return Next::Return(Step::Progress);
                }
            }
        }
        let ended =
            body.is_done() || (leg.eof && leg.from_backend.is_empty() && body.is_until_close());
        if ended && (ex.req_body.is_done() || ex.close_after) {
            return Next::Return(self.finish_exchange(ctx));
        }
        if leg.eof && (leg.from_backend.is_empty() || held_back) && !body.is_done() {
            // Truncated response: the client must not mistake it for complete.
            self.fail(ctx, 502);
            return Next::Return(Step::Progress);
        }
        Next::Wait { moved }
    }

    pub(super) fn finish_exchange(&mut self, ctx: &mut Ctx<'_>) -> Step {
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
            ctx.events.emit(Event::HttpRequest {
                client: self.id,
                peer: self.peer,
                backend: self.paired_name.as_deref(),
                request: ex.request_line.as_deref(),
                status: ex.status,
                ms,
            });
        }
        let close = ex.close_after;
        self.drop_leg(ctx, reusable);
        if close {
            self.enter_closing(ctx.now);
        } else {
            self.enter_head(ctx.now);
        }
        Step::Progress
    }
}

#[cfg(test)]
mod tests {
    //! What becomes of a request head, against a fake backend set: no sockets.
    use super::*;
    use crate::backends::registry::BackendState;
    use crate::config::parse_backend;

    fn backends(n: u16) -> Registry {
        let specs: Vec<_> = (1..=n)
            .map(|p| parse_backend(&format!("ws://127.0.0.1:{p}")).unwrap())
            .collect();
        Registry::from_specs(&specs)
    }

    fn admit_raw(raw: &str, cfg: &Config, set: &Registry, draining: bool) -> Admission {
        let mut storage = head::header_storage();
        let req = head::parse_request(raw.as_bytes(), &mut storage)
            .unwrap()
            .unwrap();
        admit(&req, cfg, set, draining)
    }

    const UPGRADE: &str = "GET /chat HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: https://app.example\r\n\r\n";
    const GET: &str = "GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    const POST: &str = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n";

    #[test]
    fn forwards_to_an_eligible_backend() {
        let cfg = Config::default();
        let set = backends(2);
        assert_eq!(admit_raw(GET, &cfg, &set, false), Admission::Forward(None));
        assert!(matches!(
            admit_raw(UPGRADE, &cfg, &set, false),
            Admission::Forward(Some(_))
        ));
    }

    #[test]
    fn no_eligible_backend_is_503_and_keeps_the_connection_only_when_it_can() {
        let cfg = Config::default();
        let mut set = backends(2);
        set.set_state(0, BackendState::Draining);
        set.set_state(1, BackendState::Draining);
        assert_eq!(
            admit_raw(GET, &cfg, &set, false),
            Admission::Unavailable { close: false }
        );
        // An unread body would be taken for the next request; a drain keeps nothing alive.
        assert_eq!(
            admit_raw(POST, &cfg, &set, false),
            Admission::Unavailable { close: true }
        );
        assert_eq!(
            admit_raw(GET, &cfg, &set, true),
            Admission::Unavailable { close: true }
        );
        let none = backends(0);
        assert_eq!(
            admit_raw(
                "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                &cfg,
                &none,
                false
            ),
            Admission::Unavailable { close: true }
        );
    }

    #[test]
    fn refusals_come_before_backend_choice() {
        let set = backends(0);
        let mut cfg = Config {
            allowed_origins: vec!["https://other.example".into()],
            ..Config::default()
        };
        assert!(matches!(
            admit_raw(UPGRADE, &cfg, &set, false),
            Admission::Refuse(Refusal { status: 403, .. })
        ));
        cfg.allowed_origins = vec!["https://APP.example".into()];
        assert_eq!(
            admit_raw(UPGRADE, &cfg, &set, false),
            Admission::Unavailable { close: false }
        );
        let cfg = Config {
            http: false,
            ..Config::default()
        };
        assert!(matches!(
            admit_raw(GET, &cfg, &backends(1), false),
            Admission::Refuse(Refusal { status: 426, .. })
        ));
        let cfg = Config {
            websocket: false,
            ..Config::default()
        };
        assert!(matches!(
            admit_raw(UPGRADE, &cfg, &backends(1), false),
            Admission::Refuse(Refusal { status: 400, .. })
        ));
        let bad_version = UPGRADE.replace("Version: 13", "Version: 8");
        assert!(matches!(
            admit_raw(&bad_version, &Config::default(), &backends(1), false),
            Admission::Refuse(Refusal { status: 426, .. })
        ));
    }

    #[test]
    fn the_dispatch_path_is_answered_by_the_balancer() {
        let cfg = Config {
            dispatch_path: Some("/connect".into()),
            ..Config::default()
        };
        // Whatever the backends: the answer (or its 503) is the dispatcher's.
        let none = backends(0);
        let get = "GET /connect?foo=1&x HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(
            admit_raw(get, &cfg, &none, false),
            Admission::Dispatch(super::super::dispatch::DispatchAs::Json)
        );
        let redirect = "GET /connect?a=b&redirect=1 HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(
            admit_raw(redirect, &cfg, &none, false),
            Admission::Dispatch(super::super::dispatch::DispatchAs::Redirect)
        );
        let upgrade = UPGRADE.replace("/chat", "/connect");
        assert!(matches!(
            admit_raw(&upgrade, &cfg, &none, false),
            Admission::Dispatch(super::super::dispatch::DispatchAs::WebSocket(_))
        ));
        let post = "POST /connect HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n";
        assert!(matches!(
            admit_raw(post, &cfg, &none, false),
            Admission::Refuse(Refusal { status: 405, .. })
        ));
        // Other paths, and a prefix of the path, are proxied as before.
        for other in ["GET /connected HTTP/1.1\r\nHost: a\r\n\r\n", GET] {
            assert_eq!(
                admit_raw(other, &cfg, &backends(1), false),
                Admission::Forward(None)
            );
        }
        // Off by default.
        assert_eq!(
            admit_raw(get, &Config::default(), &backends(1), false),
            Admission::Forward(None)
        );
    }
}
