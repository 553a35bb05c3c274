//! Where a request goes: the one decision, asked by a client connection that does not know
//! the policy. Library hooks choose first, then a sticky session, then the algorithm; a
//! backend that already failed this request is never chosen again.

use std::net::SocketAddr;
use std::time::Instant;

use rand::rngs::SmallRng;

use crate::backends::registry::Registry;
use crate::backends::sticky::{find_cookie, ip_key, CookieSigner, StickyMode};
use crate::config::Algorithm;
use crate::hooks::Hooks;

/// What sticky sessions ask of the selection for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sticky {
    /// No stickiness (off, or nothing in the request to key on).
    Off,
    /// Cookie mode; `Some(id)` = a valid cookie named this backend.
    Cookie(Option<String>),
    /// Rendezvous key (client address or header value).
    Key(Vec<u8>),
}

/// What the request asks for under `mode`: the backend its (verified) cookie names, or the
/// key to hash. `headers` are the request's; `now_secs` is Unix time for cookie expiry.
pub fn sticky_ask(
    mode: Option<&StickyMode>,
    headers: &[httparse::Header<'_>],
    peer: SocketAddr,
    signer: Option<&CookieSigner>,
    max_age_secs: u64,
    now_secs: u64,
) -> Sticky {
    match mode {
        None => Sticky::Off,
        Some(StickyMode::Ip) => Sticky::Key(ip_key(peer.ip()).to_vec()),
        Some(StickyMode::Header { name }) => headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map_or(Sticky::Off, |h| Sticky::Key(h.value.to_vec())),
        Some(StickyMode::Cookie { name }) => {
            // A tampered, expired or malformed cookie is simply not there.
            let id = signer.and_then(|signer| {
                headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case("cookie"))
                    .filter_map(|h| find_cookie(h.value, name))
                    .find_map(|v| {
                        signer
                            .verify(v, now_secs, max_age_secs)
                            .map(|c| c.id.to_string())
                    })
            });
            Sticky::Cookie(id)
        }
    }
}

/// The inputs of one choice.
pub struct Ask<'a> {
    /// Client id, for the hooks.
    pub client: u64,
    /// What the sticky session asks.
    pub sticky: &'a Sticky,
    /// Backends that already failed this request.
    pub exclude: &'a [usize],
    /// `--algorithm`.
    pub algorithm: Algorithm,
    /// Time of this loop turn (back-off expiry).
    pub now: Instant,
}

/// Chooses a backend for a request: hooks, then the sticky session, then the algorithm.
pub fn choose(
    backends: &mut Registry,
    hooks: Option<&mut (dyn Hooks + 'static)>,
    rng: &mut SmallRng,
    ask: &Ask<'_>,
) -> Option<usize> {
    let hooked = hooks.and_then(|h| {
        let cands = backends.eligible(ask.exclude);
        let names: Vec<&str> = cands.iter().map(|(_, n)| n.as_str()).collect();
        h.select_backend(ask.client, &names)
            .and_then(|i| cands.get(i))
            .map(|(id, _)| *id)
    });
    let sticky = || match ask.sticky {
        Sticky::Off => None,
        Sticky::Cookie(id) => id
            .as_deref()
            .and_then(|id| backends.find_sticky(id, ask.exclude, ask.now)),
        Sticky::Key(key) => backends.pick_by_key(key, ask.exclude, ask.now),
    };
    hooked
        .or_else(sticky)
        .or_else(|| backends.pick(ask.algorithm, ask.exclude, ask.now, rng))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_backend;
    use rand::SeedableRng;

    fn registry(n: u16) -> Registry {
        let specs: Vec<_> = (1..=n)
            .map(|p| parse_backend(&format!("ws://127.0.0.1:{p}")).unwrap())
            .collect();
        Registry::from_specs(&specs)
    }

    struct Last;
    impl Hooks for Last {
        fn select_backend(&mut self, _client: u64, candidates: &[&str]) -> Option<usize> {
            candidates.len().checked_sub(1)
        }
    }

    #[test]
    fn hooks_then_sticky_then_algorithm_never_an_excluded_backend() {
        let mut r = registry(3);
        let mut rng = SmallRng::seed_from_u64(7);
        let now = Instant::now();
        fn ask<'a>(sticky: &'a Sticky, exclude: &'a [usize], now: Instant) -> Ask<'a> {
            Ask {
                client: 1,
                sticky,
                exclude,
                algorithm: Algorithm::RoundRobin,
                now,
            }
        }
        // Hooks win over everything.
        let mut hooks = Last;
        let key = Sticky::Key(b"k".to_vec());
        assert_eq!(
            choose(&mut r, Some(&mut hooks), &mut rng, &ask(&key, &[], now)),
            Some(2)
        );
        // The sticky key gives the same backend every time, and another once it failed.
        let first = choose(&mut r, None, &mut rng, &ask(&key, &[], now)).unwrap();
        for _ in 0..10 {
            assert_eq!(
                choose(&mut r, None, &mut rng, &ask(&key, &[], now)),
                Some(first)
            );
        }
        let other = choose(&mut r, None, &mut rng, &ask(&key, &[first], now)).unwrap();
        assert_ne!(other, first);
        // A cookie naming nobody known falls through to the algorithm.
        let cookie = Sticky::Cookie(Some("nobody".into()));
        assert!(choose(&mut r, None, &mut rng, &ask(&cookie, &[], now)).is_some());
        // Everything excluded: no choice.
        assert_eq!(
            choose(&mut r, None, &mut rng, &ask(&Sticky::Off, &[0, 1, 2], now)),
            None
        );
    }

    #[test]
    fn what_a_request_asks() {
        let peer: SocketAddr = "10.0.0.9:5000".parse().unwrap();
        let headers = [httparse::Header {
            name: "X-Session",
            value: b"abc",
        }];
        assert_eq!(sticky_ask(None, &headers, peer, None, 60, 0), Sticky::Off);
        let header = StickyMode::Header {
            name: "x-session".into(),
        };
        assert_eq!(
            sticky_ask(Some(&header), &headers, peer, None, 60, 0),
            Sticky::Key(b"abc".to_vec())
        );
        assert!(matches!(
            sticky_ask(Some(&StickyMode::Ip), &[], peer, None, 60, 0),
            Sticky::Key(_)
        ));
        let cookie = StickyMode::Cookie {
            name: "wslb".into(),
        };
        assert_eq!(
            sticky_ask(Some(&cookie), &headers, peer, None, 60, 0),
            Sticky::Cookie(None)
        );
    }
}
