//! Closing many WebSockets without a reconnect storm: the spread closes of a SIGTERM drain
//! (1001), of a backend's drain (1012) and of rebalancing (1012), and the `drain_complete`
//! notice a drained backend gets once its last client is gone.
//!
//! Every such close goes through one schedule ([`Closes`]): a min-heap of `(when, key, gen,
//! why)` served by one timer kind ([`TimerKind::SpreadClose`]) armed at the next due close.
//! Each firing closes at most [`MAX_CLOSES_PER_TURN`]; an entry whose connection left, was
//! reused (another `gen`) or is already closing is skipped, so no client is closed twice.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rand::seq::SliceRandom;
use rand::Rng;

use super::*;
use crate::backends::rebalance::{self, Candidate, Load};
use crate::backends::registry::Backend;

/// Most scheduled closes taken in one loop turn, done or skipped (stale ones cost a heap
/// pop each, but a drain of thousands leaves thousands); the rest wait for the next turn.
const MAX_CLOSES_PER_TURN: usize = 128;
/// "Service restart" (RFC 6455 §7.4.1 registry): the client should reconnect, and it will
/// be sent elsewhere. What a backend drain and rebalancing send.
pub const CLOSE_SERVICE_RESTART: u16 = 1012;
/// How often rebalancing looks at the loads; `--rebalance RATE` is per this period.
pub(super) const REBALANCE_EVERY: Duration = Duration::from_secs(1);

/// Why a close was scheduled: its close code, and what is checked when it is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Why {
    /// SIGTERM: the whole balancer is going away (1001).
    Shutdown,
    /// This backend is draining (1012); skipped if it was registered again meanwhile.
    BackendDrain(usize),
    /// Rebalancing (1012).
    Rebalance,
}

impl Why {
    fn code(self) -> u16 {
        match self {
            Why::Shutdown => CLOSE_GOING_AWAY,
            Why::BackendDrain(_) | Why::Rebalance => CLOSE_SERVICE_RESTART,
        }
    }
}

/// Scheduled closes, earliest first. Pure bookkeeping: the loop does the closing.
#[derive(Debug, Default)]
pub(super) struct Closes {
    heap: BinaryHeap<Reverse<(Instant, usize, u64, Why)>>,
    /// The earliest [`TimerKind::SpreadClose`] deadline in the timer heap.
    pub(super) armed: Option<Instant>,
    /// Rebalancing closes not yet due: the next round waits for them, so it sees the
    /// loads they leave behind instead of closing the same excess twice.
    rebalance_pending: usize,
}

impl Closes {
    /// Schedules connection `(key, gen)` to be closed at `at`.
    pub(super) fn add(&mut self, at: Instant, key: usize, gen: u64, why: Why) {
        if why == Why::Rebalance {
            self.rebalance_pending += 1;
        }
        self.heap.push(Reverse((at, key, gen, why)));
    }

    /// When the next close is due.
    pub(super) fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, ..))| *at)
    }

    /// One close due by `now`, if any.
    pub(super) fn pop_due(&mut self, now: Instant) -> Option<(usize, u64, Why)> {
        match self.heap.peek() {
            Some(Reverse((at, ..))) if *at <= now => {
                let Reverse((_, key, gen, why)) = self.heap.pop()?;
                if why == Why::Rebalance {
                    self.rebalance_pending = self.rebalance_pending.saturating_sub(1);
                }
                Some((key, gen, why))
            }
            _ => None,
        }
    }

    /// Rebalancing closes still to come.
    pub(super) fn rebalance_pending(&self) -> usize {
        self.rebalance_pending
    }
}

/// Stratified jitter: shuffles `items` and gives the i-th of the n the offset
/// `window × (i + u) / n`, `u` uniform in [0, 1). Every n-th of the window gets exactly one
/// close, at a random point within it: an even spread without the clumps of independent
/// uniform times, and without the lock-step of an exact grid.
pub(super) fn spread<T, R: Rng + ?Sized>(
    mut items: Vec<T>,
    window: Duration,
    rng: &mut R,
) -> Vec<(Duration, T)> {
    items.shuffle(rng);
    let n = items.len() as f64;
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let u: f64 = rng.random();
            (window.mul_f64((i as f64 + u) / n), item)
        })
        .collect()
}

/// A drained backend waiting for its last client to go, to tell its control connection.
#[derive(Debug)]
pub(super) struct DrainWatch {
    backend: usize,
    owner: (usize, u64),
    /// Its connections when the drain began.
    clients: u32,
}

impl Server {
    fn backend(&self, id: usize) -> Option<&Backend> {
        self.backends.iter().find(|(i, _)| *i == id).map(|(_, b)| b)
    }

    /// Open tunnels, with their keys and generations, `filter` selects.
    fn open_tunnels(&self, filter: impl Fn(&OpenTunnel) -> bool) -> Vec<(usize, u64)> {
        self.conns
            .iter()
            .filter(|(_, c)| !c.marks.done && c.live_tunnel().is_some_and(|t| filter(&t)))
            .map(|(k, c)| (k, c.gen))
            .collect()
    }

    /// Schedules `conns` to be closed for `why`, spread over `window` from now.
    fn schedule_spread(&mut self, conns: Vec<(usize, u64)>, window: Duration, why: Why) {
        let now = Instant::now();
        for (offset, (key, gen)) in spread(conns, window, &mut self.rng) {
            self.closes.add(now + offset, key, gen, why);
        }
        self.arm_closes();
    }

    fn arm_closes(&mut self) {
        if let Some(at) = self.closes.next() {
            let key = TimerKey {
                key: 0,
                gen: 0,
                kind: TimerKind::SpreadClose,
            };
            self.timers.arm(&mut self.closes.armed, at, key);
        }
    }

    /// SIGTERM: the WebSockets open now are closed with 1001 spread over the drain window
    /// (the `Drain` timer at its end still closes whatever opened since).
    pub(super) fn spread_shutdown_closes(&mut self) {
        let conns = self.open_tunnels(|_| true);
        self.schedule_spread(conns, self.cfg.drain_timeout, Why::Shutdown);
    }

    /// The [`TimerKind::SpreadClose`] timer: closes what is due, at most
    /// [`MAX_CLOSES_PER_TURN`], then arms the timer for the next one (at once if some are
    /// left: the next turn takes them).
    pub(super) fn fire_spread_closes(&mut self, now: Instant) {
        self.closes.armed = None;
        for _ in 0..MAX_CLOSES_PER_TURN {
            let Some((key, gen, why)) = self.closes.pop_due(now) else {
                break;
            };
            let Some(t) = self.conns.live_gen(key, gen).and_then(|c| c.live_tunnel()) else {
                continue;
            };
            if let Why::BackendDrain(id) = why {
                // Registered again (or undrained) since: its clients are welcome again.
                if self
                    .backend(id)
                    .is_none_or(|b| b.state == BackendState::Ready)
                    || t.backend != id
                {
                    continue;
                }
            }
            match why {
                Why::Shutdown => {}
                Why::BackendDrain(_) => self.stats.backend_drain_closes += 1,
                Why::Rebalance => self.stats.rebalance_closes += 1,
            }
            self.with_conn(key, |c, ctx| c.going_away(ctx, why.code()));
        }
        self.arm_closes();
    }

    /// Puts backend `id` in draining state: no new clients; its WebSocket clients get 1012
    /// spread over `--backend-drain-window` (unless off); its control connection, if any,
    /// hears `drain_complete` once its last connection is gone. Draining a backend already
    /// draining changes nothing. Returns its connections when the drain began.
    pub(super) fn drain_backend(&mut self, id: usize) -> u32 {
        let Some(b) = self.backend(id) else {
            return 0;
        };
        if b.state != BackendState::Ready {
            let watched = self.drain_watches.iter().find(|w| w.backend == id);
            return watched.map_or(b.active, |w| w.clients);
        }
        let (owner, clients) = (b.owner, b.active);
        self.backends.set_state(id, BackendState::Draining);
        if let Some(window) = self.cfg.backend_drain_window {
            let conns = self.open_tunnels(|t| t.backend == id);
            self.schedule_spread(conns, window, Why::BackendDrain(id));
        }
        if let Some(owner) = owner {
            self.drain_watches.retain(|w| w.backend != id);
            self.drain_watches.push(DrainWatch {
                backend: id,
                owner,
                clients,
            });
        }
        clients
    }

    /// End of a turn: tells each drained backend whose last connection is gone, and forgets
    /// drains that were undone (registered again) or whose control connection went.
    pub(super) fn check_drains(&mut self) {
        if self.drain_watches.is_empty() {
            return;
        }
        let mut watches = std::mem::take(&mut self.drain_watches);
        watches.retain(|w| {
            let Some(b) = self.backend(w.backend) else {
                return false;
            };
            if b.state != BackendState::Draining || b.owner != Some(w.owner) {
                return false;
            }
            if b.active > 0 {
                return true;
            }
            let (key, gen) = w.owner;
            if let Some(c) = self.controls.live_gen(key, gen) {
                c.send_text(control_protocol::drain_complete(w.clients));
                log::info(
                    "server drained: last client gone",
                    &[
                        ("guid", &c.guid.as_deref().unwrap_or("-")),
                        ("clients", &w.clients),
                    ],
                );
            }
            false
        });
        // Watches added while these were checked (none today) are kept too.
        watches.append(&mut self.drain_watches);
        self.drain_watches = watches;
    }

    /// Lines for the status page: whether rebalancing is on, and the drain closes so far.
    pub(super) fn status_notes(&self) -> Vec<String> {
        let rebalancing = match self.cfg.rebalance {
            0 => "rebalancing off".to_string(),
            rate => format!(
                "rebalancing on: up to {rate} closes/s while loads are over {:.0}% apart, {} closes so far",
                rebalance::THRESHOLD * 100.0,
                self.stats.rebalance_closes
            ),
        };
        let drains = match self.cfg.backend_drain_window {
            Some(w) => format!(
                "backend drain: clients closed (1012) over {} s, {} so far",
                w.as_secs_f64(),
                self.stats.backend_drain_closes
            ),
            None => "backend drain: clients stay until they leave".to_string(),
        };
        vec![rebalancing, drains]
    }

    /// The [`TimerKind::Rebalance`] timer (only armed with `--rebalance`): when the Ready
    /// backends' loads are more than [`rebalance::THRESHOLD`] apart, and until they are
    /// within [`rebalance::SETTLED`], schedules up to RATE closes (1012) from the most
    /// loaded, spread over the next period.
    pub(super) fn rebalance_tick(&mut self, now: Instant) {
        let rate = self.cfg.rebalance;
        if rate == 0 || self.draining {
            return;
        }
        self.timers.add(
            now + REBALANCE_EVERY,
            TimerKey {
                key: 0,
                gen: 0,
                kind: TimerKind::Rebalance,
            },
        );
        if self.closes.rebalance_pending() > 0 {
            return;
        }
        let mut loads: Vec<Load> = self
            .backends
            .iter()
            .filter(|(_, b)| {
                b.state == BackendState::Ready && b.down_until.is_none_or(|t| t <= now)
            })
            .map(|(id, b)| Load {
                id,
                weight: b.weight,
                open: 0,
            })
            .collect();
        if loads.len() < 2 {
            return;
        }
        let mut candidates = Vec::new();
        for (key, c) in self.conns.iter().filter(|(_, c)| !c.marks.done) {
            let Some(t) = c.live_tunnel() else {
                continue;
            };
            if let Some(l) = loads.iter_mut().find(|l| l.id == t.backend) {
                l.open += 1;
                candidates.push(Candidate {
                    key: (key, c.gen),
                    backend: t.backend,
                    opened: t.opened,
                    pinned: t.pinned,
                });
            }
        }
        let imbalance = rebalance::imbalance(&loads);
        self.rebalancing = rebalance::acting(imbalance, self.rebalancing);
        if !self.rebalancing {
            return;
        }
        let quotas = rebalance::quotas(&loads, rate);
        let chosen = rebalance::choose(&candidates, &quotas, now, &mut self.rng);
        if !chosen.is_empty() {
            log::info(
                "rebalancing",
                &[
                    ("imbalance", &format!("{imbalance:.2}")),
                    ("closing", &chosen.len()),
                ],
            );
            self.schedule_spread(chosen, REBALANCE_EVERY, Why::Rebalance);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_puts_one_close_in_each_nth_of_the_window() {
        let mut rng = SmallRng::seed_from_u64(5);
        let window = Duration::from_secs(6);
        let n = 600;
        let got = spread((0..n).collect::<Vec<u32>>(), window, &mut rng);
        assert_eq!(got.len(), n as usize);
        let slot = window / n;
        for (i, (offset, _)) in got.iter().enumerate() {
            let i = u32::try_from(i).unwrap();
            assert!(
                *offset >= slot * i && *offset < slot * (i + 1),
                "{i}: {offset:?}"
            );
        }
        // Shuffled: the order of the items is not kept.
        let order: Vec<u32> = got.iter().map(|(_, k)| *k).collect();
        assert_ne!(order, (0..n).collect::<Vec<_>>());
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..n).collect::<Vec<_>>());
        assert!(spread(Vec::<u32>::new(), window, &mut rng).is_empty());
    }

    #[test]
    fn closes_come_out_in_time_order_and_count_rebalancing() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        let mut c = Closes::default();
        assert_eq!(c.next(), None);
        c.add(now + ms(30), 3, 1, Why::Rebalance);
        c.add(now + ms(10), 1, 1, Why::Shutdown);
        c.add(now + ms(20), 2, 7, Why::BackendDrain(4));
        assert_eq!((c.next(), c.rebalance_pending()), (Some(now + ms(10)), 1));
        assert_eq!(c.pop_due(now), None);
        assert_eq!(c.pop_due(now + ms(25)), Some((1, 1, Why::Shutdown)));
        assert_eq!(c.pop_due(now + ms(25)), Some((2, 7, Why::BackendDrain(4))));
        assert_eq!(c.pop_due(now + ms(25)), None);
        assert_eq!(c.pop_due(now + ms(30)), Some((3, 1, Why::Rebalance)));
        assert_eq!((c.next(), c.rebalance_pending()), (None, 0));
        assert_eq!(Why::Shutdown.code(), 1001);
        assert_eq!(Why::Rebalance.code(), 1012);
    }
}
