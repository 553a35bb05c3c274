//! What the control listener serves besides `/register`: the status page and JSON views.
//! Pure rendering from snapshots the server takes; routing and actions live in the server.

use std::fmt::Write as _;

use serde_json::{json, Value};

/// One backend row.
#[derive(Debug)]
pub struct BackendRow {
    /// Registry id.
    pub id: usize,
    /// URL or guid.
    pub name: String,
    /// Guid for registered backends.
    pub guid: Option<String>,
    /// ready / draining / gone.
    pub state: &'static str,
    /// Bindings (URLs).
    pub bindings: Vec<String>,
    /// Weight.
    pub weight: u32,
    /// Active connections.
    pub active: u32,
    /// Times selected.
    pub selected: u64,
    /// Seconds since the control connection was last heard from (registered only).
    pub heard_secs_ago: Option<u64>,
    /// In passive back-off after failed connects.
    pub down: bool,
    /// Tags.
    pub tags: Vec<(String, String)>,
    /// flag / file / api / registration.
    pub source: &'static str,
    /// Most connections at once; 0 = no limit.
    pub max_connections: u32,
    /// Issue 18: public bindings, times dispatched, last reported client count.
    pub dispatch: (Vec<String>, u64, Option<u32>),
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// JSON for `GET /api/backends`.
pub fn backends_json(rows: &[BackendRow]) -> Value {
    Value::Array(
        rows.iter()
            .map(|b| {
                json!({
                    "id": b.id, "name": b.name, "guid": b.guid, "state": b.state,
                    "bindings": b.bindings, "weight": b.weight, "active": b.active,
                    "selected": b.selected, "last_heartbeat_secs_ago": b.heard_secs_ago,
                    "down": b.down, "source": b.source,
                    "max_connections": b.max_connections,
                    "public_bindings": b.dispatch.0, "dispatches": b.dispatch.1,
                    "reported_load": b.dispatch.2,
                    "tags": b.tags.iter().map(|(k, v)| (k.clone(), Value::from(v.as_str())))
                        .collect::<serde_json::Map<String, Value>>(),
                })
            })
            .collect(),
    )
}

/// The HTML status page (no external assets): the table as it is now, which `/status.js`
/// then keeps live; without JavaScript it refreshes itself every 2 s.
pub fn status_html(
    rows: &[BackendRow],
    clients: usize,
    tunnels: usize,
    uptime_secs: u64,
    version: &str,
    fds: (Option<u64>, u64),
    notes: &[String],
) -> String {
    let mut o = String::with_capacity(4096);
    let _ = write!(
        o,
        "<!doctype html><html><head><meta charset=\"utf-8\"><noscript><meta http-equiv=\"refresh\" content=\"2\"></noscript>\
<title>wslb status</title><style>body{{font:14px system-ui,sans-serif;margin:2em}}\
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}\
.ready{{color:#070}}.draining{{color:#a60}}.gone{{color:#a00}}\
.card{{display:inline-block;margin:0 1em 1em 0;vertical-align:top}}.card h3{{font-size:13px;margin:0}}\
figure{{margin:0}}figcaption{{font-size:11px;color:#555}}svg.chart{{border:1px solid #ddd;background:#fafafa}}\
#events{{font:12px monospace;max-height:20em;overflow:auto}}</style></head><body>\
<h1>wslb {ver}</h1><p id=\"totals\">uptime {up}s · {clients} client connections · {tunnels} WebSockets · {n} backends · descriptors {used} of {limit}</p>",
        ver = esc(version),
        up = uptime_secs,
        n = rows.len(),
        used = fds.0.map_or("?".to_string(), |n| n.to_string()),
        limit = fds.1,
    );
    for n in notes {
        let _ = write!(o, "<p class=\"note\">{}</p>", esc(n));
    }
    o.push_str(
        "<table id=\"backends\"><tr><th>state</th><th>name / guid</th><th>bindings</th><th>weight</th>\
<th>active</th><th>selected</th><th>dispatches</th><th>last heartbeat / rate</th><th></th></tr>",
    );
    for b in rows {
        let heard = b
            .heard_secs_ago
            .map_or("-".to_string(), |s| format!("{s}s ago"));
        let state = if b.down && b.state == "ready" {
            "ready (backing off)"
        } else {
            b.state
        };
        let _ = write!(
            o,
            "<tr class=\"{cls}\"><td>{state}</td><td>{name}</td><td>{bind}</td><td>{w}</td><td>{a}</td><td>{s}</td><td>{d}</td><td>{heard}</td><td></td></tr>",
            cls = b.state,
            name = esc(b.guid.as_deref().unwrap_or(&b.name)),
            bind = esc(&b.bindings.join(" ")),
            w = b.weight,
            a = b.active,
            s = b.selected,
            d = b.dispatch.1,
        );
    }
    o.push_str(
        "</table><p id=\"status\"></p><h2>Last minutes</h2><div id=\"charts\"></div>\
<h2>Events</h2><ol id=\"events\" reversed></ol><script src=\"/status.js\"></script></body></html>\n",
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_escapes_and_lists() {
        let rows = [BackendRow {
            id: 0,
            name: "g<1>".into(),
            guid: Some("g<1>".into()),
            state: "ready",
            bindings: vec!["ws://127.0.0.1:1".into()],
            weight: 2,
            active: 3,
            selected: 4,
            heard_secs_ago: Some(1),
            down: false,
            tags: vec![("zone".into(), "a".into())],
            source: "registration",
            max_connections: 0,
            dispatch: (Vec::new(), 0, None),
        }];
        let note = ["rebalancing on: up to 50 closes/s, 7 so far".to_string()];
        let html = status_html(&rows, 5, 1, 9, "0.1.0", (Some(42), 1024), &note);
        assert!(html.contains("<p class=\"note\">rebalancing on: up to 50 closes/s, 7 so far</p>"));
        assert!(html.contains("g&lt;1&gt;") && !html.contains("g<1>"));
        assert!(html.contains("descriptors 42 of 1024"));
        assert!(html.contains("<noscript><meta http-equiv=\"refresh\""));
        assert!(html.contains("<script src=\"/status.js\"></script>"));
        let j = backends_json(&rows);
        assert_eq!(j[0]["tags"]["zone"], "a");
        assert_eq!(j[0]["active"], 3);
        assert_eq!(j[0]["source"], "registration");
    }
}
