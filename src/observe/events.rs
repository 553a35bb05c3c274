//! `--events FILE|-`: one JSON object per line for each moment of a connection's and a
//! backend's life, for operators and log pipelines. Disabled = one branch per event.

use std::fs::OpenOptions;
use std::io::{self, LineWriter, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use std::net::SocketAddr;

use serde_json::{json, Map, Value};

/// Where events go.
#[derive(Default)]
pub struct EventSink {
    out: Option<Box<dyn Write + Send>>,
    /// Notable events (not per-client ones) kept for the live status page until the loop
    /// takes them; `None` = no control listener, nobody to show them to.
    live: Option<Vec<Value>>,
}

/// Notable events held for the live page between two takes (one loop turn or tick).
const LIVE_PENDING: usize = 64;

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.out.is_some() {
            "EventSink(on)"
        } else {
            "EventSink(off)"
        })
    }
}

impl EventSink {
    /// `-` = stdout, otherwise a file opened for appending; `None` = off.
    pub fn open(spec: Option<&str>) -> io::Result<Self> {
        let out: Option<Box<dyn Write + Send>> = match spec {
            None => None,
            Some("-") => Some(Box::new(LineWriter::new(io::stdout()))),
            Some(path) => Some(Box::new(LineWriter::new(
                OpenOptions::new().create(true).append(true).open(path)?,
            ))),
        };
        Ok(EventSink { out, live: None })
    }

    /// Keeps notable events for [`EventSink::take_live`] from now on.
    pub fn keep_live(&mut self) {
        self.live.get_or_insert_with(Vec::new);
    }

    /// The notable events since the last take (at most `LIVE_PENDING`, the newest dropped).
    pub fn take_live(&mut self) -> Vec<Value> {
        self.live.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Events are wanted (lets callers skip building fields).
    pub fn enabled(&self) -> bool {
        self.out.is_some()
    }

    /// Writes `{"ts":…, "event": name, …fields}`; the event becomes JSON only here, and
    /// only when events are on. A failing sink is dropped, not retried on every event:
    /// losing the event log must not slow the balancer down.
    pub fn emit(&mut self, event: Event<'_>) {
        let live = self.live.is_some() && event.is_notable();
        if self.out.is_none() && !live {
            return;
        }
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let fields = event.fields();
        let mut m = Map::with_capacity(fields.len() + 2);
        m.insert("ts".into(), Value::from((ts * 1000.0).round() / 1000.0));
        m.insert("event".into(), Value::from(event.name()));
        for (k, v) in fields {
            m.insert(k.to_string(), v);
        }
        let obj = Value::Object(m);
        if let Some(pending) = self
            .live
            .as_mut()
            .filter(|p| live && p.len() < LIVE_PENDING)
        {
            pending.push(obj.clone());
        }
        let Some(out) = &mut self.out else { return };
        let mut line = obj.to_string();
        line.push('\n');
        if out.write_all(line.as_bytes()).is_err() {
            crate::observe::log::error("events sink failed; events are off from now on", &[]);
            self.out = None;
        }
    }
}

/// One moment of a connection's or a backend's life (docs in the README's events table).
/// Built from plain values where it happens; turned into JSON only by the sink.
#[derive(Debug, Clone)]
pub enum Event<'a> {
    /// A client connection was accepted.
    ClientConnect {
        client: u64,
        peer: SocketAddr,
        tls: bool,
    },
    /// A client connection went away.
    ClientDisconnect {
        client: u64,
        peer: SocketAddr,
        backend: Option<&'a str>,
        close_code: Option<u16>,
        bytes_up: u64,
        bytes_down: u64,
        duration_ms: u64,
    },
    /// A client was paired with a backend (a new or a reused connection).
    Paired {
        client: u64,
        peer: SocketAddr,
        backend: &'a str,
        reused: bool,
    },
    /// A WebSocket handshake went through.
    Handshake {
        client: u64,
        peer: SocketAddr,
        backend: Option<&'a str>,
    },
    /// A backend answered an HTTP request.
    HttpRequest {
        client: u64,
        peer: SocketAddr,
        backend: Option<&'a str>,
        request: Option<&'a str>,
        status: u16,
        ms: u64,
    },
    /// The balancer answered a request itself (`error` when 5xx).
    BalancerAnswer {
        client: u64,
        peer: SocketAddr,
        status: u16,
        backend: Option<&'a str>,
    },
    /// A client message seen with `--inspect`.
    ClientMessage {
        client: u64,
        text: bool,
        bytes: usize,
    },
    /// A control connection was opened.
    ServerConnect { peer: SocketAddr },
    /// A backend registered (or re-registered).
    ServerReady {
        guid: &'a str,
        peer: SocketAddr,
        bindings: &'a [String],
        backend: usize,
        updated: bool,
    },
    /// A registration was refused by a security rule.
    RegistrationRefused {
        guid: &'a str,
        peer: SocketAddr,
        rule: &'a str,
    },
    /// A registered backend left.
    ServerDisconnect { guid: &'a str, backend: usize },
    /// The backend set was changed at run time (admin API, `--backends-file` reload).
    BackendChanged { backend: &'a str, change: &'a str },
}

impl Event<'_> {
    /// Worth showing on the live status page: backend and admin events, not the per-client
    /// ones a busy balancer has thousands of a second (errors are summarised by count).
    pub fn is_notable(&self) -> bool {
        matches!(
            self,
            Event::ServerConnect { .. }
                | Event::ServerReady { .. }
                | Event::RegistrationRefused { .. }
                | Event::ServerDisconnect { .. }
                | Event::BackendChanged { .. }
        )
    }

    /// The `event` field.
    pub fn name(&self) -> &'static str {
        match self {
            Event::ClientConnect { .. } => "client_connect",
            Event::ClientDisconnect { .. } => "client_disconnect",
            Event::Paired { .. } => "paired",
            Event::Handshake { .. } => "handshake",
            Event::HttpRequest { .. } => "http_request",
            Event::BalancerAnswer { status, .. } if *status >= 500 => "error",
            Event::BalancerAnswer { .. } => "http_request",
            Event::ClientMessage { .. } => "client_message",
            Event::ServerConnect { .. } => "server_connect",
            Event::ServerReady { .. } => "server_ready",
            Event::RegistrationRefused { .. } => "registration_refused",
            Event::ServerDisconnect { .. } => "server_disconnect",
            Event::BackendChanged { .. } => "backend_changed",
        }
    }

    /// The other fields, in the order they are written.
    pub fn fields(&self) -> Vec<(&'static str, Value)> {
        match self {
            Event::ClientConnect { client, peer, tls } => vec![
                ("client", json!(client)),
                ("peer", json!(peer.to_string())),
                ("tls", json!(tls)),
            ],
            Event::ClientDisconnect {
                client,
                peer,
                backend,
                close_code,
                bytes_up,
                bytes_down,
                duration_ms,
            } => vec![
                ("client", json!(client)),
                ("peer", json!(peer.to_string())),
                ("backend", json!(backend)),
                ("close_code", json!(close_code)),
                ("bytes_up", json!(bytes_up)),
                ("bytes_down", json!(bytes_down)),
                ("duration_ms", json!(duration_ms)),
            ],
            Event::Paired {
                client,
                peer,
                backend,
                reused,
            } => vec![
                ("client", json!(client)),
                ("peer", json!(peer.to_string())),
                ("backend", json!(backend)),
                ("reused", json!(reused)),
            ],
            Event::Handshake {
                client,
                peer,
                backend,
            } => vec![
                ("client", json!(client)),
                ("peer", json!(peer.to_string())),
                ("backend", json!(backend)),
            ],
            Event::HttpRequest {
                client,
                peer,
                backend,
                request,
                status,
                ms,
            } => vec![
                ("client", json!(client)),
                ("peer", json!(peer.to_string())),
                ("backend", json!(backend)),
                ("request", json!(request)),
                ("status", json!(status)),
                ("ms", json!(ms)),
            ],
            Event::BalancerAnswer {
                client,
                peer,
                status,
                backend,
            } => vec![
                ("client", json!(client)),
                ("peer", json!(peer.to_string())),
                ("status", json!(status)),
                ("backend", json!(backend)),
                ("by", json!("balancer")),
            ],
            Event::ClientMessage {
                client,
                text,
                bytes,
            } => vec![
                ("client", json!(client)),
                ("text", json!(text)),
                ("bytes", json!(bytes)),
            ],
            Event::ServerConnect { peer } => vec![("peer", json!(peer.to_string()))],
            Event::ServerReady {
                guid,
                peer,
                bindings,
                backend,
                updated,
            } => vec![
                ("guid", json!(guid)),
                ("peer", json!(peer.to_string())),
                ("bindings", json!(bindings)),
                ("backend", json!(backend)),
                ("updated", json!(updated)),
            ],
            Event::RegistrationRefused { guid, peer, rule } => vec![
                ("guid", json!(guid)),
                ("peer", json!(peer.to_string())),
                ("rule", json!(rule)),
            ],
            Event::ServerDisconnect { guid, backend } => {
                vec![("guid", json!(guid)), ("backend", json!(backend))]
            }
            Event::BackendChanged { backend, change } => {
                vec![("backend", json!(backend)), ("change", json!(change))]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_keep_their_names_and_fields() {
        let peer: SocketAddr = "127.0.0.1:5".parse().unwrap();
        let answer = |status| Event::BalancerAnswer {
            client: 1,
            peer,
            status,
            backend: None,
        };
        assert_eq!(answer(502).name(), "error");
        assert_eq!(answer(429).name(), "http_request");
        let ev = Event::Paired {
            client: 7,
            peer,
            backend: "alpha",
            reused: true,
        };
        let keys: Vec<_> = ev.fields().iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, ["client", "peer", "backend", "reused"]);
        assert_eq!(ev.fields()[1].1, json!("127.0.0.1:5"));
    }
}
