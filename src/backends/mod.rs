//! The backends a request may go to: the registry (state, load), the keep-alive pool, the
//! selection algorithms, sticky sessions, and the one decision that combines them (`route`).
//! Knows nothing of client connections.

pub mod balance;
pub mod load;
pub(crate) mod pool;
pub mod rebalance;
pub(crate) mod registry;
pub(crate) mod route;
pub mod sticky;
