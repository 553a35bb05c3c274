//! wslb: a single-threaded WebSocket + HTTP/1.1 load balancer on one `mio::Poll` loop.
//!
//! Crate map, top to bottom (each layer uses the ones below it, never one above):
//! - `server`: the event loop: poll, the two passes, accept, timers, signals, reaping.
//! - [`control`]: the control listener: registration protocol, sessions, admin API.
//! - `proxy`: one client connection: its `Phase` and transitions, the HTTP exchange, the
//!   backend leg, the WebSocket tunnel (docs/LIFECYCLE.md).
//! - `slots`, `timer`: the loop's bookkeeping for every kind of connection (token blocks,
//!   generations, reaping) and its deadline heap.
//! - [`backends`]: registry, keep-alive pool, selection ([`balance`]), [`sticky`] sessions.
//! - [`config`]: command-line flags into a [`Config`] (pure).
//! - `net`: transport (plain/TLS), readiness, buffers, [`tls`] setup, descriptor budget.
//! - [`http`], [`ws`]: pure parsers (heads, bodies, rewriting; upgrade, frames).
//! - `observe`: log lines, `--events`, metrics: the floor, imports nothing above.
//! - [`agent`]: the backend-side watchdog (library and `wslb agent`), apart from the balancer.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod agent;
pub mod backends;
pub mod config;
pub mod control;
pub mod hooks;
pub mod http;
pub(crate) mod net;
pub mod netpolicy;
pub(crate) mod observe;
mod proxy;
mod server;
mod slots;
mod timer;
pub mod ws;

// Paths the fuzz targets, examples and tests have always used.
pub use agent::cli as agent_cli;
pub use backends::{balance, sticky};
pub use net::{proxy_protocol, ticket, tls};

pub use config::{Config, ConfigError};
pub use server::{run, Error, Outgoing, Server, ServerHandle, Target};
