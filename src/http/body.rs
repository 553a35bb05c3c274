//! HTTP/1.1 message body framing (RFC 9112 §6, §7.1).
//!
//! The balancer forwards body bytes unchanged; [`BodyReader`] only finds where a body ends so
//! the next message on the connection starts at the right byte. Chunked framing is checked
//! strictly and rejected rather than repaired: when two parsers disagree on where a body ends,
//! the leftover bytes become a smuggled request.
//!
//! The reader holds a few counters and no bytes, sees every byte at most once and never
//! allocates, so a peer cannot make it buffer or backtrack.

use std::fmt;

/// Largest chunk extension (from `;` to the end of the line) accepted on one chunk-size line.
pub const MAX_EXTENSION_LEN: usize = 4096;

/// Largest trailer section (every trailer line plus the final empty line) accepted.
pub const MAX_TRAILER_LEN: usize = 16 * 1024;

/// More hex digits than this cannot fit a `u64`; leading zeros count too, so the line length
/// before any extension stays bounded.
const MAX_SIZE_DIGITS: u8 = 16;

/// Largest chunk size accepted: 2^63 - 1. Backends that keep sizes in a signed 64-bit
/// integer (or add to one) overflow on anything larger, so such a size is refused before
/// any byte of its line is forwarded.
const MAX_CHUNK_SIZE: u64 = i64::MAX as u64;

/// Longest chunk-size line (digits, extension, CRLF): the most a reader holds back
/// unconsumed while the line is incomplete.
pub const MAX_SIZE_LINE: usize = MAX_SIZE_DIGITS as usize + MAX_EXTENSION_LEN + 2;

/// Why a body was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// The chunk-size line is not `1*HEXDIG [ ";" ext ] CRLF` (sign, `0x`, whitespace, bad
    /// extension byte, no digits).
    ChunkSize,
    /// The chunk size has more than 16 hex digits or is 2^63 or more.
    ChunkSizeOverflow,
    /// A line ends in a bare LF, or a CR is not followed by LF.
    LineEnding,
    /// Chunk data is not followed by CRLF.
    ChunkDataEnd,
    /// A chunk extension is longer than [`MAX_EXTENSION_LEN`].
    ExtensionTooLong,
    /// The trailer section is longer than [`MAX_TRAILER_LEN`].
    TrailerTooLarge,
    /// A trailer line is not `token ":" value` (obs-fold, empty name, control bytes).
    TrailerMalformed,
}

impl BodyError {
    fn as_str(self) -> &'static str {
        match self {
            BodyError::ChunkSize => "invalid chunk size line",
            BodyError::ChunkSizeOverflow => "chunk size too large",
            BodyError::LineEnding => "invalid line ending",
            BodyError::ChunkDataEnd => "chunk data not followed by crlf",
            BodyError::ExtensionTooLong => "chunk extension too long",
            BodyError::TrailerTooLarge => "trailer section too large",
            BodyError::TrailerMalformed => "malformed trailer field",
        }
    }
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for BodyError {}

/// Result of feeding bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyProgress {
    /// Bytes of the input that belong to this body.
    pub consumed: usize,
    /// The body ended exactly at `consumed`.
    pub done: bool,
}

/// How a message body is delimited (decided from the head by the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// No body (e.g. GET without framing headers, 204, 304, responses to HEAD).
    Empty,
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// A response delimited by the connection closing.
    UntilClose,
}

/// Where the chunked decoder is; each phase knows exactly which bytes may come next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Hex digits of a chunk size (none seen yet when `digits == 0`); the start of a
    /// chunk-size line.
    Size,
    /// After `;` on a chunk-size line, until CR.
    Extension,
    /// CR of a chunk-size line seen, LF must follow.
    SizeLf,
    /// Skipping `remaining` bytes of chunk data.
    Data,
    /// Chunk data ended, CR must follow.
    DataCr,
    /// CR after chunk data seen, LF must follow.
    DataLf,
    /// First byte of a trailer line, or CR of the empty line ending the message.
    TrailerStart,
    /// Inside a trailer field name, until `:`.
    TrailerName,
    /// Inside a trailer field value, until CR.
    TrailerValue,
    /// CR of a trailer line seen, LF must follow.
    TrailerLf,
    /// CR of the final empty line seen, LF must follow.
    EndLf,
}

impl Phase {
    /// Inside a chunk-size line (`size [; ext] CRLF`), which is forwarded only whole.
    fn in_size_line(self) -> bool {
        matches!(self, Phase::Size | Phase::Extension | Phase::SizeLf)
    }
}

/// Counters for one chunked body; no bytes are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Chunked {
    phase: Phase,
    /// Chunk size being parsed, then data bytes still to skip.
    remaining: u64,
    /// Hex digits seen on the current chunk-size line.
    digits: u8,
    /// Extension bytes on the current chunk-size line.
    ext_len: usize,
    /// Bytes of the trailer section so far.
    trailer_len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
    Done,
    Failed(BodyError),
}

/// Streaming body tracker for one message. `feed` may be called with arbitrary splits of the input.
#[derive(Debug, Clone)]
pub struct BodyReader {
    state: State,
    payload: u64,
}

impl BodyReader {
    /// Starts tracking a body delimited as `kind`.
    pub fn new(kind: BodyKind) -> Self {
        let state = match kind {
            BodyKind::Empty | BodyKind::Length(0) => State::Done,
            BodyKind::Length(n) => State::Length(n),
            BodyKind::Chunked => State::Chunked(Chunked {
                phase: Phase::Size,
                remaining: 0,
                digits: 0,
                ext_len: 0,
                trailer_len: 0,
            }),
            BodyKind::UntilClose => State::UntilClose,
        };
        BodyReader { state, payload: 0 }
    }

    /// Consumes a prefix of `input` that belongs to this body. `done` = the body ended exactly at
    /// `consumed` (bytes after it belong to the next message and are NOT consumed).
    /// Chunked: an incomplete chunk-size line at the end of `input` (at most
    /// [`MAX_SIZE_LINE`] bytes) is not consumed, so the caller forwards a size line only
    /// once it is whole and valid; feed those bytes again with what follows them.
    /// `Empty`: done immediately with consumed 0. `Length(n)`: consumes up to the remaining count.
    /// `UntilClose`: consumes everything, never done (caller ends it at EOF).
    ///
    /// After an error the reader keeps returning that error: the connection cannot be resynced.
    pub fn feed(&mut self, input: &[u8]) -> Result<BodyProgress, BodyError> {
        match &mut self.state {
            State::Done => Ok(BodyProgress {
                consumed: 0,
                done: true,
            }),
            State::Failed(e) => Err(*e),
            State::UntilClose => {
                self.payload = self.payload.saturating_add(input.len() as u64);
                Ok(BodyProgress {
                    consumed: input.len(),
                    done: false,
                })
            }
            State::Length(remaining) => {
                let take = take_len(*remaining, input.len());
                *remaining -= take as u64;
                self.payload = self.payload.saturating_add(take as u64);
                let done = *remaining == 0;
                if done {
                    self.state = State::Done;
                }
                Ok(BodyProgress {
                    consumed: take,
                    done,
                })
            }
            State::Chunked(c) => match c.feed(input, &mut self.payload) {
                Ok((consumed, done)) => {
                    if done {
                        self.state = State::Done;
                    }
                    Ok(BodyProgress { consumed, done })
                }
                Err(e) => {
                    self.state = State::Failed(e);
                    Err(e)
                }
            },
        }
    }

    /// The whole body has been seen.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Payload bytes seen so far (chunk data only for chunked).
    pub fn payload_bytes(&self) -> u64 {
        self.payload
    }

    /// The body ends only when the sender closes the connection.
    pub fn is_until_close(&self) -> bool {
        matches!(self.state, State::UntilClose)
    }
}

/// `min(remaining, available)` without a lossy cast either way.
fn take_len(remaining: u64, available: usize) -> usize {
    usize::try_from(remaining).map_or(available, |r| r.min(available))
}

impl Chunked {
    /// Returns `(consumed, done)`; stops right after the final CRLF.
    fn feed(&mut self, input: &[u8], payload: &mut u64) -> Result<(usize, bool), BodyError> {
        let mut pos = 0;
        // Where the chunk-size line being read began in `input`: an incomplete line is given
        // back (not consumed), so a size no backend could handle never leaves in part.
        let mut line_start = self.phase.in_size_line().then_some(0);
        while let Some(rest) = input.get(pos..) {
            if self.phase == Phase::Data {
                // Chunk data is skipped in bulk: it is the bulk of the traffic.
                let take = take_len(self.remaining, rest.len());
                pos += take;
                self.remaining -= take as u64;
                *payload = payload.saturating_add(take as u64);
                if self.remaining == 0 {
                    self.phase = Phase::DataCr;
                }
                if take == 0 {
                    break;
                }
                continue;
            }
            let Some(&b) = rest.first() else { break };
            pos += 1;
            if self.step(b)? {
                return Ok((pos, true));
            }
            if !self.phase.in_size_line() {
                line_start = None;
            } else if line_start.is_none() {
                line_start = Some(pos);
            }
        }
        if let Some(start) = line_start {
            self.phase = Phase::Size;
            self.digits = 0;
            self.ext_len = 0;
            self.remaining = 0;
            return Ok((start, false));
        }
        Ok((pos, false))
    }

    /// Advances over one byte outside chunk data; `true` once the message has ended.
    fn step(&mut self, b: u8) -> Result<bool, BodyError> {
        match self.phase {
            Phase::Size => match b {
                b';' | b'\r' if self.digits == 0 => return Err(BodyError::ChunkSize),
                b';' => {
                    self.ext_len = 1;
                    self.phase = Phase::Extension;
                }
                b'\r' => self.phase = Phase::SizeLf,
                b'\n' if self.digits > 0 => return Err(BodyError::LineEnding),
                _ => {
                    let digit = hex_value(b).ok_or(BodyError::ChunkSize)?;
                    if self.digits >= MAX_SIZE_DIGITS {
                        return Err(BodyError::ChunkSizeOverflow);
                    }
                    self.digits += 1;
                    self.remaining = self
                        .remaining
                        .checked_mul(16)
                        .and_then(|v| v.checked_add(u64::from(digit)))
                        .filter(|&v| v <= MAX_CHUNK_SIZE)
                        .ok_or(BodyError::ChunkSizeOverflow)?;
                }
            },
            Phase::Extension => match b {
                b'\r' => self.phase = Phase::SizeLf,
                b'\n' => return Err(BodyError::LineEnding),
                _ => {
                    self.ext_len += 1;
                    if self.ext_len > MAX_EXTENSION_LEN {
                        return Err(BodyError::ExtensionTooLong);
                    }
                    // Extensions are ignored but forwarded, so they must not carry bytes
                    // another parser could read as a line break or string end.
                    if !(is_visible_ascii(b) || b == b' ' || b == b'\t') {
                        return Err(BodyError::ChunkSize);
                    }
                }
            },
            Phase::SizeLf => {
                if b != b'\n' {
                    return Err(BodyError::LineEnding);
                }
                self.digits = 0;
                self.ext_len = 0;
                self.phase = if self.remaining == 0 {
                    Phase::TrailerStart
                } else {
                    Phase::Data
                };
            }
            // Unreachable through `feed`, which skips data in bulk; kept total for safety.
            Phase::Data => return Err(BodyError::ChunkDataEnd),
            Phase::DataCr => {
                if b != b'\r' {
                    return Err(BodyError::ChunkDataEnd);
                }
                self.phase = Phase::DataLf;
            }
            Phase::DataLf => {
                if b != b'\n' {
                    return Err(BodyError::ChunkDataEnd);
                }
                self.phase = Phase::Size;
            }
            Phase::TrailerStart
            | Phase::TrailerName
            | Phase::TrailerValue
            | Phase::TrailerLf
            | Phase::EndLf => return self.trailer_step(b),
        }
        Ok(false)
    }

    fn trailer_step(&mut self, b: u8) -> Result<bool, BodyError> {
        self.trailer_len += 1;
        if self.trailer_len > MAX_TRAILER_LEN {
            return Err(BodyError::TrailerTooLarge);
        }
        match self.phase {
            Phase::TrailerStart => match b {
                b'\r' => self.phase = Phase::EndLf,
                b'\n' => return Err(BodyError::LineEnding),
                // A leading SP/HTAB would be obs-fold (RFC 9112 §5.2): rejected like any non-token.
                _ if is_tchar(b) => self.phase = Phase::TrailerName,
                _ => return Err(BodyError::TrailerMalformed),
            },
            Phase::TrailerName => match b {
                b':' => self.phase = Phase::TrailerValue,
                b'\n' => return Err(BodyError::LineEnding),
                // Whitespace before the colon must be rejected (RFC 9112 §5.1).
                _ if is_tchar(b) => {}
                _ => return Err(BodyError::TrailerMalformed),
            },
            Phase::TrailerValue => match b {
                b'\r' => self.phase = Phase::TrailerLf,
                b'\n' => return Err(BodyError::LineEnding),
                b'\t' | b' ' | 0x80..=0xff => {}
                _ if is_visible_ascii(b) => {}
                _ => return Err(BodyError::TrailerMalformed),
            },
            Phase::TrailerLf => {
                if b != b'\n' {
                    return Err(BodyError::LineEnding);
                }
                self.phase = Phase::TrailerStart;
            }
            Phase::EndLf => {
                if b != b'\n' {
                    return Err(BodyError::LineEnding);
                }
                return Ok(true);
            }
            Phase::Size
            | Phase::Extension
            | Phase::SizeLf
            | Phase::Data
            | Phase::DataCr
            | Phase::DataLf => return Err(BodyError::TrailerMalformed),
        }
        Ok(false)
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_visible_ascii(b: u8) -> bool {
    (0x21..=0x7e).contains(&b)
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
        )
}

#[cfg(test)]
mod tests;
