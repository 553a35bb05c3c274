//! Dispatch mode's view of a backend (issue 18): its public bindings, the client count it
//! reports on the control channel, and clients dispatched to it since that report.
//!
//! A dispatched client connects to the backend directly, so the balancer never sees it in
//! `active`. The backend's report (`{"type":"load","clients":N}`, at least every
//! heartbeat) is the truth; clients dispatched after it are added provisionally so that a
//! burst between two reports spreads instead of all going to the backend that looked
//! least loaded at the last report. The next report clears them: by then they have
//! connected (and are in N) or gave up.

/// Which count the selection compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadView {
    /// Proxying: connections through this balancer.
    #[default]
    Active,
    /// Dispatching: reported + provisional, and only backends with a public binding.
    Reported,
}

/// Per-backend dispatch state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DispatchLoad {
    /// URLs clients connect to directly; empty = never dispatched to.
    pub public: Vec<String>,
    /// Last `load` report; `None` before the first.
    pub reported: Option<u32>,
    /// Clients dispatched since the last report.
    pub provisional: u32,
    /// Dispatches in total (`wslb_dispatches_total`).
    pub dispatched: u64,
    /// Rotates over `public`.
    next_public: usize,
}

impl DispatchLoad {
    /// A `load` report: the backend counted its clients; provisional ones are in it now.
    pub fn report(&mut self, clients: u32) {
        self.reported = Some(clients);
        self.provisional = 0;
    }

    /// The load the dispatch selection compares.
    pub fn load(&self) -> u32 {
        self.reported.unwrap_or(0).saturating_add(self.provisional)
    }

    /// Counts one dispatch and returns the public URL to hand out (rotating), if any.
    pub fn dispatch(&mut self) -> Option<&str> {
        let i = self.next_public % self.public.len().max(1);
        let url = self.public.get(i)?;
        self.next_public = self.next_public.wrapping_add(1);
        self.provisional = self.provisional.saturating_add(1);
        self.dispatched += 1;
        Some(url)
    }

    /// May be dispatched to under a connection cap (`max_connections`, 0 = none).
    pub fn has_room(&self, max_connections: u32) -> bool {
        !self.public.is_empty() && (max_connections == 0 || self.load() < max_connections)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provisional_counts_until_the_next_report() {
        let mut d = DispatchLoad {
            public: vec!["ws://a:1".into(), "ws://b:1".into()],
            ..DispatchLoad::default()
        };
        assert_eq!(d.load(), 0);
        d.report(10);
        assert_eq!(d.dispatch(), Some("ws://a:1"));
        assert_eq!(d.dispatch(), Some("ws://b:1"));
        assert_eq!(d.load(), 12);
        assert!(d.has_room(13) && !d.has_room(12) && d.has_room(0));
        d.report(11);
        assert_eq!((d.load(), d.dispatched), (11, 2));
        assert!(!DispatchLoad::default().has_room(0), "no public binding");
        assert_eq!(DispatchLoad::default().dispatch(), None);
    }

    /// Through `route::choose`: reported + provisional load decides, backends without a
    /// public binding, full by load, or draining are never chosen.
    #[test]
    fn dispatch_choice_uses_reported_plus_provisional_load() {
        use crate::backends::registry::{BackendState, Registry};
        use crate::backends::route::{choose, Ask, Sticky};
        use crate::config::{parse_backend, Algorithm};
        use rand::SeedableRng;
        let specs: Vec<_> = [
            "ws://127.0.0.1:1,public=ws://a.example/",
            "ws://127.0.0.1:2,public=ws://b.example/",
            "ws://127.0.0.1:3",
            "ws://127.0.0.1:4,public=ws://d.example/,max_connections=5",
        ]
        .iter()
        .map(|s| parse_backend(s).unwrap())
        .collect();
        let mut r = Registry::from_specs(&specs);
        for (id, n) in [(0, 100), (1, 110), (2, 0), (3, 5)] {
            r.report_load(id, n);
        }
        let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
        let now = std::time::Instant::now();
        let mut pick = |r: &mut Registry| {
            r.choose_for_dispatch(|r, exclude| {
                let ask = Ask {
                    client: 1,
                    sticky: &Sticky::Off,
                    exclude,
                    algorithm: Algorithm::Fewest,
                    now,
                };
                choose(r, None, &mut rng, &ask)
            })
        };
        let mut got = [0u32; 4];
        for _ in 0..30 {
            let (id, _) = pick(&mut r).unwrap();
            got[id] += 1;
        }
        // 100+20 = 110+10: the burst fills the gap, then alternates.
        assert_eq!(got, [20, 10, 0, 0]);
        r.set_state(0, BackendState::Draining);
        r.set_state(1, BackendState::Draining);
        assert_eq!(pick(&mut r), None, "no public binding, or full by load");
    }
}
