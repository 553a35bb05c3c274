//! Accepting client connections: limits, TLS wrapping, self-dial refusal, certificate reload.

use super::*;

impl Server {
    pub(super) fn accept_all(&mut self) {
        self.accept_blocked = false;
        for i in 0..self.listeners.len() {
            self.accept(i);
        }
    }

    /// Idle pooled backend connections use the descriptors clients leave free: after each
    /// accept and reap, so a client near the limit never lacks one for its backend leg.
    pub(super) fn size_pool_room(&mut self) {
        let clients = self.conns.len() + self.awaiting_header.len();
        self.backends
            .set_pool_room(2 * self.fd_clients.saturating_sub(clients));
    }

    pub(super) fn accept(&mut self, idx: usize) {
        loop {
            if self.draining {
                return;
            }
            if self.conns.len() + self.awaiting_header.len() >= self.cfg.max_connections {
                // Leave the rest in the kernel backlog; reaping resumes accepting.
                self.accept_blocked = true;
                return;
            }
            let Some((listener, tls)) = self.listeners.get(idx) else {
                return;
            };
            let tls = *tls;
            let (stream, peer) = match listener.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_fd_exhaustion(&e) => {
                    self.stats.fd_exhausted += 1;
                    if let Some(times) = self.accept_paused.hit(Instant::now()) {
                        let secs = self.accept_paused.interval_secs();
                        log::error(
                            &format!(
                                "accept paused: out of file descriptors ({times} times in the last {secs} s)"
                            ),
                            &[("error", &e), ("limit", &self.fd_limit)],
                        );
                    }
                    self.accept_blocked = true;
                    self.timers.add(
                        Instant::now() + ACCEPT_BACKOFF,
                        TimerKey {
                            key: 0,
                            gen: 0,
                            kind: TimerKind::AcceptResume,
                        },
                    );
                    return;
                }
                Err(e) => {
                    // ECONNABORTED and friends concern one connection only.
                    log::debug("accept failed", &[("error", &e)]);
                    continue;
                }
            };
            if self.is_self_dial(&stream, peer) {
                // One of our own backend connections came back to us: serving it would
                // dial again, and again (a single request once became 5,465 connections).
                log::error(
                    "refused a connection wslb opened to its own listener (self-loop)",
                    &[("peer", &peer)],
                );
                self.stats.self_connections_refused += 1;
                continue;
            }
            let _ = stream.set_nodelay(true);
            if self.cfg.proxy_protocol {
                // The client's address comes in the PROXY header; admitted once it has.
                self.await_proxy_header(stream, peer, tls);
                continue;
            }
            self.admit(stream, peer, tls);
        }
    }

    /// Takes an accepted client socket into the slab: TLS wrapping, the per-address limit,
    /// the head deadline. `peer` is the client (from the PROXY header if there was one).
    pub(super) fn admit(&mut self, stream: mio::net::TcpStream, peer: SocketAddr, tls: bool) {
        let Some(mut stream) = self.wrap(stream, tls) else {
            return;
        };
        self.next_gen += 1;
        self.next_id += 1;
        let key = self.conns.next_key();
        if let Err(e) = self.poll.registry().register(
            stream.socket_mut(),
            token_for(key, Side::Client),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::error("register failed", &[("error", &e)]);
            return;
        }
        let now = Instant::now();
        let over_ip_limit = self.cfg.max_connections_per_ip > 0 && {
            let n = self.per_ip.entry(peer.ip()).or_insert(0);
            *n >= self.cfg.max_connections_per_ip || {
                *n += 1;
                false
            }
        };
        let (key, conn) = self.conns.insert(Conn::new(
            self.cfg.throttle,
            key,
            self.next_gen,
            self.next_id,
            stream,
            peer,
            now,
        ));
        if over_ip_limit {
            log::debug("too many connections from one address", &[("peer", &peer)]);
            conn.refuse(now, 429);
        } else {
            conn.counts_for_ip = self.cfg.max_connections_per_ip > 0;
        }
        if log::enabled(log::Level::Debug) {
            log::debug("client connected", &[("client", &conn.id), ("peer", &peer)]);
        }
        if over_ip_limit {
            self.stats.rejected += 1;
        } else {
            self.stats.accepted += 1;
        }
        self.events.emit(Event::ClientConnect {
            client: conn.id,
            peer,
            tls,
        });
        if let Some(h) = &mut self.hooks {
            h.on_client_connect(conn.id, peer);
        }
        if let Some(at) = conn.deadline(&self.cfg) {
            self.conns.arm(&mut self.timers, key, at);
        }
        self.size_pool_room();
    }

    /// Wraps an accepted socket in TLS when it came from a TLS listener.
    pub(super) fn wrap(&self, sock: mio::net::TcpStream, tls: bool) -> Option<Transport> {
        if !tls {
            return Some(Transport::Plain(sock));
        }
        Self::wrap_with(sock, self.server_tls.as_ref()?)
    }

    /// Wraps an accepted control socket (TLS with `--control-tls`).
    pub(super) fn wrap_control(&self, sock: mio::net::TcpStream) -> Option<Transport> {
        match &self.control_tls {
            None => Some(Transport::Plain(sock)),
            Some(cfg) => Self::wrap_with(sock, cfg),
        }
    }

    pub(super) fn wrap_with(
        sock: mio::net::TcpStream,
        cfg: &Arc<rustls::ServerConfig>,
    ) -> Option<Transport> {
        match crate::net::tls_server::ServerTls::new(sock, cfg) {
            Ok(tls) => Some(Transport::TlsServer(Box::new(tls))),
            Err(e) => {
                log::error("tls setup failed", &[("error", &e)]);
                None
            }
        }
    }

    /// SIGHUP: new certificates for new connections; existing ones keep theirs. A reload
    /// that fails keeps the old set.
    pub(super) fn reload_tls(&mut self) {
        if self.cfg.certs.is_empty() {
            log::info("SIGHUP: no certificates to reload", &[]);
            return;
        }
        let control = match self.control_tls {
            Some(_) => crate::net::tls::control_server_config(
                &self.cfg.certs,
                self.cfg.control_client_ca.as_deref(),
            )
            .map(Some),
            None => Ok(None),
        };
        match crate::net::tls::server_config(&self.cfg.certs).and_then(|c| Ok((c, control?))) {
            Ok((cfg, control)) => {
                self.server_tls = Some(cfg);
                self.control_tls = control;
                log::info(
                    "SIGHUP: certificates reloaded",
                    &[("pairs", &self.cfg.certs.len())],
                );
            }
            Err(e) => log::error(
                "SIGHUP: reload failed, keeping the old certificates",
                &[("error", &e)],
            ),
        }
    }

    /// Was this accepted connection opened by wslb itself? The map lookup is free; the
    /// `getsockname` runs only for a peer address we dialled from.
    pub(super) fn is_self_dial(&self, stream: &mio::net::TcpStream, peer: SocketAddr) -> bool {
        let dial = &self.backends.self_dial;
        dial.maybe_own(peer)
            && stream
                .local_addr()
                .is_ok_and(|local| dial.is_own(peer, local))
    }
}
