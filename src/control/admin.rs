//! The admin API's routes: one request in, one answer out, over what the balancer exposes
//! through [`AdminApi`]. Nothing here touches the loop, so the routes are unit-tested
//! against a fake balancer.
//!
//! | Method and path | Answer |
//! | --- | --- |
//! | `GET /` | status page |
//! | `GET /status.js` | the status page's script (no token needed: it holds no data) |
//! | `GET /api/live` | server-sent events for the page (answered by the server: a stream) |
//! | `GET /metrics` | Prometheus text |
//! | `GET /ready` | 200 while a backend can take clients, else 503 (L4 health checks) |
//! | `GET /api/backends`, `GET /api/clients` | JSON lists |
//! | `POST /api/backends` `{"url", "weight"?, "max_connections"?}` | add a backend (201) |
//! | `PATCH /api/backends/{name}` `{"weight"?, "max_connections"?}` | change it |
//! | `DELETE /api/backends/{name}` | remove a flag/API/file backend (its connections finish) |
//! | `POST /api/backends/{name}/drain`, `.../undrain` | no new clients / again |
//! | `POST /api/broadcast[?backend=G\|tag=K=V]`, `POST /api/ping` | messages to clients |
//! | `POST /api/clients/{id}/send`, `.../ping`, `DELETE /api/clients/{id}[?code=N]` | one client |

use serde_json::{json, Value};

use super::session::AdminRequest;
use super::status::BackendRow;
use crate::proxy::ClientSummary;

/// Which WebSocket clients a broadcast reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every WebSocket client.
    All,
    /// Clients paired with the backend of this guid (or static backend URL).
    Backend(String),
    /// Clients paired with backends carrying this tag `key=value`.
    Tag(String, String),
    /// One client by id.
    Client(u64),
}

/// A message from the balancer itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    /// A text message.
    Text(String),
    /// A binary message.
    Binary(Vec<u8>),
    /// A ping whose pong is consumed by the balancer.
    Ping,
    /// A close frame with this code.
    Close(u16),
}

/// A change to the backend set asked for through the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendChange {
    /// A static backend: `URL[,weight=N,max_connections=M]` as for `-B`.
    Add(String),
    /// Remove a flag/API/file backend; its open connections finish.
    Remove(String),
    /// No new clients.
    Drain(String),
    /// New clients again.
    Undrain(String),
    /// New weight and/or connection limit.
    Update {
        /// Backend name (URL) or guid.
        name: String,
        /// 1..=1000.
        weight: Option<u32>,
        /// 0 = no limit.
        max_connections: Option<u32>,
    },
}

/// Why a backend change was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeError {
    /// No backend of that name (404).
    NotFound(String),
    /// The request is wrong or not allowed (400); nothing changed.
    Invalid(String),
}

/// What the routes need from the balancer.
pub trait AdminApi {
    /// The HTML status page.
    fn status_page(&self) -> String;
    /// Prometheus text.
    fn metrics(&self) -> String;
    /// Every backend.
    fn backends(&self) -> Vec<BackendRow>;
    /// Every client connection.
    fn clients(&self) -> Vec<ClientSummary>;
    /// Queues `msg` for the clients `to` selects; how many took it.
    fn send(&mut self, to: &Target, msg: &Outgoing) -> usize;
    /// At least one backend can take a client, and the balancer is not draining.
    fn ready(&self) -> bool;
    /// Applies a change to the backend set; a JSON description of the result.
    fn change_backend(&mut self, change: BackendChange) -> Result<Value, ChangeError>;
}

/// An answer: status, content type, body.
pub type Reply = (u16, &'static str, Vec<u8>);

const JSON: &str = "application/json";

fn json_reply(status: u16, v: Value) -> Reply {
    (status, JSON, v.to_string().into_bytes())
}

fn error(status: u16, why: &str) -> Reply {
    json_reply(status, json!({ "error": why }))
}

/// Routes one admin request.
pub fn route(api: &mut dyn AdminApi, req: &AdminRequest) -> Reply {
    let segments: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    let method = req.method.as_str();
    match (method, segments.as_slice()) {
        ("GET", [""]) => (
            200,
            "text/html; charset=utf-8",
            api.status_page().into_bytes(),
        ),
        ("GET", ["status.js"]) => (
            200,
            "text/javascript; charset=utf-8",
            super::live::STATUS_JS.as_bytes().to_vec(),
        ),
        ("GET", ["metrics"]) => (200, "text/plain; version=0.0.4", api.metrics().into_bytes()),
        // For an L4 tier's health checks: send new clients here only while at least one
        // backend can take them (and not while draining).
        ("GET", ["ready"]) if api.ready() => json_reply(200, json!({ "ready": true })),
        ("GET", ["ready"]) => json_reply(503, json!({ "ready": false })),
        ("GET", ["api", "backends"]) => {
            json_reply(200, super::status::backends_json(&api.backends()))
        }
        ("GET", ["api", "clients"]) => json_reply(200, clients_json(&api.clients())),
        (_, ["api", "backends", ..]) => backend_route(api, req, method, &segments),
        ("POST", ["api", "broadcast"]) => broadcast(api, req),
        ("POST", ["api", "ping"]) => sent(api.send(&Target::All, &Outgoing::Ping)),
        ("POST", ["api", "clients", id, action @ ("send" | "ping")]) => {
            let Ok(id) = id.parse::<u64>() else {
                return error(404, "no such client");
            };
            let msg = if *action == "ping" {
                Ok(Outgoing::Ping)
            } else {
                message(req)
            };
            match msg {
                Ok(m) => match api.send(&Target::Client(id), &m) {
                    0 => error(404, "no such websocket client"),
                    n => sent(n),
                },
                Err(e) => error(400, &e),
            }
        }
        ("DELETE", ["api", "clients", id]) => close_client(api, req, id),
        (_, [""] | ["metrics"] | ["ready"] | ["api", ..]) => error(405, "method not allowed"),
        _ => error(404, "not found"),
    }
}

fn sent(n: usize) -> Reply {
    json_reply(200, json!({ "sent": n }))
}

fn clients_json(list: &[ClientSummary]) -> Value {
    Value::Array(
        list.iter()
            .map(|s| {
                json!({"id": s.id, "peer": s.peer.to_string(), "backend": s.backend,
                       "websocket": s.websocket, "age_secs": s.age_secs,
                       "bytes_up": s.bytes.0, "bytes_down": s.bytes.1})
            })
            .collect(),
    )
}

/// `/api/backends/...` other than the list.
fn backend_route(
    api: &mut dyn AdminApi,
    req: &AdminRequest,
    method: &str,
    segments: &[&str],
) -> Reply {
    let change = match (method, segments) {
        ("POST", ["api", "backends"]) => add_request(&req.body),
        ("PATCH", ["api", "backends", name]) => update_request(percent_decode(name), &req.body),
        ("DELETE", ["api", "backends", name]) => Ok(BackendChange::Remove(percent_decode(name))),
        ("POST", ["api", "backends", name, "drain"]) => {
            Ok(BackendChange::Drain(percent_decode(name)))
        }
        ("POST", ["api", "backends", name, "undrain"]) => {
            Ok(BackendChange::Undrain(percent_decode(name)))
        }
        (
            _,
            ["api", "backends"]
            | ["api", "backends", _]
            | ["api", "backends", _, "drain" | "undrain"],
        ) => return error(405, "method not allowed"),
        _ => return error(404, "not found"),
    };
    let added = matches!(change, Ok(BackendChange::Add(_)));
    // `{"sent": 1}` is what a drain answered before it answered the backend's row too.
    let drain = matches!(change, Ok(BackendChange::Drain(_)));
    match change
        .map_err(ChangeError::Invalid)
        .and_then(|c| api.change_backend(c))
    {
        Ok(mut v) => {
            if let (true, Some(row)) = (drain, v.as_object_mut()) {
                row.insert("sent".into(), json!(1));
            }
            json_reply(if added { 201 } else { 200 }, v)
        }
        Err(ChangeError::NotFound(why)) => error(404, &why),
        Err(ChangeError::Invalid(why)) => error(400, &why),
    }
}

/// `POST /api/backends`: `{"url": ..., "weight": N, "max_connections": M}` into the `-B`
/// syntax, so both are checked by the same parser.
fn add_request(body: &[u8]) -> Result<BackendChange, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|_| "body must be a JSON object".to_string())?;
    let url = v
        .get("url")
        .and_then(Value::as_str)
        .ok_or("\"url\" (a string) is required")?;
    if url.contains(',') {
        return Err(
            "\"url\" must not contain options; use \"weight\" and \"max_connections\"".into(),
        );
    }
    let mut spec = url.to_string();
    for key in ["weight", "max_connections"] {
        match v.get(key) {
            None | Some(Value::Null) => {}
            Some(n) => {
                let n = n
                    .as_u64()
                    .ok_or(format!("\"{key}\" must be a non-negative integer"))?;
                spec.push_str(&format!(",{key}={n}"));
            }
        }
    }
    Ok(BackendChange::Add(spec))
}

/// `PATCH /api/backends/{name}`: `{"weight": N, "max_connections": M}`, at least one.
fn update_request(name: String, body: &[u8]) -> Result<BackendChange, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|_| "body must be a JSON object".to_string())?;
    let number = |key: &str| -> Result<Option<u32>, String> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(n) => n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or(format!("\"{key}\" must be a non-negative integer")),
        }
    };
    let weight = number("weight")?;
    let max_connections = number("max_connections")?;
    if weight.is_some_and(|w| !(1..=1000).contains(&w)) {
        return Err("\"weight\" must be from 1 to 1000".into());
    }
    if weight.is_none() && max_connections.is_none() {
        return Err("nothing to change: give \"weight\" and/or \"max_connections\"".into());
    }
    Ok(BackendChange::Update {
        name,
        weight,
        max_connections,
    })
}

fn broadcast(api: &mut dyn AdminApi, req: &AdminRequest) -> Reply {
    let target = match (param(req, "backend"), param(req, "tag")) {
        (Some(b), _) => Target::Backend(b),
        (None, Some(t)) => match t.split_once('=') {
            Some((k, v)) => Target::Tag(k.to_string(), v.to_string()),
            None => return error(400, "tag must be KEY=VALUE"),
        },
        (None, None) => Target::All,
    };
    match message(req) {
        Ok(m) => sent(api.send(&target, &m)),
        Err(e) => error(400, &e),
    }
}

fn close_client(api: &mut dyn AdminApi, req: &AdminRequest, id: &str) -> Reply {
    let code = match param(req, "code").map(|c| c.parse::<u16>()) {
        None => 1000,
        Some(Ok(c)) if (1000..=4999).contains(&c) && !matches!(c, 1004..=1006 | 1015) => c,
        Some(_) => return error(400, "code must be a valid close code"),
    };
    match id
        .parse::<u64>()
        .map(|id| api.send(&Target::Client(id), &Outgoing::Close(code)))
    {
        Ok(n) if n > 0 => sent(n),
        _ => error(404, "no such websocket client"),
    }
}

/// The request body as a message: text unless the content type says binary. `curl -d`
/// sends a form type, and a page would then show "[object Blob]" for a plain word.
fn message(req: &AdminRequest) -> Result<Outgoing, String> {
    let ct = req.content_type.to_ascii_lowercase();
    let text = ct.is_empty()
        || ct.starts_with("text/")
        || ct.starts_with("application/json")
        || ct.starts_with("application/x-www-form-urlencoded");
    if text {
        String::from_utf8(req.body.clone())
            .map(Outgoing::Text)
            .map_err(|_| "text message is not UTF-8".to_string())
    } else {
        Ok(Outgoing::Binary(req.body.clone()))
    }
}

fn param(req: &AdminRequest, name: &str) -> Option<String> {
    req.query.split('&').find_map(|kv| {
        kv.split_once('=')
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| percent_decode(v))
    })
}

/// Decodes `%XX` escapes (and `+` as space) in a query value; invalid escapes stay as-is.
fn percent_decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b, hex) {
            (b'%', Some(x)) => {
                out.push(x);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests;
