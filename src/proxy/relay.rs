//! Moving bytes: reads that run a frame tracker over what arrives, the exact reads that
//! pick our pongs out of a client's stream, the lingering reads of a closing connection.

use super::*;
use crate::ws::frames;

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
