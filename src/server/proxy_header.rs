//! `--proxy-protocol`: accepted sockets wait here, outside the connection slab, until their
//! PROXY header has arrived; then [`Server::admit`] takes them in under the client's own
//! address, so limits, stickiness, forwarding headers, logs and events all see the client,
//! not the L4 balancer.
//!
//! The header is read from the raw TCP socket, before any TLS: the socket is only peeked
//! at (`MSG_PEEK`) until [`proxy_protocol::parse`] knows the header's length, then exactly
//! that many bytes are read, so the ClientHello or request behind it stays in the socket
//! for the stage after. Bounded: one stack buffer of [`proxy_protocol::MAX_HEADER`] bytes
//! per read, no per-connection buffer, and `--header-timeout` to arrive.
#![deny(clippy::indexing_slicing)]

use std::io::{self, Read};

use super::*;
use crate::net::proxy_protocol::{self, PpError, Status};

use crate::slots::{Marks, Slots, HEADER_TOKENS};

/// Sockets waiting for their header (in their own token block), and the warning about
/// refusals.
#[derive(Debug)]
pub(super) struct AwaitingHeaders {
    pub(super) slots: Slots<Awaiting>,
    /// "refused N connections", at most once per interval: a `--trusted-proxy` that misses
    /// the L4 tier's address refuses every client, which should not hide in metrics.
    refused_log: log::Repeated,
}

impl Default for AwaitingHeaders {
    fn default() -> Self {
        AwaitingHeaders {
            slots: Slots::new(HEADER_TOKENS, TimerKind::ProxyHeader, 0),
            refused_log: log::Repeated::every(REPEATED_LOG_INTERVAL),
        }
    }
}

impl AwaitingHeaders {
    /// Sockets waiting (they count against `--max-connections`).
    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }
}

/// An accepted socket whose PROXY header has not fully arrived.
#[derive(Debug)]
pub(super) struct Awaiting {
    sock: mio::net::TcpStream,
    /// The socket's peer: the L4 balancer (or, for LOCAL/UNKNOWN headers, the client).
    peer: SocketAddr,
    tls: bool,
    gen: u64,
    marks: Marks,
}

crate::slots::slotted!(Awaiting);

impl Server {
    /// Refuses peers outside `--trusted-proxy` at once; parks the others until their header
    /// arrives (or `--header-timeout` passes).
    pub(super) fn await_proxy_header(
        &mut self,
        mut sock: mio::net::TcpStream,
        peer: SocketAddr,
        tls: bool,
    ) {
        if !crate::netpolicy::any_contains(&self.cfg.trusted_proxies, peer.ip()) {
            self.proxy_header_failed(peer, PpError::Untrusted);
            return;
        }
        self.next_gen += 1;
        let waiting = &mut self.awaiting_header.slots;
        let token = waiting.tokens.token(waiting.next_key(), 0);
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut sock, token, Interest::READABLE)
        {
            log::error("register failed", &[("error", &e)]);
            return;
        }
        let (key, _) = waiting.insert(Awaiting {
            sock,
            peer,
            tls,
            gen: self.next_gen,
            marks: Marks::default(),
        });
        waiting.arm(
            &mut self.timers,
            key,
            Instant::now() + self.cfg.header_timeout,
        );
        // Data that came with the connection raises no further edge: look now.
        self.read_proxy_header(key, false);
    }

    /// Readiness on an awaiting socket: parse what has arrived; admit, wait, or refuse.
    /// `closed` = the peer's FIN was reported, so a partial header will stay partial.
    pub(super) fn read_proxy_header(&mut self, key: usize, closed: bool) {
        let Some(a) = self.awaiting_header.slots.get_mut(key) else {
            return;
        };
        let mut buf = [0u8; proxy_protocol::MAX_HEADER];
        let verdict = loop {
            match a.sock.peek(&mut buf) {
                Ok(0) => break Err(PpError::Truncated),
                Ok(n) => match proxy_protocol::parse(buf.get(..n).unwrap_or_default()) {
                    Ok(Status::Complete(h)) => break consume(&mut a.sock, h.len).map(|()| h),
                    Ok(Status::Partial) if closed => break Err(PpError::Truncated),
                    Ok(Status::Partial) => return,
                    Err(e) => break Err(e),
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break Err(PpError::Truncated),
            }
        };
        let Some(Awaiting {
            mut sock,
            peer,
            tls,
            ..
        }) = self.awaiting_header.slots.remove(key)
        else {
            return;
        };
        // The socket is registered anew under its connection's token by `admit`.
        let _ = self.poll.registry().deregister(&mut sock);
        match verdict {
            Ok(h) => {
                self.stats.proxy_protocol_headers += 1;
                let client = h.addrs.map_or(peer, |a| {
                    SocketAddr::new(a.src.ip().to_canonical(), a.src.port())
                });
                if log::enabled(log::Level::Debug) {
                    log::debug(
                        "PROXY header",
                        &[
                            ("version", &h.version),
                            ("proxy", &peer),
                            ("client", &client),
                        ],
                    );
                }
                self.admit(sock, client, tls);
            }
            Err(e) => self.proxy_header_failed(peer, e),
        }
    }

    /// `--header-timeout` passed for an awaiting socket (unless it moved on already).
    pub(super) fn expire_proxy_header(&mut self, t: &TimerKey) {
        if self.awaiting_header.slots.due(t).is_none() {
            return;
        }
        let Some(mut a) = self.awaiting_header.slots.remove(t.key) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut a.sock);
        self.proxy_header_failed(a.peer, PpError::Timeout);
    }

    /// Counts and logs a refused connection; dropping its socket closes it.
    fn proxy_header_failed(&mut self, peer: SocketAddr, e: PpError) {
        *self
            .stats
            .proxy_protocol_errors
            .entry(e.reason())
            .or_insert(0) += 1;
        if let Some(times) = self.awaiting_header.refused_log.hit(Instant::now()) {
            let secs = self.awaiting_header.refused_log.interval_secs();
            log::warn(
                &format!(
                    "PROXY protocol: connections refused: {times} in the last {secs} s (wslb_proxy_protocol_errors_total has the reasons); the latest"
                ),
                &[("peer", &peer), ("error", &e)],
            );
        } else {
            log::debug(
                "PROXY protocol: connection refused",
                &[("peer", &peer), ("error", &e)],
            );
        }
    }
}

/// Reads the `len` header bytes just peeked at, leaving everything after them in the socket.
fn consume(sock: &mut mio::net::TcpStream, len: usize) -> Result<(), PpError> {
    let mut buf = [0u8; proxy_protocol::MAX_HEADER];
    let mut left = buf.get_mut(..len).ok_or(PpError::Oversized)?;
    while !left.is_empty() {
        match sock.read(left) {
            Ok(0) => return Err(PpError::Truncated),
            Ok(n) => left = left.get_mut(n..).unwrap_or_default(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // Peeked bytes are in the socket: anything else is a reset.
            Err(_) => return Err(PpError::Truncated),
        }
    }
    Ok(())
}
