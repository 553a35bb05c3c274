//! HTTP/1.1 parsing and rewriting. Pure: no sockets, no mio.
pub mod body;
pub mod head;
pub mod rewrite;
