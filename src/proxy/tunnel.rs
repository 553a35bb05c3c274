//! The WebSocket tunnel after 101: frames relayed both ways through two trackers, the
//! balancer's own frames injected at message boundaries, its pings and their pongs, and
//! the closing rules (docs/LIFECYCLE.md).

use super::*;
use crate::backends::route::Sticky;

/// After 101: frames relayed both ways, tracked header by header.
#[derive(Debug)]
pub(super) struct Tunnel {
    pub(super) up: FrameTracker,
    pub(super) down: FrameTracker,
    /// Close code the balancer sends the client at the next frame boundary of the backend's
    /// stream. Set only by the balancer's own decisions (limits, unparseable frames, drain,
    /// idle, admin) and by a backend vanishing without any close frame.
    pub(super) pending_close: Option<u16>,
    /// Close code the balancer sends the backend, with `pending_close`, at the next frame
    /// boundary of the client's stream; `None` when the backend is gone.
    pub(super) backend_close: Option<u16>,
    pub(super) close_reason: std::borrow::Cow<'static, str>,
    /// The close owed to the client went out, or is no longer owed.
    pub(super) client_closed: bool,
    /// The close owed to the backend went out, or is no longer owed.
    pub(super) backend_closed: bool,
    /// When `pending_close` was set: the frames in progress get [`LINGER`] from then to
    /// reach their ends (a peer trickling a huge frame does not hold the close back).
    pub(super) closing_since: Option<Instant>,
    /// Frames the balancer wants to send the client, at the next message boundary.
    pub(super) inject: VecDeque<Vec<u8>>,
    pub(super) inject_bytes: usize,
    /// Pings we sent whose pongs have not come back; their pongs are not relayed.
    pub(super) pings_out: u32,
    /// A client frame being read exactly, to see whether it is a pong answering our ping.
    pub(super) up_hold: Vec<u8>,
    pub(super) next_ping: Option<Instant>,
    /// `--inspect` reassembly of client messages.
    pub(super) inspect: Option<Inspect>,
    /// When the 101 went out: rebalancing leaves young tunnels alone.
    pub(super) opened: Instant,
    /// The backend was chosen by a sticky session (a valid cookie naming it, or the ip or
    /// header key): rebalancing never moves such a client while that backend is healthy.
    pub(super) pinned: bool,
}

impl Tunnel {
    /// The balancer closes the tunnel itself: `client` for the client, `backend` (if it is
    /// still there to be told) for the backend. The first cause wins.
    pub(super) fn fail(
        &mut self,
        now: Instant,
        client: u16,
        backend: Option<u16>,
        reason: impl Into<std::borrow::Cow<'static, str>>,
    ) {
        if self.pending_close.is_none() {
            self.pending_close = Some(client);
            self.backend_close = backend;
            self.close_reason = reason.into();
            self.closing_since = Some(now);
        }
    }
}

impl Tunnel {
    /// How much of the client's stream may be read now: `None` while the balancer closes
    /// and the client's frame in progress has been relayed to its end (where the backend's
    /// close frame goes); until then only that frame is finished.
    fn up_read_limit(&self, up_max: usize) -> Option<usize> {
        match self.pending_close {
            None => Some(up_max),
            Some(_) if self.backend_closed || self.up.relayed_to_frame_boundary() => None,
            Some(_) => Some(
                up_max.min(usize::try_from(self.up.bytes_to_frame_end()).unwrap_or(usize::MAX)),
            ),
        }
    }

    /// While our ping is out, client frames are read one at a time so the pong answering
    /// it can be taken out of the stream.
    fn reads_exact_frames(&self) -> bool {
        self.pings_out > 0
            && self.pending_close.is_none()
            && !self.up.close_seen()
            && (self.up.at_frame_boundary() || !self.up_hold.is_empty())
    }

    /// How much of the backend's stream may be read now. Frames of our own wait for a
    /// message boundary: reading stops exactly there. While the balancer closes, only the
    /// frame in progress is finished, then nothing.
    pub(super) fn down_read_limit(&self, down_max: usize) -> Option<usize> {
        let to_frame_end = usize::try_from(self.down.bytes_to_frame_end()).unwrap_or(usize::MAX);
        if self.pending_close.is_some() {
            if self.client_closed || self.down.relayed_to_frame_boundary() {
                return None;
            }
            return Some(down_max.min(to_frame_end));
        }
        if self.inject.is_empty() {
            return Some(down_max);
        }
        self.down
            .read_limit_for_injection()
            .map(|n| down_max.min(usize::try_from(n).unwrap_or(usize::MAX)))
    }

    /// Hands `--inspect`ed client messages to the hooks and the event sink.
    fn deliver_inspected(&mut self, client: u64, ctx: &mut Ctx<'_>) {
        let Some(ins) = self.inspect.as_mut().filter(|i| !i.done.is_empty()) else {
            return;
        };
        for (opcode, msg) in ins.done.drain(..) {
            if let Some(h) = ctx.hooks.as_deref_mut() {
                h.on_client_message(client, opcode == 1, &msg);
            }
            ctx.events.emit(Event::ClientMessage {
                client,
                text: opcode == 1,
                bytes: msg.len(),
            });
        }
    }
}

/// Payload prefix of the balancer's own pings, so their pongs can be told from others.
pub(super) const PING_MAGIC: &[u8] = b"wslb";

/// Most bytes of injected frames queued per client (a client that never reads cannot
/// make the balancer hold more).
pub(super) const MAX_INJECT_BYTES: usize = 1 << 20;

/// Unanswered balancer pings after which the client is considered dead.
pub(super) const MAX_PINGS_OUT: u32 = 3;

/// Longest control frame: 2 header bytes + 4 mask bytes + 125 payload bytes.
pub(super) const MAX_CONTROL_FRAME: usize = 131;

impl Conn {
    /// Reads client frames into the backend's outbox. Returns (progress, bytes read).
    pub(super) fn read_client_frames(&mut self, ctx: &mut Ctx<'_>, up_max: usize) -> (bool, usize) {
        let (Phase::Tunnel(t), Some(leg)) = (&mut self.phase, &mut self.leg) else {
            return (false, 0);
        };
        let messages = t.up.messages();
        let to_backend = &mut leg.to_backend.buf;
        let io = match t.up_read_limit(up_max) {
            None => Ok(Io::WouldBlock),
            Some(_) if t.reads_exact_frames() => {
                if to_backend.has_room(MAX_CONTROL_FRAME) {
                    read_exact_frame(&mut self.client, &mut self.c_ready, t, to_backend)
                } else {
                    Ok(Io::WouldBlock)
                }
            }
            Some(_) if to_backend.is_full() => Ok(Io::WouldBlock),
            Some(max) => read_tracked(
                &mut self.client,
                &mut self.c_ready,
                to_backend,
                &mut t.up,
                max,
                t.inspect.as_mut(),
            ),
        };
        let read = t.up.messages() - messages;
        ctx.stats.ws_messages_up += read;
        ctx.stats.backend_messages(leg.backend, read, 0);
        t.deliver_inspected(self.id, ctx);
        match io {
            Ok(Io::Progress(n)) => (true, n),
            Ok(Io::WouldBlock) => (false, 0),
            Ok(Io::Eof) | Ok(Io::Failed) => {
                self.c_eof = true;
                (true, 0)
            }
            Err(e) => {
                log::debug(
                    "bad frame from client",
                    &[("client", &self.id), ("error", &e)],
                );
                // The client is told why; the backend, which did nothing wrong, that its
                // peer is going away. Reading goes on (into the lingering close) so the
                // client gets to read ours.
                t.fail(ctx.now, e.close_code(), Some(CLOSE_GOING_AWAY), e.as_str());
                (true, 0)
            }
        }
    }

    pub(super) fn open_tunnel(&mut self, ctx: &mut Ctx<'_>) -> Step {
        let max = ctx.cfg.max_frame_size;
        let pinned = match (&self.phase, &self.leg) {
            (Phase::Exchange(ex), Some(leg)) => match &ex.sticky {
                Sticky::Off => false,
                // A cookie naming a backend that could not take the client fell through to
                // the algorithm: only a cookie naming the very backend chosen pins it.
                Sticky::Cookie(id) => {
                    id.is_some() && id.as_deref() == ctx.backends.sticky_id(leg.backend)
                }
                Sticky::Key(_) => true,
            },
            _ => false,
        };
        let mut t = Tunnel {
            up: FrameTracker::new(Direction::ClientToServer, max),
            down: FrameTracker::new(Direction::ServerToClient, max),
            pending_close: None,
            backend_close: None,
            close_reason: "".into(),
            client_closed: false,
            backend_closed: false,
            closing_since: None,
            inject: VecDeque::new(),
            inject_bytes: 0,
            pings_out: 0,
            up_hold: Vec::new(),
            next_ping: ctx.cfg.ws_ping.map(|i| ctx.now + i),
            inspect: ctx.cfg.inspect.then(Inspect::default),
            opened: ctx.now,
            pinned,
        };
        ctx.stats.ws_opened += 1;
        ctx.stats.response(101);
        ctx.events.emit(Event::Handshake {
            client: self.id,
            peer: self.peer,
            backend: self.paired_name.as_deref(),
        });
        let Some(leg) = &mut self.leg else {
            self.enter_closing(ctx.now);
            return Step::Progress;
        };
        // Bytes that arrived with the handshake belong to the frame streams. What the
        // trackers release is relayed; a partial header stays held for the next read.
        let early_up = self.from_client.data();
        if let Err(e) = feed(&mut t.up, early_up, t.inspect.as_mut()) {
            t.fail(ctx.now, e.close_code(), Some(CLOSE_GOING_AWAY), e.as_str());
        }
        let released = usize::try_from(t.up.released()).unwrap_or(usize::MAX);
        push_whole(
            &mut leg.to_backend.buf,
            early_up.get(..released).unwrap_or(early_up),
        );
        self.from_client.release();
        let early_down = leg.from_backend.data();
        if let Err(e) = t.down.feed(early_down) {
            t.fail(ctx.now, CLOSE_GOING_AWAY, Some(e.close_code()), e.as_str());
        }
        let released = usize::try_from(t.down.released()).unwrap_or(usize::MAX);
        push_whole(
            &mut self.to_client.buf,
            early_down.get(..released).unwrap_or(early_down),
        );
        leg.from_backend.release();
        log::debug(
            "websocket open",
            &[("client", &self.id), ("backend", &leg.backend)],
        );
        self.enter(Phase::Tunnel(Box::new(t)));
        Step::Progress
    }

    /// The tunnel's rules for one round: injection, half-closes, and the closes it owes.
    pub(super) fn process_tunnel(&mut self, ctx: &mut Ctx<'_>) -> Step {
        let Phase::Tunnel(t) = &mut self.phase else {
            return Step::Idle;
        };
        let Some(leg) = &mut self.leg else {
            return Step::Done;
        };
        if leg.eof && self.c_eof && leg.fin_sent {
            // Both hung up; what the client is still owed (the backend's close, say) is
            // flushed by `Closing` before the sockets close.
            self.enter_closing(ctx.now);
            return Step::Progress;
        }
        if self.to_client.head_pending() == 0 {
            // All written: give back the memory of large injected frames (a 64 KiB
            // broadcast to 9,000 clients would otherwise stay allocated 9,000 times).
            self.to_client.drop_head();
        }
        if inject(t, &mut self.to_client, ctx) {
            return Step::Progress;
        }
        // Client hung up: pass its FIN on once its last bytes reached the backend.
        if self.c_eof && leg.to_backend.is_empty() && !leg.fin_sent {
            leg.stream.shutdown_write(&mut leg.ready);
            leg.fin_sent = true;
            return Step::Progress;
        }
        if leg.eof && t.pending_close.is_none() && !t.down.close_seen() {
            if t.up.close_seen() || leg.aborted {
                // The client's close is being answered (a backend may fail a close it
                // rejects by dropping TCP), or the backend aborted the connection: either way
                // the backend decided, and the client sees what it would see directly,
                // everything the backend sent and then the TCP close. No close frame of ours.
                self.enter_closing(ctx.now);
                return Step::Progress;
            }
            // The backend vanished with no close in either direction: tell the client why.
            t.fail(ctx.now, CLOSE_BACKEND_GONE, None, REASON_BACKEND_GONE);
        }
        if t.pending_close.is_some() {
            let progress = self.send_owed_closes(ctx);
            if let Phase::Tunnel(t) = &self.phase {
                if t.client_closed && t.backend_closed {
                    self.enter_closing(ctx.now);
                    return Step::Progress;
                }
            }
            if progress {
                return Step::Progress;
            }
        }
        let (Phase::Tunnel(t), Some(leg)) = (&self.phase, &self.leg) else {
            return Step::Progress;
        };
        if leg.eof && t.down.close_seen() && self.to_client.is_empty() {
            // Clean close handshake from the backend side: forward the FIN.
            self.enter_closing(ctx.now);
            return Step::Progress;
        }
        Step::Idle
    }

    /// The balancer closes the tunnel: its close frame goes to each side at that side's
    /// next frame boundary, unless that side already closed or is gone. Returns progress.
    fn send_owed_closes(&mut self, ctx: &mut Ctx<'_>) -> bool {
        let (Phase::Tunnel(t), Some(leg)) = (&mut self.phase, &mut self.leg) else {
            return false;
        };
        let Some(code) = t.pending_close else {
            return false;
        };
        let mut progress = false;
        if !t.client_closed {
            if t.down.close_seen() {
                // The backend's close already went to the client: one close per direction.
                t.client_closed = true;
            } else if t.down.relayed_to_frame_boundary()
                && self.to_client.buf.has_room(MAX_CONTROL_FRAME)
            {
                let mut frame = Vec::with_capacity(MAX_CONTROL_FRAME);
                encode_close_reason(code, &t.close_reason, None, &mut frame);
                push_whole(&mut self.to_client.buf, &frame);
                t.client_closed = true;
                progress = true;
            } else if leg.eof {
                // Mid-frame with no more bytes coming: a TCP close is all that is left.
                t.client_closed = true;
            }
        }
        if !t.backend_closed {
            match t.backend_close {
                // Gone, already has the client's close, or hung up: nothing to tell it.
                _ if t.up.close_seen() || leg.eof || leg.fin_sent => t.backend_closed = true,
                None => t.backend_closed = true,
                Some(bc)
                    if t.up.relayed_to_frame_boundary()
                        && leg.to_backend.buf.has_room(MAX_CONTROL_FRAME) =>
                {
                    // Masked, as a client's frames must be.
                    let mut frame = Vec::with_capacity(MAX_CONTROL_FRAME);
                    let mask = ctx.rng.random::<[u8; 4]>();
                    encode_close_reason(bc, &t.close_reason, Some(mask), &mut frame);
                    push_whole(&mut leg.to_backend.buf, &frame);
                    t.backend_closed = true;
                    progress = true;
                }
                // The client's frame in progress will not be finished.
                Some(_) if self.c_eof => t.backend_closed = true,
                Some(_) => {}
            }
        }
        progress
    }
}

/// Moves the balancer's queued frames into the client's outbox at a message boundary of
/// the backend's stream; drops them when nothing may follow. Returns whether it moved any.
fn inject(t: &mut Tunnel, to_client: &mut Outbox, ctx: &mut Ctx<'_>) -> bool {
    if t.inject.is_empty() {
        return false;
    }
    if t.down.close_seen()
        || t.pending_close.is_some()
        || t.down.error().is_some()
        || t.down.violation().is_some()
    {
        // Nothing may follow a close, nor be spliced into a broken stream.
        t.inject.clear();
        t.inject_bytes = 0;
        return false;
    }
    if !(t.down.at_message_boundary() && to_client.buf.is_empty()) {
        return false;
    }
    let head = to_client.head_vec();
    for frame in t.inject.drain(..) {
        head.extend_from_slice(&frame);
        ctx.stats.ws_injected += 1;
    }
    t.inject_bytes = 0;
    true
}
