//! Backend → client messaging (issue 17): what a registered backend's `broadcast`, `send`,
//! `close` and `ping` do to this balancer's WebSocket clients, and the `sent`/`failed`
//! answer on its control connection. Delivery uses the same injection path as the admin
//! API (whole frames at message boundaries), bounded per client by `--client-queue-max`.

use std::collections::HashSet;

use super::*;
use crate::config::MessageScope;
use crate::control::messaging::{
    self, ClientRef, Filter, MsgError, Op, Payload, RateBucket, Request,
};
use crate::proxy::Injected;

/// Draws a random instance id when `--instance-id` is not given, so that client ids of
/// two balancers never collide (8 hex digits: a collision among a few balancers is
/// one in billions).
pub(super) fn ensure_instance_id(cfg: &mut Config, rng: &mut SmallRng) {
    use rand::Rng;
    if cfg.messaging.instance_id.is_empty() {
        cfg.messaging.instance_id = format!("{:08x}", rng.random::<u32>());
    }
    log::info(
        "client ids are INSTANCE.N",
        &[("instance", &cfg.messaging.instance_id)],
    );
}

impl Server {
    /// Carries out a messaging request from control connection `(key, gen)` (or refuses it)
    /// and answers it there. The session goes on either way.
    pub(super) fn backend_message(
        &mut self,
        key: usize,
        gen: u64,
        msg: Result<Request, (Option<u64>, MsgError)>,
    ) {
        let (id, result) = match msg {
            Ok(req) => (req.id, self.carry_out(key, gen, req.op)),
            Err((id, e)) => (id, Err(e)),
        };
        let answer = match result {
            Ok(n) => {
                self.stats.backend_messages += 1;
                messaging::sent(id, n)
            }
            Err(e) => {
                self.stats.backend_messages_failed += 1;
                log::debug(
                    "backend message refused",
                    &[("code", &e.code()), ("error", &e)],
                );
                messaging::failed(id, &e)
            }
        };
        if let Some(c) = self.controls.live_gen(key, gen) {
            c.send_text(answer);
        }
    }

    fn carry_out(&mut self, key: usize, gen: u64, op: Op) -> Result<usize, MsgError> {
        let own = self
            .owned_backend(key, gen)
            .ok_or(MsgError::NotRegistered)?;
        let m = &self.cfg.messaging;
        if m.scope == MessageScope::Off {
            return Err(MsgError::NotAllowed);
        }
        let (rate, now) = (m.rate, Instant::now());
        let c = self.controls.get_mut(key).ok_or(MsgError::NotRegistered)?;
        if !c
            .bucket
            .get_or_insert_with(|| RateBucket::new(rate, now))
            .take(rate, now)
        {
            return Err(MsgError::RateLimited);
        }
        // `own` scope: a backend reaches only the clients paired with it.
        let only = (m.scope == MessageScope::Own).then_some(own);
        match op {
            Op::Broadcast {
                payload,
                filter,
                except,
            } => {
                let backends = self.filter_backends(&filter);
                let except = except.and_then(|c| self.local_id(&c));
                let keys = self.websocket_keys(|id, backend| {
                    Some(id) != except
                        && backends
                            .as_ref()
                            .is_none_or(|ids| backend.is_some_and(|b| ids.contains(&b)))
                        && only.is_none_or(|o| backend == Some(o))
                });
                Ok(self.deliver(&keys, &payload))
            }
            Op::Send { to, payload } => {
                let keys = self.client_keys(&to, only)?;
                match self.deliver(&keys, &payload) {
                    0 => Err(MsgError::UnknownClient),
                    n => Ok(n),
                }
            }
            Op::Close {
                client,
                code,
                reason,
            } => {
                let keys = self.client_keys(&[client], only)?;
                let mut closed = 0;
                for k in keys {
                    let reason = reason.clone();
                    self.with_conn(k, |c, ctx| {
                        let (ok, drive) = c.close_websocket(ctx, code, reason);
                        closed += usize::from(ok);
                        drive
                    });
                }
                match closed {
                    0 => Err(MsgError::UnknownClient),
                    n => Ok(n),
                }
            }
            Op::Ping { client } => {
                let keys = self.client_keys(&[client], only)?;
                let ping = (crate::ws::frames::OPCODE_PING, &[][..]);
                match self.deliver_frame(&keys, ping) {
                    0 => Err(MsgError::UnknownClient),
                    n => Ok(n),
                }
            }
        }
    }

    /// Backend ids a broadcast filter selects; `None` = no filter.
    fn filter_backends(&self, filter: &Filter) -> Option<Vec<usize>> {
        let pick = |f: &dyn Fn(&crate::backends::registry::Backend) -> bool| {
            self.backends
                .iter()
                .filter(|(_, b)| f(b))
                .map(|(id, _)| id)
                .collect()
        };
        match filter {
            Filter::All => None,
            Filter::Backend(g) => Some(pick(&|b| b.guid.as_deref() == Some(g.as_str()))),
            Filter::Tag(k, v) => Some(pick(&|b| b.tags.get(k) == Some(v))),
        }
    }

    /// The connection number of `c` if it names a client of this balancer.
    fn local_id(&self, c: &ClientRef) -> Option<u64> {
        (c.instance == self.cfg.messaging.instance_id).then_some(c.id)
    }

    /// Slab keys of open WebSocket clients for which `keep(client id, backend id)` holds.
    fn websocket_keys(&self, keep: impl Fn(u64, Option<usize>) -> bool) -> Vec<usize> {
        self.conns
            .iter()
            .filter(|(_, c)| !c.marks.done && c.is_websocket() && keep(c.id, c.backend_id()))
            .map(|(k, _)| k)
            .collect()
    }

    /// Slab keys of the named clients that are here. With `only`, a named client paired
    /// with another backend is `not_allowed` rather than silently skipped.
    fn client_keys(&self, to: &[ClientRef], only: Option<usize>) -> Result<Vec<usize>, MsgError> {
        let wanted: HashSet<u64> = to.iter().filter_map(|c| self.local_id(c)).collect();
        if wanted.is_empty() {
            return Err(MsgError::UnknownClient);
        }
        let keys = self.websocket_keys(|id, _| wanted.contains(&id));
        let foreign = keys.iter().any(|&k| {
            self.conns
                .get(k)
                .is_some_and(|c| only.is_some_and(|o| c.backend_id() != Some(o)))
        });
        if foreign {
            return Err(MsgError::NotAllowed);
        }
        Ok(keys)
    }

    fn deliver(&mut self, keys: &[usize], payload: &Payload) -> usize {
        self.deliver_frame(keys, payload.frame())
    }

    /// Queues one frame for each client; returns how many took it. A client over its
    /// queue limit is closed (1013) and not counted; the others are not held up by it.
    fn deliver_frame(&mut self, keys: &[usize], (opcode, payload): (u8, &[u8])) -> usize {
        let mut queued = 0;
        for &key in keys {
            self.with_conn(key, |c, ctx| {
                let (outcome, drive) = c.inject(ctx, opcode, payload);
                queued += usize::from(outcome == Injected::Queued);
                drive
            });
        }
        queued
    }
}
