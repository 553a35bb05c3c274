//! WebSocket upgrade validation and frame tracking. Pure: no sockets, no mio.
pub mod frames;
pub mod handshake;
