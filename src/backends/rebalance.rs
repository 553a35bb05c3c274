//! Opt-in rebalancing (`--rebalance RATE`): how uneven the Ready backends are, how many
//! connections each should give up, and which. Pure: the loop passes counts and
//! candidates, and a random source; no sockets, no clock.
//!
//! A new backend only gets new clients; long-lived WebSockets keep the old ones loaded for
//! hours. Closing a few of the most loaded backends' clients (1012, "service restart": come
//! back) lets them reconnect through the normal selection, which sends them to the least
//! loaded. Closes are capped per second so the reconnects are a trickle, not a storm.

use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::Rng;

/// Rebalancing starts when [`imbalance`] is above this (20 %)...
pub const THRESHOLD: f64 = 0.2;
/// ...and, once started, goes on until it is down to this (5 %): stopping as soon as it
/// dips under 20 % would leave the new backend at the low edge of its share (measured:
/// 450 / 500 / 550 of 1,500), while a threshold this low to start with would keep
/// closing clients over ordinary churn.
pub const SETTLED: f64 = 0.05;

/// A connection younger than this is never a candidate. A client closed by rebalancing
/// comes back as a new, young connection, so it is not closed again within this window;
/// and a burst of fresh connections is left to the selection to place.
pub const MIN_AGE: Duration = Duration::from_secs(10);

/// One Ready, healthy backend as rebalancing sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// Registry id.
    pub id: usize,
    /// Relative weight (at least 1 is assumed).
    pub weight: u32,
    /// Open WebSocket tunnels (not those already closing).
    pub open: u32,
}

impl Load {
    fn per_weight(&self) -> f64 {
        f64::from(self.open) / f64::from(self.weight.max(1))
    }
}

/// The spread of connections per unit of weight: `(max − min) / mean`, where each
/// backend's load is `open / weight` and `mean = Σ open / Σ weight` (the load every backend
/// would have if the connections were shared by weight). 0 when there is nothing to
/// compare (fewer than two backends, or no connection at all). Two backends at 110 and
/// 90 connections of equal weight are 0.2 apart; a new backend at 0 beside two at 150 is 1.5.
pub fn imbalance(loads: &[Load]) -> f64 {
    let total: u64 = loads.iter().map(|l| u64::from(l.open)).sum();
    let weight: u64 = loads.iter().map(|l| u64::from(l.weight.max(1))).sum();
    if loads.len() < 2 || total == 0 || weight == 0 {
        return 0.0;
    }
    let mean = total as f64 / weight as f64;
    let (min, max) = loads
        .iter()
        .map(Load::per_weight)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), l| {
            (lo.min(l), hi.max(l))
        });
    (max - min) / mean
}

/// Whether to act this round, given the [`imbalance`] and whether the last round acted
/// (hysteresis between [`THRESHOLD`] and [`SETTLED`]).
pub fn acting(imbalance: f64, was_acting: bool) -> bool {
    imbalance > if was_acting { SETTLED } else { THRESHOLD }
}

/// How many connections each backend should give up this round, `budget` in all, by id:
/// one at a time from whichever backend is then the most loaded per unit of weight, never
/// taking a backend below its fair share (`Σ open × weight / Σ weight`, rounded up). Equally
/// loaded backends so give up equally. Backends that give up nothing are left out.
pub fn quotas(loads: &[Load], budget: u32) -> Vec<(usize, u32)> {
    let total: u64 = loads.iter().map(|l| u64::from(l.open)).sum();
    let weight: u64 = loads.iter().map(|l| u64::from(l.weight.max(1))).sum();
    if weight == 0 {
        return Vec::new();
    }
    // (load after this round's closes, fair share, closes) per backend.
    let mut left: Vec<(Load, u64, u32)> = loads
        .iter()
        .map(|l| {
            let fair = (total * u64::from(l.weight.max(1))).div_ceil(weight);
            (*l, fair, 0)
        })
        .collect();
    // O(budget × backends): both are small (a rate per second, a pool of backends).
    for _ in 0..budget {
        let most = left
            .iter_mut()
            .filter(|(l, fair, _)| u64::from(l.open) > *fair)
            .max_by(|a, b| a.0.per_weight().total_cmp(&b.0.per_weight()));
        let Some((l, _, taken)) = most else {
            break;
        };
        l.open -= 1;
        *taken += 1;
    }
    left.into_iter()
        .filter(|(_, _, taken)| *taken > 0)
        .map(|(l, _, taken)| (l.id, taken))
        .collect()
}

/// A connection that might be closed, with the loop's handle on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<K> {
    /// The loop's handle (slab key and generation).
    pub key: K,
    /// Its backend.
    pub backend: usize,
    /// When its tunnel opened.
    pub opened: Instant,
    /// Its backend was chosen by a sticky session.
    pub pinned: bool,
}

/// Picks, for each `(backend, n)` of `quotas`, up to `n` of that backend's candidates at
/// random among those neither pinned by a sticky session nor younger than [`MIN_AGE`].
pub fn choose<K: Copy, R: Rng + ?Sized>(
    candidates: &[Candidate<K>],
    quotas: &[(usize, u32)],
    now: Instant,
    rng: &mut R,
) -> Vec<K> {
    let mut out = Vec::new();
    for &(backend, n) in quotas {
        let mut pool: Vec<K> = candidates
            .iter()
            .filter(|c| c.backend == backend && !c.pinned)
            .filter(|c| now.saturating_duration_since(c.opened) >= MIN_AGE)
            .map(|c| c.key)
            .collect();
        let n = usize::try_from(n).unwrap_or(usize::MAX).min(pool.len());
        let (picked, _) = pool.partial_shuffle(rng, n);
        out.extend_from_slice(picked);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    fn load(id: usize, weight: u32, open: u32) -> Load {
        Load { id, weight, open }
    }

    #[test]
    fn imbalance_is_the_spread_of_load_per_weight_over_the_mean() {
        assert_eq!(imbalance(&[]), 0.0);
        assert_eq!(imbalance(&[load(0, 1, 50)]), 0.0);
        assert_eq!(imbalance(&[load(0, 1, 0), load(1, 1, 0)]), 0.0);
        let even = imbalance(&[load(0, 1, 100), load(1, 1, 100)]);
        assert!(even.abs() < 1e-9);
        let edge = imbalance(&[load(0, 1, 110), load(1, 1, 90)]);
        assert!((edge - 0.2).abs() < 1e-9, "{edge}");
        let fresh = imbalance(&[load(0, 1, 150), load(1, 1, 150), load(2, 1, 0)]);
        assert!((fresh - 1.5).abs() < 1e-9, "{fresh}");
        // Weight 2 holding twice as many is balanced.
        let weighted = imbalance(&[load(0, 2, 200), load(1, 1, 100)]);
        assert!(weighted.abs() < 1e-9);
    }

    #[test]
    fn acting_starts_over_20_percent_and_stops_at_5() {
        assert!(!acting(0.2, false) && acting(0.21, false));
        assert!(acting(0.1, true) && !acting(0.05, true));
    }

    #[test]
    fn quotas_take_the_excess_from_the_most_loaded_within_the_budget() {
        // At the fair share: nothing.
        assert!(quotas(&[load(0, 1, 100), load(1, 1, 100)], 50).is_empty());
        // A new backend: fair share 100 each, 50 excess on each old one.
        let q = quotas(&[load(0, 1, 150), load(1, 1, 150), load(2, 1, 0)], 1000);
        assert_eq!(q, vec![(0, 50), (1, 50)]);
        // The budget caps the round; the most loaded gives up first, then both alike.
        let q = quotas(&[load(0, 1, 140), load(1, 1, 160), load(2, 1, 0)], 70);
        assert_eq!(q, vec![(0, 25), (1, 45)]);
        let q = quotas(&[load(0, 1, 150), load(1, 1, 150), load(2, 1, 0)], 50);
        assert_eq!(q, vec![(0, 25), (1, 25)]);
        // Weights: fair shares 200 and 100 of 300.
        let q = quotas(&[load(0, 2, 150), load(1, 1, 150)], 1000);
        assert_eq!(q, vec![(1, 50)]);
        assert!(quotas(&[load(0, 1, 150), load(1, 1, 0)], 0).is_empty());
    }

    #[test]
    fn candidates_are_old_unpinned_and_of_the_right_backend() {
        let now = Instant::now() + Duration::from_secs(100);
        let old = now - MIN_AGE - Duration::from_secs(1);
        let young = now - Duration::from_secs(1);
        let c = |key, backend, opened, pinned| Candidate {
            key,
            backend,
            opened,
            pinned,
        };
        let cands = [
            c(1, 0, old, false),
            c(2, 0, young, false),
            c(3, 0, old, true),
            c(4, 1, old, false),
            c(5, 0, old, false),
        ];
        let mut rng = SmallRng::seed_from_u64(1);
        let mut got = choose(&cands, &[(0, 10)], now, &mut rng);
        got.sort_unstable();
        assert_eq!(got, vec![1, 5]);
        let got = choose(&cands, &[(0, 1), (1, 1)], now, &mut rng);
        assert_eq!(got.len(), 2);
        assert!(got.contains(&4) && (got.contains(&1) || got.contains(&5)));
        assert!(choose(&cands, &[(2, 5)], now, &mut rng).is_empty());
    }
}
