//! What the event loop keeps about each connection beside the connection's own state:
//! its armed timer, whether it is finished and waiting to be reaped, and whether it is on
//! this turn's flush list. Client connections and control connections carry the same
//! [`Marks`], so the loop's timer and reaping rules are written once.

use std::time::Instant;

/// The loop's bookkeeping about one connection (not protocol state).
#[derive(Debug, Default)]
pub struct Marks {
    /// Earliest deadline armed in the timer heap for this connection.
    pub armed: Option<Instant>,
    /// Finished and waiting to be reaped after this batch of events.
    pub done: bool,
    /// On the server's list for this turn's flush pass: until then it reads and parses but
    /// leaves writing to that pass.
    pub flush_queued: bool,
}
