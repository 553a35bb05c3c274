//! The admin API routes and the operator's messages to clients (broadcast, send, drain).

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
            .filter(|(_, c)| !c.done && c.is_websocket())
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
        let id = self
            .backends
            .iter()
            .find(|(_, b)| b.name == name || b.guid.as_deref() == Some(name))
            .map(|(id, _)| id)
            .ok_or_else(|| format!("no backend {name}"))?;
        self.backends.set_state(id, BackendState::Draining);
        log::info("server draining", &[("backend", &name), ("by", &"admin")]);
        Ok(1)
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
            })
            .collect()
    }

    /// Routes one admin API request; returns status, content type and body.
    pub(super) fn handle_admin(&mut self, req: &AdminRequest) -> (u16, &'static str, Vec<u8>) {
        const JSON: &str = "application/json";
        let segments: Vec<&str> = req.path.trim_matches('/').split('/').collect();
        let param = |name: &str| {
            req.query.split('&').find_map(|kv| {
                kv.split_once('=')
                    .filter(|(k, _)| *k == name)
                    .map(|(_, v)| percent_decode(v))
            })
        };
        let sent = |r: Result<usize, String>| match r {
            Ok(n) => (200, JSON, json!({ "sent": n }).to_string().into_bytes()),
            Err(e) => (404, JSON, json!({ "error": e }).to_string().into_bytes()),
        };
        let message = || -> Result<Outgoing, String> {
            let ct = req.content_type.to_ascii_lowercase();
            // Only an explicit binary type makes a binary frame: `curl -d` sends a form type,
            // and a page would then show "[object Blob]" for a plain word.
            let text = ct.is_empty()
                || ct.starts_with("text/")
                || ct.starts_with("application/json")
                || ct.starts_with("application/x-www-form-urlencoded");
            if text {
                String::from_utf8(req.body.clone())
                    .map(Outgoing::Text)
                    .map_err(|_| "text message is not UTF-8".to_string())
            } else {
                Ok(Outgoing::Binary(req.body.clone()))
            }
        };
        let method = req.method.as_str();
        let uptime = self.started.elapsed().as_secs();
        let tunnels = self.conns.iter().filter(|(_, c)| c.is_websocket()).count();
        match (method, segments.as_slice()) {
            ("GET", [""]) => {
                let html = admin::status_html(
                    &self.backend_rows(),
                    self.conns.len(),
                    tunnels,
                    uptime,
                    env!("CARGO_PKG_VERSION"),
                    (fdlimit::open_fds(), self.fd_limit),
                );
                (200, "text/html; charset=utf-8", html.into_bytes())
            }
            ("GET", ["metrics"]) => {
                let rows = self.backend_rows();
                let samples: Vec<BackendSample<'_>> = rows
                    .iter()
                    .map(|r| BackendSample {
                        name: r.guid.as_deref().unwrap_or(&r.name),
                        state: r.state,
                        active: r.active,
                        selected: r.selected,
                    })
                    .collect();
                let mut text =
                    metrics::render(&self.stats, self.conns.len(), tunnels, uptime, &samples);
                metrics::render_fds(
                    &mut text,
                    self.fd_limit,
                    fdlimit::open_fds(),
                    self.stats.fd_exhausted,
                );
                (200, "text/plain; version=0.0.4", text.into_bytes())
            }
            ("GET", ["api", "backends"]) => (
                200,
                JSON,
                admin::backends_json(&self.backend_rows())
                    .to_string()
                    .into_bytes(),
            ),
            ("GET", ["api", "clients"]) => {
                let now = Instant::now();
                let list: Vec<_> = self
                    .conns
                    .iter()
                    .map(|(_, c)| {
                        let s = c.summary(now);
                        json!({"id": s.id, "peer": s.peer.to_string(), "backend": s.backend,
                               "websocket": s.websocket, "age_secs": s.age_secs,
                               "bytes_up": s.bytes.0, "bytes_down": s.bytes.1})
                    })
                    .collect();
                (
                    200,
                    JSON,
                    serde_json::Value::Array(list).to_string().into_bytes(),
                )
            }
            ("POST", ["api", "broadcast"]) => {
                let target = match (param("backend"), param("tag")) {
                    (Some(b), _) => Target::Backend(b),
                    (None, Some(t)) => match t.split_once('=') {
                        Some((k, v)) => Target::Tag(k.to_string(), v.to_string()),
                        None => {
                            return (400, JSON, br#"{"error":"tag must be KEY=VALUE"}"#.to_vec())
                        }
                    },
                    (None, None) => Target::All,
                };
                match message() {
                    Ok(m) => sent(Ok(self.send_to(&target, &m))),
                    Err(e) => (400, JSON, json!({ "error": e }).to_string().into_bytes()),
                }
            }
            ("POST", ["api", "ping"]) => sent(Ok(self.send_to(&Target::All, &Outgoing::Ping))),
            ("POST", ["api", "clients", id, action @ ("send" | "ping")]) => {
                let Ok(id) = id.parse::<u64>() else {
                    return (404, JSON, br#"{"error":"no such client"}"#.to_vec());
                };
                let msg = if *action == "ping" {
                    Ok(Outgoing::Ping)
                } else {
                    message()
                };
                match msg {
                    Ok(m) => match self.send_to(&Target::Client(id), &m) {
                        0 => (
                            404,
                            JSON,
                            br#"{"error":"no such websocket client"}"#.to_vec(),
                        ),
                        n => sent(Ok(n)),
                    },
                    Err(e) => (400, JSON, json!({ "error": e }).to_string().into_bytes()),
                }
            }
            ("DELETE", ["api", "clients", id]) => {
                let code = match param("code").map(|c| c.parse::<u16>()) {
                    None => 1000,
                    Some(Ok(c))
                        if (1000..=4999).contains(&c) && !matches!(c, 1004..=1006 | 1015) =>
                    {
                        c
                    }
                    Some(_) => {
                        return (
                            400,
                            JSON,
                            br#"{"error":"code must be a valid close code"}"#.to_vec(),
                        )
                    }
                };
                match id
                    .parse::<u64>()
                    .map(|id| self.send_to(&Target::Client(id), &Outgoing::Close(code)))
                {
                    Ok(n) if n > 0 => sent(Ok(n)),
                    _ => (
                        404,
                        JSON,
                        br#"{"error":"no such websocket client"}"#.to_vec(),
                    ),
                }
            }
            ("POST", ["api", "backends", guid, "drain"]) => {
                sent(self.drain_named(&percent_decode(guid)))
            }
            (_, [""] | ["metrics"] | ["api", ..])
                if !matches!(method, "GET" | "POST" | "DELETE") =>
            {
                (405, JSON, br#"{"error":"method not allowed"}"#.to_vec())
            }
            _ => (404, JSON, br#"{"error":"not found"}"#.to_vec()),
        }
    }
}

/// Decodes `%XX` escapes (and `+` as space) in a query value; invalid escapes stay as-is.
fn percent_decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b, hex) {
            (b'%', Some(x)) => {
                out.push(x);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
