//! wslb: a single-threaded WebSocket + HTTP/1.1 load balancer on one `mio::Poll` loop.
//!
//! Crate map:
//! - [`config`]: command-line flags into a [`Config`] (pure).
//! - `server`: the event loop, listeners, accept, timers, reaping.
//! - `conn`: one slab entry per client connection and its backend leg.
//! - [`http`]: request/response heads, body framing, rewriting (pure).
//! - [`ws`]: upgrade validation and the frame tracker (pure).
//! - [`balance`]: backend selection algorithms (pure).
//! - `timer`, `buffer`, `log`: small building blocks.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod admin;
pub mod agent;
pub mod agent_cli;
pub mod balance;
pub(crate) mod buffer;
pub mod config;
mod conn;
pub mod control;
mod endpoint;
mod events;
mod fdlimit;
pub mod hooks;
pub mod http;
mod log;
mod metrics;
pub mod netpolicy;
mod registry;
mod server;
pub mod sticky;
mod timer;
pub mod tls;
mod transport;
pub mod ws;

pub use config::{Config, ConfigError};
pub use server::{run, Error, Outgoing, Server, ServerHandle, Target};
