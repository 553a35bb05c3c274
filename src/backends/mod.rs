//! The backends a request may go to: the registry (state, load, keep-alive pool), the
//! selection algorithms, and sticky sessions. Knows nothing of client connections.

pub mod balance;
pub(crate) mod pool;
pub(crate) mod registry;
pub mod sticky;
