//! Backend → client messages on the control channel (docs/PROTOCOL.md, "Messaging"): a
//! registered backend asks the balancer to `broadcast`, `send`, `close` or `ping`, and gets
//! one `sent` or `failed` answer per request. Pure: bytes in, values out, no I/O; the fuzz
//! target `control_message` calls [`decode_text`] and [`decode_binary`], the very functions
//! the session calls.
//!
//! Binary payloads travel as one binary WebSocket frame: a 2-byte big-endian length, that
//! many bytes of the JSON header (the same object as the text form, without `text`), then
//! the payload. One frame per request keeps the channel stateless (no "next frame belongs to
//! the previous header" state to get out of step) and the payload is never base64.

use std::fmt;

use serde_json::{json, Map, Value};

use super::protocol::{self, BackendMsg, ControlError};

/// Largest control frame tungstenite accepts: the largest `--message-max` plus room for
/// the JSON around it. Beyond it the connection is closed (1009), as for any oversized
/// frame; at or below it a too-large payload is a `failed` answer and the session goes on.
pub const MAX_FRAME: usize = MAX_PAYLOAD_CEILING + 64 * 1024;
/// Highest value `--message-max` accepts.
pub const MAX_PAYLOAD_CEILING: usize = crate::config::MESSAGE_MAX_CEILING;
/// Most client ids in one `send`.
pub const MAX_RECIPIENTS: usize = 1024;
/// Longest close reason: a close frame's payload is at most 125 bytes, 2 of them the code.
pub const MAX_REASON: usize = 123;

/// A client as backends name it: `INSTANCE.N`, the balancer's instance id and its own
/// connection number. Qualified so that ids stay unique across balancers: an agent sends
/// to every balancer it is registered with and only the one whose instance matches acts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientRef {
    /// The balancer's `--instance-id`.
    pub instance: String,
    /// The connection's number on that balancer.
    pub id: u64,
}

impl ClientRef {
    /// Parses `INSTANCE.N`.
    pub fn parse(s: &str) -> Option<ClientRef> {
        let (instance, n) = s.rsplit_once('.')?;
        if !valid_instance(instance) || n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(ClientRef {
            instance: instance.to_string(),
            id: n.parse().ok()?,
        })
    }
}

impl fmt::Display for ClientRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.instance, self.id)
    }
}

pub use crate::config::valid_instance;

/// What a message carries to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// A text frame.
    Text(String),
    /// A binary frame.
    Binary(Vec<u8>),
}

impl Payload {
    /// Payload bytes, for the size limit.
    pub fn len(&self) -> usize {
        match self {
            Payload::Text(t) => t.len(),
            Payload::Binary(b) => b.len(),
        }
    }

    /// Empty payload (allowed: an empty message is a message).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// WebSocket opcode and bytes.
    pub fn frame(&self) -> (u8, &[u8]) {
        match self {
            Payload::Text(t) => (0x1, t.as_bytes()),
            Payload::Binary(b) => (0x2, b),
        }
    }
}

/// Which clients a broadcast reaches, besides `except`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// Every WebSocket client.
    All,
    /// Clients paired with the backend of this guid.
    Backend(String),
    /// Clients paired with backends carrying tag `key=value`.
    Tag(String, String),
}

/// What a backend asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// One message to many clients.
    Broadcast {
        /// The message.
        payload: Payload,
        /// Which clients.
        filter: Filter,
        /// Left out (typically the sender of a chat line).
        except: Option<ClientRef>,
    },
    /// One message to these clients.
    Send {
        /// Recipients (1-[`MAX_RECIPIENTS`]).
        to: Vec<ClientRef>,
        /// The message.
        payload: Payload,
    },
    /// A close frame to one client.
    Close {
        /// The client.
        client: ClientRef,
        /// Close code (1000, 1001, 1008, 1011, 3000-4999...).
        code: u16,
        /// Close reason, at most [`MAX_REASON`] bytes.
        reason: String,
    },
    /// A ping whose pong the balancer consumes (liveness of one client).
    Ping {
        /// The client.
        client: ClientRef,
    },
}

/// One request: what to do and the id its answer carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Echoed in the answer; chosen by the backend.
    pub id: Option<u64>,
    /// The operation.
    pub op: Op,
}

/// Why a request was not carried out. The session goes on after any of these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MsgError {
    /// A field is missing or invalid; the text names it.
    BadField(&'static str),
    /// The payload is over `--message-max`.
    TooLarge(usize),
    /// No WebSocket client with that id here (or it is closing).
    UnknownClient,
    /// `--message-rate` exceeded: retry later.
    RateLimited,
    /// Messages come from registered backends only.
    NotRegistered,
    /// `--backend-messages` does not let this backend reach those clients.
    NotAllowed,
}

impl MsgError {
    /// Machine-readable code of the `failed` answer.
    pub fn code(&self) -> &'static str {
        match self {
            MsgError::BadField(_) => "bad_field",
            MsgError::TooLarge(_) => "too_large",
            MsgError::UnknownClient => "unknown_client",
            MsgError::RateLimited => "rate_limited",
            MsgError::NotRegistered => "not_registered",
            MsgError::NotAllowed => "not_allowed",
        }
    }
}

impl fmt::Display for MsgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MsgError::BadField(why) => f.write_str(why),
            MsgError::TooLarge(max) => write!(f, "payload larger than {max} bytes (--message-max)"),
            MsgError::UnknownClient => f.write_str("no such websocket client on this balancer"),
            MsgError::RateLimited => f.write_str("over --message-rate; retry later"),
            MsgError::NotRegistered => f.write_str("register first"),
            MsgError::NotAllowed => {
                f.write_str("--backend-messages does not allow this backend to reach that client")
            }
        }
    }
}

impl std::error::Error for MsgError {}

/// A text frame from a backend: the registration protocol or a messaging request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// `register` / `drain` / `deregister` (protocol v1).
    Control(BackendMsg),
    /// `broadcast` / `send` / `close` / `ping`.
    Request(Request),
}

/// Why a frame was refused: `Fatal` keeps v1's rule (an `error`, then close); `Failed` is a
/// messaging request that is answered with `failed` and the session goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Protocol v1 refusal: `error` then close.
    Fatal(ControlError),
    /// A messaging request that cannot be carried out, with its id if it had a readable one.
    Failed(Option<u64>, MsgError),
}

fn is_request_type(t: &str) -> bool {
    matches!(t, "broadcast" | "send" | "close" | "ping")
}

/// Decodes one text frame. `max_payload` is `--message-max`.
pub fn decode_text(text: &str, max_payload: usize) -> Result<Incoming, Refusal> {
    if text.len() > MAX_FRAME {
        return Err(Refusal::Fatal(ControlError::TooLarge));
    }
    // Registration messages keep their own, smaller limit and exact v1 behaviour: only a
    // request type takes the messaging path.
    let value: Value =
        serde_json::from_str(text).map_err(|_| Refusal::Fatal(ControlError::BadJson))?;
    let Value::Object(obj) = value else {
        return Err(Refusal::Fatal(ControlError::BadJson));
    };
    match obj.get("type").and_then(Value::as_str) {
        Some(t) if is_request_type(t) => {
            let payload = match obj.get("text") {
                Some(Value::String(s)) => Some(Payload::Text(s.clone())),
                None | Some(Value::Null) => None,
                Some(_) => {
                    return Err(Refusal::Failed(
                        request_id(&obj),
                        MsgError::BadField("text must be a string"),
                    ))
                }
            };
            request(&obj, payload, max_payload).map(Incoming::Request)
        }
        _ => protocol::decode(text)
            .map(Incoming::Control)
            .map_err(Refusal::Fatal),
    }
}

/// Decodes one binary frame: `u16` big-endian header length, the JSON header, the payload.
pub fn decode_binary(frame: &[u8], max_payload: usize) -> Result<Request, Refusal> {
    let bad = |why| Refusal::Failed(None, MsgError::BadField(why));
    let (len, rest) = match frame {
        [hi, lo, rest @ ..] => (usize::from(u16::from_be_bytes([*hi, *lo])), rest),
        _ => return Err(bad("binary frame shorter than its 2-byte header length")),
    };
    let (header, payload) = (rest.get(..len), rest.get(len..));
    let (Some(header), Some(payload)) = (header, payload) else {
        return Err(bad("binary frame shorter than its header length says"));
    };
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(header) else {
        return Err(bad("binary frame header is not a JSON object"));
    };
    let id = request_id(&obj);
    match obj.get("type").and_then(Value::as_str) {
        Some("broadcast" | "send") if obj.get("text").is_none() => {
            request(&obj, Some(Payload::Binary(payload.to_vec())), max_payload)
        }
        Some("broadcast" | "send") => Err(Refusal::Failed(
            id,
            MsgError::BadField("a binary frame's header has no text field"),
        )),
        _ => Err(Refusal::Failed(
            id,
            MsgError::BadField("binary frames carry broadcast or send only"),
        )),
    }
}

/// Encodes a request with a binary payload as one binary frame (the inverse of
/// [`decode_binary`]); `None` if the header would not fit its 2-byte length.
pub fn encode_binary(req: &Request) -> Option<Vec<u8>> {
    let (mut header, payload) = encode_parts(req);
    let Some(Payload::Binary(bytes)) = payload else {
        return None;
    };
    header.remove("text");
    let header = Value::Object(header).to_string();
    let len = u16::try_from(header.len()).ok()?;
    let mut out = Vec::with_capacity(2 + header.len() + bytes.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(bytes);
    Some(out)
}

/// Encodes a request as a text frame (binary payloads: use [`encode_binary`]).
pub fn encode_text(req: &Request) -> String {
    Value::Object(encode_parts(req).0).to_string()
}

/// The JSON object of `req` (with `text` for a text payload) and its payload.
fn encode_parts(req: &Request) -> (Map<String, Value>, Option<&Payload>) {
    let mut o = Map::new();
    let mut put = |k: &str, v: Value| {
        o.insert(k.to_string(), v);
    };
    let payload = match &req.op {
        Op::Broadcast {
            payload,
            filter,
            except,
        } => {
            put("type", json!("broadcast"));
            match filter {
                Filter::All => {}
                Filter::Backend(g) => put("backend", json!(g)),
                Filter::Tag(k, v) => put("tag", json!(format!("{k}={v}"))),
            }
            if let Some(c) = except {
                put("except", json!(c.to_string()));
            }
            Some(payload)
        }
        Op::Send { to, payload } => {
            put("type", json!("send"));
            let ids: Vec<String> = to.iter().map(ToString::to_string).collect();
            put("to", json!(ids));
            Some(payload)
        }
        Op::Close {
            client,
            code,
            reason,
        } => {
            put("type", json!("close"));
            put("client", json!(client.to_string()));
            put("code", json!(code));
            put("reason", json!(reason));
            None
        }
        Op::Ping { client } => {
            put("type", json!("ping"));
            put("client", json!(client.to_string()));
            None
        }
    };
    if let Some(Payload::Text(t)) = payload {
        put("text", json!(t));
    }
    if let Some(id) = req.id {
        put("id", json!(id));
    }
    (o, payload)
}

fn request_id(obj: &Map<String, Value>) -> Option<u64> {
    obj.get("id").and_then(Value::as_u64)
}

fn client_field(obj: &Map<String, Value>, name: &str) -> Result<ClientRef, MsgError> {
    obj.get(name)
        .and_then(Value::as_str)
        .and_then(ClientRef::parse)
        .ok_or(MsgError::BadField(
            "client ids are strings INSTANCE.N, as in the X-Wslb-Client header",
        ))
}

/// A close code a client library accepts from a server: 1000-1003, 1007-1014, 3000-4999.
pub fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

fn request(
    obj: &Map<String, Value>,
    payload: Option<Payload>,
    max_payload: usize,
) -> Result<Request, Refusal> {
    let id = match obj.get("id") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().ok_or(Refusal::Failed(
            None,
            MsgError::BadField("id must be a non-negative integer"),
        ))?),
    };
    let op = match obj.get("type").and_then(Value::as_str) {
        Some("broadcast") => broadcast_op(obj, payload, max_payload),
        Some("send") => send_op(obj, payload, max_payload),
        Some("close") => close_op(obj),
        _ => client_field(obj, "client").map(|client| Op::Ping { client }),
    };
    op.map(|op| Request { id, op })
        .map_err(|e| Refusal::Failed(id, e))
}

/// The message a `broadcast` or `send` carries: text in the JSON, or the binary frame's.
fn need_payload(p: Option<Payload>, max_payload: usize) -> Result<Payload, MsgError> {
    match p {
        None => Err(MsgError::BadField("text missing (or send a binary frame)")),
        Some(p) if p.len() > max_payload => Err(MsgError::TooLarge(max_payload)),
        Some(p) => Ok(p),
    }
}

fn broadcast_op(
    obj: &Map<String, Value>,
    payload: Option<Payload>,
    max_payload: usize,
) -> Result<Op, MsgError> {
    let filter = match (obj.get("backend"), obj.get("tag")) {
        (Some(_), Some(_)) => return Err(MsgError::BadField("backend and tag exclude each other")),
        (Some(b), None) => Filter::Backend(
            b.as_str()
                .filter(|g| protocol::valid_guid(g))
                .ok_or(MsgError::BadField("backend must be a guid"))?
                .to_string(),
        ),
        (None, Some(t)) => match t.as_str().and_then(|t| t.split_once('=')) {
            Some((k, v)) if !k.is_empty() => Filter::Tag(k.to_string(), v.to_string()),
            _ => return Err(MsgError::BadField("tag must be KEY=VALUE")),
        },
        (None, None) => Filter::All,
    };
    let except = match obj.get("except") {
        None | Some(Value::Null) => None,
        Some(_) => Some(client_field(obj, "except")?),
    };
    Ok(Op::Broadcast {
        payload: need_payload(payload, max_payload)?,
        filter,
        except,
    })
}

fn send_op(
    obj: &Map<String, Value>,
    payload: Option<Payload>,
    max_payload: usize,
) -> Result<Op, MsgError> {
    let to = match obj.get("to") {
        Some(Value::String(_)) => vec![client_field(obj, "to")?],
        Some(Value::Array(list)) if (1..=MAX_RECIPIENTS).contains(&list.len()) => list
            .iter()
            .map(|v| v.as_str().and_then(ClientRef::parse))
            .collect::<Option<Vec<_>>>()
            .ok_or(MsgError::BadField("to must list client ids INSTANCE.N"))?,
        _ => {
            return Err(MsgError::BadField(
                "to must be a client id or a list of 1-1024",
            ))
        }
    };
    Ok(Op::Send {
        to,
        payload: need_payload(payload, max_payload)?,
    })
}

fn close_op(obj: &Map<String, Value>) -> Result<Op, MsgError> {
    let client = client_field(obj, "client")?;
    let code = match obj.get("code") {
        None | Some(Value::Null) => 1000,
        Some(v) => v
            .as_u64()
            .and_then(|c| u16::try_from(c).ok())
            .filter(|c| valid_close_code(*c))
            .ok_or(MsgError::BadField(
                "code must be 1000-1003, 1007-1014 or 3000-4999",
            ))?,
    };
    let reason = match obj.get("reason") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(r)) if r.len() <= MAX_REASON => r.clone(),
        Some(_) => {
            return Err(MsgError::BadField(
                "reason must be a string of at most 123 bytes",
            ))
        }
    };
    Ok(Op::Close {
        client,
        code,
        reason,
    })
}

/// `sent`: the request reached `count` clients (queued for each, in order).
pub fn sent(id: Option<u64>, count: usize) -> String {
    json!({"type": "sent", "id": id, "count": count}).to_string()
}

/// `failed`: the request was not carried out; the session goes on.
pub fn failed(id: Option<u64>, e: &MsgError) -> String {
    json!({"type": "failed", "id": id, "code": e.code(), "message": e.to_string()}).to_string()
}

/// A balancer's answer to a request, as the agent reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// `sent`.
    Sent {
        /// Request id.
        id: Option<u64>,
        /// Clients reached.
        count: usize,
    },
    /// `failed`.
    Failed {
        /// Request id.
        id: Option<u64>,
        /// Error code.
        code: String,
        /// Human-readable text.
        message: String,
    },
}

/// Reads a `sent`/`failed` answer; `None` for any other message.
pub fn parse_answer(text: &str) -> Option<Answer> {
    let v: Value = serde_json::from_str(text).ok()?;
    let id = v.get("id").and_then(Value::as_u64);
    let field = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    match v.get("type")?.as_str()? {
        "sent" => Some(Answer::Sent {
            id,
            count: usize::try_from(v.get("count")?.as_u64()?).ok()?,
        }),
        "failed" => Some(Answer::Failed {
            id,
            code: field("code"),
            message: field("message"),
        }),
        _ => None,
    }
}

/// Per-backend token bucket for `--message-rate`: `rate` requests a second, bursts of up
/// to `rate`. Time is passed in, so it is testable without sleeping.
#[derive(Debug, Clone)]
pub struct RateBucket {
    tokens: f64,
    last: std::time::Instant,
}

impl RateBucket {
    /// A full bucket.
    pub fn new(rate: u32, now: std::time::Instant) -> RateBucket {
        RateBucket {
            tokens: f64::from(rate),
            last: now,
        }
    }

    /// Takes one token; `false` = over the rate. `rate` 0 = unlimited.
    pub fn take(&mut self, rate: u32, now: std::time::Instant) -> bool {
        if rate == 0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * f64::from(rate)).min(f64::from(rate));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests;
