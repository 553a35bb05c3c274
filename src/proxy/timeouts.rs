//! Deadlines of a connection (one per phase, plus the throttle's resume time) and what
//! happens when one passes; the drain signals (SIGTERM, drain timeout) that shorten them.

use super::*;

impl Conn {
    /// The next instant at which [`Conn::expire`] has something to do.
    pub fn deadline(&self, cfg: &Config) -> Option<Instant> {
        let phase = self.phase_deadline(cfg);
        match self.throttle.as_ref().and_then(Throttle::resume_at) {
            Some(t) => Some(phase.map_or(t, |p| p.min(t))),
            None => phase,
        }
    }

    fn phase_deadline(&self, cfg: &Config) -> Option<Instant> {
        match &self.phase {
            Phase::Head { started } => Some(match started {
                Some(t) => *t + cfg.header_timeout,
                None => self.last_activity + cfg.idle_timeout,
            }),
            Phase::Exchange(ex) => {
                let connect = self
                    .leg
                    .as_ref()
                    .and_then(|l| l.connecting_since)
                    .map(|t| t + cfg.connect_timeout);
                let idle = self.last_activity + cfg.idle_timeout;
                let mut at = connect.map_or(idle, |c| c.min(idle));
                if cfg.min_body_rate > 0 && !ex.req_body.is_done() {
                    at = at.min(ex.body_window.0 + BODY_RATE_WINDOW);
                }
                Some(at)
            }
            Phase::Tunnel(t) if !self.tunnel_live(t) => {
                let quiet = self.last_activity + LINGER;
                Some(t.closing_since.map_or(quiet, |at| quiet.min(at + LINGER)))
            }
            Phase::Tunnel(t) => {
                let idle = cfg.ws_idle_timeout.map(|d| self.last_activity + d);
                match (idle, t.next_ping) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
            Phase::Closing { since, .. } => Some(*since + LINGER),
        }
    }

    /// Neither side is closing the tunnel.
    fn tunnel_live(&self, t: &Tunnel) -> bool {
        t.pending_close.is_none() && !self.c_eof && self.leg.as_ref().is_some_and(|l| !l.eof)
    }

    /// A deadline passed: act if it is still due.
    pub fn expire(&mut self, ctx: &mut Ctx<'_>) -> Drive {
        match self.phase_deadline(ctx.cfg) {
            Some(d) if d <= ctx.now => {}
            // A throttle window may have ended: reads resume.
            _ => return self.drive(ctx),
        }
        match &self.phase {
            Phase::Head { .. } => {
                if self.from_client.is_empty() {
                    self.count_handshake_failure(ctx, "tls handshake timed out");
                    // An idle keep-alive connection (or one that never spoke) just closes.
                    return Drive::Done;
                }
                log::debug("request head timeout", &[("client", &self.id)]);
                self.fail(ctx, 408);
                self.drive(ctx)
            }
            Phase::Exchange(_) => self.expire_exchange(ctx),
            Phase::Tunnel(t) if !self.tunnel_live(t) => Drive::Done,
            Phase::Tunnel(_) => self.expire_tunnel(ctx),
            Phase::Closing { .. } => Drive::Done,
        }
    }

    /// Connect timeout, `--min-body-rate`, or the backend's silence.
    fn expire_exchange(&mut self, ctx: &mut Ctx<'_>) -> Drive {
        let Phase::Exchange(ex) = &mut self.phase else {
            return self.drive(ctx);
        };
        let connecting = self
            .leg
            .as_ref()
            .is_some_and(|l| l.connecting_since.is_some());
        let window_over = ctx.cfg.min_body_rate > 0
            && !ex.req_body.is_done()
            && ex.body_window.0 + BODY_RATE_WINDOW <= ctx.now;
        if window_over && self.last_activity + ctx.cfg.idle_timeout > ctx.now {
            // Only the client's own slowness counts: not while the backend is connecting,
            // not reading (full outbox), or owes a 100 Continue.
            let blocked = connecting
                || self
                    .leg
                    .as_ref()
                    .is_some_and(|l| l.to_backend.buf.is_full())
                || (ex.expect_continue && !ex.answered);
            let needed = ctx.cfg.min_body_rate * BODY_RATE_WINDOW.as_secs();
            if blocked || ex.body_window.1 >= needed {
                ex.body_window = (ctx.now, 0);
                return self.drive(ctx);
            }
            log::debug("request body too slow", &[("client", &self.id)]);
            self.fail(ctx, 408);
            return self.drive(ctx);
        }
        if connecting {
            self.backend_failed(ctx, "connect timeout");
        } else {
            log::error("backend timed out", &[("client", &self.id)]);
            self.fail(ctx, 504);
        }
        self.drive(ctx)
    }

    /// A ping is due (or the peer left too many unanswered), or `--ws-idle-timeout`.
    fn expire_tunnel(&mut self, ctx: &mut Ctx<'_>) -> Drive {
        let Phase::Tunnel(t) = &mut self.phase else {
            return self.drive(ctx);
        };
        if let (Some(at), Some(every)) = (t.next_ping, ctx.cfg.ws_ping) {
            if at <= ctx.now {
                if t.pings_out >= MAX_PINGS_OUT {
                    log::debug(
                        "websocket peer dead: pings unanswered",
                        &[("client", &self.id)],
                    );
                    return Drive::Done;
                }
                t.next_ping = Some(ctx.now + every);
                let _ = self.ping();
                return self.drive(ctx);
            }
        }
        let idle_due = ctx
            .cfg
            .ws_idle_timeout
            .is_some_and(|d| self.last_activity + d <= ctx.now);
        if idle_due {
            log::debug("websocket idle timeout", &[("client", &self.id)]);
            t.fail(
                ctx.now,
                CLOSE_GOING_AWAY,
                Some(CLOSE_GOING_AWAY),
                "idle timeout",
            );
            self.last_activity = ctx.now;
        }
        self.drive(ctx)
    }

    /// SIGTERM: stop keeping this connection alive; idle ones close now, unless
    /// `keep_idle` (their next answer then says `Connection: close`; the drain timeout
    /// closes those that send nothing).
    pub fn begin_drain(&mut self, ctx: &mut Ctx<'_>, keep_idle: bool) -> Drive {
        match &mut self.phase {
            Phase::Head { .. } if self.from_client.is_empty() && !keep_idle => return Drive::Done,
            Phase::Exchange(ex) => ex.close_after = true,
            _ => {}
        }
        self.drive(ctx)
    }

    /// Drain timeout: WebSocket clients get a close frame with `code`, others just close.
    pub fn going_away(&mut self, ctx: &mut Ctx<'_>, code: u16) -> Drive {
        match &mut self.phase {
            Phase::Tunnel(t) => {
                t.fail(ctx.now, code, Some(code), "");
                self.last_activity = ctx.now;
                self.drive(ctx)
            }
            Phase::Closing { .. } => Drive::Continue,
            _ => Drive::Done,
        }
    }
}
