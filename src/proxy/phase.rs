//! The phases of a client connection and the one function that moves between them.
//!
//! ```text
//!   Head ──request──▶ Exchange ──101──▶ Tunnel
//!    ▲  └──503───┐       │ └──response done, keep-alive──▶ Head
//!    └───────────┘       ▼                    │
//!   (any) ─────────────▶ Closing ◀────────────┘
//! ```
//!
//! What the balancer owes a peer while it moves between phases (a response head, a close
//! frame) lives in the outboxes; what only one phase needs lives in that phase.

use super::*;

pub(crate) use crate::slots::Marks;

#[derive(Debug)]
pub(super) enum Phase {
    /// Waiting for (the rest of) a request head. `started`: first byte of this head (or
    /// accept, for the first one); `None` while an idle keep-alive connection waits.
    Head { started: Option<Instant> },
    /// A request forwarded, its response on the way.
    Exchange(Box<Exchange>),
    /// After 101: frames both ways.
    Tunnel(Box<Tunnel>),
    /// Flushing what the client is owed, then FIN (`fin_sent`), then waiting for its FIN.
    Closing { since: Instant, fin_sent: bool },
}

/// A phase without its data, for the transition table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PhaseKind {
    Head,
    Exchange,
    Tunnel,
    Closing,
}

impl Phase {
    pub(super) fn kind(&self) -> PhaseKind {
        match self {
            Phase::Head { .. } => PhaseKind::Head,
            Phase::Exchange(_) => PhaseKind::Exchange,
            Phase::Tunnel(_) => PhaseKind::Tunnel,
            Phase::Closing { .. } => PhaseKind::Closing,
        }
    }
}

/// The transitions a connection may make. A 503 for want of any backend is answered from
/// `Exchange` (the request was read) back to `Head`; `Closing` is final.
pub(super) fn allowed(from: PhaseKind, to: PhaseKind) -> bool {
    use PhaseKind::*;
    matches!(
        (from, to),
        (Head, Exchange)
            | (Head, Closing)
            | (Exchange, Head)
            | (Exchange, Tunnel)
            | (Exchange, Closing)
            | (Tunnel, Closing)
    )
}

impl Conn {
    /// Every phase change goes through here. Leaving a tunnel keeps its close code (either
    /// direction's, or the one the balancer sends) for the disconnect event.
    pub(super) fn enter(&mut self, next: Phase) {
        debug_assert!(
            allowed(self.phase.kind(), next.kind()),
            "phase {:?} -> {:?}",
            self.phase.kind(),
            next.kind()
        );
        if let Phase::Tunnel(t) = &self.phase {
            self.close_code = self
                .close_code
                .or(t.down.close_code())
                .or(t.up.close_code())
                .or(t.pending_close);
        }
        self.phase = next;
    }

    pub(super) fn enter_closing(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::Closing { .. }) {
            self.enter(Phase::Closing {
                since: now,
                fin_sent: false,
            });
        }
    }

    /// Back to waiting for a request on a kept-alive connection; a pipelined request that
    /// already arrived starts its header timeout now.
    pub(super) fn enter_head(&mut self, now: Instant) {
        let started = (!self.from_client.is_empty()).then_some(now);
        self.enter(Phase::Head { started });
    }

    /// A request answered by the balancer itself without leaving `Head` (no backend, a
    /// dispatch answer) on a connection kept alive: the header timeout restarts for the
    /// next request, as `enter_head` does after an exchange; otherwise it would keep
    /// running from the first request of the connection.
    pub(super) fn answered_in_head(&mut self, now: Instant) {
        let pending = !self.from_client.is_empty();
        if let Phase::Head { started } = &mut self.phase {
            *started = pending.then_some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PhaseKind::*;

    #[test]
    fn closing_is_final_and_reachable_from_everywhere() {
        for from in [Head, Exchange, Tunnel, Closing] {
            assert!(!allowed(Closing, from), "Closing -> {from:?}");
            assert_eq!(
                allowed(from, Closing),
                from != Closing,
                "{from:?} -> Closing"
            );
        }
    }

    #[test]
    fn a_tunnel_only_comes_from_an_exchange() {
        for from in [Head, Exchange, Tunnel, Closing] {
            assert_eq!(
                allowed(from, Tunnel),
                from == Exchange,
                "{from:?} -> Tunnel"
            );
        }
        assert!(!allowed(Tunnel, Head), "a tunnel never goes back to HTTP");
        assert!(!allowed(Tunnel, Exchange));
    }

    #[test]
    fn keep_alive_cycles_through_head() {
        assert!(allowed(Head, Exchange));
        assert!(allowed(Exchange, Head));
        assert!(
            !allowed(Head, Head),
            "a head is parsed into an exchange first"
        );
        assert!(
            !allowed(Exchange, Exchange),
            "a retry stays in the same exchange"
        );
    }
}
