//! Backend selection. Pure: the caller passes the eligible candidates and a random source.
//!
//! Weights are respected by every algorithm: `fewest` and `p2c` compare load per unit of
//! weight, `random` draws proportionally to weight, and `round-robin` is nginx's smooth
//! weighted round-robin (a weight-3 backend gets 3 of every 4 picks, interleaved).

use std::cmp::Ordering;

use rand::Rng;

// The flag value lives with the other flag values (config is the layer below).
pub use crate::config::Algorithm;

/// One eligible backend as the selector sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Stable small integer id (the registry key); round-robin state is kept per id.
    pub id: usize,
    /// Active connections (WebSocket tunnels + in-flight HTTP exchanges).
    pub active: u32,
    /// Relative weight, at least 1.
    pub weight: u32,
}

/// Selection state that lives across picks (only round-robin needs any).
#[derive(Debug, Default)]
pub struct Selector {
    rr_current: Vec<i64>,
}

/// `a` is less loaded than `b` per unit of weight (cross-multiplied: no float, no division).
fn load_cmp(a: &Candidate, b: &Candidate) -> Ordering {
    let la = u64::from(a.active) * u64::from(b.weight.max(1));
    let lb = u64::from(b.active) * u64::from(a.weight.max(1));
    la.cmp(&lb)
}

fn weighted_index<R: Rng + ?Sized>(cands: &[Candidate], rng: &mut R) -> Option<usize> {
    let total: u64 = cands.iter().map(|c| u64::from(c.weight.max(1))).sum();
    if total == 0 {
        return None;
    }
    let mut r = rng.random_range(0..total);
    for (i, c) in cands.iter().enumerate() {
        let w = u64::from(c.weight.max(1));
        if r < w {
            return Some(i);
        }
        r -= w;
    }
    None
}

impl Selector {
    /// Picks one of `cands`, returning its index in the slice; `None` only if it is empty.
    pub fn pick<R: Rng + ?Sized>(
        &mut self,
        alg: Algorithm,
        cands: &[Candidate],
        rng: &mut R,
    ) -> Option<usize> {
        match cands.len() {
            0 => return None,
            1 => return Some(0),
            _ => {}
        }
        match alg {
            Algorithm::Random => weighted_index(cands, rng),
            Algorithm::Fewest => {
                // Reservoir sampling over the minima gives a uniform tie-break in one pass.
                let mut best = 0usize;
                let mut ties = 1u32;
                for i in 1..cands.len() {
                    match load_cmp(&cands[i], &cands[best]) {
                        Ordering::Less => {
                            best = i;
                            ties = 1;
                        }
                        Ordering::Equal => {
                            ties += 1;
                            if rng.random_range(0..ties) == 0 {
                                best = i;
                            }
                        }
                        Ordering::Greater => {}
                    }
                }
                Some(best)
            }
            Algorithm::PowerOfTwo => {
                let a = weighted_index(cands, rng)?;
                // Draw the second among the others so the two choices are distinct.
                let mut b = rng.random_range(0..cands.len() - 1);
                if b >= a {
                    b += 1;
                }
                match load_cmp(&cands[a], &cands[b]) {
                    Ordering::Greater => Some(b),
                    Ordering::Less => Some(a),
                    Ordering::Equal => Some(if rng.random_bool(0.5) { a } else { b }),
                }
            }
            Algorithm::RoundRobin => {
                let max_id = cands.iter().map(|c| c.id).max().unwrap_or(0);
                if self.rr_current.len() <= max_id {
                    self.rr_current.resize(max_id + 1, 0);
                }
                let total: i64 = cands.iter().map(|c| i64::from(c.weight.max(1))).sum();
                let mut best: Option<(usize, i64)> = None;
                for (i, c) in cands.iter().enumerate() {
                    let cur = self.rr_current.get_mut(c.id)?;
                    *cur += i64::from(c.weight.max(1));
                    if best.is_none_or(|(_, b)| *cur > b) {
                        best = Some((i, *cur));
                    }
                }
                let (i, _) = best?;
                let id = cands.get(i)?.id;
                *self.rr_current.get_mut(id)? -= total;
                Some(i)
            }
        }
    }

    /// Forgets round-robin state of a backend id that left (its id may be reused).
    pub fn forget(&mut self, id: usize) {
        if let Some(c) = self.rr_current.get_mut(id) {
            *c = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    fn cands(spec: &[(u32, u32)]) -> Vec<Candidate> {
        spec.iter()
            .enumerate()
            .map(|(id, &(active, weight))| Candidate { id, active, weight })
            .collect()
    }

    fn histogram(alg: Algorithm, c: &[Candidate], n: usize) -> Vec<usize> {
        let mut sel = Selector::default();
        let mut rng = SmallRng::seed_from_u64(7);
        let mut h = vec![0; c.len()];
        for _ in 0..n {
            h[sel.pick(alg, c, &mut rng).unwrap()] += 1;
        }
        h
    }

    #[test]
    fn empty_and_single() {
        let mut sel = Selector::default();
        let mut rng = SmallRng::seed_from_u64(1);
        for alg in [
            Algorithm::Fewest,
            Algorithm::Random,
            Algorithm::RoundRobin,
            Algorithm::PowerOfTwo,
        ] {
            assert_eq!(sel.pick(alg, &[], &mut rng), None);
            assert_eq!(sel.pick(alg, &cands(&[(9, 1)]), &mut rng), Some(0));
        }
    }

    #[test]
    fn fewest_picks_least_loaded_and_breaks_ties_randomly() {
        assert_eq!(
            histogram(Algorithm::Fewest, &cands(&[(3, 1), (1, 1), (2, 1)]), 50),
            [0, 50, 0]
        );
        let h = histogram(Algorithm::Fewest, &cands(&[(1, 1), (1, 1), (5, 1)]), 4000);
        assert_eq!(h[2], 0);
        assert!((1700..2300).contains(&h[0]), "{h:?}");
    }

    #[test]
    fn fewest_respects_weight() {
        // 4 active on weight 4 is lighter than 2 active on weight 1.
        assert_eq!(
            histogram(Algorithm::Fewest, &cands(&[(2, 1), (4, 4)]), 20),
            [0, 20]
        );
    }

    #[test]
    fn random_follows_weights() {
        let h = histogram(Algorithm::Random, &cands(&[(0, 1), (0, 3)]), 40_000);
        let share = h[1] as f64 / 40_000.0;
        assert!((0.72..0.78).contains(&share), "{h:?}");
        let h = histogram(
            Algorithm::Random,
            &cands(&[(0, 1), (0, 1), (0, 1), (0, 1)]),
            40_000,
        );
        assert!(h.iter().all(|&n| (9_000..11_000).contains(&n)), "{h:?}");
    }

    #[test]
    fn round_robin_is_exact_and_smooth() {
        assert_eq!(
            histogram(Algorithm::RoundRobin, &cands(&[(0, 1), (0, 1), (0, 1)]), 9),
            [3, 3, 3]
        );
        let c = cands(&[(0, 3), (0, 1)]);
        let mut sel = Selector::default();
        let mut rng = SmallRng::seed_from_u64(1);
        let seq: Vec<usize> = (0..8)
            .map(|_| sel.pick(Algorithm::RoundRobin, &c, &mut rng).unwrap())
            .collect();
        // Smooth: the weight-1 backend is not starved for 3 picks in a row at the start.
        assert_eq!(seq, [0, 0, 1, 0, 0, 0, 1, 0]);
        assert_eq!(histogram(Algorithm::RoundRobin, &c, 400), [300, 100]);
    }

    #[test]
    fn p2c_prefers_less_loaded_and_never_picks_the_busiest_of_two() {
        let h = histogram(Algorithm::PowerOfTwo, &cands(&[(0, 1), (10, 1)]), 1000);
        assert_eq!(h, [1000, 0]);
        // With 4 backends the most loaded one can only win when paired with... nobody.
        let h = histogram(
            Algorithm::PowerOfTwo,
            &cands(&[(0, 1), (1, 1), (2, 1), (9, 1)]),
            4000,
        );
        assert_eq!(h[3], 0);
        assert!(h[0] > h[1] && h[1] > h[2], "{h:?}");
    }

    #[test]
    fn parse_names() {
        assert_eq!("fewest".parse(), Ok(Algorithm::Fewest));
        assert_eq!("round-robin".parse(), Ok(Algorithm::RoundRobin));
        assert_eq!("p2c".parse(), Ok(Algorithm::PowerOfTwo));
        assert_eq!("random".parse(), Ok(Algorithm::Random));
        assert!("nope".parse::<Algorithm>().is_err());
    }
}
