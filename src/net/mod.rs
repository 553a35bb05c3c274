//! Sockets and bytes: plain/TLS transport, readiness kept in userland, bounded buffers,
//! TLS configuration, and the file-descriptor budget.

pub(crate) mod buffer;
pub(crate) mod endpoint;
pub(crate) mod fdlimit;
pub(crate) mod fdpass;
pub mod proxy_protocol;
pub mod ticket;
pub mod tls;
pub(crate) mod tls_server;
pub(crate) mod transport;
