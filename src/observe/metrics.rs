//! Counters the loop keeps, and their Prometheus text exposition. Plain integers: the loop is
//! single-threaded, so counting costs one add.

use std::fmt::Write as _;

/// Loop-wide counters.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Client connections accepted.
    pub accepted: u64,
    /// Client connections refused by a limit (429) .
    pub rejected: u64,
    /// WebSocket handshakes relayed (101 sent to the client).
    pub ws_opened: u64,
    /// WebSocket data messages client → backend.
    pub ws_messages_up: u64,
    /// WebSocket data messages backend → client.
    pub ws_messages_down: u64,
    /// WebSocket bytes client → backend.
    pub ws_bytes_up: u64,
    /// WebSocket bytes backend → client.
    pub ws_bytes_down: u64,
    /// Frames injected by the balancer (broadcast, send, ping, close).
    pub ws_injected: u64,
    /// WebSocket clients closed (1013) because their queue of balancer frames was full.
    pub ws_slow_clients_closed: u64,
    /// Messaging requests from backends answered `sent`.
    pub backend_messages: u64,
    /// Messaging requests from backends answered `failed`, whatever the cause.
    pub backend_messages_failed: u64,
    /// HTTP responses by status class: index 0 = 1xx … 4 = 5xx.
    pub http_responses: [u64; 5],
    /// TLS handshakes that failed.
    pub tls_handshake_failures: u64,
    /// Control connections opened.
    pub server_connected: u64,
    /// Registrations accepted.
    pub server_ready: u64,
    /// Registered backends lost or deregistered.
    pub server_disconnected: u64,
    /// Idle pooled backend connections dropped because their backend closed them.
    pub pool_evicted: u64,
    /// Requests sent again on a new connection after a reused one failed before answering.
    pub pool_retries: u64,
    /// Accepts and backend connects that failed for want of a file descriptor.
    pub fd_exhausted: u64,
    /// Registrations refused by a security rule, by rule name (`own_listener`,
    /// `not_peer_address`, `guid_in_use`, ...).
    pub registrations_refused: std::collections::BTreeMap<&'static str, u64>,
    /// Accepted connections that wslb itself had opened (a self-loop), refused.
    pub self_connections_refused: u64,
    /// WebSockets closed (1012) because their backend was drained.
    pub backend_drain_closes: u64,
    /// WebSockets closed (1012) by `--rebalance`.
    pub rebalance_closes: u64,
    /// `--proxy-protocol` connections closed before admission, by reason (`untrusted`,
    /// `malformed`, `timeout`, ...).
    pub proxy_protocol_errors: std::collections::BTreeMap<&'static str, u64>,
    /// `--proxy-protocol` headers accepted.
    pub proxy_protocol_headers: u64,
    /// WebSocket messages `[up, down]` by backend registry id (a reused id continues the
    /// count: the live page tells backends apart by name). As long as the most backends
    /// ever registered at once.
    pub backend_messages_by_id: Vec<[u64; 2]>,
}

impl Stats {
    /// Counts WebSocket messages relayed for backend `id`.
    pub fn backend_messages(&mut self, id: usize, up: u64, down: u64) {
        if up == 0 && down == 0 {
            return;
        }
        if self.backend_messages_by_id.len() <= id {
            self.backend_messages_by_id.resize(id + 1, [0, 0]);
        }
        if let Some(n) = self.backend_messages_by_id.get_mut(id) {
            n[0] += up;
            n[1] += down;
        }
    }

    /// Counts one HTTP response with `status`.
    pub fn response(&mut self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        if let Some(n) = self.http_responses.get_mut(class) {
            *n += 1;
        }
    }
}

/// One backend as the metrics see it.
#[derive(Debug)]
pub struct BackendSample<'a> {
    /// Name (URL or guid).
    pub name: &'a str,
    /// Life-cycle state.
    pub state: &'a str,
    /// Active connections.
    pub active: u32,
    /// Times selected.
    pub selected: u64,
    /// Times dispatched (issue 18).
    pub dispatched: u64,
}

/// A per-backend series: name, type, help, and how to read the value.
type PerBackend = (
    &'static str,
    &'static str,
    &'static str,
    fn(&BackendSample<'_>) -> u64,
);

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Appends the descriptor series: the limit, how many are open (where known) and how
/// often an accept or backend connect found none left.
pub fn render_fds(out: &mut String, limit: u64, open: Option<u64>, exhausted: u64) {
    metric(
        out,
        "wslb_fd_limit",
        "gauge",
        "File descriptors the process may hold (soft RLIMIT_NOFILE).",
    );
    let _ = writeln!(out, "wslb_fd_limit {limit}");
    if let Some(open) = open {
        metric(out, "wslb_fd_open", "gauge", "File descriptors open now.");
        let _ = writeln!(out, "wslb_fd_open {open}");
    }
    metric(
        out,
        "wslb_fd_exhausted_total",
        "counter",
        "Accepts and backend connects that failed for want of a file descriptor.",
    );
    let _ = writeln!(out, "wslb_fd_exhausted_total {exhausted}");
}

/// Renders the text exposition format (version 0.0.4).
pub fn render(
    s: &Stats,
    active_clients: usize,
    active_tunnels: usize,
    uptime_secs: u64,
    backends: &[BackendSample<'_>],
) -> String {
    let mut o = String::with_capacity(4096);
    let counters: [(&str, &str, u64); 18] = [
        (
            "wslb_backend_drain_closes_total",
            "WebSockets closed with 1012 because their backend was drained.",
            s.backend_drain_closes,
        ),
        (
            "wslb_rebalance_closes_total",
            "WebSockets closed with 1012 to rebalance the backends.",
            s.rebalance_closes,
        ),
        (
            "wslb_backend_pool_evicted_total",
            "Idle keep-alive backend connections dropped because the backend closed them.",
            s.pool_evicted,
        ),
        (
            "wslb_backend_pool_retries_total",
            "Requests retried on a new connection after a reused one failed unanswered.",
            s.pool_retries,
        ),
        (
            "wslb_connections_accepted_total",
            "Client connections accepted.",
            s.accepted,
        ),
        (
            "wslb_connections_rejected_total",
            "Client connections refused by a limit.",
            s.rejected,
        ),
        (
            "wslb_websocket_opened_total",
            "WebSocket handshakes relayed.",
            s.ws_opened,
        ),
        (
            "wslb_websocket_injected_frames_total",
            "Frames sent by the balancer itself.",
            s.ws_injected,
        ),
        (
            "wslb_websocket_slow_clients_closed_total",
            "WebSocket clients closed with 1013 because their queue of balancer frames was full.",
            s.ws_slow_clients_closed,
        ),
        (
            "wslb_backend_messages_total",
            "Messaging requests from backends carried out (broadcast, send, close, ping).",
            s.backend_messages,
        ),
        (
            "wslb_backend_messages_failed_total",
            "Messaging requests from backends refused (bad field, too large, rate, unknown client).",
            s.backend_messages_failed,
        ),
        (
            "wslb_tls_handshake_failures_total",
            "TLS handshakes that failed.",
            s.tls_handshake_failures,
        ),
        (
            "wslb_server_connected_total",
            "Backend control connections opened.",
            s.server_connected,
        ),
        (
            "wslb_server_ready_total",
            "Backend registrations accepted.",
            s.server_ready,
        ),
        (
            "wslb_server_disconnected_total",
            "Registered backends lost.",
            s.server_disconnected,
        ),
        (
            "wslb_uptime_seconds_total",
            "Seconds since start.",
            uptime_secs,
        ),
        (
            "wslb_websocket_messages_up_total",
            "WebSocket messages client to backend.",
            s.ws_messages_up,
        ),
        (
            "wslb_websocket_messages_down_total",
            "WebSocket messages backend to client.",
            s.ws_messages_down,
        ),
    ];
    for (name, help, v) in counters {
        metric(&mut o, name, "counter", help);
        let _ = writeln!(o, "{name} {v}");
    }
    metric(
        &mut o,
        "wslb_websocket_bytes_total",
        "counter",
        "WebSocket bytes relayed.",
    );
    let _ = writeln!(
        o,
        "wslb_websocket_bytes_total{{direction=\"up\"}} {}",
        s.ws_bytes_up
    );
    let _ = writeln!(
        o,
        "wslb_websocket_bytes_total{{direction=\"down\"}} {}",
        s.ws_bytes_down
    );
    metric(
        &mut o,
        "wslb_http_responses_total",
        "counter",
        "HTTP responses by status class.",
    );
    for (i, n) in s.http_responses.iter().enumerate() {
        let _ = writeln!(o, "wslb_http_responses_total{{class=\"{}xx\"}} {n}", i + 1);
    }
    metric(
        &mut o,
        "wslb_registrations_refused_total",
        "counter",
        "Backend registrations refused by a security rule.",
    );
    for (rule, n) in &s.registrations_refused {
        let _ = writeln!(o, "wslb_registrations_refused_total{{rule=\"{rule}\"}} {n}");
    }
    metric(
        &mut o,
        "wslb_self_connections_refused_total",
        "counter",
        "Connections wslb opened to its own listeners, refused.",
    );
    let _ = writeln!(
        o,
        "wslb_self_connections_refused_total {}",
        s.self_connections_refused
    );
    metric(
        &mut o,
        "wslb_proxy_protocol_headers_total",
        "counter",
        "PROXY protocol headers accepted (--proxy-protocol).",
    );
    let _ = writeln!(
        o,
        "wslb_proxy_protocol_headers_total {}",
        s.proxy_protocol_headers
    );
    metric(
        &mut o,
        "wslb_proxy_protocol_errors_total",
        "counter",
        "Connections closed for a missing, bad or untrusted PROXY protocol header.",
    );
    for (reason, n) in &s.proxy_protocol_errors {
        let _ = writeln!(
            o,
            "wslb_proxy_protocol_errors_total{{reason=\"{reason}\"}} {n}"
        );
    }
    metric(
        &mut o,
        "wslb_connections_active",
        "gauge",
        "Client connections open.",
    );
    let _ = writeln!(o, "wslb_connections_active {active_clients}");
    metric(
        &mut o,
        "wslb_websocket_active",
        "gauge",
        "WebSocket tunnels open.",
    );
    let _ = writeln!(o, "wslb_websocket_active {active_tunnels}");
    let per_backend: [PerBackend; 3] = [
        (
            "wslb_backend_active_connections",
            "gauge",
            "Active connections per backend.",
            |b| u64::from(b.active),
        ),
        (
            "wslb_backend_selected_total",
            "counter",
            "Times each backend was chosen.",
            |b| b.selected,
        ),
        (
            "wslb_dispatches_total",
            "counter",
            "Clients dispatched to each backend's public binding (--dispatch-path).",
            |b| b.dispatched,
        ),
    ];
    for (name, kind, help, value) in per_backend {
        metric(&mut o, name, kind, help);
        for b in backends {
            let _ = writeln!(
                o,
                "{name}{{backend=\"{}\"}} {}",
                escape_label(b.name),
                value(b)
            );
        }
    }
    metric(
        &mut o,
        "wslb_backend_state",
        "gauge",
        "1 for the state each backend is in.",
    );
    for b in backends {
        for state in ["ready", "draining", "gone"] {
            let v = u8::from(b.state == state);
            let _ = writeln!(
                o,
                "wslb_backend_state{{backend=\"{}\",state=\"{state}\"}} {v}",
                escape_label(b.name)
            );
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_help_type_and_samples() {
        let mut s = Stats::default();
        s.response(204);
        s.response(502);
        s.response(99);
        s.accepted = 3;
        s.registrations_refused.insert("own_listener", 2);
        let b = [BackendSample {
            name: "ws://a\"b",
            state: "ready",
            active: 2,
            selected: 7,
            dispatched: 4,
        }];
        let text = render(&s, 1, 0, 5, &b);
        assert!(text.contains("wslb_connections_accepted_total 3\n"));
        assert!(text.contains("wslb_registrations_refused_total{rule=\"own_listener\"} 2\n"));
        assert!(text.contains("wslb_http_responses_total{class=\"2xx\"} 1\n"));
        assert!(text.contains("wslb_http_responses_total{class=\"5xx\"} 1\n"));
        assert!(text.contains("wslb_http_responses_total{class=\"1xx\"} 1\n"));
        assert!(text.contains("backend=\"ws://a\\\"b\""));
        assert!(text.contains("wslb_backend_state{backend=\"ws://a\\\"b\",state=\"ready\"} 1"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(
                line.rsplit_once(' ')
                    .is_some_and(|(_, v)| v.parse::<f64>().is_ok()),
                "{line}"
            );
        }
    }
}
