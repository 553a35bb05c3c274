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
mod tests;
