//! The backend pool: every backend the balancer may pick, its load, its health, and its idle
//! keep-alive connections.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use rand::Rng;
use slab::Slab;

use crate::balance::{Algorithm, Candidate, Selector};
use crate::config::BackendSpec;
use crate::log;

/// Idle keep-alive connections kept per backend.
const POOL_PER_BACKEND: usize = 32;
/// A pooled connection older than this is not trusted (backends commonly time out at 5-60 s).
const POOL_MAX_AGE: Duration = Duration::from_secs(4);
/// First back-off after a failed connect; doubles per consecutive failure.
const DOWN_BASE: Duration = Duration::from_millis(500);
/// Longest back-off.
const DOWN_MAX: Duration = Duration::from_secs(30);

/// One backend.
#[derive(Debug)]
pub struct Backend {
    /// Stable name: the URL for static backends.
    pub name: String,
    /// Where to connect.
    pub addr: SocketAddr,
    /// Relative weight.
    pub weight: u32,
    /// Active connections: WebSocket tunnels plus in-flight HTTP exchanges.
    pub active: u32,
    /// Consecutive failed connects; 0 = healthy.
    pub failures: u32,
    /// Not preferred until then (passive health check).
    pub down_until: Option<Instant>,
    /// Times this backend was picked.
    pub selected: u64,
    idle: Vec<(TcpStream, Instant)>,
}

/// All backends.
#[derive(Debug, Default)]
pub struct Registry {
    backends: Slab<Backend>,
    selector: Selector,
    scratch: Vec<Candidate>,
}

impl Registry {
    /// A registry holding the static `-B` backends.
    pub fn from_specs(specs: &[BackendSpec]) -> Self {
        let mut r = Registry::default();
        for s in specs {
            r.backends.insert(Backend {
                name: s.url.clone(),
                addr: s.addr,
                weight: s.weight,
                active: 0,
                failures: 0,
                down_until: None,
                selected: 0,
                idle: Vec::new(),
            });
        }
        r
    }

    /// Number of backends known, healthy or not.
    pub fn len(&self) -> usize {
        self.backends.len()
    }

    /// Looks up a backend.
    pub fn get(&self, id: usize) -> Option<&Backend> {
        self.backends.get(id)
    }

    /// Picks a backend not in `exclude`. Backends marked down are used only when every
    /// other choice is exhausted: trying a possibly-recovered backend beats a certain 502.
    pub fn pick<R: Rng + ?Sized>(
        &mut self,
        alg: Algorithm,
        exclude: &[usize],
        now: Instant,
        rng: &mut R,
    ) -> Option<usize> {
        for allow_down in [false, true] {
            self.scratch.clear();
            for (id, b) in &self.backends {
                let down = b.down_until.is_some_and(|t| t > now);
                if exclude.contains(&id) || (down && !allow_down) {
                    continue;
                }
                self.scratch.push(Candidate {
                    id,
                    active: b.active,
                    weight: b.weight,
                });
            }
            if let Some(i) = self.selector.pick(alg, &self.scratch, rng) {
                let id = self.scratch.get(i)?.id;
                if let Some(b) = self.backends.get_mut(id) {
                    b.selected += 1;
                }
                return Some(id);
            }
        }
        None
    }

    /// One more connection/exchange on `id`.
    pub fn acquire(&mut self, id: usize) {
        if let Some(b) = self.backends.get_mut(id) {
            b.active += 1;
        }
    }

    /// One fewer connection/exchange on `id`.
    pub fn release(&mut self, id: usize) {
        if let Some(b) = self.backends.get_mut(id) {
            b.active = b.active.saturating_sub(1);
        }
    }

    /// A connect to `id` failed: back off exponentially before preferring it again.
    pub fn connect_failed(&mut self, id: usize, now: Instant, why: &dyn std::fmt::Display) {
        if let Some(b) = self.backends.get_mut(id) {
            b.failures = b.failures.saturating_add(1);
            let backoff = DOWN_BASE
                .saturating_mul(1 << b.failures.min(7).saturating_sub(1))
                .min(DOWN_MAX);
            b.down_until = Some(now + backoff);
            b.idle.clear();
            log::error(
                "backend connect failed",
                &[
                    ("backend", &b.name),
                    ("error", why),
                    ("retry_in_ms", &backoff.as_millis()),
                ],
            );
        }
    }

    /// A connect to `id` succeeded.
    pub fn connect_ok(&mut self, id: usize) {
        if let Some(b) = self.backends.get_mut(id) {
            if b.failures > 0 {
                log::info("backend up again", &[("backend", &b.name)]);
            }
            b.failures = 0;
            b.down_until = None;
        }
    }

    /// Takes an idle keep-alive connection to `id` that still looks open.
    pub fn checkout(&mut self, id: usize, now: Instant) -> Option<TcpStream> {
        let b = self.backends.get_mut(id)?;
        while let Some((stream, since)) = b.idle.pop() {
            if now.duration_since(since) > POOL_MAX_AGE {
                continue;
            }
            let mut probe = [0u8; 1];
            // WouldBlock = open and silent: the only state in which reuse is safe. EOF or
            // unsolicited bytes mean the backend closed or misbehaved; drop it.
            match stream.peek(&mut probe) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Some(stream),
                _ => continue,
            }
        }
        None
    }

    /// Returns a deregistered, quiet keep-alive connection to `id`'s pool.
    pub fn checkin(&mut self, id: usize, stream: TcpStream, now: Instant) {
        if let Some(b) = self.backends.get_mut(id) {
            if b.idle.len() >= POOL_PER_BACKEND {
                b.idle.remove(0);
            }
            b.idle.push((stream, now));
        }
    }

    /// Drops pooled connections past their age.
    pub fn sweep_idle(&mut self, now: Instant) {
        for (_, b) in &mut self.backends {
            b.idle
                .retain(|(_, since)| now.duration_since(*since) <= POOL_MAX_AGE);
        }
    }

    /// Sets how a backend takes part in selection (for later registration support).
    #[allow(dead_code)]
    pub fn forget(&mut self, id: usize) {
        if self.backends.try_remove(id).is_some() {
            self.selector.forget(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_backend;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    #[test]
    fn down_backends_are_last_resort() {
        let specs = [
            parse_backend("ws://127.0.0.1:1").unwrap(),
            parse_backend("ws://127.0.0.1:2").unwrap(),
        ];
        let mut r = Registry::from_specs(&specs);
        let mut rng = SmallRng::seed_from_u64(3);
        let now = Instant::now();
        r.connect_failed(0, now, &"refused");
        for _ in 0..20 {
            assert_eq!(r.pick(Algorithm::Random, &[], now, &mut rng), Some(1));
        }
        assert_eq!(r.pick(Algorithm::Random, &[1], now, &mut rng), Some(0));
        assert_eq!(r.pick(Algorithm::Random, &[0, 1], now, &mut rng), None);
        // Back-off expires.
        let later = now + Duration::from_secs(1);
        let picks: Vec<_> = (0..40)
            .filter_map(|_| r.pick(Algorithm::Random, &[], later, &mut rng))
            .collect();
        assert!(picks.contains(&0));
    }
}
