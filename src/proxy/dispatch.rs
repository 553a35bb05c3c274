//! Dispatch mode (issue 18): a request to `--dispatch-path` is answered with the public
//! binding of the backend the proxy would have chosen, and the client connects there
//! itself. JSON `{"url","guid","expires"}` for `GET`, a 307 to it for `?redirect=1`, one
//! text message with the JSON then close 1000 for a WebSocket upgrade.
//!
//! The choice is `route::choose` (hooks, sticky, algorithm) over the registry's dispatch
//! view (reported + provisional load, public bindings only): the rules of proxying.

use super::*;
use crate::backends::route::{self, Ask};

/// How a dispatch answer is shaped, from the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DispatchAs {
    /// `200` JSON.
    Json,
    /// `307` with `Location` (`redirect=1` in the query).
    Redirect,
    /// `101`, one text message with the JSON, close 1000.
    WebSocket(WsKey),
}

/// What `admit` makes of a request to the dispatch path: `None` = not the dispatch path.
/// Unknown query parameters are ignored; only `GET` is served (405 otherwise).
pub(super) fn classify(req: &head::Request<'_, '_>, cfg: &Config) -> Option<Admission> {
    let want = cfg.dispatch_path.as_deref()?;
    let (path, query) = req.origin.split_once('?').unwrap_or((req.origin, ""));
    if path != want {
        return None;
    }
    let refuse = |status, why| Some(Admission::Refuse(Refusal { status, why }));
    if req.method != "GET" {
        return refuse(405, "dispatch: only GET");
    }
    if req.wants_websocket {
        return match handshake::validate_request(req) {
            Err(e) => refuse(e.status(), e.as_str()),
            Ok(_) if !origin_allowed(&cfg.allowed_origins, head::header(req.headers, "origin")) => {
                refuse(403, "websocket origin refused")
            }
            Ok(key) => Some(Admission::Dispatch(DispatchAs::WebSocket(key))),
        };
    }
    let redirect = query
        .split('&')
        .any(|kv| matches!(kv, "redirect=1" | "redirect=true"));
    Some(Admission::Dispatch(if redirect {
        DispatchAs::Redirect
    } else {
        DispatchAs::Json
    }))
}

/// What a dispatch answer needs of the request, taken before the head is consumed.
pub(super) struct Asked {
    sticky: route::Sticky,
    /// Close after answering: asked by the client, draining, or a body after a GET
    /// (it would be taken for the next request).
    close: bool,
    head_len: usize,
}

impl Asked {
    pub(super) fn of(req: &head::Request<'_, '_>, peer: SocketAddr, ctx: &Ctx<'_>) -> Self {
        Asked {
            sticky: sticky_of(req, peer, ctx),
            close: !req.keep_alive || ctx.draining || req.body != BodyKind::Empty,
            head_len: req.head_len,
        }
    }
}

/// A dispatch answer: the chosen backend's id and the JSON document, or `None` for 503.
struct Answer {
    backend: usize,
    url: String,
    json: String,
}

impl Conn {
    /// Answers a request to the dispatch path (see the module docs).
    pub(super) fn answer_dispatch(
        &mut self,
        ctx: &mut Ctx<'_>,
        asked: Asked,
        how: DispatchAs,
    ) -> Step {
        let Asked {
            sticky,
            close,
            head_len,
        } = asked;
        let answer = self.choose_public(ctx, &sticky);
        let mut out = Vec::with_capacity(512);
        // The head (ending with the blank line), then the sticky cookie added to it, then
        // the body (for a WebSocket: its one message and the close frame).
        let (status, body) = match (&answer, how) {
            (None, _) => {
                let body = r#"{"error":"no backend available"}"#;
                json_head(&mut out, "503 Service Unavailable", body.len(), close);
                out.extend_from_slice(b"Retry-After: 1\r\n\r\n");
                (503, body.as_bytes().to_vec())
            }
            (Some(a), DispatchAs::Json) => {
                json_head(&mut out, "200 OK", a.json.len(), close);
                out.extend_from_slice(b"\r\n");
                (200, a.json.clone().into_bytes())
            }
            (Some(a), DispatchAs::Redirect) => {
                json_head(&mut out, "307 Temporary Redirect", a.json.len(), close);
                out.extend_from_slice(b"Location: ");
                out.extend_from_slice(a.url.as_bytes());
                out.extend_from_slice(b"\r\n\r\n");
                (307, a.json.clone().into_bytes())
            }
            (Some(a), DispatchAs::WebSocket(key)) => {
                let accept = tungstenite::handshake::derive_accept_key(&key.0);
                out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ");
                out.extend_from_slice(accept.as_bytes());
                out.extend_from_slice(b"\r\n\r\n");
                let mut frames = Vec::with_capacity(a.json.len() + 8);
                text_frame(a.json.as_bytes(), &mut frames);
                encode_close_reason(1000, "", None, &mut frames);
                (101, frames)
            }
        };
        if let Some(a) = &answer {
            let tls = self.client.is_tls();
            add_sticky_cookie(&mut out, &sticky, Some(a.backend), tls, ctx);
        }
        out.extend_from_slice(&body);
        log::debug(
            "dispatch",
            &[
                ("client", &self.id),
                ("status", &status),
                ("url", &answer.as_ref().map_or("-", |a| a.url.as_str())),
            ],
        );
        self.from_client.consume(head_len);
        self.to_client.head_vec().extend_from_slice(&out);
        ctx.stats.response(status);
        ctx.events.emit(Event::BalancerAnswer {
            client: self.id,
            peer: self.peer,
            status,
            backend: answer.as_ref().and_then(|a| ctx.backends.name(a.backend)),
        });
        if close || status == 101 {
            self.enter_closing(ctx.now);
        } else {
            self.answered_in_head(ctx.now);
        }
        Step::Progress
    }

    /// The proxy's choice among backends with a public binding, counted as dispatched.
    fn choose_public(&self, ctx: &mut Ctx<'_>, sticky: &route::Sticky) -> Option<Answer> {
        let (client, algorithm, now) = (self.id, ctx.cfg.algorithm, ctx.now);
        let hooks = ctx.hooks.as_deref_mut();
        let rng = &mut *ctx.rng;
        let (backend, public) = ctx.backends.choose_for_dispatch(|r, exclude| {
            let ask = Ask {
                client,
                sticky,
                exclude,
                algorithm,
                now,
            };
            route::choose(r, hooks, rng, &ask)
        })?;
        let b = ctx.backends.get(backend)?;
        let guid = b.guid.as_deref().unwrap_or(&b.sticky_id);
        let expires = unix_now().saturating_add(ctx.cfg.dispatch_ttl.as_secs());
        let url = match ctx.tickets.and_then(|t| t.issue(guid, expires)) {
            Some(ticket) => crate::net::ticket::ticketed_url(&public, &ticket),
            None => public,
        };
        let json = serde_json::json!({"url": url, "guid": guid, "expires": expires}).to_string();
        Some(Answer { backend, url, json })
    }
}

/// Status line and the headers every HTTP dispatch answer has (without the blank line).
fn json_head(out: &mut Vec<u8>, status: &str, len: usize, close: bool) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_bytes());
    // `no-store`: each answer is a fresh choice (and may carry a single-purpose ticket).
    // Any origin may ask: the answer is what any client gets, and browsers need the header
    // to read it from a page served elsewhere.
    out.extend_from_slice(b"\r\nContent-Type: application/json\r\nCache-Control: no-store\r\nAccess-Control-Allow-Origin: *\r\nContent-Length: ");
    out.extend_from_slice(len.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
}

/// An unmasked (server) text frame, FIN set.
fn text_frame(payload: &[u8], out: &mut Vec<u8>) {
    out.push(0x81);
    match u16::try_from(payload.len()) {
        Ok(n) if n < 126 => out.push(n as u8),
        Ok(n) => {
            out.push(126);
            out.extend_from_slice(&n.to_be_bytes());
        }
        Err(_) => {
            out.push(127);
            out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}
