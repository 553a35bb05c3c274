//! One progress round of a connection: read from the client, let the phase act on what
//! arrived (`Conn::process`), finish the backend connect and write to it, read from the
//! backend, write to the client, send the FINs a closing connection owes. `Conn::drive`
//! repeats rounds until nothing moves.

use super::*;

/// What one round moved.
#[derive(Default)]
struct Round {
    progress: bool,
    up: usize,
    down: usize,
}

/// `Err` ends the round early with that outcome.
type Flow = Result<(), Step>;

impl Conn {
    pub(super) fn step(&mut self, ctx: &mut Ctx<'_>) -> Step {
        match self.round(ctx) {
            Ok(true) => Step::Progress,
            Ok(false) => Step::Idle,
            Err(step) => step,
        }
    }

    fn round(&mut self, ctx: &mut Ctx<'_>) -> Result<bool, Step> {
        let (up_max, down_max) = match &mut self.throttle {
            Some(t) => {
                t.refill(ctx.now);
                (t.up_left, t.down_left)
            }
            None => (usize::MAX, usize::MAX),
        };
        let mut r = Round::default();
        if self.c_ready.readable && !self.c_eof && up_max > 0 {
            self.read_client(ctx, up_max, &mut r)?;
        }
        match self.process(ctx) {
            Step::Progress => r.progress = true,
            Step::Done => return Err(Step::Done),
            Step::Idle => {}
        }
        self.write_backend(ctx, &mut r)?;
        self.read_backend(ctx, down_max, &mut r)?;
        self.account(ctx, &r);
        self.write_client(&mut r)?;
        Ok(r.progress)
    }

    fn read_client(&mut self, ctx: &mut Ctx<'_>, up_max: usize, r: &mut Round) -> Flow {
        match &self.phase {
            Phase::Tunnel(_) => {
                let (progress, read) = self.read_client_frames(ctx, up_max);
                r.progress |= progress;
                r.up = read;
                Ok(())
            }
            Phase::Closing { .. } => {
                // Read and discard so our close does not turn into a reset that destroys
                // the answer still in flight to the client.
                match linger_read(&mut self.client, &mut self.c_ready, &mut self.lingered) {
                    Linger::Read => r.progress = true,
                    Linger::Idle => {}
                    Linger::Ended => {
                        self.c_eof = true;
                        r.progress = true;
                    }
                    Linger::OverBudget => return Err(Step::Done),
                }
                Ok(())
            }
            Phase::Head { .. } | Phase::Exchange(_) => {
                if self.from_client.is_full() {
                    return Ok(());
                }
                let io = read_into(
                    &mut self.client,
                    &mut self.c_ready,
                    &mut self.from_client,
                    up_max,
                );
                match io {
                    Io::Progress(n) => {
                        r.up = n;
                        if let Phase::Head {
                            started: started @ None,
                        } = &mut self.phase
                        {
                            *started = Some(ctx.now);
                        }
                        r.progress = true;
                    }
                    Io::WouldBlock => {}
                    Io::Eof => {
                        self.c_eof = true;
                        r.progress = true;
                    }
                    Io::Failed => {
                        self.count_handshake_failure(ctx, "tls handshake failed");
                        return Err(Step::Done);
                    }
                }
                Ok(())
            }
        }
    }

    /// Completes a pending connect, then writes what the backend is owed.
    fn write_backend(&mut self, ctx: &mut Ctx<'_>, r: &mut Round) -> Flow {
        let Some(leg) = &mut self.leg else {
            return Ok(());
        };
        if leg.connecting_since.is_some() && leg.ready.writable {
            match leg.connected() {
                Ok(true) => {
                    leg.connecting_since = None;
                    ctx.backends.connect_ok(leg.backend);
                    r.progress = true;
                }
                Ok(false) => leg.ready.writable = false,
                Err(e) => {
                    let why = e.to_string();
                    self.backend_failed(ctx, &why);
                    return Err(Step::Progress);
                }
            }
        }
        let Some(leg) = &mut self.leg else {
            return Ok(());
        };
        if leg.connecting_since.is_some() || self.marks.flush_queued {
            return Ok(());
        }
        match leg.to_backend.flush(&mut leg.stream, &mut leg.ready) {
            Io::Progress(_) => {
                r.progress = true;
                if matches!(self.phase, Phase::Tunnel(_)) {
                    leg.to_backend.shed_written_head();
                }
            }
            Io::Failed if matches!(self.phase, Phase::Tunnel(_) | Phase::Closing { .. }) => {
                leg.eof = true;
                leg.aborted = true;
                leg.fin_sent = true;
                leg.to_backend.buf.release();
                r.progress = true;
            }
            Io::Failed => {
                self.backend_lost(ctx);
                return Err(Step::Progress);
            }
            _ => {}
        }
        Ok(())
    }

    fn read_backend(&mut self, ctx: &mut Ctx<'_>, down_max: usize, r: &mut Round) -> Flow {
        let Some(leg) = &mut self.leg else {
            return Ok(());
        };
        if leg.connecting_since.is_some() || !leg.ready.readable || leg.eof {
            return Ok(());
        }
        let io = match &mut self.phase {
            Phase::Closing { .. } => {
                // The backend's answer to our close and its FIN are awaited, not relayed.
                match linger_read(&mut leg.stream, &mut leg.ready, &mut self.lingered) {
                    Linger::Read => r.progress = true,
                    Linger::Idle => {}
                    Linger::Ended => {
                        leg.eof = true;
                        r.progress = true;
                    }
                    Linger::OverBudget => return Err(Step::Done),
                }
                return Ok(());
            }
            _ if down_max == 0 => return Ok(()),
            Phase::Tunnel(t) => {
                let messages = t.down.messages();
                let io = match t.down_read_limit(down_max) {
                    Some(max) if !self.to_client.buf.is_full() => read_tracked(
                        &mut leg.stream,
                        &mut leg.ready,
                        &mut self.to_client.buf,
                        &mut t.down,
                        max,
                        None,
                    ),
                    _ => Ok(Io::WouldBlock),
                };
                let read = t.down.messages() - messages;
                ctx.stats.ws_messages_down += read;
                ctx.stats.backend_messages(leg.backend, 0, read);
                io
            }
            Phase::Head { .. } | Phase::Exchange(_) if leg.from_backend.is_full() => {
                Ok(Io::WouldBlock)
            }
            Phase::Head { .. } | Phase::Exchange(_) => Ok(read_into(
                &mut leg.stream,
                &mut leg.ready,
                &mut leg.from_backend,
                down_max,
            )),
        };
        match io {
            Ok(Io::Progress(n)) => {
                r.down = n;
                r.progress = true;
            }
            Ok(Io::WouldBlock) => {}
            Ok(Io::Eof) => {
                leg.eof = true;
                r.progress = true;
            }
            Ok(Io::Failed) => {
                leg.eof = true;
                leg.aborted = true;
                r.progress = true;
            }
            Err(e) => {
                log::error(
                    "bad frame from backend",
                    &[("client", &self.id), ("error", &e)],
                );
                if let Phase::Tunnel(t) = &mut self.phase {
                    t.fail(ctx.now, CLOSE_GOING_AWAY, Some(e.close_code()), e.as_str());
                }
                r.progress = true;
            }
        }
        Ok(())
    }

    /// Byte counters and the throttle's buckets.
    fn account(&mut self, ctx: &mut Ctx<'_>, r: &Round) {
        self.bytes_up += r.up as u64;
        self.bytes_down += r.down as u64;
        if matches!(self.phase, Phase::Tunnel(_)) {
            ctx.stats.ws_bytes_up += r.up as u64;
            ctx.stats.ws_bytes_down += r.down as u64;
        }
        if let Some(t) = &mut self.throttle {
            t.up_left = t.up_left.saturating_sub(r.up);
            t.down_left = t.down_left.saturating_sub(r.down);
        }
    }

    /// Writes what the client is owed; a closing connection then sends its FINs: to the
    /// client once its outbox is empty, to a backend kept through closing once our close
    /// frame has left.
    fn write_client(&mut self, r: &mut Round) -> Flow {
        if !self.marks.flush_queued {
            match self.to_client.flush(&mut self.client, &mut self.c_ready) {
                Io::Progress(_) => {
                    r.progress = true;
                    if matches!(self.phase, Phase::Tunnel(_)) {
                        self.to_client.shed_written_head();
                    }
                }
                Io::Failed => return Err(Step::Done),
                _ => {}
            }
        }
        let Phase::Closing { fin_sent, .. } = &mut self.phase else {
            return Ok(());
        };
        if self.to_client.is_empty() && !*fin_sent {
            self.client.shutdown_write(&mut self.c_ready);
            *fin_sent = true;
            r.progress = true;
        }
        if let Some(leg) = &mut self.leg {
            if leg.connecting_since.is_none()
                && leg.to_backend.is_empty()
                && !leg.fin_sent
                && !self.marks.flush_queued
            {
                leg.stream.shutdown_write(&mut leg.ready);
                leg.fin_sent = true;
                r.progress = true;
            }
        }
        Ok(())
    }
}
