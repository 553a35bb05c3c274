//! The WebSocket tunnel after 101: frames relayed both ways through two trackers, the
//! balancer's own frames injected at message boundaries, its pings and their pongs, and
//! the closing rules (docs/LIFECYCLE.md).

use super::*;
use crate::ws::frames;

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

/// Payload prefix of the balancer's own pings, so their pongs can be told from others.
pub(super) const PING_MAGIC: &[u8] = b"wslb";

/// Most bytes of injected frames queued per client (a client that never reads cannot
/// make the balancer hold more).
pub(super) const MAX_INJECT_BYTES: usize = 1 << 20;

/// Unanswered balancer pings after which the client is considered dead.
pub(super) const MAX_PINGS_OUT: u32 = 3;

/// Longest control frame: 2 header bytes + 4 mask bytes + 125 payload bytes.
pub(super) const MAX_CONTROL_FRAME: usize = 131;

/// Reads into `buf` and runs the new bytes through `tracker`, committing what it releases:
/// a partial header is held back (and put in front of the next read), so the relayed stream
/// never ends inside a header, nothing of a header that failed is relayed, and bytes after a
/// close frame are dropped.
pub(super) fn read_tracked(
    stream: &mut Transport,
    ready: &mut Ready,
    buf: &mut Buffer,
    tracker: &mut FrameTracker,
    max: usize,
    inspect: Option<&mut Inspect>,
) -> Result<Io, FrameError> {
    let held = tracker.held_header().len();
    let space = buf.space();
    if space.len() <= held {
        return Ok(Io::WouldBlock);
    }
    let (front, rest) = space.split_at_mut(held);
    front.copy_from_slice(tracker.held_header());
    let len = rest.len().min(max);
    let io = stream.read(ready, rest.get_mut(..len).unwrap_or_default());
    let mut fed = Ok(0);
    if let Io::Progress(n) = io {
        let before = tracker.released();
        fed = feed(tracker, rest.get(..n).unwrap_or_default(), inspect);
        let released = usize::try_from(tracker.released() - before).unwrap_or(0);
        buf.commit(released);
    }
    if buf.is_empty() {
        // An idle tunnel keeps no buffer.
        buf.release();
    }
    fed.map(|_| io)
}

/// Reads and drops input. Out of line so its scratch space does not enlarge the stack frame
/// of every `drive` (a frame over a page is probed on each call).
#[inline(never)]
pub(super) fn discard(stream: &mut Transport, ready: &mut Ready) -> Io {
    let mut sink = [0u8; 4096];
    read_some(stream, ready, &mut sink)
}

/// What one lingering read (read and drop while a close is owed) came to.
pub(super) enum Linger {
    /// Bytes were dropped, within the budget.
    Read,
    /// Nothing to read now.
    Idle,
    /// The peer hung up (or reset): its FIN has come.
    Ended,
    /// More than [`LINGER_MAX_BYTES`] dropped in all: give up waiting.
    OverBudget,
}

/// Reads and drops what a peer still sends after our close, counting it against the
/// connection's linger budget (`lingered`, shared by both legs).
pub(super) fn linger_read(stream: &mut Transport, ready: &mut Ready, lingered: &mut u64) -> Linger {
    match discard(stream, ready) {
        Io::Progress(n) => {
            *lingered += n as u64;
            if *lingered > LINGER_MAX_BYTES {
                Linger::OverBudget
            } else {
                Linger::Read
            }
        }
        Io::WouldBlock => Linger::Idle,
        Io::Eof | Io::Failed => Linger::Ended,
    }
}

/// `--inspect`: client messages reassembled (unmasked) for the hooks and events.
#[derive(Debug, Default)]
pub(super) struct Inspect {
    pub(super) partial: Vec<u8>,
    pub(super) done: Vec<(u8, Vec<u8>)>,
}

/// Most bytes of one message shown to `on_client_message` (the relay itself is unbounded
/// by this; only the copy for inspection is cut).
pub(super) const MAX_INSPECT: usize = 1 << 20;

/// Runs client bytes through the tracker, collecting messages when inspecting.
pub(super) fn feed(
    tracker: &mut FrameTracker,
    bytes: &[u8],
    inspect: Option<&mut Inspect>,
) -> Result<usize, FrameError> {
    match inspect {
        None => tracker.feed(bytes),
        Some(ins) => tracker.feed_inspect(bytes, |piece| {
            if ins.partial.len() < MAX_INSPECT {
                piece.unmask_into(&mut ins.partial);
                ins.partial.truncate(MAX_INSPECT);
            }
            if piece.message_end {
                ins.done
                    .push((piece.opcode, std::mem::take(&mut ins.partial)));
            }
        }),
    }
}

/// Reads at most to the end of the current client frame into the tunnel's hold buffer.
/// A frame that is not a pong is released into `buf` as soon as its header is whole and its
/// first byte shows that; a pong is held whole, then dropped if it answers one of our pings,
/// else released. A "pong" longer than a control frame may be (the backend's to judge) is
/// released once the hold is full, so the hold stays bounded.
pub(super) fn read_exact_frame(
    stream: &mut Transport,
    ready: &mut Ready,
    t: &mut Tunnel,
    buf: &mut Buffer,
) -> Result<Io, FrameError> {
    let to_end = usize::try_from(t.up.bytes_to_frame_end()).unwrap_or(usize::MAX);
    let want = to_end
        .min(MAX_CONTROL_FRAME.saturating_sub(t.up_hold.len()))
        .max(1);
    let mut tmp = [0u8; MAX_CONTROL_FRAME];
    let Some(dst) = tmp.get_mut(..want) else {
        return Ok(Io::WouldBlock);
    };
    let io = stream.read(ready, dst);
    let Io::Progress(n) = io else {
        return Ok(io);
    };
    let fresh = tmp.get(..n).unwrap_or_default();
    let fed = feed(&mut t.up, fresh, t.inspect.as_mut());
    t.up_hold.extend_from_slice(fresh);
    if let Err(e) = fed {
        // The failed header is not relayed.
        t.up_hold.clear();
        return Err(e);
    }
    if !t.up.held_header().is_empty() {
        return Ok(io);
    }
    let is_pong = t.up_hold.first().copied().is_some_and(frames::is_pong);
    let whole = t.up.at_frame_boundary();
    if is_pong && !whole && t.up_hold.len() < MAX_CONTROL_FRAME {
        return Ok(io);
    }
    if is_pong
        && whole
        && t.pings_out > 0
        && frames::masked_control_payload(&t.up_hold).starts_with(PING_MAGIC)
    {
        t.pings_out -= 1;
        t.up_hold.clear();
        return Ok(io);
    }
    buf.push(&t.up_hold);
    t.up_hold.clear();
    Ok(io)
}

/// Appends all of `bytes` (at most a head buffer's worth, which may exceed a relay buffer
/// after a large handshake head), growing `buf` for it.
pub(super) fn push_whole(buf: &mut Buffer, bytes: &[u8]) {
    if !buf.has_room(bytes.len()) {
        buf.grow(buf.len() + bytes.len());
    }
    let pushed = buf.push(bytes);
    debug_assert_eq!(pushed, bytes.len());
}

impl Conn {
    pub(super) fn open_tunnel(&mut self, ctx: &mut Ctx<'_>) -> Step {
        let max = ctx.cfg.max_frame_size;
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
        self.phase = Phase::Tunnel(Box::new(t));
        Step::Progress
    }

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
        if !t.inject.is_empty() {
            if t.down.close_seen()
                || t.pending_close.is_some()
                || t.down.error().is_some()
                || t.down.violation().is_some()
            {
                // Nothing may follow a close, nor be spliced into a broken stream.
                t.inject.clear();
                t.inject_bytes = 0;
            } else if t.down.at_message_boundary() && self.to_client.buf.is_empty() {
                let head = self.to_client.head_vec();
                for frame in t.inject.drain(..) {
                    head.extend_from_slice(&frame);
                    ctx.stats.ws_injected += 1;
                }
                t.inject_bytes = 0;
                return Step::Progress;
            }
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
        if let Some(code) = t.pending_close {
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
            if t.client_closed && t.backend_closed {
                self.enter_closing(ctx.now);
                return Step::Progress;
            }
            if progress {
                return Step::Progress;
            }
        }
        if leg.eof && t.down.close_seen() && self.to_client.is_empty() {
            // Clean close handshake from the backend side: forward the FIN.
            self.enter_closing(ctx.now);
            return Step::Progress;
        }
        Step::Idle
    }
}
