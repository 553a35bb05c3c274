//! Idle keep-alive connections to one backend. Each stays registered with the poll under
//! the token of the client connection that used it last (reusing it from the same client
//! then needs no `epoll_ctl`), so an event for that token may be for a pooled connection:
//! [`IdlePool::evict_closed`] is how it leaves as soon as its backend closes it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use mio::Token;

use crate::net::transport::Transport;

/// Idle keep-alive connections kept per backend.
pub(crate) const POOL_PER_BACKEND: usize = 256;
/// A pooled connection older than this is not trusted (backends commonly time out at 5-60 s).
pub(crate) const POOL_MAX_AGE: Duration = Duration::from_secs(4);
/// A pooled connection idle longer than this is checked with a `peek` before reuse; a
/// younger one is used at once (a failure before any answer is retried on a new one).
const POOL_PEEK_AFTER: Duration = Duration::from_secs(1);
/// An idle keep-alive connection.
#[derive(Debug)]
struct Pooled {
    stream: Transport,
    since: Instant,
    /// The poll token it is registered under (its last user's).
    token: Token,
}

impl Pooled {
    /// The connection, if it may carry another request.
    fn usable(self, now: Instant) -> Option<Transport> {
        let idle = now.duration_since(self.since);
        if idle > POOL_MAX_AGE {
            return None;
        }
        if idle < POOL_PEEK_AFTER || self.is_quiet() {
            return Some(self.stream);
        }
        None
    }

    /// Open and silent: the only state in which reuse is safe. EOF, an error or unsolicited
    /// bytes (a backend's `408` before it hangs up, a TLS close_notify) mean the backend
    /// closed or misbehaved.
    fn is_quiet(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.socket().peek(&mut probe),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

/// One backend's idle connections, oldest first.
#[derive(Debug, Default)]
pub(crate) struct IdlePool {
    idle: VecDeque<Pooled>,
}

impl IdlePool {
    /// Idle connections held.
    pub fn len(&self) -> usize {
        self.idle.len()
    }

    /// Closes them all (new bindings, a failed connect, a backend gone).
    pub fn clear(&mut self) {
        self.idle.clear();
    }

    /// A connection that still looks open, preferring one registered under `token` (the
    /// caller's own); and whether it is registered under `token` already.
    pub fn take(&mut self, now: Instant, token: Token) -> Option<(Transport, bool)> {
        if let Some(at) = self.idle.iter().rposition(|p| p.token == token) {
            if let Some(stream) = self.idle.remove(at).and_then(|p| p.usable(now)) {
                return Some((stream, true));
            }
        }
        // Otherwise the most recently returned one: the least likely to have been closed by
        // the backend (taking the oldest instead measured more re-registrations, not fewer).
        while let Some(pooled) = self.idle.pop_back() {
            let same = pooled.token == token;
            if let Some(stream) = pooled.usable(now) {
                return Some((stream, same));
            }
        }
        None
    }

    /// Keeps a quiet connection, registered under `token`; the oldest goes when full.
    pub fn put(&mut self, stream: Transport, now: Instant, token: Token) {
        if self.idle.len() >= POOL_PER_BACKEND {
            self.idle.pop_front();
        }
        self.idle.push_back(Pooled {
            stream,
            since: now,
            token,
        });
    }

    /// Drops the connections registered under `token` that are no longer open and silent;
    /// returns how many.
    pub fn evict_closed(&mut self, token: Token) -> usize {
        let before = self.idle.len();
        self.idle.retain(|p| p.token != token || p.is_quiet());
        before - self.idle.len()
    }

    /// Closes the oldest one (its descriptor is wanted by a client); false when empty.
    pub fn close_oldest(&mut self) -> bool {
        self.idle.pop_front().is_some()
    }

    /// Drops connections past their age.
    pub fn sweep(&mut self, now: Instant) {
        self.idle
            .retain(|p| now.duration_since(p.since) <= POOL_MAX_AGE);
    }
}
