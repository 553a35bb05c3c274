//! Deadlines in one min-heap with lazy cancellation (gaea's shape).
//!
//! Removing an entry from a binary heap is costly, so nothing is ever removed early: each
//! entry names `(key, gen)` of its connection and a kind, and the owner ignores an expired
//! entry whose connection is gone, was reused (different `gen`), or has moved past the
//! deadline's purpose.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

/// What a deadline is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TimerKind {
    /// The connection's own deadline (head, connect, idle, linger: it knows which).
    Conn,
    /// Resume accepting after EMFILE.
    AcceptResume,
    /// SIGTERM grace period over: WebSocket clients get close 1001.
    Drain,
    /// Drain grace plus linger over: exit whatever is left.
    HardStop,
    /// Periodic housekeeping (stale pooled backend connections).
    Sweep,
    /// A control connection's deadline (handshake, heartbeat).
    Control,
    /// Binary upgrade, new side: accept clients even if not every backend came back.
    Takeover,
    /// The next spread close of a drain or of rebalancing is due (`server/drain.rs`).
    SpreadClose,
    /// Rebalancing looks at the backends' loads (`--rebalance`).
    Rebalance,
    /// `--proxy-protocol`: an accepted socket's PROXY header is overdue.
    ProxyHeader,
    /// The live status page's once-a-second sample and push (`server/live.rs`).
    LiveTick,
}

/// Identifies the owner of a deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TimerKey {
    /// Slab key of the connection (0 for loop-wide timers).
    pub key: usize,
    /// Generation of the connection when the deadline was armed.
    pub gen: u64,
    /// What the deadline is for.
    pub kind: TimerKind,
}

/// All deadlines of the loop.
#[derive(Debug, Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<(Instant, TimerKey)>>,
}

impl Timers {
    /// Arms a deadline; cancelling is the owner's job (ignore it when it fires).
    pub fn add(&mut self, at: Instant, key: TimerKey) {
        self.heap.push(Reverse((at, key)));
    }

    /// Arms `at` for `key` unless the owner already has an earlier deadline armed (`armed`,
    /// kept by the owner). Later deadlines are not pushed: the earlier timer fires, and the
    /// owner re-arms from its state then (lazy re-arming, one heap entry per owner).
    pub fn arm(&mut self, armed: &mut Option<Instant>, at: Instant, key: TimerKey) {
        if armed.is_none_or(|earlier| at < earlier) {
            *armed = Some(at);
            self.add(at, key);
        }
    }

    /// How long `poll` may sleep: until the nearest deadline, `None` = no deadline.
    pub fn next_timeout(&self, now: Instant) -> Option<Duration> {
        self.heap
            .peek()
            .map(|Reverse((at, _))| at.saturating_duration_since(now))
    }

    /// Pops one expired deadline, if any.
    pub fn pop_expired(&mut self, now: Instant) -> Option<TimerKey> {
        match self.heap.peek() {
            Some(Reverse((at, _))) if *at <= now => self.heap.pop().map(|Reverse((_, k))| k),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(key: usize, kind: TimerKind) -> TimerKey {
        TimerKey { key, gen: 1, kind }
    }

    #[test]
    fn pops_in_deadline_order() {
        let now = Instant::now();
        let mut t = Timers::default();
        assert_eq!(t.next_timeout(now), None);
        t.add(now + Duration::from_millis(30), key(3, TimerKind::Sweep));
        t.add(now + Duration::from_millis(10), key(1, TimerKind::Conn));
        t.add(now + Duration::from_millis(20), key(2, TimerKind::Drain));
        assert_eq!(t.next_timeout(now), Some(Duration::from_millis(10)));
        assert_eq!(t.pop_expired(now), None);
        let later = now + Duration::from_millis(25);
        assert_eq!(t.pop_expired(later), Some(key(1, TimerKind::Conn)));
        assert_eq!(t.pop_expired(later), Some(key(2, TimerKind::Drain)));
        assert_eq!(t.pop_expired(later), None);
        assert_eq!(
            t.next_timeout(later + Duration::from_secs(1)),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn arming_keeps_only_the_earliest_deadline() {
        let now = Instant::now();
        let mut t = Timers::default();
        let mut armed = None;
        let k = key(4, TimerKind::Conn);
        t.arm(&mut armed, now + Duration::from_millis(50), k);
        // Later deadlines are not pushed; an earlier one is.
        t.arm(&mut armed, now + Duration::from_millis(80), k);
        t.arm(&mut armed, now + Duration::from_millis(20), k);
        assert_eq!(armed, Some(now + Duration::from_millis(20)));
        let end = now + Duration::from_secs(1);
        assert_eq!(t.pop_expired(end), Some(k));
        assert_eq!(t.pop_expired(end), Some(k));
        assert_eq!(
            t.pop_expired(end),
            None,
            "the 80 ms deadline was never pushed"
        );
    }
}
