//! The balancer's side of the admin API (`control::admin` routes the requests): messages
//! to clients, the backend set changed at run time, the snapshots the pages show.

use super::*;

impl Server {
    /// Queues `msg` for the WebSocket clients `to` selects; returns how many took it.
    pub(super) fn send_to(&mut self, to: &Target, msg: &Outgoing) -> usize {
        let backend_ids: Option<Vec<usize>> = match to {
            Target::All | Target::Client(_) => None,
            Target::Backend(name) => Some(
                self.backends
                    .iter()
                    .filter(|(_, b)| b.name == *name || b.guid.as_deref() == Some(name))
                    .map(|(id, _)| id)
                    .collect(),
            ),
            Target::Tag(k, v) => Some(
                self.backends
                    .iter()
                    .filter(|(_, b)| b.tags.get(k) == Some(v))
                    .map(|(id, _)| id)
                    .collect(),
            ),
        };
        let keys: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.marks.done && c.is_websocket())
            .filter(|(_, c)| match to {
                Target::Client(id) => c.id == *id,
                _ => backend_ids
                    .as_ref()
                    .is_none_or(|ids| c.backend_id().is_some_and(|b| ids.contains(&b))),
            })
            .map(|(k, _)| k)
            .collect();
        let mut sent = 0;
        for key in keys {
            let mut ok = false;
            self.with_conn(key, |c, ctx| {
                // Same queue limit as backends' messages: a client that does not read is
                // closed (1013) rather than holding an operator's broadcasts in memory.
                let (opcode, payload) = match msg {
                    Outgoing::Text(t) => (0x1, t.as_bytes()),
                    Outgoing::Binary(b) => (0x2, b.as_slice()),
                    Outgoing::Ping => (crate::ws::frames::OPCODE_PING, &[][..]),
                    Outgoing::Close(code) => {
                        ok = true;
                        return c.going_away(ctx, *code);
                    }
                };
                let (outcome, drive) = c.inject(ctx, opcode, payload);
                ok = outcome == crate::proxy::Injected::Queued;
                drive
            });
            sent += usize::from(ok);
        }
        sent
    }

    /// Admin/handle drain of one backend by guid or static URL.
    pub(super) fn drain_named(&mut self, name: &str) -> Result<usize, String> {
        match self.change_backend(BackendChange::Drain(name.to_string())) {
            Ok(_) => Ok(1),
            Err(ChangeError::NotFound(why) | ChangeError::Invalid(why)) => Err(why),
        }
    }

    pub(super) fn backend_rows(&self) -> Vec<BackendRow> {
        let now = Instant::now();
        self.backends
            .iter()
            .map(|(id, b)| BackendRow {
                id,
                name: b.name.clone(),
                guid: b.guid.clone(),
                state: b.state.as_str(),
                bindings: b.bindings.clone(),
                weight: b.weight,
                active: b.active,
                selected: b.selected,
                heard_secs_ago: b.owner.and_then(|(k, g)| {
                    self.controls
                        .get(k)
                        .filter(|c| c.gen == g)
                        .map(|c| now.saturating_duration_since(c.last_heard()).as_secs())
                }),
                down: b.down_until.is_some_and(|t| t > now),
                tags: b.tags.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                source: b.source.as_str(),
                max_connections: b.max_connections,
                dispatch: (
                    b.dispatch.public.clone(),
                    b.dispatch.dispatched,
                    b.dispatch.reported,
                ),
            })
            .collect()
    }
}

impl AdminApi for Server {
    fn status_page(&self) -> String {
        let tunnels = self.conns.iter().filter(|(_, c)| c.is_websocket()).count();
        admin::status_html(
            &self.backend_rows(),
            self.conns.len(),
            tunnels,
            self.started.elapsed().as_secs(),
            env!("CARGO_PKG_VERSION"),
            (fdlimit::open_fds(), self.fd_limit),
            &self.status_notes(),
        )
    }

    fn metrics(&self) -> String {
        let tunnels = self.conns.iter().filter(|(_, c)| c.is_websocket()).count();
        let rows = self.backend_rows();
        let samples: Vec<BackendSample<'_>> = rows
            .iter()
            .map(|r| BackendSample {
                name: r.guid.as_deref().unwrap_or(&r.name),
                state: r.state,
                active: r.active,
                selected: r.selected,
                dispatched: r.dispatch.1,
            })
            .collect();
        let uptime = self.started.elapsed().as_secs();
        let mut text = metrics::render(&self.stats, self.conns.len(), tunnels, uptime, &samples);
        metrics::render_fds(
            &mut text,
            self.fd_limit,
            fdlimit::open_fds(),
            self.stats.fd_exhausted,
        );
        self.render_live_metrics(&mut text);
        text
    }

    fn backends(&self) -> Vec<BackendRow> {
        self.backend_rows()
    }

    fn clients(&self) -> Vec<crate::proxy::ClientSummary> {
        let now = Instant::now();
        self.conns.iter().map(|(_, c)| c.summary(now)).collect()
    }

    fn send(&mut self, to: &Target, msg: &Outgoing) -> usize {
        self.send_to(to, msg)
    }

    fn ready(&self) -> bool {
        let now = Instant::now();
        !self.draining
            && self.backends.iter().any(|(_, b)| {
                b.state == BackendState::Ready && b.down_until.is_none_or(|t| t <= now)
            })
    }

    fn change_backend(&mut self, change: BackendChange) -> Result<serde_json::Value, ChangeError> {
        let found = |name: &str| -> Result<usize, ChangeError> {
            self.backends
                .find(name)
                .ok_or_else(|| ChangeError::NotFound(format!("no backend {name}")))
        };
        let (id, what) = match &change {
            BackendChange::Add(spec) => (self.add_backend(spec, Source::Api)?, "backend added"),
            BackendChange::Remove(name) => {
                let id = found(name)?;
                if self
                    .backends
                    .get(id)
                    .is_some_and(|b| b.source == Source::Registration)
                {
                    return Err(ChangeError::Invalid(format!(
                        "{name} registered itself: it leaves by deregistering (or drain it)"
                    )));
                }
                self.backends.set_state(id, BackendState::Gone);
                (id, "backend removed")
            }
            BackendChange::Drain(name) => {
                let id = found(name)?;
                self.drain_backend(id);
                (id, "server draining")
            }
            BackendChange::Undrain(name) => {
                let id = found(name)?;
                self.backends.set_state(id, BackendState::Ready);
                (id, "server undrained")
            }
            BackendChange::Update {
                name,
                weight,
                max_connections,
            } => {
                let id = found(name)?;
                self.backends.update(id, *weight, *max_connections);
                (id, "backend updated")
            }
        };
        let row = self.backend_rows().into_iter().find(|r| r.id == id);
        let name = row.as_ref().map_or(String::new(), |r| r.name.clone());
        log::info(what, &[("backend", &name), ("by", &"admin")]);
        self.events.emit(Event::BackendChanged {
            backend: &name,
            change: what,
        });
        Ok(match row {
            Some(r) => admin::backends_json(&[r])
                .get(0)
                .cloned()
                .unwrap_or(serde_json::Value::Null),
            None => serde_json::json!({ "name": name, "state": "gone" }),
        })
    }
}

impl Server {
    /// A static backend from `-B` syntax (API or `--backends-file`), with the checks the
    /// flags get: the URL parses and resolves, and it is not one of wslb's own listeners.
    pub(super) fn add_backend(&mut self, spec: &str, source: Source) -> Result<usize, ChangeError> {
        let parsed = crate::config::parse_backend(spec)
            .map_err(|why| ChangeError::Invalid(why.to_string()))?;
        if startup::is_own_listener(parsed.addr, &self.own_addrs) {
            return Err(ChangeError::Invalid(format!(
                "{} is wslb's own listener",
                parsed.url
            )));
        }
        self.backends
            .add_static(&parsed, source)
            .ok_or_else(|| ChangeError::Invalid(format!("{} is already a backend", parsed.url)))
    }
}

impl Server {
    /// SIGHUP: makes the `--backends-file` backends what the file says now: new lines are
    /// added, changed weights and limits applied, missing lines removed (their open
    /// connections finish). A file that fails to load changes nothing.
    pub(super) fn reload_backends_file(&mut self) {
        let Some(path) = self.cfg.backends_file.clone() else {
            return;
        };
        let specs = match startup::load_backends_file(&path) {
            Ok(specs) => specs,
            Err(e) => {
                log::error(
                    "SIGHUP: backends file reload failed, keeping the backends",
                    &[("error", &e)],
                );
                return;
            }
        };
        let mut changes: Vec<(String, &'static str)> = Vec::new();
        let from_file: Vec<(usize, String)> = self
            .backends
            .iter()
            .filter(|(_, b)| b.source == Source::File && b.state != BackendState::Gone)
            .map(|(id, b)| (id, b.name.clone()))
            .collect();
        for (id, name) in &from_file {
            if !specs.iter().any(|s| s.url == *name) {
                self.backends.set_state(*id, BackendState::Gone);
                changes.push((name.clone(), "backend removed"));
            }
        }
        for spec in &specs {
            match self.backends.find(&spec.url) {
                Some(id)
                    if self
                        .backends
                        .get(id)
                        .is_some_and(|b| b.source == Source::File) =>
                {
                    let same = self.backends.get(id).is_some_and(|b| {
                        b.weight == spec.weight && b.max_connections == spec.max_connections
                    });
                    if !same {
                        self.backends
                            .update(id, Some(spec.weight), Some(spec.max_connections));
                        changes.push((spec.url.clone(), "backend updated"));
                    }
                }
                Some(_) => log::warn(
                    "--backends-file lists a backend added otherwise; left as it is",
                    &[("backend", &spec.url)],
                ),
                None if startup::is_own_listener(spec.addr, &self.own_addrs) => log::error(
                    "--backends-file: skipped wslb's own listener",
                    &[("backend", &spec.url)],
                ),
                None => {
                    self.backends.add_static(spec, Source::File);
                    changes.push((spec.url.clone(), "backend added"));
                }
            }
        }
        for (name, what) in &changes {
            log::info(what, &[("backend", name), ("by", &"backends file")]);
            self.events.emit(Event::BackendChanged {
                backend: name,
                change: what,
            });
        }
        log::info(
            "SIGHUP: backends file reloaded",
            &[("backends", &specs.len()), ("changes", &changes.len())],
        );
    }
}
