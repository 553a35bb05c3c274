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

impl Conn {
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
            client_id: self.client_id_field(ctx.cfg),
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

    #[inline(never)]
    pub(super) fn process_exchange(&mut self, ctx: &mut Ctx<'_>) -> Step {
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
            self.phase = Phase::Head;
            self.head_started = if self.from_client.is_empty() {
                None
            } else {
                Some(ctx.now)
            };
        }
        Step::Progress
    }
}
