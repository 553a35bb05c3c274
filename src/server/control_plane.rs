//! The control listener's connections: backends registering over a WebSocket and admin
//! requests, and what their messages do to the registry.

use super::*;

impl Server {
    /// SIGHUP: re-reads `--token-file`. Connections already authenticated keep going; a
    /// file that fails to load keeps the old tokens.
    pub(super) fn reload_token_file(&mut self) {
        let Some(path) = &self.cfg.token_file else {
            return;
        };
        match load_token_file(path) {
            Ok(list) => {
                self.control_auth.set_per_guid(&list);
                log::info("SIGHUP: token file reloaded", &[("entries", &list.len())]);
            }
            Err(e) => log::error(
                "SIGHUP: token file reload failed, keeping the old tokens",
                &[("error", &e)],
            ),
        }
    }

    pub(super) fn accept_controls(&mut self) {
        loop {
            if self.controls.len() >= self.control_max {
                // Their descriptors are budgeted: the rest wait in the backlog until one goes.
                self.control_accept_blocked = true;
                return;
            }
            self.control_accept_blocked = false;
            let Some(listener) = &self.control_listener else {
                return;
            };
            let (stream, peer) = match listener.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_fd_exhaustion(&e) => {
                    // Control connections are few; the next readiness edge retries.
                    log::error("control accept failed", &[("error", &e)]);
                    return;
                }
                Err(_) => continue,
            };
            let via_proxy = self.is_self_dial(&stream, peer);
            if via_proxy {
                self.stats.self_connections_refused += 1;
            }
            let Some(mut stream) = self.wrap_control(stream) else {
                continue;
            };
            self.next_gen += 1;
            let now = Instant::now();
            let key = self.controls.next_key();
            if let Err(e) = self.poll.registry().register(
                stream.socket_mut(),
                self.controls.tokens.token(key, 0),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                log::error("register failed", &[("error", &e)]);
                continue;
            }
            let (key, c) = self
                .controls
                .insert(ControlConn::new(self.next_gen, stream, peer, now));
            c.via_proxy = via_proxy;
            c.max_payload = self.cfg.messaging.max_payload;
            let at = c.deadline(self.cfg.header_timeout, self.cfg.heartbeat);
            self.controls.arm(&mut self.timers, key, at);
        }
    }

    pub(super) fn drive_control(&mut self, key: usize) {
        let Some(c) = self.controls.get_mut(key) else {
            return;
        };
        let now = Instant::now();
        let mut events = std::mem::take(&mut self.control_events);
        let outcome = c.drive(now, &self.control_auth, &mut events);
        let gen = c.gen;
        let answered = events.iter().any(|e| matches!(e, ControlEvent::Admin(_)));
        for ev in events.drain(..) {
            self.apply_control_event(key, gen, ev);
        }
        self.control_events = events;
        if answered {
            // The answer is queued: write it now, no new readiness edge will ask for it.
            return self.drive_control(key);
        }
        let Some(c) = self.controls.get_mut(key) else {
            return;
        };
        if outcome == ControlDrive::Done {
            self.controls.finish(key);
            return;
        }
        let at = c.deadline(self.cfg.header_timeout, self.cfg.heartbeat);
        self.controls.arm(&mut self.timers, key, at);
    }

    /// The backend registered by control connection `(key, gen)`, if any.
    pub(super) fn owned_backend(&self, key: usize, gen: u64) -> Option<usize> {
        self.backends
            .iter()
            .find(|(_, b)| b.owner == Some((key, gen)))
            .map(|(id, _)| id)
    }

    pub(super) fn apply_control_event(&mut self, key: usize, gen: u64, ev: ControlEvent) {
        let owned = self.owned_backend(key, gen);
        let Some(c) = self.controls.get_mut(key) else {
            return;
        };
        let peer = c.peer;
        match ev {
            ControlEvent::Connected => {
                log::info("server connected", &[("peer", &peer)]);
                self.stats.server_connected += 1;
                self.events.emit(Event::ServerConnect { peer });
                if let Some(h) = &mut self.hooks {
                    h.on_server_connect(peer);
                }
            }
            ControlEvent::Message(msg) => self.backend_message(key, gen, *msg),
            ControlEvent::Admin(req) if req.method == "GET" && req.path == "/api/live" => {
                self.live_subscribe(key, gen)
            }
            ControlEvent::Admin(req) => {
                let (status, ctype, body) = crate::control::admin::route(self, &req);
                if let Some(c) = self.controls.get_mut(key) {
                    c.respond(Instant::now(), status, ctype, &body);
                }
                // A drain or another change shows on the open pages now, not at the tick.
                self.push_live_events();
            }
            ControlEvent::Register(reg) => {
                let identity = c.identity.clone();
                self.register_backend(key, gen, owned, *reg, peer, identity);
            }
            ControlEvent::Load(n) => match owned {
                Some(id) => self.backends.report_load(id, n),
                None => c.refuse(&ControlError::NotRegistered),
            },
            ControlEvent::Drain => match owned {
                Some(id) => {
                    log::info(
                        "server draining",
                        &[
                            ("guid", &c.guid.as_deref().unwrap_or("-")),
                            ("state", &BackendState::Draining.as_str()),
                        ],
                    );
                    let clients = self.drain_backend(id);
                    if let Some(c) = self.controls.get_mut(key) {
                        c.send_text(control_protocol::drained(clients));
                    }
                }
                None => c.refuse(&ControlError::NotRegistered),
            },
            ControlEvent::Deregister => match owned {
                Some(id) => {
                    c.close_with(control_protocol::ack("deregistered"));
                    log::info(
                        "server disconnected",
                        &[
                            ("guid", &c.guid.as_deref().unwrap_or("-")),
                            ("reason", &"deregister"),
                        ],
                    );
                    self.backend_lost(id);
                }
                None => c.refuse(&ControlError::NotRegistered),
            },
        }
    }

    /// A `register` message: refused (a security rule, with its reason counted), or the
    /// backend is added or updated and its previous control connection, if another one,
    /// is replaced.
    fn register_backend(
        &mut self,
        key: usize,
        gen: u64,
        owned: Option<usize>,
        reg: control_protocol::Registration,
        peer: SocketAddr,
        identity: Option<Identity>,
    ) {
        if let Some(e) = self.registration_refusal(key, gen, &reg, peer, identity) {
            let rule = match &e {
                ControlError::BindingRefused { rule, .. } => rule.rule(),
                other => other.code(),
            };
            log::error(
                "registration refused",
                &[
                    ("peer", &peer),
                    ("guid", &reg.guid),
                    ("rule", &rule),
                    ("error", &e),
                ],
            );
            *self.stats.registrations_refused.entry(rule).or_insert(0) += 1;
            self.events.emit(Event::RegistrationRefused {
                guid: &reg.guid,
                peer,
                rule,
            });
            if let Some(c) = self.controls.get_mut(key) {
                c.refuse(&e);
            }
            return;
        }
        let Some(c) = self.controls.get_mut(key) else {
            return;
        };
        if c.guid.as_deref().is_some_and(|g| g != reg.guid) {
            // Same connection, new identity: the old entry is gone.
            if let Some(id) = owned {
                self.backends.set_state(id, BackendState::Gone);
            }
        }
        let (id, fresh, previous) = self.backends.register(&reg, (key, gen));
        let hb = u64::try_from(self.cfg.heartbeat.as_millis()).unwrap_or(u64::MAX);
        if let Some(c) = self.controls.get_mut(key) {
            c.guid = Some(reg.guid.clone());
            c.send_text(control_protocol::registered(&reg.guid, hb));
        }
        self.announce_ready(&reg, peer, id, fresh);
        self.check_takeover(Instant::now());
        if let Some((old_key, old_gen)) = previous {
            if let Some(old) = self.controls.live_gen(old_key, old_gen) {
                old.refuse(&ControlError::Replaced);
                self.controls.finish(old_key);
            }
        }
    }

    /// "server ready": counted, logged, and told to events and hooks.
    fn announce_ready(
        &mut self,
        reg: &control_protocol::Registration,
        peer: SocketAddr,
        id: usize,
        fresh: bool,
    ) {
        self.stats.server_ready += 1;
        self.events.emit(Event::ServerReady {
            guid: &reg.guid,
            peer,
            bindings: &reg.bindings,
            backend: id,
            updated: !fresh,
        });
        if let Some(h) = &mut self.hooks {
            h.on_server_ready(&reg.guid);
        }
        let bindings = reg.bindings.join(",");
        log::info(
            if fresh {
                "server ready"
            } else {
                "server ready (updated)"
            },
            &[
                ("guid", &reg.guid),
                ("bindings", &bindings),
                ("weight", &reg.weight),
                ("backend", &id),
            ],
        );
    }

    /// Why `reg` from control connection `(key, gen)` at `peer` may not be applied, if so.
    pub(super) fn registration_refusal(
        &self,
        key: usize,
        gen: u64,
        reg: &control_protocol::Registration,
        peer: SocketAddr,
        identity: Option<Identity>,
    ) -> Option<ControlError> {
        if !identity.is_some_and(|id| id.may_register(&reg.guid)) {
            return Some(ControlError::GuidNotAllowed);
        }
        // A live guid moves only to a connection from the same address: that is a
        // restarted backend; anyone else holding the token would be a takeover.
        let holder = self
            .backends
            .iter()
            .find(|(_, b)| b.guid.as_deref() == Some(reg.guid.as_str()))
            .and_then(|(_, b)| b.owner)
            .filter(|&owner| owner != (key, gen))
            .filter(|&(k, g)| self.controls.is_live(k, g))
            .and_then(|(k, _)| self.controls.get(k));
        if holder.is_some_and(|o| o.peer.ip().to_canonical() != peer.ip().to_canonical()) {
            return Some(ControlError::GuidInUse);
        }
        for (binding, addr) in reg.bindings.iter().zip(&reg.addrs) {
            if let Err(rule) = crate::netpolicy::check_binding(
                *addr,
                peer.ip(),
                &self.cfg.backend_allow,
                &self.own_addrs,
                &crate::netpolicy::is_local_ip,
            ) {
                return Some(ControlError::BindingRefused {
                    binding: binding.clone(),
                    rule,
                });
            }
        }
        None
    }

    /// A registered backend left: out of selection at once; its clients stay or go per flag.
    pub(super) fn backend_lost(&mut self, id: usize) {
        let name = self
            .backends
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, b)| b.guid.clone().unwrap_or_else(|| b.name.clone()))
            .unwrap_or_default();
        self.stats.server_disconnected += 1;
        self.events.emit(Event::ServerDisconnect {
            guid: &name,
            backend: id,
        });
        if let Some(h) = &mut self.hooks {
            h.on_server_disconnect(&name);
        }
        if self.cfg.on_backend_lost == OnBackendLost::Close {
            let keys: Vec<usize> = self
                .conns
                .iter()
                .filter(|(_, c)| c.backend_id() == Some(id))
                .map(|(k, _)| k)
                .collect();
            for key in keys {
                self.with_conn(key, |c, ctx| c.going_away(ctx, CLOSE_GOING_AWAY));
            }
        }
        self.backends.set_state(id, BackendState::Gone);
    }

    pub(super) fn send_unreachable_notices(&mut self) {
        for n in std::mem::take(&mut self.backends.unreachable) {
            let (key, gen) = n.owner;
            if let Some(c) = self.controls.live_gen(key, gen) {
                c.send_text(control_protocol::unreachable(&n.binding));
            }
        }
    }

    pub(super) fn reap_controls(&mut self) {
        for (key, mut c) in self.controls.take_finished() {
            let owned = self.owned_backend(key, c.gen);
            if let Some(id) = owned.filter(|_| self.upgrade.handing_over) {
                // Sent to the new process by an upgrade: still serving here until it takes
                // over, and its agent registers there.
                self.backends.orphan(id);
            } else if let Some(id) = owned {
                log::info(
                    "server disconnected",
                    &[
                        ("guid", &c.guid.as_deref().unwrap_or("-")),
                        ("reason", &"control connection lost"),
                    ],
                );
                self.backend_lost(id);
            }
            if let Some(s) = c.stream_mut() {
                let _ = self.poll.registry().deregister(s);
            }
        }
        if self.control_accept_blocked && self.controls.len() < self.control_max {
            self.accept_controls();
        }
    }
}
