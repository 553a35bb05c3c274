//! What the event loop keeps about each connection beside the connection's own state:
//! its armed timer, whether it is finished and waiting to be reaped, and whether it is on
//! this turn's flush list. Client connections and control connections carry the same
//! [`Marks`], so the loop's timer and reaping rules are written once.

use std::time::Instant;

/// The loop's bookkeeping about one connection (not protocol state).
#[derive(Debug, Default, Clone, Copy)]
pub struct Marks {
    /// Earliest deadline armed in the timer heap for this connection.
    pub armed: Option<Instant>,
    /// Finished and waiting to be reaped after this batch of events.
    pub done: bool,
    /// On the server's list for this turn's flush pass: until then it reads and parses but
    /// leaves writing to that pass.
    pub flush_queued: bool,
}

use mio::Token;
use slab::Slab;

use crate::timer::{TimerKey, TimerKind, Timers};

/// A block of poll tokens owned by one kind of connection: entry `key` owns the
/// `per_entry` consecutive tokens from `start + key * per_entry` (a client connection has
/// two sockets, a control connection one). Blocks do not overlap, so a token names its
/// kind, its slab key and which socket of the entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenRange {
    /// First token of the block.
    pub start: usize,
    /// One past the last token of the block.
    pub end: usize,
    /// Tokens per slab entry.
    pub per_entry: usize,
}

/// Tokens below this are the loop's own (listeners, signals, waker).
pub const RESERVED_TOKENS: usize = 1024;
/// Client connections: the client socket and the backend socket of each.
pub const CLIENT_TOKENS: TokenRange = TokenRange {
    start: RESERVED_TOKENS,
    end: usize::MAX / 2,
    per_entry: 2,
};
/// Control connections (backends registering): one socket each.
pub const CONTROL_TOKENS: TokenRange = TokenRange {
    start: usize::MAX / 2,
    end: usize::MAX / 2 + usize::MAX / 4,
    per_entry: 1,
};
/// `--proxy-protocol`: accepted sockets whose PROXY header has not arrived yet.
pub const HEADER_TOKENS: TokenRange = TokenRange {
    start: usize::MAX / 2 + usize::MAX / 4,
    end: usize::MAX,
    per_entry: 1,
};

impl TokenRange {
    /// Token of socket `index` (below `per_entry`) of entry `key`.
    pub fn token(self, key: usize, index: usize) -> Token {
        Token(self.start + key * self.per_entry + index)
    }

    /// `(key, index)` of a token in this block; `None` for tokens outside it.
    pub fn key_of(self, token: Token) -> Option<(usize, usize)> {
        if !(self.start..self.end).contains(&token.0) {
            return None;
        }
        let n = token.0 - self.start;
        Some((n / self.per_entry, n % self.per_entry))
    }
}

/// What a slot's occupant shows the loop.
pub trait Slotted {
    /// Generation: timers and other references hold `(key, gen)` and ignore a mismatch.
    fn generation(&self) -> u64;
    /// The loop's marks on it.
    fn marks(&self) -> &Marks;
    /// The loop's marks on it, to set.
    fn marks_mut(&mut self) -> &mut Marks;
}

/// Implements [`Slotted`] for a type with `gen: u64` and `marks: Marks` fields.
macro_rules! slotted {
    ($t:ty) => {
        impl $crate::slots::Slotted for $t {
            fn generation(&self) -> u64 {
                self.gen
            }
            fn marks(&self) -> &$crate::slots::Marks {
                &self.marks
            }
            fn marks_mut(&mut self) -> &mut $crate::slots::Marks {
                &mut self.marks
            }
        }
    };
}
pub(crate) use slotted;

/// One kind of connection in a slab, with its token block, its timer kind and its reap
/// list: how the loop finds, times and removes every kind of connection, written once.
#[derive(Debug)]
pub struct Slots<T> {
    slab: Slab<T>,
    /// The block of tokens this kind owns.
    pub tokens: TokenRange,
    timer: TimerKind,
    finished: Vec<usize>,
}

impl<T: Slotted> Slots<T> {
    /// An empty set owning `tokens`, arming its deadlines as `timer`.
    pub fn new(tokens: TokenRange, timer: TimerKind, capacity: usize) -> Self {
        Slots {
            slab: Slab::with_capacity(capacity),
            tokens,
            timer,
            finished: Vec::new(),
        }
    }

    /// The key the next [`Slots::insert`] will use (to register its sockets first).
    pub fn next_key(&self) -> usize {
        self.slab.vacant_key()
    }

    /// Adds a connection; returns its key and the entry.
    pub fn insert(&mut self, value: T) -> (usize, &mut T) {
        let entry = self.slab.vacant_entry();
        let key = entry.key();
        (key, entry.insert(value))
    }

    /// Number of connections, finished ones included until reaped.
    pub fn len(&self) -> usize {
        self.slab.len()
    }

    /// No connection at all.
    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    /// Any connection under `key`, finished or not.
    pub fn get(&self, key: usize) -> Option<&T> {
        self.slab.get(key)
    }

    /// Any connection under `key`, finished or not.
    pub fn get_mut(&mut self, key: usize) -> Option<&mut T> {
        self.slab.get_mut(key)
    }

    /// All connections with their keys, finished ones included until reaped.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &T)> {
        self.slab.iter()
    }

    /// The connection under `key` unless it finished.
    pub fn live(&mut self, key: usize) -> Option<&mut T> {
        self.slab.get_mut(key).filter(|c| !c.marks().done)
    }

    /// The connection `(key, gen)` unless it finished or the key was reused since.
    pub fn live_gen(&mut self, key: usize, gen: u64) -> Option<&mut T> {
        self.live(key).filter(|c| c.generation() == gen)
    }

    /// Whether `(key, gen)` is a connection that has not finished.
    pub fn is_live(&self, key: usize, gen: u64) -> bool {
        self.slab
            .get(key)
            .is_some_and(|c| c.generation() == gen && !c.marks().done)
    }

    /// Removes a connection at once (one that moves on rather than finishes).
    pub fn remove(&mut self, key: usize) -> Option<T> {
        self.slab.try_remove(key)
    }

    /// Marks the connection finished: it is ignored from now on and removed at the next
    /// [`Slots::take_finished`]. Finishing twice is harmless.
    pub fn finish(&mut self, key: usize) {
        if let Some(c) = self.slab.get_mut(key) {
            let marks = c.marks_mut();
            if !marks.done {
                marks.done = true;
                self.finished.push(key);
            }
        }
    }

    /// Removes and returns every finished connection, with the key it had.
    pub fn take_finished(&mut self) -> Vec<(usize, T)> {
        let keys = std::mem::take(&mut self.finished);
        keys.into_iter()
            .filter_map(|key| Some((key, self.slab.try_remove(key)?)))
            .collect()
    }

    /// Arms the connection's next deadline (see [`Timers::arm`]).
    pub fn arm(&mut self, timers: &mut Timers, key: usize, at: Instant) {
        let kind = self.timer;
        if let Some(c) = self.slab.get_mut(key) {
            let gen = c.generation();
            timers.arm(&mut c.marks_mut().armed, at, TimerKey { key, gen, kind });
        }
    }

    /// The connection a fired timer is for, if that timer is still its armed one: live,
    /// same generation. Its armed mark is cleared (the caller re-arms from its state).
    pub fn due(&mut self, t: &TimerKey) -> Option<&mut T> {
        let c = self.live_gen(t.key, t.gen)?;
        c.marks_mut().armed = None;
        Some(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Fake {
        gen: u64,
        marks: Marks,
    }

    slotted!(Fake);

    #[test]
    fn token_blocks_round_trip_and_do_not_overlap() {
        for key in [0usize, 1, 7, 100_000] {
            for index in 0..CLIENT_TOKENS.per_entry {
                let t = CLIENT_TOKENS.token(key, index);
                assert_eq!(CLIENT_TOKENS.key_of(t), Some((key, index)));
                assert_eq!(CONTROL_TOKENS.key_of(t), None);
            }
            let t = CONTROL_TOKENS.token(key, 0);
            assert_eq!(CONTROL_TOKENS.key_of(t), Some((key, 0)));
            assert_eq!(CLIENT_TOKENS.key_of(t), None);
            assert_eq!(HEADER_TOKENS.key_of(t), None);
            let t = HEADER_TOKENS.token(key, 0);
            assert_eq!(HEADER_TOKENS.key_of(t), Some((key, 0)));
            assert_eq!(CONTROL_TOKENS.key_of(t), None);
        }
        assert_eq!(CLIENT_TOKENS.key_of(Token(3)), None);
        assert_eq!(CONTROL_TOKENS.key_of(Token(3)), None);
    }

    #[test]
    fn finished_entries_are_ignored_then_reaped_once() {
        let mut slots = Slots::new(CLIENT_TOKENS, TimerKind::Conn, 4);
        let (a, _) = slots.insert(Fake {
            gen: 1,
            ..Fake::default()
        });
        let (b, _) = slots.insert(Fake {
            gen: 2,
            ..Fake::default()
        });
        assert!(slots.is_live(a, 1) && !slots.is_live(a, 2));
        slots.finish(a);
        slots.finish(a);
        assert!(slots.live(a).is_none() && slots.get(a).is_some());
        let reaped = slots.take_finished();
        assert_eq!(reaped.len(), 1);
        assert_eq!((reaped[0].0, reaped[0].1.gen), (a, 1));
        assert!(slots.get(a).is_none() && slots.live(b).is_some());
        assert!(slots.take_finished().is_empty());
    }

    #[test]
    fn a_timer_fires_only_for_its_own_generation_and_rearms_after() {
        let mut timers = Timers::default();
        let mut slots = Slots::new(CONTROL_TOKENS, TimerKind::Control, 4);
        let (key, _) = slots.insert(Fake {
            gen: 7,
            ..Fake::default()
        });
        let now = Instant::now();
        slots.arm(&mut timers, key, now);
        // A later deadline is not pushed while an earlier one is armed.
        slots.arm(&mut timers, key, now + std::time::Duration::from_secs(5));
        let fired = timers.pop_expired(now).unwrap();
        assert_eq!(
            (fired.key, fired.gen, fired.kind),
            (key, 7, TimerKind::Control)
        );
        assert!(timers
            .pop_expired(now + std::time::Duration::from_secs(9))
            .is_none());
        assert!(slots.due(&fired).is_some());
        assert_eq!(slots.get(key).unwrap().marks.armed, None);
        let stale = TimerKey { gen: 6, ..fired };
        assert!(slots.due(&stale).is_none());
    }
}
