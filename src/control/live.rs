//! The live status page's data: a once-a-second sample of the backends into bounded
//! history rings, the last notable events, and the server-sent-events (`GET /api/live`)
//! frames built from them. Pure: the server feeds rows in and pushes the frames out.
//!
//! Bounds: history is `HISTORY` samples per backend (O(backends × 300)), events are the
//! last `MAX_EVENTS`, subscribers at most `MAX_SUBSCRIBERS`, and each subscriber queues at
//! most `MAX_QUEUED` bytes: one that does not read is dropped, never buffered for.

use std::collections::VecDeque;
use std::time::Duration;

use serde_json::{json, Value};

use super::status::BackendRow;

/// Sampling period of the history and of snapshot pushes.
pub const TICK: Duration = Duration::from_secs(1);
/// Samples kept per backend: 5 minutes at one a second.
pub const HISTORY: usize = 300;
/// Events kept for a freshly opened page.
pub const MAX_EVENTS: usize = 50;
/// Most live pages at once; more get 503 (each costs a control slot and a queue).
pub const MAX_SUBSCRIBERS: usize = 16;
/// Most bytes queued for one subscriber. A hello (history of every backend) must fit, so
/// this is sized for ~100 backends; a reader that falls this far behind is dropped.
pub const MAX_QUEUED: usize = 256 * 1024;
/// Kernel send buffer of an event stream: a few seconds of frames, no autotuning.
pub const STREAM_SNDBUF: usize = 64 * 1024;
/// The page served with the status HTML: a file, so the CSP can stay `script-src 'self'`.
pub const STATUS_JS: &str = include_str!("status.js");
/// Where [`STATUS_JS`] is served; public (a static file with no data in it).
pub const STATUS_JS_PATH: &str = "/status.js";

/// Loop-wide counters a snapshot turns into per-second rates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Client connections open.
    pub clients: usize,
    /// Connections to backends open (WebSockets and HTTP exchanges in flight).
    pub active: usize,
    /// WebSocket messages client → backend so far.
    pub up: u64,
    /// WebSocket messages backend → client so far.
    pub down: u64,
    /// 5xx answers so far (a summary event, not one event each: there may be thousands).
    pub errors: u64,
    /// Seconds since start.
    pub uptime: u64,
}

/// One second of one backend.
#[derive(Debug, Clone, Copy)]
struct Sample {
    active: u32,
    /// Times selected in that second (new connections, or requests).
    rate: u64,
    /// WebSocket messages in that second, client → backend and back.
    up: u64,
    down: u64,
}

/// One backend's history.
#[derive(Debug)]
struct Track {
    name: String,
    last_selected: u64,
    last_messages: [u64; 2],
    samples: VecDeque<Sample>,
}

/// The live page's state in the server.
#[derive(Debug, Default)]
pub struct Live {
    tracks: Vec<Track>,
    /// `(messages up/s, down/s)` per tick.
    totals: VecDeque<(u64, u64)>,
    last: Option<Totals>,
    events: VecDeque<Value>,
    /// Live subscribers: control connections by `(key, gen)`.
    pub subscribers: Vec<(usize, u64)>,
    /// Subscribers dropped because they did not read.
    pub dropped: u64,
}

fn push_bounded<T>(q: &mut VecDeque<T>, v: T, cap: usize) {
    if q.len() >= cap {
        q.pop_front();
    }
    q.push_back(v);
}

/// One server-sent event; `data` is JSON (one line, so one `data:` field).
pub fn sse(event: &str, data: &Value) -> String {
    format!("event: {event}\ndata: {data}\n\n")
}

/// The response head that opens an event stream.
pub fn stream_head() -> &'static [u8] {
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\nX-Accel-Buffering: no\r\nConnection: close\r\n\r\nretry: 2000\n\n"
}

impl Live {
    /// One tick: appends a sample per backend (tracks of vanished backends go), and returns
    /// the snapshot frame plus, if 5xx answers happened, a summary event frame.
    /// `messages`: `[up, down]` so far by backend id (`Stats::backend_messages_by_id`).
    pub fn sample(
        &mut self,
        rows: &[BackendRow],
        messages: &[[u64; 2]],
        now: Totals,
    ) -> Vec<String> {
        let last = self.last.replace(now).unwrap_or(now);
        let rate = (
            now.up.saturating_sub(last.up),
            now.down.saturating_sub(last.down),
        );
        push_bounded(&mut self.totals, rate, HISTORY);
        self.tracks
            .retain(|t| rows.iter().any(|r| row_name(r) == t.name));
        let mut backends = Vec::with_capacity(rows.len());
        for r in rows {
            let name = row_name(r);
            let msgs = messages.get(r.id).copied().unwrap_or_default();
            let i = match self.tracks.iter().position(|t| t.name == name) {
                Some(i) => i,
                None => {
                    self.tracks.push(Track {
                        name: name.to_string(),
                        last_selected: r.selected,
                        last_messages: msgs,
                        samples: VecDeque::with_capacity(HISTORY),
                    });
                    self.tracks.len() - 1
                }
            };
            let Some(t) = self.tracks.get_mut(i) else {
                continue;
            };
            let s = Sample {
                active: r.active,
                rate: r.selected.saturating_sub(t.last_selected),
                up: msgs[0].saturating_sub(t.last_messages[0]),
                down: msgs[1].saturating_sub(t.last_messages[1]),
            };
            (t.last_selected, t.last_messages) = (r.selected, msgs);
            push_bounded(&mut t.samples, s, HISTORY);
            backends.push(json!({
                "name": name, "url": r.name, "state": r.state, "down": r.down,
                "weight": r.weight, "active": r.active, "selected": r.selected,
                "rate": s.rate, "up_s": s.up, "down_s": s.down,
                "bindings": r.bindings, "heard": r.heard_secs_ago,
                "dispatches": r.dispatch.1,
            }));
        }
        let snapshot = json!({
            "uptime": now.uptime, "clients": now.clients, "active": now.active,
            "up_s": rate.0, "down_s": rate.1, "backends": backends,
        });
        let mut frames = vec![sse("snapshot", &snapshot)];
        let errors = now.errors.saturating_sub(last.errors);
        if errors > 0 {
            let summary = json!({
                "event": "errors", "count": errors,
                "text": format!("{errors} 5xx answers in the last second"),
            });
            frames.push(self.record(summary));
        }
        frames
    }

    /// Keeps a notable event for new pages; returns its frame for the open ones.
    pub fn record(&mut self, event: Value) -> String {
        let frame = sse("event", &event);
        push_bounded(&mut self.events, event, MAX_EVENTS);
        frame
    }

    /// What a new subscriber gets first: every backend's history and the last events.
    pub fn hello(&self) -> String {
        let history: serde_json::Map<String, Value> = self
            .tracks
            .iter()
            .map(|t| {
                let series = |f: fn(&Sample) -> u64| t.samples.iter().map(f).collect::<Vec<_>>();
                let v = json!({
                    "active": series(|s| u64::from(s.active)), "rate": series(|s| s.rate),
                    "up": series(|s| s.up), "down": series(|s| s.down),
                });
                (t.name.clone(), v)
            })
            .collect();
        let (up, down): (Vec<u64>, Vec<u64>) = self.totals.iter().copied().unzip();
        let mut out = sse(
            "history",
            &json!({ "backends": history, "up": up, "down": down }),
        );
        for e in &self.events {
            out.push_str(&sse("event", e));
        }
        out
    }
}

/// The name a page shows and the API takes: the guid for registered backends, else the URL.
fn row_name(r: &BackendRow) -> &str {
    r.guid.as_deref().unwrap_or(&r.name)
}

/// Appends the live page's series to the metrics text.
pub fn render_metrics(out: &mut String, subscribers: usize, queued: usize, dropped: u64) {
    use std::fmt::Write as _;
    let _ = write!(
        out,
        "# HELP wslb_live_subscribers Live status pages open (GET /api/live).\n\
# TYPE wslb_live_subscribers gauge\nwslb_live_subscribers {subscribers}\n\
# HELP wslb_live_queued_bytes Bytes queued for live status pages, at most {MAX_QUEUED} each.\n\
# TYPE wslb_live_queued_bytes gauge\nwslb_live_queued_bytes {queued}\n\
# HELP wslb_live_dropped_total Live status pages dropped because they did not read.\n\
# TYPE wslb_live_dropped_total counter\nwslb_live_dropped_total {dropped}\n"
    );
}

/// A subscriber's queue: bytes not yet written, at most [`MAX_QUEUED`].
#[derive(Debug, Default)]
pub struct StreamOut {
    q: VecDeque<u8>,
}

impl StreamOut {
    /// Queues `bytes`; `false` (nothing queued) if that would pass the bound.
    pub fn push(&mut self, bytes: &[u8]) -> bool {
        if self.q.len() + bytes.len() > MAX_QUEUED {
            return false;
        }
        self.q.extend(bytes);
        true
    }

    /// The queued bytes, in two parts (a ring).
    pub fn slices(&self) -> (&[u8], &[u8]) {
        self.q.as_slices()
    }

    /// `n` bytes were written.
    pub fn consume(&mut self, n: usize) {
        self.q.drain(..n.min(self.q.len()));
        if self.q.is_empty() && self.q.capacity() > 16 * 1024 {
            // A hello's worth of capacity is not kept for a page that now gets ~1 KB/s.
            self.q = VecDeque::new();
        }
    }

    /// Bytes waiting.
    pub fn len(&self) -> usize {
        self.q.len()
    }

    /// Nothing waiting.
    pub fn is_empty(&self) -> bool {
        self.q.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(guid: &str, active: u32, selected: u64) -> BackendRow {
        BackendRow {
            id: 0,
            name: "ws://127.0.0.1:1".into(),
            guid: Some(guid.into()),
            state: "ready",
            bindings: vec![],
            weight: 1,
            active,
            selected,
            heard_secs_ago: None,
            down: false,
            tags: vec![],
            source: "registration",
            max_connections: 0,
            dispatch: (Vec::new(), 0, None),
        }
    }

    fn data(frame: &str) -> Value {
        let line = frame
            .lines()
            .find_map(|l| l.strip_prefix("data: "))
            .unwrap();
        serde_json::from_str(line).unwrap()
    }

    #[test]
    fn sse_frames_are_one_data_line_and_escape_newlines() {
        let f = sse("event", &json!({"text": "a\nb</script>"}));
        assert!(f.starts_with("event: event\ndata: {"));
        assert!(f.ends_with("}\n\n"));
        assert_eq!(f.matches('\n').count(), 3, "{f}");
        assert_eq!(data(&f)["text"], "a\nb</script>");
    }

    #[test]
    fn samples_give_rates_and_history_is_bounded() {
        let mut live = Live::default();
        let t = |up, errors| Totals {
            up,
            errors,
            ..Totals::default()
        };
        live.sample(&[row("a", 1, 10)], &[[5, 6]], t(100, 0));
        let frames = live.sample(&[row("a", 2, 13)], &[[9, 16]], t(150, 0));
        assert_eq!(frames.len(), 1);
        let snap = data(&frames[0]);
        assert_eq!(snap["up_s"], 50);
        assert_eq!(snap["backends"][0]["rate"], 3);
        assert_eq!(snap["backends"][0]["up_s"], 4);
        assert_eq!(snap["backends"][0]["down_s"], 10);
        assert_eq!(snap["backends"][0]["name"], "a");
        for i in 0..HISTORY as u64 + 20 {
            live.sample(&[row("a", 2, 13 + i)], &[], t(150, 0));
        }
        let hello = data(&live.hello());
        let a = hello["backends"]["a"]["active"].as_array().unwrap();
        assert_eq!(a.len(), HISTORY);
        assert_eq!(hello["up"].as_array().unwrap().len(), HISTORY);
        // A backend that left loses its history; errors become one summary event.
        assert_eq!(
            hello["backends"]["a"]["down"][0], 0,
            "no counts: no messages"
        );
        let frames = live.sample(&[row("b", 0, 0)], &[], t(150, 7));
        assert_eq!(frames.len(), 2);
        assert_eq!(data(&frames[1])["count"], 7);
        let hello = live.hello();
        assert!(data(&hello)["backends"].get("a").is_none());
        assert!(hello.contains("5xx answers"));
    }

    #[test]
    fn events_ring_keeps_the_last() {
        let mut live = Live::default();
        for i in 0..MAX_EVENTS + 5 {
            live.record(json!({ "n": i }));
        }
        let hello = live.hello();
        assert_eq!(hello.matches("event: event\n").count(), MAX_EVENTS);
        assert!(!hello.contains("{\"n\":4}") && hello.contains("{\"n\":5}"));
    }

    #[test]
    fn stream_queue_refuses_past_its_bound() {
        let mut q = StreamOut::default();
        assert!(q.push(&vec![1; MAX_QUEUED - 10]));
        assert!(!q.push(&[2; 11]));
        assert!(q.push(&[3; 10]));
        q.consume(MAX_QUEUED - 5);
        let (a, b) = q.slices();
        assert_eq!([a, b].concat(), vec![3; 5]);
        q.consume(100);
        assert!(q.is_empty());
    }
}
