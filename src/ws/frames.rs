//! WebSocket frame tracking (RFC 6455 §5) for a byte-for-byte relay.
//!
//! The balancer never decodes payloads: [`FrameTracker`] reads frame headers only (through
//! tungstenite's [`FrameHeader::parse`], so the bit layout lives in one well-tested place) and
//! skips payload bytes by count. That is enough to know where frames and messages end, so the
//! balancer can insert its own frames between messages, count traffic and enforce limits
//! without buffering or copying what it forwards.
//!
//! The tracker judges only what the relay itself needs: a frame over the size limit
//! ([`FrameError::TooLarge`]) or a header it cannot parse past ([`FrameError::BadHeader`]).
//! Every other RFC 6455 violation (masking, reserved opcodes, control frame rules,
//! continuation order) is the two endpoints' business: such frames are relayed and only
//! noted ([`FrameTracker::violation`]), so the receiving endpoint fails the connection the
//! way it would without a balancer. After a close frame the rest of the direction is ignored
//! (RFC 6455 §5.5.1: no data frames after a close), not relayed and not an error.

use std::fmt;
use std::io::Cursor;

use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Longest possible frame header: 2 bytes + 8 length bytes + 4 mask bytes.
const MAX_HEADER: usize = 14;

/// Control frames carry at most this many payload bytes (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: u64 = 125;

/// Which way the tracked bytes flow; decides the masking rule (RFC 6455 §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to server: every frame MUST be masked.
    ClientToServer,
    /// Server to client: no frame may be masked.
    ServerToClient,
}

impl Direction {
    fn requires_mask(self) -> bool {
        self == Direction::ClientToServer
    }
}

/// Why a frame stream was rejected (`TooLarge`, `BadHeader`) or, for the other variants,
/// which RFC 6455 rule an endpoint broke in a frame that is still relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// A frame's mask bit does not match its [`Direction`].
    Masking,
    /// Opcode 0x3-0x7 or 0xB-0xF.
    ReservedOpcode,
    /// A control frame with more than 125 payload bytes.
    ControlTooLong,
    /// A control frame without the FIN bit.
    FragmentedControl,
    /// A continuation frame with no fragmented message open.
    UnexpectedContinuation,
    /// A new text/binary frame while a fragmented message is still open.
    ExpectedContinuation,
    /// A frame payload larger than the tracker's limit.
    TooLarge,
    /// A header tungstenite rejected for another reason, or a 64-bit length with its top bit set.
    BadHeader,
}

impl FrameError {
    /// WebSocket close code to send when failing the connection for this error (RFC 6455 §7.4.1).
    pub fn close_code(self) -> u16 {
        match self {
            FrameError::TooLarge => 1009,
            _ => 1002,
        }
    }

    /// Short description, also the reason in the close frame the balancer sends for it.
    pub fn as_str(self) -> &'static str {
        match self {
            FrameError::Masking => "wrong frame masking",
            FrameError::ReservedOpcode => "reserved opcode",
            FrameError::ControlTooLong => "control frame too long",
            FrameError::FragmentedControl => "fragmented control frame",
            FrameError::UnexpectedContinuation => "unexpected continuation frame",
            FrameError::ExpectedContinuation => "expected continuation frame",
            FrameError::TooLarge => "frame too large",
            FrameError::BadHeader => "bad frame header",
        }
    }
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for FrameError {}

/// What completing the current frame means for the message-level state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Text, binary or continuation; `ends_message` when it carries FIN.
    Data {
        ends_message: bool,
    },
    Close,
    /// Ping or pong.
    Other,
}

/// The frame whose payload is being skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Payload {
    kind: Kind,
    remaining: u64,
    /// Payload bytes already seen; the close code sits at offsets 0 and 1.
    offset: u64,
    /// All zeros when unmasked, so unmasking is a no-op.
    mask: [u8; 4],
    code: [u8; 2],
}

impl Payload {
    /// Keeps the (unmasked) close code bytes out of `chunk`, which starts at `self.offset`.
    fn capture_close_code(&mut self, chunk: &[u8]) {
        if self.kind != Kind::Close {
            return;
        }
        let start = usize::try_from(self.offset).unwrap_or(2);
        for (i, &b) in (start..2).zip(chunk) {
            if let (Some(slot), Some(&m)) = (self.code.get_mut(i), self.mask.get(i % 4)) {
                *slot = b ^ m;
            }
        }
    }
}

/// A run of payload bytes of a data message, as they were on the wire.
#[derive(Debug, Clone, Copy)]
pub struct PayloadPiece<'a> {
    /// The bytes, still masked if the frame was.
    pub raw: &'a [u8],
    /// The frame's mask (zeros when unmasked).
    pub mask: [u8; 4],
    /// Offset of `raw` within the frame's payload (for the mask phase).
    pub offset: u64,
    /// 1 = text message, 2 = binary message.
    pub opcode: u8,
    /// The message ends with this piece.
    pub message_end: bool,
}

impl PayloadPiece<'_> {
    /// Appends the unmasked bytes to `out`.
    pub fn unmask_into(&self, out: &mut Vec<u8>) {
        let phase = (self.offset % 4) as usize;
        out.extend(
            self.raw
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ self.mask.get((i + phase) % 4).copied().unwrap_or(0)),
        );
    }
}

/// Follows one direction of a WebSocket connection, header by header. Small and heap-free:
/// at most one partial header (14 bytes) plus counters.
#[derive(Debug, Clone)]
pub struct FrameTracker {
    direction: Direction,
    max_payload: u64,
    header: [u8; MAX_HEADER],
    header_len: usize,
    payload: Option<Payload>,
    fragmented: bool,
    close_seen: bool,
    close_code: Option<u16>,
    messages: u64,
    frames: u64,
    error: Option<FrameError>,
    /// The first rule an endpoint broke in a frame that was relayed anyway.
    violation: Option<FrameError>,
    /// Bytes that may be relayed: whole headers and the payload bytes seen, never a partial
    /// header, the header that failed, or anything after a close frame.
    released: u64,
    /// Bytes after a close frame, read and dropped.
    ignored: u64,
    /// Opcode of the data message in progress (1 text, 2 binary).
    message_opcode: u8,
    /// A zero-length data frame just completed (`Some(ends_message)`), for `feed_inspect`.
    empty_data: Option<bool>,
}

impl FrameTracker {
    /// `max_payload`: largest frame payload accepted (frame length checked from the header, before any payload).
    pub fn new(direction: Direction, max_payload: u64) -> Self {
        FrameTracker {
            direction,
            max_payload,
            header: [0; MAX_HEADER],
            header_len: 0,
            payload: None,
            fragmented: false,
            close_seen: false,
            close_code: None,
            messages: 0,
            frames: 0,
            error: None,
            violation: None,
            released: 0,
            ignored: 0,
            message_opcode: 0,
            empty_data: None,
        }
    }

    /// Scans all of `input` (always consumes it all); returns the number of frames completed in it.
    ///
    /// After an error the tracker keeps returning that error: the stream cannot be resynced.
    pub fn feed(&mut self, input: &[u8]) -> Result<usize, FrameError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        self.scan(input, &mut |_| {})
            .inspect_err(|&e| self.error = Some(e))
    }

    /// [`FrameTracker::feed`], also handing every piece of data-frame payload to `on_data`
    /// (for `--inspect`); control frames are not shown.
    pub fn feed_inspect(
        &mut self,
        input: &[u8],
        mut on_data: impl FnMut(PayloadPiece<'_>),
    ) -> Result<usize, FrameError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        self.scan(input, &mut on_data)
            .inspect_err(|&e| self.error = Some(e))
    }

    /// Between two frames (no partial header, no payload outstanding).
    ///
    /// False once the tracker has failed: nothing may be inserted into a broken stream.
    pub fn at_frame_boundary(&self) -> bool {
        self.error.is_none() && self.header_len == 0 && self.payload.is_none()
    }

    /// At a frame boundary and not inside a fragmented data message: a frame of our own can be inserted here.
    ///
    /// Stays true after a close frame; the caller decides whether anything may follow it.
    /// False for good once a violation went through: message boundaries are guesses in a
    /// stream whose receiver is about to fail it, and nothing of ours belongs in it.
    pub fn at_message_boundary(&self) -> bool {
        self.at_frame_boundary() && !self.fragmented && self.violation.is_none()
    }

    /// The first RFC 6455 rule broken by a frame that was relayed anyway.
    pub fn violation(&self) -> Option<FrameError> {
        self.violation
    }

    /// Total input bytes that may be relayed so far. It grows by whole headers (a partial
    /// header is held back until it is complete, see [`FrameTracker::held_header`]) and by
    /// payload bytes; it stops before a header that failed and at the end of a close frame.
    /// The relay commits the growth of this count, so what it forwards always ends at a
    /// frame boundary or inside a payload, never inside a header: a frame of its own can
    /// follow a failed header without corrupting the stream.
    pub fn released(&self) -> u64 {
        self.released
    }

    /// The bytes of a partial header fed so far and not yet released: the relay puts them
    /// in front of the next bytes it reads, which it then feeds (without them).
    pub fn held_header(&self) -> &[u8] {
        self.header.get(..self.header_len).unwrap_or_default()
    }

    /// Bytes that followed a close frame, dropped.
    pub fn ignored(&self) -> u64 {
        self.ignored
    }

    /// A complete close frame has gone through.
    pub fn close_seen(&self) -> bool {
        self.close_seen
    }

    /// Close code carried by that close frame if it had >= 2 payload bytes (unmasked using the frame's mask; the code may be split across feeds).
    pub fn close_code(&self) -> Option<u16> {
        self.close_code
    }

    /// Completed data messages (a fragmented message counts once, when its final frame completes).
    pub fn messages(&self) -> u64 {
        self.messages
    }

    /// Completed frames of any kind.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Bytes that can be read without going past the end of the current frame: the rest of
    /// its payload, or of its header (at a boundary: the 2 bytes every header starts with).
    /// Lets the relay stop exactly at a boundary to insert or remove a frame.
    pub fn bytes_to_frame_end(&self) -> u64 {
        if let Some(p) = self.payload {
            return p.remaining;
        }
        let Some(&second) = self.header.get(1).filter(|_| self.header_len >= 2) else {
            return 2u64.saturating_sub(self.header_len as u64);
        };
        let ext = match second & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if second & 0x80 != 0 { 4 } else { 0 };
        (2 + ext + mask as u64)
            .saturating_sub(self.header_len as u64)
            .max(1)
    }

    /// How far the relay may read when frames of its own wait to go into this stream:
    /// `None` = not at all, this is a message boundary and the place to insert them;
    /// `Some(n)` = at most `n` bytes, which never passes the end of the current frame, so
    /// the next boundary is seen before any byte beyond it is read.
    pub fn read_limit_for_injection(&self) -> Option<u64> {
        if self.at_message_boundary() {
            None
        } else {
            Some(self.bytes_to_frame_end())
        }
    }

    /// The bytes relayed so far end at a frame boundary (a partial header is held back, and
    /// a header that failed was never released): a frame of the balancer's own, such as the
    /// close it fails the connection with, can be put here. Unlike
    /// [`FrameTracker::at_frame_boundary`] this stays meaningful after an error.
    pub fn relayed_to_frame_boundary(&self) -> bool {
        self.payload.is_none()
    }

    /// The error this tracker stopped on, if any.
    pub fn error(&self) -> Option<FrameError> {
        self.error
    }

    fn scan<F: FnMut(PayloadPiece<'_>)>(
        &mut self,
        mut input: &[u8],
        on_data: &mut F,
    ) -> Result<usize, FrameError> {
        let mut completed = 0;
        while !input.is_empty() {
            if let Some(mut p) = self.payload {
                let take = usize::try_from(p.remaining).map_or(input.len(), |r| r.min(input.len()));
                let (chunk, rest) = input.split_at_checked(take).unwrap_or((input, &[]));
                if let Kind::Data { ends_message } = p.kind {
                    on_data(PayloadPiece {
                        raw: chunk,
                        mask: p.mask,
                        offset: p.offset,
                        opcode: self.message_opcode,
                        message_end: ends_message && p.remaining == chunk.len() as u64,
                    });
                }
                p.capture_close_code(chunk);
                self.released = self.released.saturating_add(chunk.len() as u64);
                p.offset = p.offset.saturating_add(chunk.len() as u64);
                p.remaining = p.remaining.saturating_sub(chunk.len() as u64);
                input = rest;
                if p.remaining == 0 {
                    self.payload = None;
                    self.complete(&p);
                    completed += 1;
                } else {
                    self.payload = Some(p);
                }
            } else {
                // Whatever follows a close is dropped from its first byte: the receiver has
                // started the closing handshake and must not see late frames (RFC 6455
                // §5.5.1), and they are no reason to fail the connection either.
                if self.close_seen {
                    self.ignored = self.ignored.saturating_add(input.len() as u64);
                    return Ok(completed);
                }
                let (used, frame_done) = self.header_bytes(input)?;
                input = input.get(used..).unwrap_or(&[]);
                if frame_done {
                    completed += 1;
                }
                if let Some(ends_message) = self.empty_data.take() {
                    on_data(PayloadPiece {
                        raw: &[],
                        mask: [0; 4],
                        offset: 0,
                        opcode: self.message_opcode,
                        message_end: ends_message,
                    });
                }
            }
        }
        Ok(completed)
    }

    /// Adds bytes to the partial header; once it is whole, validates it and starts the payload.
    /// Returns the input bytes used and whether a frame (one without payload) completed.
    fn header_bytes(&mut self, input: &[u8]) -> Result<(usize, bool), FrameError> {
        if self.header_len == 0 {
            if let Some((header, len, used)) = whole_header(input) {
                let done = self.start_frame(&header, len)?;
                self.released = self.released.saturating_add(used as u64);
                return Ok((used, done));
            }
        }
        let start = self.header_len;
        let n = (MAX_HEADER - start).min(input.len());
        let filled = start + n;
        match (self.header.get_mut(start..filled), input.get(..n)) {
            (Some(dst), Some(src)) => dst.copy_from_slice(src),
            _ => return Err(FrameError::BadHeader),
        }
        let mut bytes = [0u8; MAX_HEADER];
        let (Some(dst), Some(src)) = (bytes.get_mut(..filled), self.header.get(..filled)) else {
            return Err(FrameError::BadHeader);
        };
        dst.copy_from_slice(src);
        // tungstenite refuses reserved opcodes, which are relayed here like any frame: it
        // parses a copy whose opcode is a valid one (same layout), and the real one is put back.
        let opcode = bytes.first().map_or(0, |b| b & 0x0f);
        if let Some(b0) = bytes.first_mut() {
            if matches!(opcode, 3..=7 | 0xb..=0xf) {
                *b0 = (*b0 & 0xf0) | if opcode < 8 { 0x2 } else { 0x9 };
            }
        }
        let mut cursor = Cursor::new(bytes.get(..filled).unwrap_or_default());
        match FrameHeader::parse(&mut cursor) {
            Ok(None) if filled < MAX_HEADER => {
                self.header_len = filled;
                Ok((n, false))
            }
            Ok(None) => Err(FrameError::BadHeader),
            Ok(Some((mut header, len))) => {
                header.opcode = OpCode::from(opcode);
                let whole =
                    usize::try_from(cursor.position()).map_err(|_| FrameError::BadHeader)?;
                // The previous feed could not parse `start` bytes, so the header ends in this input.
                let used = whole
                    .checked_sub(start)
                    .filter(|&used| used > 0 && used <= n)
                    .ok_or(FrameError::BadHeader)?;
                self.header_len = 0;
                let done = self.start_frame(&header, len)?;
                self.released = self.released.saturating_add(whole as u64);
                Ok((used, done))
            }
            Err(_) => Err(FrameError::BadHeader),
        }
    }

    /// Applies the RFC 6455 rules to a complete header; `true` when the frame is already complete.
    /// Only the relay's own limits fail; broken rules are noted and the frame is tracked.
    fn start_frame(&mut self, header: &FrameHeader, len: u64) -> Result<bool, FrameError> {
        // RFC 6455 §5.2: the most significant bit of a 64-bit length MUST be 0.
        if len > i64::MAX as u64 {
            return Err(FrameError::BadHeader);
        }
        if len > self.max_payload {
            return Err(FrameError::TooLarge);
        }
        if header.mask.is_some() != self.direction.requires_mask() {
            self.violate(FrameError::Masking);
        }
        let kind = match header.opcode {
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                self.violate(FrameError::ReservedOpcode);
                Kind::Other
            }
            OpCode::Control(c) => {
                if len > MAX_CONTROL_PAYLOAD {
                    self.violate(FrameError::ControlTooLong);
                }
                if !header.is_final {
                    self.violate(FrameError::FragmentedControl);
                }
                if c == Control::Close {
                    Kind::Close
                } else {
                    Kind::Other
                }
            }
            OpCode::Data(Data::Continue) => {
                if !self.fragmented {
                    self.violate(FrameError::UnexpectedContinuation);
                }
                Kind::Data {
                    ends_message: header.is_final,
                }
            }
            OpCode::Data(d) => {
                if self.fragmented {
                    self.violate(FrameError::ExpectedContinuation);
                }
                self.message_opcode = if d == Data::Text { 1 } else { 2 };
                Kind::Data {
                    ends_message: header.is_final,
                }
            }
        };
        if let Kind::Data { ends_message } = kind {
            self.fragmented = !ends_message;
        }
        let p = Payload {
            kind,
            remaining: len,
            offset: 0,
            mask: header.mask.unwrap_or_default(),
            code: [0; 2],
        };
        if len == 0 {
            if let Kind::Data { ends_message } = p.kind {
                self.empty_data = Some(ends_message);
            }
            self.complete(&p);
            Ok(true)
        } else {
            self.payload = Some(p);
            Ok(false)
        }
    }

    fn violate(&mut self, e: FrameError) {
        self.violation.get_or_insert(e);
    }

    fn complete(&mut self, p: &Payload) {
        self.frames = self.frames.saturating_add(1);
        match p.kind {
            Kind::Data { ends_message: true } => self.messages = self.messages.saturating_add(1),
            Kind::Data {
                ends_message: false,
            }
            | Kind::Other => {}
            Kind::Close => {
                self.close_seen = true;
                self.close_code = (p.offset >= 2).then(|| u16::from_be_bytes(p.code));
            }
        }
    }
}

/// Fast path for the usual case, a header that lies whole at the start of `input`: decoded
/// in place instead of through a copy and a cursor (the profile's largest per-message cost).
/// Partial headers take the general path through [`FrameHeader::parse`]; the `ws_frames`
/// fuzz target checks both against tungstenite.
fn whole_header(input: &[u8]) -> Option<(FrameHeader, u64, usize)> {
    let (&b0, &b1) = (input.first()?, input.get(1)?);
    let masked = b1 & 0x80 != 0;
    let (len, mut at) = match b1 & 0x7f {
        126 => (
            u64::from(u16::from_be_bytes(input.get(2..4)?.try_into().ok()?)),
            4,
        ),
        127 => (u64::from_be_bytes(input.get(2..10)?.try_into().ok()?), 10),
        n => (u64::from(n), 2),
    };
    let mask = if masked {
        let m: [u8; 4] = input.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(m)
    } else {
        None
    };
    let header = FrameHeader {
        is_final: b0 & 0x80 != 0,
        rsv1: b0 & 0x40 != 0,
        rsv2: b0 & 0x20 != 0,
        rsv3: b0 & 0x10 != 0,
        opcode: OpCode::from(b0 & 0x0f),
        mask,
    };
    Some((header, len, at))
}

/// Opcode of a ping frame.
pub const OPCODE_PING: u8 = 0x9;
/// Opcode of a pong frame.
pub const OPCODE_PONG: u8 = 0xA;

/// Whether a frame whose first byte is `first` is a pong.
pub fn is_pong(first: u8) -> bool {
    first & 0x0f == OPCODE_PONG
}

/// The unmasked payload of one whole masked (client) control frame, at most 125 bytes; empty
/// when `frame` is shorter than its header says.
pub fn masked_control_payload(frame: &[u8]) -> Vec<u8> {
    let (Some(&b1), Some(mask)) = (frame.get(1), frame.get(2..6)) else {
        return Vec::new();
    };
    let len = usize::from(b1 & 0x7f);
    frame
        .get(6..6 + len)
        .unwrap_or_default()
        .iter()
        .zip(mask.iter().cycle())
        .map(|(b, m)| b ^ m)
        .collect()
}

/// Encodes a close frame with `code` and no reason into `out`, masked with `mask` when given (client→server frames must be masked). Returns the length (4 unmasked, 8 masked).
pub fn encode_close(code: u16, mask: Option<[u8; 4]>, out: &mut [u8; 8]) -> usize {
    let [c0, c1] = code.to_be_bytes();
    match mask {
        None => {
            *out = [0x88, 0x02, c0, c1, 0, 0, 0, 0];
            4
        }
        Some([m0, m1, m2, m3]) => {
            *out = [0x88, 0x82, m0, m1, m2, m3, c0 ^ m0, c1 ^ m1];
            8
        }
    }
}

/// Appends a close frame with `code` and `reason` (cut to the 123 bytes a control frame
/// leaves for it, at a UTF-8 character boundary) to `out`, masked with `mask` when given.
pub fn encode_close_reason(code: u16, reason: &str, mask: Option<[u8; 4]>, out: &mut Vec<u8>) {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD as usize - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = reason.as_bytes().get(..end).unwrap_or_default();
    let len = 2 + reason.len();
    out.push(0x88);
    let payload = code.to_be_bytes().into_iter().chain(reason.iter().copied());
    match mask {
        None => {
            out.push(len as u8);
            out.extend(payload);
        }
        Some(m) => {
            out.push(0x80 | len as u8);
            out.extend_from_slice(&m);
            out.extend(payload.zip(m.iter().cycle()).map(|(b, k)| b ^ k));
        }
    }
}

/// Encodes the header of a single unfragmented frame (opcode 0x1 text, 0x2 binary, 0x9 ping, 0xA pong, 0x8 close) with payload length `len` into `out`, unmasked (server→client), returning header length.
///
/// Only the low 4 bits of `opcode` are used; the caller keeps control payloads <= 125 bytes.
pub fn encode_header(opcode: u8, len: u64, out: &mut [u8; 14]) -> usize {
    let first = 0x80 | (opcode & 0x0f);
    let [b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, ..] = out;
    *b0 = first;
    if let Ok(short @ 0..=125) = u8::try_from(len) {
        *b1 = short;
        2
    } else if let Ok(medium) = u16::try_from(len) {
        *b1 = 126;
        [*b2, *b3] = medium.to_be_bytes();
        4
    } else {
        *b1 = 127;
        [*b2, *b3, *b4, *b5, *b6, *b7, *b8, *b9] = len.to_be_bytes();
        10
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tungstenite::protocol::frame::coding::CloseCode;
    use tungstenite::protocol::frame::{CloseFrame, Frame};

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn bytes(frame: Frame) -> Vec<u8> {
        let mut out = Vec::new();
        frame.format(&mut out).unwrap();
        out
    }

    fn masked(mut frame: Frame, mask: [u8; 4]) -> Frame {
        frame.header_mut().mask = Some(mask);
        frame
    }

    fn text(s: &str, fin: bool) -> Frame {
        Frame::message(s.as_bytes().to_vec(), OpCode::Data(Data::Text), fin)
    }

    fn binary(len: usize, fin: bool) -> Frame {
        let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
        Frame::message(data, OpCode::Data(Data::Binary), fin)
    }

    fn cont(s: &str, fin: bool) -> Frame {
        Frame::message(s.as_bytes().to_vec(), OpCode::Data(Data::Continue), fin)
    }

    fn close(code: u16, reason: &'static str) -> Frame {
        Frame::close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        }))
    }

    /// Everything observable after feeding.
    #[derive(Debug, PartialEq, Eq)]
    struct Seen {
        completed: usize,
        frames: u64,
        messages: u64,
        frame_boundary: bool,
        message_boundary: bool,
        close_seen: bool,
        close_code: Option<u16>,
        released: u64,
        violation: Option<FrameError>,
    }

    fn run(dir: Direction, max: u64, parts: &[&[u8]]) -> Result<Seen, FrameError> {
        let mut t = FrameTracker::new(dir, max);
        let mut completed = 0;
        for part in parts {
            completed += t.feed(part)?;
        }
        Ok(Seen {
            completed,
            frames: t.frames(),
            messages: t.messages(),
            frame_boundary: t.at_frame_boundary(),
            message_boundary: t.at_message_boundary(),
            close_seen: t.close_seen(),
            close_code: t.close_code(),
            released: t.released(),
            violation: t.violation(),
        })
    }

    /// Whole, byte by byte and every two-way split must agree.
    fn check_splits(dir: Direction, max: u64, input: &[u8]) -> Result<Seen, FrameError> {
        let whole = run(dir, max, &[input]);
        let single: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(run(dir, max, &single), whole, "byte by byte");
        for i in 0..=input.len() {
            let (a, b) = input.split_at(i);
            assert_eq!(run(dir, max, &[a, b]), whole, "split at {i}");
        }
        whole
    }

    fn conversation(mask: Option<[u8; 4]>) -> Vec<u8> {
        let frames = [
            text("hello", true),
            binary(3, true),
            Frame::ping(b"p".to_vec()),
            Frame::pong(Vec::new()),
            text("", true),
            close(1000, "bye"),
        ];
        frames
            .into_iter()
            .flat_map(|f| bytes(if let Some(m) = mask { masked(f, m) } else { f }))
            .collect()
    }

    #[test]
    fn server_to_client_unmasked() {
        let input = conversation(None);
        let seen = check_splits(Direction::ServerToClient, 1 << 20, &input).unwrap();
        assert_eq!(
            seen,
            Seen {
                completed: 6,
                frames: 6,
                messages: 3,
                frame_boundary: true,
                message_boundary: true,
                close_seen: true,
                close_code: Some(1000),
                released: input.len() as u64,
                violation: None,
            }
        );
    }

    #[test]
    fn client_to_server_masked() {
        let input = conversation(Some(MASK));
        let seen = check_splits(Direction::ClientToServer, 1 << 20, &input).unwrap();
        assert_eq!((seen.frames, seen.messages), (6, 3));
        assert_eq!(seen.close_code, Some(1000));
    }

    #[test]
    fn fragmented_message_with_ping() {
        let parts = [
            bytes(masked(text("hel", false), MASK)),
            bytes(masked(Frame::ping(b"x".to_vec()), MASK)),
            bytes(masked(cont("lo ", false), MASK)),
            bytes(masked(cont("world", true), MASK)),
        ];
        let mut t = FrameTracker::new(Direction::ClientToServer, 1024);
        let expected_message_boundary = [false, false, false, true];
        for (part, &mb) in parts.iter().zip(&expected_message_boundary) {
            assert_eq!(t.feed(part), Ok(1));
            assert!(t.at_frame_boundary());
            assert_eq!(t.at_message_boundary(), mb);
        }
        assert_eq!((t.frames(), t.messages()), (4, 1));

        let all = parts.concat();
        let seen = check_splits(Direction::ClientToServer, 1024, &all).unwrap();
        assert_eq!((seen.frames, seen.messages), (4, 1));
    }

    #[test]
    fn boundaries_mid_frame() {
        let frame = bytes(text("hello", true));
        let mut t = FrameTracker::new(Direction::ServerToClient, 1024);
        assert!(t.at_frame_boundary() && t.at_message_boundary());
        assert_eq!(t.feed(&frame[..1]), Ok(0)); // partial header
        assert!(!t.at_frame_boundary());
        assert_eq!(t.feed(&frame[1..4]), Ok(0)); // inside payload
        assert!(!t.at_frame_boundary() && !t.at_message_boundary());
        assert_eq!(t.feed(&frame[4..]), Ok(1));
        assert!(t.at_message_boundary());
    }

    #[test]
    fn lengths_16_and_64_bit() {
        for len in [126, 300, 65535, 65536, 70_000] {
            let s2c = bytes(binary(len, true));
            let c2s = bytes(masked(binary(len, true), MASK));
            let mut t = FrameTracker::new(Direction::ServerToClient, 70_000);
            assert_eq!(t.feed(&s2c), Ok(1), "len {len}");
            let mut t = FrameTracker::new(Direction::ClientToServer, 70_000);
            assert_eq!(t.feed(&c2s), Ok(1), "len {len}");
        }
        // Every split of a 16-bit and a 64-bit frame, plus a frame after each.
        for len in [300, 70_000] {
            let input = [
                bytes(masked(binary(len, true), MASK)),
                bytes(masked(text("x", true), MASK)),
            ]
            .concat();
            let seen = check_splits(Direction::ClientToServer, 70_000, &input).unwrap();
            assert_eq!((seen.frames, seen.messages), (2, 2));
        }
    }

    #[test]
    fn max_payload_limit() {
        let at = bytes(binary(100, true));
        let over = bytes(binary(101, true));
        assert_eq!(
            run(Direction::ServerToClient, 100, &[&at]).unwrap().frames,
            1
        );
        assert_eq!(
            check_splits(Direction::ServerToClient, 100, &over),
            Err(FrameError::TooLarge)
        );
        // Rejected on the header alone, before any payload arrives.
        let mut t = FrameTracker::new(Direction::ServerToClient, 100);
        assert_eq!(t.feed(&over[..2]), Err(FrameError::TooLarge));
        // 64-bit lengths too.
        let big = bytes(binary(70_000, true));
        let mut t = FrameTracker::new(Direction::ServerToClient, 69_999);
        assert_eq!(t.feed(&big[..10]), Err(FrameError::TooLarge));
    }

    #[test]
    fn close_code_split_across_feeds() {
        let frame = bytes(masked(close(4321, "reason"), MASK));
        // Header is 6 bytes (2 + mask); the code is bytes 6 and 7.
        for i in 0..frame.len() {
            for j in i..frame.len() {
                let mut t = FrameTracker::new(Direction::ClientToServer, 1024);
                assert_eq!(t.feed(&frame[..i]), Ok(0));
                assert_eq!(t.feed(&frame[i..j]), Ok(0));
                assert!(!t.close_seen());
                assert_eq!(t.feed(&frame[j..]), Ok(1));
                assert!(t.close_seen());
                assert_eq!(t.close_code(), Some(4321), "splits {i} {j}");
            }
        }
    }

    #[test]
    fn close_without_code() {
        let empty = bytes(Frame::close(None));
        let seen = check_splits(Direction::ServerToClient, 1024, &empty).unwrap();
        assert!(seen.close_seen);
        assert_eq!(seen.close_code, None);
        // A one-byte close body is invalid (RFC 6455 §5.5.1) but carries no code either way.
        let one = [0x88, 0x01, 0x03];
        let seen = run(Direction::ServerToClient, 1024, &[&one]).unwrap();
        assert_eq!((seen.close_seen, seen.close_code), (true, None));
    }

    #[test]
    fn bytes_to_frame_end_stops_exactly_at_boundaries() {
        let mut stream = bytes(masked(binary(70_000, true), [9, 9, 9, 9]));
        stream.extend(conversation(Some([1, 2, 3, 4])));
        let mut t = FrameTracker::new(Direction::ClientToServer, u64::MAX);
        let mut rest = &stream[..];
        let mut boundaries = 0;
        while !rest.is_empty() {
            let n = (t.bytes_to_frame_end() as usize).min(rest.len());
            assert!(n > 0);
            t.feed(&rest[..n]).unwrap();
            rest = &rest[n..];
            if t.at_frame_boundary() {
                boundaries += 1;
            }
        }
        assert_eq!(
            boundaries as u64,
            t.frames(),
            "every frame end was hit exactly"
        );
    }

    #[test]
    fn feed_inspect_reassembles_masked_messages_across_splits() {
        let mut stream = bytes(masked(text("hel", false), [1, 2, 3, 4]));
        stream.extend(bytes(masked(Frame::ping(vec![9]), [5, 6, 7, 8])));
        stream.extend(bytes(masked(cont("lo world", true), [9, 8, 7, 6])));
        stream.extend(bytes(masked(binary(0, true), [1, 1, 1, 1])));
        for cut in 0..stream.len() {
            let mut t = FrameTracker::new(Direction::ClientToServer, u64::MAX);
            let mut msg = Vec::new();
            let mut done = Vec::new();
            for part in [&stream[..cut], &stream[cut..]] {
                t.feed_inspect(part, |p| {
                    p.unmask_into(&mut msg);
                    if p.message_end {
                        done.push((p.opcode, std::mem::take(&mut msg)));
                    }
                })
                .unwrap();
            }
            assert_eq!(
                done,
                [(1, b"hello world".to_vec()), (2, vec![])],
                "cut {cut}"
            );
        }
    }

    #[test]
    fn rsv_bits_pass_through() {
        let mut f = text("compressed", true);
        f.header_mut().rsv1 = true;
        let seen = check_splits(Direction::ServerToClient, 1024, &bytes(f)).unwrap();
        assert_eq!(seen.messages, 1);
    }

    fn expect_err(dir: Direction, max: u64, input: &[u8], err: FrameError) {
        assert_eq!(check_splits(dir, max, input), Err(err));
        let mut t = FrameTracker::new(dir, max);
        assert_eq!(t.feed(input), Err(err));
        // The error sticks, even for input that would be fine on its own.
        assert_eq!(t.feed(&bytes(text("ok", true))), Err(err));
        assert_eq!(t.error(), Some(err));
        assert!(!t.at_frame_boundary());
    }

    /// A broken rule the endpoints decide on: the frame is relayed whole (released), the
    /// violation is noted, every split agrees, and no message boundary is offered after it.
    fn expect_violation(dir: Direction, input: &[u8], v: FrameError, frames: u64) {
        let seen = check_splits(dir, 1024, input).unwrap();
        assert_eq!(seen.frames, frames);
        assert!(seen.frame_boundary && !seen.message_boundary);
        let mut t = FrameTracker::new(dir, 1024);
        assert_eq!(t.feed(input), Ok(frames as usize));
        assert_eq!((t.violation(), t.error()), (Some(v), None));
        assert_eq!(t.released(), input.len() as u64);
    }

    #[test]
    fn violation_masking() {
        use Direction::*;
        let unmasked = bytes(text("a", true));
        expect_violation(ClientToServer, &unmasked, FrameError::Masking, 1);
        let masked_frame = bytes(masked(text("a", true), MASK));
        expect_violation(ServerToClient, &masked_frame, FrameError::Masking, 1);
    }

    #[test]
    fn violation_reserved_opcode_is_relayed_with_what_follows() {
        for op in [3u8, 7, 0xb, 0xf] {
            let input = [vec![0x80 | op, 0x01, 0x55], bytes(text("x", true))].concat();
            expect_violation(
                Direction::ServerToClient,
                &input,
                FrameError::ReservedOpcode,
                2,
            );
            // A 16-bit length and a mask, split anywhere (the general header path).
            let mut long = vec![0x80 | op, 0xfe, 0, 200, 1, 2, 3, 4];
            long.extend(std::iter::repeat_n(7u8, 200));
            expect_violation(
                Direction::ClientToServer,
                &long,
                FrameError::ReservedOpcode,
                1,
            );
        }
    }

    #[test]
    fn violation_control_too_long() {
        let ping = bytes(Frame::ping(vec![0u8; 126]));
        expect_violation(
            Direction::ServerToClient,
            &ping,
            FrameError::ControlTooLong,
            1,
        );
        let ok = bytes(Frame::ping(vec![0u8; 125]));
        let mut t = FrameTracker::new(Direction::ServerToClient, 1024);
        assert_eq!(t.feed(&ok), Ok(1));
        assert_eq!(t.violation(), None);
    }

    #[test]
    fn violation_fragmented_control() {
        let mut ping = Frame::ping(b"x".to_vec());
        ping.header_mut().is_final = false;
        expect_violation(
            Direction::ServerToClient,
            &bytes(ping),
            FrameError::FragmentedControl,
            1,
        );
    }

    #[test]
    fn violation_continuation_order() {
        expect_violation(
            Direction::ServerToClient,
            &bytes(cont("x", true)),
            FrameError::UnexpectedContinuation,
            1,
        );
        let after_complete = [bytes(text("a", true)), bytes(cont("b", true))].concat();
        expect_violation(
            Direction::ServerToClient,
            &after_complete,
            FrameError::UnexpectedContinuation,
            2,
        );
        let input = [bytes(text("a", false)), bytes(binary(1, true))].concat();
        expect_violation(
            Direction::ServerToClient,
            &input,
            FrameError::ExpectedContinuation,
            2,
        );
    }

    #[test]
    fn bytes_after_close_are_ignored_not_released() {
        let close_frame = bytes(close(1000, ""));
        for late in [
            bytes(text("late", true)),
            bytes(Frame::ping(Vec::new())),
            bytes(close(1001, "")),
            bytes(text("frag", false)),
        ] {
            let input = [close_frame.clone(), late.clone()].concat();
            let seen = check_splits(Direction::ServerToClient, 1024, &input).unwrap();
            assert_eq!((seen.frames, seen.close_code), (1, Some(1000)));
            let mut t = FrameTracker::new(Direction::ServerToClient, 1024);
            assert_eq!(t.feed(&input), Ok(1));
            assert_eq!(t.released(), close_frame.len() as u64);
            assert_eq!(t.ignored(), late.len() as u64);
            assert_eq!(t.error(), None);
        }
    }

    #[test]
    fn partial_headers_are_held_until_whole() {
        let frame = bytes(masked(binary(300, true), MASK)); // 2 + 2 + 4 header bytes
        let mut t = FrameTracker::new(Direction::ClientToServer, 1024);
        assert_eq!(t.feed(&frame[..3]), Ok(0));
        assert_eq!((t.released(), t.held_header()), (0, &frame[..3]));
        assert_eq!(t.feed(&frame[3..10]), Ok(0));
        assert_eq!((t.released(), t.held_header()), (10, &[][..]));
        // A header that fails is never released, though its first bytes were fed earlier.
        let over = bytes(masked(binary(2000, true), MASK));
        let input = [frame.clone(), over].concat();
        let mut t = FrameTracker::new(Direction::ClientToServer, 1024);
        assert_eq!(t.feed(&input[..frame.len() + 2]), Ok(1));
        assert_eq!(t.feed(&input[frame.len() + 2..]), Err(FrameError::TooLarge));
        assert_eq!(t.released(), frame.len() as u64);
    }

    #[test]
    fn error_bad_header_length_top_bit() {
        let input = [0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 1];
        expect_err(
            Direction::ServerToClient,
            u64::MAX,
            &input,
            FrameError::BadHeader,
        );
    }

    #[test]
    fn error_mapping() {
        assert_eq!(FrameError::TooLarge.close_code(), 1009);
        assert_eq!(FrameError::Masking.close_code(), 1002);
        assert_eq!(FrameError::BadHeader.close_code(), 1002);
        assert_eq!(FrameError::ReservedOpcode.to_string(), "reserved opcode");
        let e: &dyn std::error::Error = &FrameError::TooLarge;
        assert_eq!(e.to_string(), "frame too large");
    }

    fn parse(buf: &[u8]) -> (FrameHeader, u64, u64) {
        let mut cursor = Cursor::new(buf);
        let (h, len) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
        (h, len, cursor.position())
    }

    #[test]
    fn encode_close_round_trip() {
        let mut out = [0u8; 8];
        assert_eq!(encode_close(1001, None, &mut out), 4);
        let (h, len, pos) = parse(&out[..4]);
        assert_eq!(
            (h.opcode, h.is_final, h.mask, len, pos),
            (OpCode::Control(Control::Close), true, None, 2, 2)
        );
        assert_eq!(&out[2..4], &1001u16.to_be_bytes());
        let seen = run(Direction::ServerToClient, 1024, &[&out[..4]]).unwrap();
        assert_eq!(seen.close_code, Some(1001));

        assert_eq!(encode_close(1009, Some(MASK), &mut out), 8);
        let (h, len, pos) = parse(&out);
        assert_eq!(
            (h.opcode, h.mask, len, pos),
            (OpCode::Control(Control::Close), Some(MASK), 2, 6)
        );
        assert_eq!(out.to_vec(), bytes(masked(close(1009, ""), MASK)));
        let seen = check_splits(Direction::ClientToServer, 1024, &out).unwrap();
        assert_eq!(seen.close_code, Some(1009));
    }

    #[test]
    fn encode_close_reason_round_trip() {
        for mask in [None, Some(MASK)] {
            for reason in ["", "backend went away", &"é".repeat(70)] {
                let mut out = Vec::new();
                encode_close_reason(1001, reason, mask, &mut out);
                let (h, len, pos) = parse(&out);
                assert_eq!((h.opcode, h.mask), (OpCode::Control(Control::Close), mask));
                let payload: Vec<u8> = out[pos as usize..]
                    .iter()
                    .zip(mask.unwrap_or_default().iter().cycle())
                    .map(|(b, k)| b ^ k)
                    .collect();
                assert_eq!(payload.len() as u64, len);
                assert!(len <= 125);
                assert_eq!(&payload[..2], &1001u16.to_be_bytes());
                let got = std::str::from_utf8(&payload[2..]).unwrap();
                assert!(reason.starts_with(got));
                let dir = if mask.is_some() {
                    Direction::ClientToServer
                } else {
                    Direction::ServerToClient
                };
                let seen = check_splits(dir, 1024, &out).unwrap();
                assert_eq!((seen.close_code, seen.violation), (Some(1001), None));
            }
        }
    }

    #[test]
    fn encode_header_round_trip() {
        let cases = [
            (0x1, 0u64, 2),
            (0x2, 125, 2),
            (0x2, 126, 4),
            (0x1, 65535, 4),
            (0x2, 65536, 10),
            (0x2, 1 << 40, 10),
            (0x9, 5, 2),
            (0xa, 0, 2),
            (0x8, 2, 2),
        ];
        for (opcode, len, header_len) in cases {
            let mut out = [0u8; 14];
            assert_eq!(encode_header(opcode, len, &mut out), header_len);
            let (h, parsed_len, pos) = parse(&out[..header_len]);
            assert_eq!(u8::from(h.opcode), opcode);
            assert!(h.is_final && !h.rsv1 && h.mask.is_none());
            assert_eq!((parsed_len, pos), (len, header_len as u64));
            let mut expected = Vec::new();
            FrameHeader {
                opcode: OpCode::from(opcode),
                ..FrameHeader::default()
            }
            .format(len, &mut expected)
            .unwrap();
            assert_eq!(&out[..header_len], expected.as_slice());
        }
    }

    #[test]
    fn never_panics_and_splits_agree_on_noise() {
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..5_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 40) as usize;
            let input: Vec<u8> = (0..len)
                .map(|i| (seed.rotate_left(i as u32 * 7) & 0xff) as u8)
                .collect();
            for dir in [Direction::ClientToServer, Direction::ServerToClient] {
                let whole = run(dir, 64, &[&input]);
                let single: Vec<&[u8]> = input.chunks(1).collect();
                assert_eq!(run(dir, 64, &single), whole);
            }
        }
    }

    #[test]
    fn pong_bits_live_here() {
        let mut frame = vec![0x80 | OPCODE_PONG, 0x80 | 4, 1, 2, 3, 4];
        frame.extend(b"wslb".iter().zip([1u8, 2, 3, 4]).map(|(b, m)| b ^ m));
        assert!(is_pong(frame[0]));
        assert!(!is_pong(0x80 | OPCODE_PING));
        assert_eq!(masked_control_payload(&frame), b"wslb");
        // Shorter than its header says: nothing, never a panic.
        assert!(masked_control_payload(&frame[..3]).is_empty());
        assert!(masked_control_payload(&frame[..8]).len() <= 2);
    }
}
