//! `wslb agent --local ADDR`: a loopback HTTP endpoint through which a backend written in
//! any language asks its agent to message clients on every balancer:
//!
//! ```text
//! POST /broadcast[?backend=GUID | ?tag=K=V][&except=CLIENT]   body = the message
//! POST /send?to=CLIENT[,CLIENT...]                             body = the message
//! POST /close?client=CLIENT[&code=N]                           body = the close reason
//! POST /ping?client=CLIENT
//! Authorization: Bearer TOKEN  (--local-token / WSLB_LOCAL_TOKEN)
//! ```
//!
//! `Content-Type: application/octet-stream` sends a binary message, anything else a text
//! message (the body must then be UTF-8). The answer is `200 {"sent": N}` or an error status
//! with `{"error": CODE, "message": TEXT}`. Query values are taken as they are: client ids,
//! guids and tags need no escaping.
//!
//! Blocking threads, like the links: one per connection (at most [`MAX_CONNECTIONS`]), each
//! serving keep-alive requests in turn. The parser is the balancer's own
//! (`http::head::parse_request`), so the same fuzzed code reads these heads.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use serde_json::json;

use super::messages::{MessageError, Messenger};
use crate::control::messaging::{valid_close_code, ClientRef, Filter, Op, Payload, MAX_REASON};
use crate::http::body::BodyKind;
use crate::http::head::{self, header};

/// Concurrent connections served; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 64;
/// Longest request body: the largest `--message-max` a balancer accepts.
const MAX_BODY: usize = crate::control::messaging::MAX_PAYLOAD_CEILING;
/// A connection idle (or stalled mid-request) this long is closed.
const IDLE: Duration = Duration::from_secs(30);

/// Where the endpoint listens and the token it wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalConfig {
    /// A loopback address (`127.0.0.1:PORT`, `[::1]:PORT`; port 0 = any).
    pub addr: SocketAddr,
    /// Required as `Authorization: Bearer TOKEN`.
    pub token: String,
}

/// Binds the endpoint and serves it on a thread; returns the bound address.
pub fn start(cfg: &LocalConfig, messenger: Messenger) -> io::Result<SocketAddr> {
    if !cfg.addr.ip().is_loopback() {
        return Err(io::Error::other(
            "--local must be a loopback address: the endpoint messages every client",
        ));
    }
    let listener = TcpListener::bind(cfg.addr)?;
    let bound = listener.local_addr()?;
    let token = Arc::new(cfg.token.clone());
    let active = Arc::new(AtomicUsize::new(0));
    thread::Builder::new()
        .name("wslb-agent-local".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                    // Refused at once rather than queued without bound.
                    let _ = (&stream).write_all(&answer(503, "busy", "too many connections"));
                    continue;
                }
                active.fetch_add(1, Ordering::SeqCst);
                let (token, messenger, mine) =
                    (Arc::clone(&token), messenger.clone(), Arc::clone(&active));
                let spawned = thread::Builder::new()
                    .name("wslb-agent-local-conn".into())
                    .spawn(move || {
                        let _ = serve(stream, &token, &messenger);
                        mine.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    active.fetch_sub(1, Ordering::SeqCst);
                }
            }
        })?;
    Ok(bound)
}

/// What a request head says, owned, so the body can be read into the same buffer.
struct Head {
    len: usize,
    body: usize,
    keep_alive: bool,
    post: bool,
    authorized: bool,
    target: String,
    content_type: Vec<u8>,
}

/// Parses the head at the start of `buf`: `Ok(None)` = need more, `Err` = the answer to
/// send before closing.
fn parse_head(buf: &[u8], token: &str) -> Result<Option<Head>, Vec<u8>> {
    let mut storage = head::header_storage();
    let req = match head::parse_request(buf, &mut storage) {
        Ok(Some(req)) => req,
        Ok(None) if buf.len() >= head::MAX_HEAD => {
            return Err(answer(431, "bad_request", "head too large"))
        }
        Ok(None) => return Ok(None),
        Err(e) => return Err(answer(e.status(), "bad_request", "bad request")),
    };
    let body = match req.body {
        BodyKind::Empty => 0,
        BodyKind::Length(n) if n <= MAX_BODY as u64 => n as usize,
        BodyKind::Length(_) => return Err(answer(413, "too_large", "body over 1 MiB")),
        _ => return Err(answer(411, "bad_request", "Content-Length needed")),
    };
    Ok(Some(Head {
        len: req.head_len,
        body,
        keep_alive: req.keep_alive,
        post: req.method == "POST",
        authorized: header(req.headers, "authorization")
            .and_then(|v| v.strip_prefix(b"Bearer "))
            .is_some_and(|t| same(t, token.as_bytes())),
        target: req.path.to_string(),
        content_type: header(req.headers, "content-type")
            .unwrap_or_default()
            .to_vec(),
    }))
}

/// Reads more into `buf`; `false` at end of stream.
fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<bool> {
    let mut chunk = [0u8; 16 * 1024];
    let n = stream.read(&mut chunk)?;
    buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    Ok(n > 0)
}

/// Serves keep-alive requests on one connection until it closes or breaks a rule.
fn serve(mut stream: TcpStream, token: &str, messenger: &Messenger) -> io::Result<()> {
    stream.set_read_timeout(Some(IDLE))?;
    stream.set_nodelay(true)?;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        let h = match parse_head(&buf, token) {
            Ok(Some(h)) => h,
            Ok(None) if read_more(&mut stream, &mut buf)? => continue,
            Ok(None) => return Ok(()),
            Err(refusal) => return stream.write_all(&refusal),
        };
        let end = h.len + h.body;
        while buf.len() < end {
            if !read_more(&mut stream, &mut buf)? {
                return Ok(());
            }
        }
        let body = buf.get(h.len..end).unwrap_or_default();
        let out = if !h.authorized {
            answer(401, "unauthorized", "Authorization: Bearer TOKEN required")
        } else if !h.post {
            answer(405, "method_not_allowed", "POST only")
        } else {
            match op_for(&h.target, &h.content_type, body) {
                Ok(op) => match messenger.request(op) {
                    Ok(n) => ok(n),
                    Err(e) => answer(status_for(&e), e.code(), &e.to_string()),
                },
                Err((status, why)) => answer(status, "bad_field", why),
            }
        };
        stream.write_all(&out)?;
        buf.drain(..end);
        if !h.keep_alive {
            return Ok(());
        }
    }
}

/// Compares without stopping at the first difference (the token is a credential).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The status a refused message gets.
fn status_for(e: &MessageError) -> u16 {
    match e.code() {
        "unknown_client" => 404,
        "not_allowed" | "not_registered" => 403,
        "rate_limited" | "busy" => 429,
        "too_large" => 413,
        "not_connected" | "link_lost" => 503,
        "timeout" => 504,
        _ => 400,
    }
}

fn ok(n: usize) -> Vec<u8> {
    respond(200, &json!({ "sent": n }).to_string())
}

fn answer(status: u16, code: &str, message: &str) -> Vec<u8> {
    respond(
        status,
        &json!({"error": code, "message": message}).to_string(),
    )
}

fn respond(status: u16, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        if status == 200 { "OK" } else { "Error" },
        body.len()
    )
    .into_bytes()
}

/// The request a path, query and body ask for (pure: unit-tested below).
/// The body as a message: binary for `application/octet-stream`, else UTF-8 text.
fn body_payload(content_type: &[u8], body: &[u8]) -> Result<Payload, (u16, &'static str)> {
    if content_type
        .get(..24)
        .is_some_and(|t| t.eq_ignore_ascii_case(b"application/octet-stream"))
    {
        Ok(Payload::Binary(body.to_vec()))
    } else {
        String::from_utf8(body.to_vec())
            .map(Payload::Text)
            .map_err(|_| {
                (
                    400,
                    "a text message must be UTF-8 (or send application/octet-stream)",
                )
            })
    }
}

fn op_for(target: &str, content_type: &[u8], body: &[u8]) -> Result<Op, (u16, &'static str)> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let param = |name: &str| {
        query.split('&').find_map(|kv| {
            kv.split_once('=')
                .filter(|(k, _)| *k == name)
                .map(|(_, v)| v)
        })
    };
    let client = |name: &str| {
        param(name).and_then(ClientRef::parse).ok_or((
            400,
            "client ids are INSTANCE.N, as in the X-Wslb-Client header",
        ))
    };
    let payload = || body_payload(content_type, body);
    match path {
        "/broadcast" => {
            let filter = match (param("backend"), param("tag")) {
                (Some(_), Some(_)) => return Err((400, "backend and tag exclude each other")),
                (Some(g), None) => Filter::Backend(g.to_string()),
                (None, Some(t)) => match t.split_once('=') {
                    Some((k, v)) if !k.is_empty() => Filter::Tag(k.to_string(), v.to_string()),
                    _ => return Err((400, "tag must be KEY=VALUE")),
                },
                (None, None) => Filter::All,
            };
            let except = match param("except") {
                None => None,
                Some(_) => Some(client("except")?),
            };
            Ok(Op::Broadcast {
                payload: payload()?,
                filter,
                except,
            })
        }
        "/send" => {
            let to = param("to")
                .unwrap_or_default()
                .split(',')
                .map(ClientRef::parse)
                .collect::<Option<Vec<_>>>()
                .filter(|l| !l.is_empty())
                .ok_or((400, "to must list client ids INSTANCE.N, comma-separated"))?;
            Ok(Op::Send {
                to,
                payload: payload()?,
            })
        }
        "/close" => {
            let code = match param("code") {
                None => 1000,
                Some(c) => c
                    .parse::<u16>()
                    .ok()
                    .filter(|c| valid_close_code(*c))
                    .ok_or((400, "code must be 1000-1003, 1007-1014 or 3000-4999"))?,
            };
            let reason = std::str::from_utf8(body)
                .ok()
                .filter(|r| r.len() <= MAX_REASON)
                .ok_or((400, "the reason (body) must be UTF-8, at most 123 bytes"))?;
            Ok(Op::Close {
                client: client("client")?,
                code,
                reason: reason.to_string(),
            })
        }
        "/ping" => Ok(Op::Ping {
            client: client("client")?,
        }),
        _ => Err((404, "no such endpoint: /broadcast, /send, /close, /ping")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> ClientRef {
        ClientRef::parse(s).unwrap()
    }

    #[test]
    fn requests_map_to_ops() {
        assert_eq!(
            op_for("/broadcast?tag=zone=a&except=i.4", b"text/plain", b"hi"),
            Ok(Op::Broadcast {
                payload: Payload::Text("hi".into()),
                filter: Filter::Tag("zone".into(), "a".into()),
                except: Some(c("i.4")),
            })
        );
        assert_eq!(
            op_for("/send?to=i.1,j.2", b"application/octet-stream", b"\xff"),
            Ok(Op::Send {
                to: vec![c("i.1"), c("j.2")],
                payload: Payload::Binary(vec![0xff]),
            })
        );
        assert_eq!(
            op_for("/close?client=i.1&code=4001", b"", b"bye"),
            Ok(Op::Close {
                client: c("i.1"),
                code: 4001,
                reason: "bye".into()
            })
        );
        assert_eq!(
            op_for("/ping?client=i.1", b"", b""),
            Ok(Op::Ping { client: c("i.1") })
        );
        for (target, body) in [
            ("/send?to=", &b"x"[..]),
            ("/send?to=i.1,nope", b"x"),
            ("/broadcast", b"\xff"),
            ("/broadcast?backend=g&tag=a=b", b"x"),
            ("/close?client=i.1&code=1006", b""),
            ("/ping", b""),
            ("/other", b""),
        ] {
            assert!(op_for(target, b"text/plain", body).is_err(), "{target}");
        }
    }

    #[test]
    fn statuses() {
        let refused = |code: &str| MessageError::Refused {
            code: code.into(),
            message: String::new(),
        };
        assert_eq!(status_for(&refused("unknown_client")), 404);
        assert_eq!(status_for(&refused("rate_limited")), 429);
        assert_eq!(status_for(&MessageError::NotConnected), 503);
        assert!(same(b"abc", b"abc") && !same(b"abc", b"abd") && !same(b"ab", b"abc"));
    }
}
