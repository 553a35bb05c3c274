//! The live status page's loop side: a tick each second samples the backends (O(backends),
//! never a walk over the clients) and pushes frames to the pages subscribed to
//! `GET /api/live`; a page that does not keep up is dropped (`control::live` for bounds).

use super::*;
use crate::control::live::{self, Totals};

impl Server {
    /// Starts sampling when there is a control listener to show the page on.
    pub(super) fn start_live(&mut self) {
        if self.control_listener.is_none() {
            return;
        }
        self.events.keep_live();
        self.timers.add(
            Instant::now() + live::TICK,
            TimerKey {
                key: 0,
                gen: 0,
                kind: TimerKind::LiveTick,
            },
        );
    }

    pub(super) fn live_tick(&mut self, now: Instant, t: TimerKey) {
        self.timers.add(now + live::TICK, t);
        let rows = self.backend_rows();
        let totals = Totals {
            clients: self.conns.len(),
            active: rows.iter().map(|r| r.active as usize).sum(),
            up: self.stats.ws_messages_up,
            down: self.stats.ws_messages_down,
            errors: self.stats.http_responses.get(4).copied().unwrap_or(0),
            uptime: self.started.elapsed().as_secs(),
        };
        let frames = self
            .live
            .sample(&rows, &self.stats.backend_messages_by_id, totals);
        self.push_live_events();
        for f in frames {
            self.broadcast_live(f.as_bytes());
        }
    }

    /// Notable events since the last call go to the ring and the open pages.
    pub(super) fn push_live_events(&mut self) {
        for ev in self.events.take_live() {
            let frame = self.live.record(ev);
            self.broadcast_live(frame.as_bytes());
        }
    }

    /// `GET /api/live` on control connection `(key, gen)`: becomes a stream, or 503 past
    /// the subscriber cap.
    pub(super) fn live_subscribe(&mut self, key: usize, gen: u64) {
        let controls = &self.controls;
        self.live
            .subscribers
            .retain(|&(k, g)| controls.is_live(k, g));
        let full = self.live.subscribers.len() >= live::MAX_SUBSCRIBERS;
        let now = Instant::now();
        let Some(c) = self.controls.get_mut(key) else {
            return;
        };
        if full {
            let body = br#"{"error":"too many live status pages open"}"#;
            c.respond(now, 503, "application/json", body);
            return;
        }
        c.start_stream(now, self.live.hello().as_bytes());
        self.live.subscribers.push((key, gen));
    }

    /// Queues `frame` for every subscriber and writes what each socket takes now (no
    /// readiness edge would come for a socket that was already writable).
    fn broadcast_live(&mut self, frame: &[u8]) {
        let now = Instant::now();
        let mut i = 0;
        while let Some(&(key, gen)) = self.live.subscribers.get(i) {
            let Some(c) = self.controls.live_gen(key, gen) else {
                self.live.subscribers.swap_remove(i);
                continue;
            };
            if !c.push_stream(now, frame) {
                log::warn(
                    "live status page dropped: it does not read",
                    &[("peer", &c.peer)],
                );
                self.live.dropped += 1;
                self.controls.finish(key);
                self.live.subscribers.swap_remove(i);
                continue;
            }
            self.drive_control(key);
            i += 1;
        }
    }

    /// `wslb_live_*` series: open pages, bytes queued for them, pages dropped.
    pub(super) fn render_live_metrics(&self, out: &mut String) {
        let queued: usize = self
            .live
            .subscribers
            .iter()
            .filter_map(|&(k, _)| self.controls.get(k))
            .map(ControlConn::stream_queued)
            .sum();
        live::render_metrics(out, self.live.subscribers.len(), queued, self.live.dropped);
    }
}
