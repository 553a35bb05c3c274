//! What the balancer says about itself: log lines on stderr, `--events` JSON lines, and
//! counters rendered for `/metrics`. The floor of the crate: it imports nothing above it.

pub(crate) mod events;
pub(crate) mod log;
pub(crate) mod metrics;
