//! The registration protocol's messages (docs/PROTOCOL.md): decode what a backend sends,
//! encode what the balancer answers. Pure: text in, values out, no I/O.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde_json::{json, Map, Value};

use crate::config::parse_backend_url;

/// The protocol version this balancer speaks.
pub const VERSION: u64 = 1;
/// Largest control message accepted.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Most bindings one backend may announce.
pub const MAX_BINDINGS: usize = 16;
/// Most tags one backend may carry.
pub const MAX_TAGS: usize = 32;

/// A backend's announcement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// Stable id chosen by the backend; a restart re-registers under the same guid.
    pub guid: String,
    /// URLs as announced.
    pub bindings: Vec<String>,
    /// Resolved endpoints of `bindings`, same order.
    pub addrs: Vec<SocketAddr>,
    /// Relative weight (1-1000).
    pub weight: u32,
    /// Most connections this backend wants at once; 0 = no limit.
    pub max_connections: u32,
    /// Free-form labels (used by admin filters).
    pub tags: BTreeMap<String, String>,
    /// `proxy_protocol: "v1" | "v2"`: start every connection to this backend with a PROXY
    /// header naming the client, so it sees client addresses without parsing HTTP.
    pub proxy_protocol: Option<crate::net::proxy_protocol::Version>,
    /// Issue 18, optional: URLs clients connect to directly when dispatched (empty = the
    /// backend is never dispatched to).
    pub public_bindings: Vec<String>,
}

/// A message from a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendMsg {
    /// Announce or update (bindings, weight, ...).
    Register(Registration),
    /// Take no new clients; existing ones stay.
    Drain,
    /// Leave the pool now.
    Deregister,
    /// Issue 18: `{"type":"load","clients":N}`: the backend's live client count, which
    /// the balancer cannot see for dispatched clients.
    Load(u32),
}

/// Why a control message was refused. [`ControlError::code`] is the wire `code`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlError {
    /// Not a JSON object.
    BadJson,
    /// `type` missing or unknown.
    UnknownType,
    /// `version` missing or not [`VERSION`].
    BadVersion,
    /// A field is missing or invalid; the text names it.
    BadField(&'static str),
    /// Over [`MAX_MESSAGE`].
    TooLarge,
    /// A binary frame (the protocol is text only).
    Binary,
    /// `drain`/`deregister` before `register`.
    NotRegistered,
    /// The same guid registered on another control connection.
    Replaced,
    /// A binding breaks a rule of [`crate::netpolicy::check_binding`].
    BindingRefused {
        /// The binding as announced.
        binding: String,
        /// The rule it breaks.
        rule: crate::netpolicy::BindingRule,
    },
    /// The guid is live on a control connection from another address.
    GuidInUse,
    /// The connection's per-backend token is for another guid.
    GuidNotAllowed,
}

impl ControlError {
    /// Machine-readable code sent in `error` messages.
    pub fn code(&self) -> &'static str {
        match self {
            ControlError::BadJson => "bad_json",
            ControlError::UnknownType => "unknown_type",
            ControlError::BadVersion => "bad_version",
            ControlError::BadField(_) => "bad_field",
            ControlError::TooLarge => "too_large",
            ControlError::Binary => "binary",
            ControlError::NotRegistered => "not_registered",
            ControlError::Replaced => "replaced",
            ControlError::BindingRefused { .. } => "binding_refused",
            ControlError::GuidInUse => "guid_in_use",
            ControlError::GuidNotAllowed => "guid_not_allowed",
        }
    }

    /// WebSocket close code that follows the `error` message.
    pub fn close_code(&self) -> u16 {
        match self {
            ControlError::TooLarge => 1009,
            ControlError::Binary => 1003,
            ControlError::Replaced => 1000,
            _ => 1008,
        }
    }
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ControlError::BadJson => f.write_str("message is not a JSON object"),
            ControlError::UnknownType => f.write_str("missing or unknown message type"),
            ControlError::BadVersion => write!(
                f,
                "unsupported protocol version (this balancer speaks {VERSION})"
            ),
            ControlError::BadField(why) => f.write_str(why),
            ControlError::TooLarge => write!(f, "message larger than {MAX_MESSAGE} bytes"),
            ControlError::Binary => f.write_str("binary messages are not part of the protocol"),
            ControlError::NotRegistered => f.write_str("register first"),
            ControlError::Replaced => f.write_str("the same guid registered on another connection"),
            ControlError::BindingRefused { binding, rule } => {
                write!(f, "{binding} refused: {rule} (rule {})", rule.rule())
            }
            ControlError::GuidInUse => {
                f.write_str("guid is registered on a live control connection from another address")
            }
            ControlError::GuidNotAllowed => {
                f.write_str("this connection's token does not cover that guid")
            }
        }
    }
}

impl std::error::Error for ControlError {}

/// 1-128 characters of `A-Z a-z 0-9 - _ . :`.
pub fn valid_guid(g: &str) -> bool {
    (1..=128).contains(&g.len())
        && g.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// A binding must be an IP literal or `localhost`: resolving names would block the loop.
pub fn binding_addr(url: &str) -> Result<SocketAddr, &'static str> {
    let authority = parse_backend_url(url)?;
    if let Ok(a) = authority.parse::<SocketAddr>() {
        return Ok(a);
    }
    match authority.rsplit_once(':') {
        Some(("localhost", port)) => port
            .parse::<u16>()
            .map(|p| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p))
            .map_err(|_| "bad port"),
        _ => Err("binding host must be an IP address or localhost"),
    }
}

fn registration(obj: &Map<String, Value>) -> Result<Registration, ControlError> {
    match obj.get("version").and_then(Value::as_u64) {
        Some(VERSION) => {}
        _ => return Err(ControlError::BadVersion),
    }
    let guid = obj
        .get("guid")
        .and_then(Value::as_str)
        .filter(|g| valid_guid(g))
        .ok_or(ControlError::BadField(
            "guid must be 1-128 characters of A-Z a-z 0-9 - _ . :",
        ))?
        .to_string();
    let list = obj
        .get("bindings")
        .and_then(Value::as_array)
        .filter(|l| (1..=MAX_BINDINGS).contains(&l.len()))
        .ok_or(ControlError::BadField(
            "bindings must be a list of 1-16 URLs",
        ))?;
    let mut bindings = Vec::with_capacity(list.len());
    let mut addrs = Vec::with_capacity(list.len());
    for b in list {
        let url = b
            .as_str()
            .ok_or(ControlError::BadField("bindings must be strings"))?;
        let addr = binding_addr(url).map_err(|_| {
            ControlError::BadField("binding must be ws://IP:PORT or http://IP:PORT")
        })?;
        bindings.push(url.to_string());
        addrs.push(addr);
    }
    let weight = match obj.get("weight") {
        None | Some(Value::Null) => 1,
        Some(v) => v
            .as_u64()
            .filter(|w| (1..=1000).contains(w))
            .ok_or(ControlError::BadField(
                "weight must be an integer from 1 to 1000",
            ))? as u32,
    };
    let max_connections = match obj.get("max_connections") {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or(ControlError::BadField(
                "max_connections must be a non-negative integer",
            ))?,
    };
    let mut tags = BTreeMap::new();
    match obj.get("tags") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) if m.len() <= MAX_TAGS => {
            for (k, v) in m {
                let v = v
                    .as_str()
                    .ok_or(ControlError::BadField("tag values must be strings"))?;
                tags.insert(k.clone(), v.to_string());
            }
        }
        Some(_) => {
            return Err(ControlError::BadField(
                "tags must be an object of up to 32 strings",
            ))
        }
    }
    let proxy_protocol = match obj.get("proxy_protocol") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_str()
                .and_then(crate::net::proxy_protocol::Version::parse)
                .ok_or(ControlError::BadField(
                    "proxy_protocol must be \"v1\" or \"v2\"",
                ))?,
        ),
    };
    let public_bindings = match obj.get("public_bindings") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(l)) if l.len() <= crate::config::MAX_PUBLIC_BINDINGS => l
            .iter()
            .map(|u| {
                u.as_str()
                    .filter(|u| crate::config::check_public_url(u).is_ok())
                    .map(str::to_string)
                    .ok_or(ControlError::BadField(
                        "public_bindings must be ws:// wss:// http:// https:// URLs",
                    ))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ControlError::BadField(
                "public_bindings must be a list of up to 16 URLs",
            ))
        }
    };
    Ok(Registration {
        public_bindings,
        guid,
        bindings,
        addrs,
        weight,
        max_connections,
        tags,
        proxy_protocol,
    })
}

/// Decodes one text message from a backend.
pub fn decode(text: &str) -> Result<BackendMsg, ControlError> {
    if text.len() > MAX_MESSAGE {
        return Err(ControlError::TooLarge);
    }
    let value: Value = serde_json::from_str(text).map_err(|_| ControlError::BadJson)?;
    let Value::Object(obj) = value else {
        return Err(ControlError::BadJson);
    };
    match obj.get("type").and_then(Value::as_str) {
        Some("register") => registration(&obj).map(BackendMsg::Register),
        Some("drain") => Ok(BackendMsg::Drain),
        Some("deregister") => Ok(BackendMsg::Deregister),
        Some("load") => obj
            .get("clients")
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .map(BackendMsg::Load)
            .ok_or(ControlError::BadField(
                "clients must be a non-negative integer",
            )),
        _ => Err(ControlError::UnknownType),
    }
}

/// Encodes a backend message (used by the agent; the inverse of [`decode`]).
pub fn encode(msg: &BackendMsg) -> String {
    match msg {
        BackendMsg::Register(r) => {
            let mut v = json!({
                "type": "register",
                "version": VERSION,
                "guid": r.guid,
                "bindings": r.bindings,
                "weight": r.weight,
                "max_connections": r.max_connections,
                "tags": r.tags,
            });
            // Only when asked for: balancers that predate the field see the same message.
            if let (Some(p), Some(o)) = (r.proxy_protocol, v.as_object_mut()) {
                o.insert("proxy_protocol".into(), p.as_str().into());
            }
            if let (false, Some(o)) = (r.public_bindings.is_empty(), v.as_object_mut()) {
                o.insert("public_bindings".into(), r.public_bindings.clone().into());
            }
            v.to_string()
        }
        BackendMsg::Drain => json!({"type": "drain"}).to_string(),
        BackendMsg::Deregister => json!({"type": "deregister"}).to_string(),
        BackendMsg::Load(n) => json!({"type": "load", "clients": n}).to_string(),
    }
}

/// `registered` answer.
pub fn registered(guid: &str, heartbeat_ms: u64) -> String {
    json!({
        "type": "registered",
        "version": VERSION,
        "guid": guid,
        "balancer": concat!("wslb ", env!("CARGO_PKG_VERSION")),
        "heartbeat_ms": heartbeat_ms,
    })
    .to_string()
}

/// Acknowledges `drain` / `deregister`.
pub fn ack(what: &str) -> String {
    json!({ "type": what }).to_string()
}

/// `drained`, the answer to `drain`, with the backend's client connections when the drain
/// began. The count also says that `drain_complete` will follow: balancers before it
/// answered a bare `{"type":"drained"}` and sent nothing more.
pub fn drained(clients: u32) -> String {
    json!({ "type": "drained", "clients": clients }).to_string()
}

/// `drain_complete`: the drained backend's last client connection is gone (it had
/// `clients` when the drain began); the backend may stop now.
pub fn drain_complete(clients: u32) -> String {
    json!({ "type": "drain_complete", "clients": clients }).to_string()
}

/// `error` answer (the connection is closed after it).
pub fn error(e: &ControlError) -> String {
    let mut v = json!({"type": "error", "code": e.code(), "message": e.to_string()});
    if let (ControlError::BindingRefused { binding, rule }, Some(o)) = (e, v.as_object_mut()) {
        o.insert("rule".into(), json!(rule.rule()));
        o.insert("binding".into(), json!(binding));
    }
    v.to_string()
}

/// Tells a backend that the balancer could not reach one of its bindings. The reason is
/// always the same word: the OS error (refused, timed out, no route) would let a registrant
/// probe which ports the balancer's host can reach.
pub fn unreachable(binding: &str) -> String {
    json!({"type": "unreachable", "binding": binding, "reason": "unreachable"}).to_string()
}

#[cfg(test)]
mod tests;
