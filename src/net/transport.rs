//! One byte stream over plain TCP or TLS, so HTTP and WebSocket code never knows which.
//!
//! TLS runs inside the same non-blocking loop: records are read with `read_tls` until the
//! socket would block, decrypted by `process_new_packets`, and handed out as plaintext;
//! whatever rustls wants to send (handshake, alerts, encrypted data) goes out through
//! [`Transport::flush_tls`], which the owner calls whenever the socket is writable.

use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;

use mio::net::TcpStream;

use super::tls_server::ServerTls;

/// Outcome of one non-blocking read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Io {
    /// Moved this many bytes (never 0).
    Progress(usize),
    /// Nothing to do until the next readiness event.
    WouldBlock,
    /// Peer closed its sending side (reads only).
    Eof,
    /// Connection reset or other fatal error.
    Failed,
}

/// Edge-triggered readiness seen and not yet used up. A bit is set by an event and cleared
/// only when an operation hits `WouldBlock`, so a stopped reader (full buffer) resumes
/// without waiting for a new edge.
#[derive(Debug, Default, Clone, Copy)]
pub struct Ready {
    /// A read may make progress.
    pub readable: bool,
    /// A write may make progress.
    pub writable: bool,
    /// The peer's FIN (or an error) was reported: reads must go on until they say so,
    /// because no further edge will come.
    pub read_closed: bool,
}

impl Ready {
    /// Folds a poll event into the bits. Errors and hang-ups wake both directions so the next
    /// read/write reports them.
    pub fn absorb(&mut self, ev: &mio::event::Event) {
        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
            self.readable = true;
        }
        if ev.is_read_closed() || ev.is_error() {
            self.read_closed = true;
        }
        if ev.is_writable() || ev.is_write_closed() || ev.is_error() {
            self.writable = true;
        }
    }
}

/// A plain or TLS stream.
#[derive(Debug)]
pub enum Transport {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP, client side (to `wss://` backends).
    Tls(Box<TlsStream>),
    /// TLS over TCP, server side (clients), on buffers freed while idle.
    TlsServer(Box<ServerTls>),
}

/// A socket and its rustls state.
#[derive(Debug)]
pub struct TlsStream {
    sock: TcpStream,
    conn: rustls::Connection,
}

impl TlsStream {
    /// Wraps a socket with a rustls connection.
    pub fn new(sock: TcpStream, conn: rustls::Connection) -> Self {
        TlsStream { sock, conn }
    }
}

fn kind_io(e: &io::Error) -> Option<Io> {
    match e.kind() {
        io::ErrorKind::WouldBlock => Some(Io::WouldBlock),
        io::ErrorKind::Interrupted => None,
        _ => Some(Io::Failed),
    }
}

impl Transport {
    /// The socket, for readiness registration and connect checks.
    pub fn socket(&self) -> &TcpStream {
        match self {
            Transport::Plain(s) => s,
            Transport::Tls(t) => &t.sock,
            Transport::TlsServer(t) => t.socket(),
        }
    }

    /// The socket, for (de)registration.
    pub fn socket_mut(&mut self) -> &mut TcpStream {
        match self {
            Transport::Plain(s) => s,
            Transport::Tls(t) => &mut t.sock,
            Transport::TlsServer(t) => t.socket_mut(),
        }
    }

    /// The TLS handshake has not finished yet.
    pub fn handshaking(&self) -> bool {
        match self {
            Transport::Plain(_) => false,
            Transport::Tls(t) => t.conn.is_handshaking(),
            Transport::TlsServer(t) => t.state().is_handshaking(),
        }
    }

    /// The name on the peer's verified client certificate, if it presented one.
    pub fn client_cert_name(&self) -> Option<String> {
        match self {
            Transport::Plain(_) => None,
            Transport::Tls(t) => crate::net::tls::client_cert_name(&t.conn),
            Transport::TlsServer(t) => crate::net::tls::client_cert_name(t.state()),
        }
    }

    /// Is this a TLS stream?
    pub fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_) | Transport::TlsServer(_))
    }

    /// rustls has bytes to put on the wire.
    pub fn wants_write(&self) -> bool {
        match self {
            Transport::Plain(_) => false,
            Transport::Tls(t) => t.conn.wants_write(),
            Transport::TlsServer(t) => t.wants_write(),
        }
    }

    /// Reads plaintext into `dst`. Clears `ready.readable` only when the socket would block.
    pub fn read(&mut self, ready: &mut Ready, dst: &mut [u8]) -> Io {
        if dst.is_empty() {
            return Io::WouldBlock;
        }
        match self {
            Transport::Plain(s) => loop {
                return match s.read(dst) {
                    Ok(0) => Io::Eof,
                    Ok(n) => {
                        // A short read emptied the socket: the next read would only say
                        // WouldBlock, and new data brings a new edge. Not after a FIN was
                        // reported, whose EOF must still be read.
                        if n < dst.len() && !ready.read_closed {
                            ready.readable = false;
                        }
                        Io::Progress(n)
                    }
                    Err(e) => match kind_io(&e) {
                        None => continue,
                        Some(Io::WouldBlock) => {
                            ready.readable = false;
                            Io::WouldBlock
                        }
                        Some(other) => other,
                    },
                };
            },
            Transport::TlsServer(t) => t.read(ready, dst),
            Transport::Tls(t) => loop {
                // Plaintext already decrypted comes first: no socket edge will announce it.
                match t.conn.reader().read(dst) {
                    Ok(0) => return Io::Eof,
                    Ok(n) => return Io::Progress(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return Io::Eof,
                }
                if !ready.readable {
                    return Io::WouldBlock;
                }
                match t.conn.read_tls(&mut t.sock) {
                    Ok(0) => return Io::Eof,
                    Ok(_) => {
                        if let Err(e) = t.conn.process_new_packets() {
                            // Last gasp: let the alert reach the peer before we close.
                            let _ = t.conn.write_tls(&mut t.sock);
                            crate::observe::log::debug("tls error", &[("error", &e)]);
                            return Io::Failed;
                        }
                    }
                    Err(e) => match kind_io(&e) {
                        None => continue,
                        Some(Io::WouldBlock) => {
                            ready.readable = false;
                            return Io::WouldBlock;
                        }
                        Some(other) => return other,
                    },
                }
            },
        }
    }

    /// Writes plaintext from `src` (into rustls' bounded buffer for TLS; call
    /// [`Transport::flush_tls`] after). Clears `ready.writable` when the socket would block.
    pub fn write(&mut self, ready: &mut Ready, src: &[u8]) -> Io {
        self.write_pair(ready, src, &[])
    }

    /// [`Transport::write`] of `first` then `second` in one system call (`writev`): an
    /// HTTP head the balancer rewrote and the body bytes that came with it leave together,
    /// as one segment, instead of costing a second `send` per response.
    pub fn write_pair(&mut self, ready: &mut Ready, first: &[u8], second: &[u8]) -> Io {
        let len = first.len() + second.len();
        if len == 0 {
            return Io::WouldBlock;
        }
        match self {
            Transport::Plain(s) => loop {
                let written = if second.is_empty() {
                    s.write(first)
                } else if first.is_empty() {
                    s.write(second)
                } else {
                    s.write_vectored(&[IoSlice::new(first), IoSlice::new(second)])
                };
                return match written {
                    Ok(0) => Io::Failed,
                    Ok(n) => {
                        // A short write filled the socket buffer: wait for the next edge.
                        if n < len {
                            ready.writable = false;
                        }
                        Io::Progress(n)
                    }
                    Err(e) => match kind_io(&e) {
                        None => continue,
                        Some(Io::WouldBlock) => {
                            ready.writable = false;
                            Io::WouldBlock
                        }
                        Some(other) => other,
                    },
                };
            },
            Transport::TlsServer(t) => t.write_pair(ready, first, second),
            Transport::Tls(t) => {
                let mut writer = t.conn.writer();
                let mut total = 0;
                for part in [first, second] {
                    match writer.write(part) {
                        Ok(n) => {
                            total += n;
                            if n < part.len() {
                                break;
                            }
                        }
                        Err(_) => return Io::Failed,
                    }
                }
                // rustls' buffer is full until flush_tls drains it.
                if total == 0 {
                    Io::WouldBlock
                } else {
                    Io::Progress(total)
                }
            }
        }
    }

    /// Puts pending TLS records on the wire until done or the socket would block.
    pub fn flush_tls(&mut self, ready: &mut Ready) -> Io {
        let t = match self {
            Transport::Plain(_) => return Io::WouldBlock,
            Transport::TlsServer(t) => return t.flush(ready),
            Transport::Tls(t) => t,
        };
        let mut total = 0;
        while t.conn.wants_write() && ready.writable {
            match t.conn.write_tls(&mut t.sock) {
                Ok(0) => return Io::Failed,
                Ok(n) => total += n,
                Err(e) => match kind_io(&e) {
                    None => continue,
                    Some(Io::WouldBlock) => ready.writable = false,
                    Some(other) => return other,
                },
            }
        }
        if total > 0 {
            Io::Progress(total)
        } else {
            Io::WouldBlock
        }
    }

    /// Ends our sending side (TLS: close_notify first).
    pub fn shutdown_write(&mut self, ready: &mut Ready) {
        match self {
            Transport::Tls(t) => t.conn.send_close_notify(),
            Transport::TlsServer(t) => t.close_notify(),
            Transport::Plain(_) => {}
        }
        let _ = self.flush_tls(ready);
        let _ = self.socket().shutdown(Shutdown::Write);
    }
}

/// Blocking-style adapter for tungstenite on the control listener (`WouldBlock` surfaces
/// as an error, which tungstenite handles for non-blocking streams).
impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut ready = Ready {
            readable: true,
            writable: true,
            read_closed: true,
        };
        match Transport::read(self, &mut ready, buf) {
            Io::Progress(n) => Ok(n),
            Io::Eof => Ok(0),
            Io::WouldBlock => Err(io::ErrorKind::WouldBlock.into()),
            Io::Failed => Err(io::ErrorKind::ConnectionReset.into()),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut ready = Ready {
            readable: true,
            writable: true,
            read_closed: true,
        };
        let r = match Transport::write(self, &mut ready, buf) {
            Io::Progress(n) => Ok(n),
            Io::WouldBlock => Err(io::ErrorKind::WouldBlock.into()),
            Io::Eof | Io::Failed => Err(io::ErrorKind::ConnectionReset.into()),
        };
        let _ = self.flush_tls(&mut ready);
        r
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut ready = Ready {
            readable: true,
            writable: true,
            read_closed: true,
        };
        match self.flush_tls(&mut ready) {
            Io::Failed => Err(io::ErrorKind::ConnectionReset.into()),
            _ if self.wants_write() => Err(io::ErrorKind::WouldBlock.into()),
            _ => Ok(()),
        }
    }
}
