//! The backend leg: choosing a backend (through `backends::route`), a pooled connection or
//! a new one, and what happens when it fails before or while answering.

use super::*;
use crate::backends::route;
use std::io::Write;

/// The backend half of a connection.
#[derive(Debug)]
pub(super) struct Leg {
    pub(super) stream: Transport,
    pub(super) ready: Ready,
    pub(super) backend: usize,
    /// Address dialled (for reporting which binding failed).
    pub(super) addr: SocketAddr,
    pub(super) connecting_since: Option<Instant>,
    /// Came from the keep-alive pool: a failure before any answer may be retried.
    pub(super) reused: bool,
    pub(super) from_backend: Buffer,
    pub(super) to_backend: Outbox,
    /// Backend closed its sending side.
    pub(super) eof: bool,
    /// Backend reset the connection (an abortive close).
    pub(super) aborted: bool,
    /// Our FIN was sent to the backend.
    pub(super) fin_sent: bool,
    /// PROXY header owed to the backend (`proxy=v1|v2`), sent as the connect completes.
    pub(super) proxy_header: Option<Vec<u8>>,
}

impl Leg {
    /// Connect outcome (`Ok(true)` = connected). The PROXY header, if any, is written then,
    /// on the raw socket: before any byte of the request and before a TLS ClientHello,
    /// which rustls only emits once the connect has completed.
    pub(super) fn connected(&mut self) -> io::Result<bool> {
        if !connect_result(self.stream.socket())? {
            return Ok(false);
        }
        if let Some(header) = self.proxy_header.take() {
            // A fresh connection's send buffer is empty and far larger than a header (at
            // most 52 bytes here): a short write means the connection is unusable.
            let written = loop {
                match self.stream.socket().write(&header) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => break other?,
                }
            };
            if written != header.len() {
                return Err(io::Error::other("short write of the PROXY header"));
            }
        }
        Ok(true)
    }
}

/// Starts a non-blocking connect, wrapped in TLS for `wss://`/`https://` bindings.
pub(super) fn open_backend(
    addr: SocketAddr,
    tls: Option<rustls_pki_types::ServerName<'static>>,
    cfg: Option<&std::sync::Arc<rustls::ClientConfig>>,
) -> io::Result<Transport> {
    let sock = TcpStream::connect(addr)?;
    let _ = sock.set_nodelay(true);
    match (tls, cfg) {
        (None, _) => Ok(Transport::Plain(sock)),
        (Some(name), Some(cfg)) => {
            let conn = crate::net::tls::connect(cfg, name).map_err(io::Error::other)?;
            Ok(Transport::Tls(Box::new(TlsStream::new(sock, conn))))
        }
        (Some(_), None) => Err(io::Error::other("no TLS client configuration")),
    }
}

/// Non-blocking connect outcome: `Ok(true)` connected, `Ok(false)` not yet.
pub(super) fn connect_result(stream: &TcpStream) -> io::Result<bool> {
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    match stream.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(e) => Err(e),
    }
}

impl Conn {
    /// Pairs the exchange with a backend (chosen by `backends::route`, skipping those that
    /// failed for it) on a pooled or new connection carrying `to_backend`; answers 502 when
    /// none is left (503 when our own descriptors ran out). `same_backend_fresh` retries the
    /// last failed backend on a new connection (its pooled connection was stale, the
    /// backend is fine).
    pub(super) fn connect_backend(
        &mut self,
        ctx: &mut Ctx<'_>,
        mut to_backend: Outbox,
        same_backend_fresh: bool,
    ) {
        let (id, addr, stream, reused, proxy) = match self.dial(ctx, same_backend_fresh) {
            Ok(dialled) => dialled,
            Err(out_of_fds) => {
                self.no_backend(ctx, out_of_fds);
                return;
            }
        };
        self.paired(ctx, id, reused);
        to_backend.rewind_head();
        // Pooled connections are never PROXY ones (the registry keeps none), so every
        // connection that needs a header is a new one.
        let proxy_header = proxy.map(|version| {
            let dst =
                (self.client.socket().local_addr()).unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
            let mut h = Vec::with_capacity(64);
            crate::net::proxy_protocol::encode(version, self.peer, dst, &mut h);
            h
        });
        self.leg = Some(Leg {
            stream,
            // A pooled connection is usable now; a new one waits for its connect event.
            ready: Ready {
                readable: reused,
                writable: reused,
                read_closed: false,
            },
            backend: id,
            addr,
            connecting_since: if reused { None } else { Some(ctx.now) },
            reused,
            from_backend: Buffer::default(),
            to_backend,
            eof: false,
            aborted: false,
            fin_sent: false,
            proxy_header,
        });
    }

    /// Picks backends until one gives a registered socket: `(backend, address, socket,
    /// from the pool, PROXY header version owed)`. `Err(true)` when our descriptors ran
    /// out, `Err(false)` when no backend is left.
    #[allow(clippy::type_complexity)]
    fn dial(
        &mut self,
        ctx: &mut Ctx<'_>,
        same_backend_fresh: bool,
    ) -> Result<
        (
            usize,
            SocketAddr,
            Transport,
            bool,
            Option<crate::net::proxy_protocol::Version>,
        ),
        bool,
    > {
        let Phase::Exchange(ex) = &mut self.phase else {
            return Err(false);
        };
        let token = token_for(self.key, Side::Backend);
        loop {
            let picked = if same_backend_fresh && ex.failed.len() == 1 {
                ex.failed.last().copied()
            } else {
                let ask = route::Ask {
                    client: self.id,
                    sticky: &ex.sticky,
                    exclude: &ex.failed,
                    algorithm: ctx.cfg.algorithm,
                    now: ctx.now,
                };
                route::choose(ctx.backends, ctx.hooks.as_deref_mut(), ctx.rng, &ask)
            };
            let id = picked.ok_or(false)?;
            let Some(dial) = ctx.backends.next_dial(id) else {
                ex.failed.push(id);
                continue;
            };
            let (addr, proxy) = (dial.addr, dial.proxy);
            let pooled = if same_backend_fresh {
                None
            } else {
                ctx.backends.checkout(id, ctx.now, token)
            };
            let reused = pooled.is_some();
            let registered_here = matches!(pooled, Some((_, true)));
            let stream = match pooled {
                Some((s, _)) => Ok(s),
                None => open_backend(addr, dial.tls, ctx.backend_tls)
                    .inspect(|s| ctx.backends.note_dialled(s, addr, ctx.now)),
            };
            let mut stream = match stream {
                Ok(s) => s,
                // Our own descriptors ran out: not the backend's fault; later may work.
                Err(e) if crate::net::fdlimit::is_exhaustion(&e) => return Err(true),
                Err(e) => {
                    ctx.backends.connect_failed(id, Some(addr), ctx.now, &e);
                    ex.failed.push(id);
                    continue;
                }
            };
            // A pooled socket is still registered under the token of its last owner: one
            // MOD moves it here, unless that owner was this connection. A new one is added.
            let interest = Interest::READABLE | Interest::WRITABLE;
            let registered = if registered_here {
                Ok(())
            } else if reused {
                ctx.poll
                    .reregister(stream.socket_mut(), token, interest)
                    .or_else(|_| ctx.poll.register(stream.socket_mut(), token, interest))
            } else {
                ctx.poll.register(stream.socket_mut(), token, interest)
            };
            if let Err(e) = registered {
                log::error("register failed", &[("error", &e)]);
                return Err(false);
            }
            return Ok((id, addr, stream, reused, proxy));
        }
    }

    /// No backend could take the request: 502, or 503 when our descriptors ran out; the
    /// log line is rate-limited with a count.
    fn no_backend(&mut self, ctx: &mut Ctx<'_>, out_of_fds: bool) {
        let (status, what, repeated) = if out_of_fds {
            ctx.stats.fd_exhausted += 1;
            (
                503,
                "backend connect: out of file descriptors, answered 503",
                &mut ctx.logs.connect_no_fd,
            )
        } else {
            (502, "no backend could be reached", &mut ctx.logs.no_backend)
        };
        if let Some(times) = repeated.hit(ctx.now) {
            let secs = repeated.interval_secs();
            log::error(
                &format!("{what} ({times} times in the last {secs} s)"),
                &[("client", &self.id)],
            );
        }
        self.fail(ctx, status);
    }

    /// Counts the pairing and tells the events and hooks.
    fn paired(&mut self, ctx: &mut Ctx<'_>, id: usize, reused: bool) {
        ctx.backends.acquire(id);
        self.paired_backend = Some(id);
        if ctx.events.enabled() || ctx.hooks.is_some() {
            let name = ctx.backends.name(id).unwrap_or_default().to_string();
            self.paired_name = Some(name.clone());
            ctx.events.emit(Event::Paired {
                client: self.id,
                peer: self.peer,
                backend: &name,
                reused,
            });
            if let Some(h) = ctx.hooks.as_deref_mut() {
                h.on_client_paired(self.id, &name);
            }
        }
        if log::enabled(log::Level::Debug) {
            log::debug(
                "paired",
                &[("client", &self.id), ("backend", &id), ("reused", &reused)],
            );
        }
    }

    /// Drops the backend leg; `reusable` returns its socket to the keep-alive pool.
    pub(super) fn drop_leg(&mut self, ctx: &mut Ctx<'_>, reusable: bool) -> Option<Outbox> {
        let leg = self.leg.take()?;
        ctx.backends.release(leg.backend);
        // Not deregistered: a pooled socket is moved by `reregister` at checkout, and closing
        // a socket removes it from epoll. Stray events for it are ignored like any other.
        if reusable {
            let token = token_for(self.key, Side::Backend);
            ctx.backends
                .checkin(leg.backend, leg.stream, ctx.now, token);
        }
        Some(leg.to_backend)
    }

    /// Connecting failed: try another backend while the client has seen nothing.
    pub(super) fn backend_failed(&mut self, ctx: &mut Ctx<'_>, why: &str) {
        let Some((id, addr)) = self.leg.as_ref().map(|l| (l.backend, Some(l.addr))) else {
            return;
        };
        ctx.backends.connect_failed(id, addr, ctx.now, &why);
        let to_backend = self.drop_leg(ctx, false).unwrap_or_default();
        if let Phase::Exchange(ex) = &mut self.phase {
            ex.failed.push(id);
        }
        self.connect_backend(ctx, to_backend, false);
    }

    /// The backend closed or reset during an exchange before the response was complete.
    pub(super) fn backend_lost(&mut self, ctx: &mut Ctx<'_>) {
        let Some(leg) = &self.leg else { return };
        let retry = match &self.phase {
            // A pooled connection the backend had closed (or closed as we reused it): it
            // answered nothing, and we still hold every byte sent on it, so the request goes
            // again on a fresh connection, whatever its method (as nginx and HAProxy's
            // `retry-on conn-failure empty-response` do).
            Phase::Exchange(ex) => {
                leg.reused
                    && !ex.answered
                    && leg.from_backend.is_empty()
                    && matches!(ex.resp, Resp::AwaitHead)
                    && ex.replay.is_some()
            }
            _ => false,
        };
        let id = leg.backend;
        if retry {
            let mut to_backend = self.drop_leg(ctx, false).unwrap_or_default();
            if let Phase::Exchange(ex) = &mut self.phase {
                ex.failed.push(id);
                // What was queued but not yet written is part of the replay too.
                to_backend.buf.release();
                let held = ex.replay.take().unwrap_or_default();
                let pushed = to_backend.buf.push(&held);
                // REPLAY_MAX is one buffer: a replay always fits an empty one.
                debug_assert_eq!(pushed, held.len());
            }
            ctx.stats.pool_retries += 1;
            log::debug(
                "reused backend connection closed unanswered; retrying",
                &[("client", &self.id), ("backend", &id)],
            );
            self.connect_backend(ctx, to_backend, true);
            return;
        }
        let answered = matches!(&self.phase, Phase::Exchange(ex) if ex.answered);
        if !answered {
            log::error(
                "backend closed before answering",
                &[("client", &self.id), ("backend", &id)],
            );
        }
        self.fail(ctx, 502);
    }
}
